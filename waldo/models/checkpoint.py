"""Model checkpoints: a folder with ``config.json`` and ``model.safetensors`` (never pickle).

The config records everything needed to rebuild the model and to preprocess images the way it
expects; the weights hash identifies the exact model, so an index can refuse queries from another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from waldo.fsutil import atomic_write_bytes, atomic_write_text
from waldo.models.backbones import create_backbone
from waldo.models.descriptor import DescriptorModel

FORMAT_VERSION = 1


class ModelConfig(BaseModel):
    """How a descriptor model was built. Saved as ``config.json`` beside the weights.

    Validated on construction, on assignment and on load: an unknown key (a typo, or a file
    from another program) or a value of the wrong type is a ``ValidationError`` naming it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: str = "efficientnet_lite0"
    dim: int = Field(128, ge=1)
    image_size: int = Field(224, ge=1)
    transform: str = "resize256-crop224"
    weights_source: str = "imagenet"  # where the backbone weights came from (recorded, not reloaded)
    projection: str = "random"  # "random" | "pca:<what it was fitted on>" | "trained"
    #: how the feature map is pooled into the global descriptor (waldo.models.pooling); older
    #: configs have no key and mean "avg"
    pooling: str = "avg"
    #: width of the global descriptor when it differs from ``dim`` (the locals' width); None = dim
    global_dim: int | None = Field(None, ge=1)
    #: extra image scales of a multi-scale global descriptor (factors of image_size, e.g.
    #: [0.75, 1.25]; DescriptorModel.multiscale_global); older configs have no key: single scale
    global_scales: list[float] = Field(default_factory=list)
    #: the backbone stage (an index into Backbone.stages()) whose output map the locals project,
    #: finer than the last (e.g. 4: EfficientNet-Lite's stride-16 stage); None, and older configs
    #: without the key: the last map, as the reference
    local_stage: int | None = Field(None, ge=0)
    #: a backbone stage whose cells are stored after the locals, ``match_dim`` wide, for the
    #: local-match reranker beside an RRT's tokens (DescriptorModel.match_stage); None: none
    match_stage: int | None = Field(None, ge=0)
    match_dim: int | None = Field(None, ge=1)
    #: > 0: the global descriptor carries the input's colour signature at this weight
    #: (DescriptorModel.with_colour); older configs have no key: no colour
    colour_weight: float = Field(0.0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, spec: str) -> str:
        from waldo.models.pooling import validate_pooling

        return validate_pooling(spec)

    @field_validator("global_scales")
    @classmethod
    def _sane_scales(cls, scales: list[float]) -> list[float]:
        return check_global_scales(scales)

    @property
    def global_width(self) -> int:
        """The global projection's width (``global_dim``, or ``dim`` when not set)."""
        return self.global_dim or self.dim

    @property
    def descriptor_width(self) -> int:
        """The stored global descriptor's width: :attr:`global_width`, plus the colour
        signature's for a model with ``colour_weight`` (DescriptorModel.descriptor_width)."""
        from waldo.models.colour import SIGNATURE_DIM

        return self.global_width + (SIGNATURE_DIM if self.colour_weight else 0)

    @field_validator("format_version")
    @classmethod
    def _readable_format(cls, version: int) -> int:
        if version > FORMAT_VERSION:
            raise ValueError(f"model format {version} is newer than this Waldo supports ({FORMAT_VERSION}); "
                             f"upgrade Waldo")
        return version


