"""Model checkpoints: a folder with ``config.json`` and ``model.safetensors`` (never pickle).

The config records everything needed to rebuild the model and to preprocess images the way it
expects; the weights hash identifies the exact model, so an index can refuse queries from another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from waldo.fsutil import atomic_write_bytes as _atomic_write_bytes
from waldo.models.backbones import create_backbone
from waldo.models.descriptor import DescriptorModel

FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """How a descriptor model was built. Saved as ``config.json`` beside the weights."""

    backbone: str = "efficientnet_lite0"
    dim: int = 128
    image_size: int = 224
    transform: str = "resize256-crop224"
    weights_source: str = "imagenet"  # where the backbone weights came from (recorded, not reloaded)
    projection: str = "random"  # "random" | "pca:<what it was fitted on>" | "trained"
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"model format {data['format_version']} is newer than this Waldo "
                             f"supports ({FORMAT_VERSION}); upgrade Waldo")
        return cls(**data)


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def save_model(model: DescriptorModel, config: ModelConfig, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (each atomically)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _atomic_write_bytes(folder / "model.safetensors", save(state, metadata={"format": "pt"}))
    _atomic_write_bytes(folder / "config.json", config.to_json().encode())
    return folder


def build_model(config: ModelConfig, pretrained: bool = True) -> DescriptorModel:
    """A fresh descriptor model for ``config`` (ImageNet backbone weights when ``pretrained``)."""
    return DescriptorModel(create_backbone(config.backbone, pretrained=pretrained), dim=config.dim)


def load_model(folder: str | Path) -> tuple[DescriptorModel, ModelConfig]:
    """Rebuild a model saved by :func:`save_model`. Every tensor comes from the safetensors file;
    a missing or mismatched tensor is an error, not a silent random init."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} is not a Waldo model folder (needs config.json and "
                                f"model.safetensors)")
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    import warnings

    with warnings.catch_warnings():  # random init is overwritten right below
        warnings.simplefilter("ignore")
        model = build_model(config, pretrained=False)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not match a {config.backbone} model with "
                         f"dim {config.dim}: {error}") from error
    model.eval()
    return model, config