def check_global_scales(scales: list[float]) -> list[float]:
    """``scales`` if they are factors of the image size in [0.25, 4], none of them 1 or repeated;
    else ValueError (ModelConfig's check, and ``--global-scales``')."""
    for factor in scales:
        if not 0.25 <= factor <= 4 or factor == 1:
            raise ValueError(f"global scales are factors of the image size in [0.25, 4] other than 1, got {factor:g}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"global scales repeat: {scales}")
    return scales


def model_hash(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes), in name order.
    ``exclude``: name prefixes left out (e.g. ``("global_proj.",)``: what a Reranking
    Transformer reads, the backbone and the locals, without the global head)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if exclude and name.startswith(exclude):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    pooling = getattr(model, "pooling", "avg")
    if pooling != "avg":  # avg and max have the same weights; avg adds nothing (old hashes hold)
        digest.update(f"pooling|{pooling}|".encode())
    scales = getattr(model, "global_scales", ())
    if scales:  # same weights, other descriptors; single scale adds nothing (old hashes hold)
        digest.update(f"global_scales|{list(scales)}|".encode())
    stage = getattr(model, "local_stage", None)
    if stage is not None:  # which map the locals read; the last adds nothing (old hashes hold)
        digest.update(f"local_stage|{stage}|".encode())
    colour = getattr(model, "colour_weight", 0.0)
    if colour:  # same weights, other global descriptors; no colour adds nothing (old hashes hold)
        digest.update(f"colour_weight|{colour!r}|".encode())
    return digest.hexdigest()


def save_model(model: DescriptorModel, config: ModelConfig, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (each atomically)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", config_json(config))
    return folder


def config_json(config: ModelConfig) -> str:
    """``config.json``'s text. Sorted keys, no trailing newline, and the keys added later only
    when they differ from what their absence means: a model without them is byte for byte what
    earlier versions wrote (and earlier versions can still read it)."""
    data = config.model_dump()
    for key, absent in (("pooling", "avg"), ("global_dim", None), ("global_scales", []), ("local_stage", None),
                          ("match_stage", None), ("match_dim", None), ("colour_weight", 0.0)):
        if data[key] == absent:
            del data[key]
    return json.dumps(data, indent=2, sort_keys=True)


def without_match_cells(model: DescriptorModel, config: ModelConfig) -> tuple[DescriptorModel, ModelConfig]:
    """``model`` and ``config`` with any match cells dropped (the model in place): what training
    reads, so that an index's model folder (which may add match cells, ``index build
    --local-stage``) trains an RRT on its locals alone."""
    if model.match_stage is None:
        return model, config
    model.match_stage = None
    del model.match_proj
    extra = {key: value for key, value in config.extra.items() if key != "match_cells"}
    return model, config.model_copy(update={"match_stage": None, "match_dim": None, "extra": extra})


def build_model(config: ModelConfig, pretrained: bool = True) -> DescriptorModel:
    """A fresh descriptor model for ``config`` (ImageNet backbone weights when ``pretrained``)."""
    return DescriptorModel(create_backbone(config.backbone, pretrained=pretrained), dim=config.dim,
                           pooling=config.pooling, global_dim=config.global_dim,
                           global_scales=tuple(config.global_scales), local_stage=config.local_stage,
                           match_stage=config.match_stage, match_dim=config.match_dim or 64,
                           colour_weight=config.colour_weight)


def _with_package_backbone(state: dict[str, torch.Tensor], config: ModelConfig, weights_path: Path) -> dict:
    """A head-only weights file (see waldo.models.shipped): the backbone comes from its weights
    package, which must be the very file the heads were trained on (its recorded hash)."""
    from waldo.models.backbones import create_backbone

    recorded = config.extra["backbone_weights"]
    backbone = create_backbone(config.backbone, pretrained=True)
    if backbone.weights_source != recorded.get("weights_source"):
        raise ValueError(f"{weights_path} holds heads trained on backbone weights {recorded.get('weights_source')}, "
                         f"but the installed {config.backbone} weights are {backbone.weights_source}")
    full = {f"backbone.{name}": tensor for name, tensor in backbone.state_dict().items()}
    return {**full, **{name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}}


#: the tensors a shipped model may take from another shipped model (``extra["global_head_weights"]``)
SHARED_GLOBAL_HEAD = ("global_proj.weight", "global_proj.bias")


def tensors_digest(state: dict[str, torch.Tensor], names: tuple[str, ...] = SHARED_GLOBAL_HEAD) -> str | None:
    """sha256 over ``names``' float16 bytes: what identifies a shared global head (None when
    ``state`` lacks one of them)."""
    if any(name not in state for name in names):
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(state[name].detach().half().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _with_shared_global_head(state: dict[str, torch.Tensor], config: ModelConfig, weights_path: Path) -> dict:
    """A shipped model whose global head is another shipped model's (waldo.rerank.rrt_checkpoint.
    export_head_only ``share_global_from``): the same 512-d learned whitening ships once. The donor
    must still hold the very tensors recorded at export (their digest)."""
    from safetensors.torch import load_file

    from waldo.models.shipped import SHIPPED_DIR

    recorded = config.extra["global_head_weights"]
    donor_file = SHIPPED_DIR / str(recorded.get("shipped")) / "model.safetensors"
    if not donor_file.is_file():
        raise FileNotFoundError(f"{weights_path} takes its global head from the shipped model "
                                f"{recorded.get('shipped')!r}, which this installation lacks")
    donor = load_file(str(donor_file))
    digest = tensors_digest(donor)
    if digest is None or digest != recorded.get("sha256"):
        raise ValueError(f"{weights_path} takes its global head from {recorded.get('shipped')!r}, whose global "
                         "head is no longer the one it was exported with")
    return {**state, **{name: donor[name].float() for name in SHARED_GLOBAL_HEAD}}


def load_model(folder: str | Path) -> tuple[DescriptorModel, ModelConfig]:
    """Rebuild a model saved by :func:`save_model`. Every tensor comes from the safetensors file
    (or, for a head-only file with ``extra["backbone_weights"]``, the backbone from its
    installed weights package, checked against the recorded hash); a missing or mismatched
    tensor is an error, not a silent random init."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        from waldo.models.shipped import is_trained_backbone

        if is_trained_backbone(folder):  # waldo.models.shipped.export_trained_backbone
            raise FileNotFoundError(f"{folder} is a trained backbone, not a model: index with it through "
                                    f"--backbone-from {folder.name} (Python: backbone_from=...)")
        raise FileNotFoundError(f"{folder} is not a Waldo model folder (needs config.json and "
                                f"model.safetensors)")
    try:
        config = ModelConfig.model_validate_json(config_path.read_text())
    except ValidationError as error:
        raise ValueError(f"{config_path}: {error}") from None
    import warnings

    with warnings.catch_warnings():  # random init is overwritten right below
        warnings.simplefilter("ignore")
        model = build_model(config, pretrained=False)
    state = load_file(str(weights_path))
    head_only = not any(name.startswith("backbone.") for name in state) and "backbone_weights" in config.extra
    if head_only:
        state = _with_package_backbone(state, config, weights_path)
        if "global_head_weights" in config.extra:
            state = _with_shared_global_head(state, config, weights_path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not match a {config.backbone} model with "
                         f"dim {config.dim}, global dim {config.global_width}, pooling {config.pooling}: "
                         f"{error}") from error
    if head_only:
        model.backbone.weights_source = config.extra["backbone_weights"]["weights_source"]
    model.eval()
    return model, config
