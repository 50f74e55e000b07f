"""Reranker checkpoints: a model folder plus ``rrt.json`` and ``rrt.safetensors`` (never pickle).

A reranker folder is a normal descriptor-model folder (``config.json`` + ``model.safetensors``,
loadable by waldo.models.checkpoint.load_model: its global head serves search, its locals feed
the RRT) with two more files:

    rrt.json          {"format_version", "rrt": RRTConfig, "grid": [h, w], "training": {...}}
                      training holds e.g. the mode, the init model's hash and the fusion weight
                      chosen on validation ("fusion_weight").
    rrt.safetensors   the RerankingTransformer's state dict
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from waldo.fsutil import atomic_write_bytes, atomic_write_json
from waldo.models.checkpoint import ModelConfig, config_json, save_model
from waldo.models.descriptor import DescriptorModel
from waldo.rerank.rrt import RerankingTransformer, RRTConfig

__all__ = ["RRT_FILES", "export_head_only", "has_rrt", "load_rrt", "read_rrt_info", "save_reranker", "save_rrt", "update_rrt_training"]

RRT_FORMAT = 1
RRT_FILES = ("rrt.json", "rrt.safetensors")


def has_rrt(folder: str | Path) -> bool:
    """Whether ``folder`` holds a reranker (both rrt files)."""
    return all((Path(folder) / name).is_file() for name in RRT_FILES)


def save_rrt(folder: str | Path, rrt: RerankingTransformer, *, grid: tuple[int, int] = (7, 7),
             training: dict[str, Any] | None = None) -> Path:
    """Write ``rrt.safetensors`` then ``rrt.json`` (each atomically) into ``folder``."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in rrt.state_dict().items()}
    atomic_write_bytes(folder / "rrt.safetensors", save(state, metadata={"format": "pt"}))
    info = {"format_version": RRT_FORMAT, "rrt": rrt.config.model_dump(), "grid": list(grid),
            "training": dict(training or {})}
    atomic_write_json(folder / "rrt.json", info)
    return folder


def save_reranker(folder: str | Path, model: DescriptorModel, model_config: ModelConfig,
                  rrt: RerankingTransformer, *, grid: tuple[int, int] = (7, 7),
                  training: dict[str, Any] | None = None) -> Path:
    """A complete reranker folder: the descriptor model and its RRT."""
    save_model(model, model_config, folder)
    return save_rrt(folder, rrt, grid=grid, training=training)


def has_global_residual(folder: str | Path) -> bool:
    """Whether ``folder``'s RRT adds the global similarity to its logit (``rrt.json``'s
    ``rrt.global_skip``); False without a readable reranker."""
    try:
        config = read_rrt_info(folder).get("rrt")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("global_skip") is True


def read_rrt_info(folder: str | Path) -> dict[str, Any]:
    """The parsed ``rrt.json`` of ``folder``."""
    path = Path(folder) / "rrt.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no reranker (rrt.json); train one with `waldo train rrt`")
    info = json.loads(path.read_text())
    if info.get("format_version", RRT_FORMAT) > RRT_FORMAT:
        raise ValueError(f"{path}: reranker format {info['format_version']} is newer than this Waldo supports")
    return info


def load_rrt(folder: str | Path) -> tuple[RerankingTransformer, dict[str, Any]]:
    """Rebuild the RRT of a reranker folder (eval mode) and return it with its ``rrt.json``.
    Every tensor comes from the file: a missing or extra one is an error."""
    from safetensors.torch import load_file

    info = read_rrt_info(folder)
    rrt = RerankingTransformer(RRTConfig.model_validate(info["rrt"]))
    try:
        rrt.load_state_dict(load_file(str(Path(folder) / "rrt.safetensors")), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{folder}/rrt.safetensors does not match its rrt.json: {error}") from error
    return rrt.eval(), info


def update_rrt_training(folder: str | Path, **entries: Any) -> dict[str, Any]:
    """Merge ``entries`` into the ``training`` section of ``rrt.json`` (e.g. the fusion weight)."""
    info = read_rrt_info(folder)
    info["training"] = {**info.get("training", {}), **entries}
    path = Path(folder) / "rrt.json"
    atomic_write_json(path, info)
    return info


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (t.detach().half() if t.is_floating_point() else t.detach()).contiguous()
            for name, t in state.items()}


def export_head_only(reranker_dir: str | Path, out_dir: str | Path, card: dict[str, Any],
                     share_global_from: str | None = None) -> Path:
    """Write ``reranker_dir``'s trained parts into ``out_dir`` as a shipped model (see
    waldo.models.shipped): heads and RRT in float16, the backbone left to its weights package.
    ``share_global_from``: a shipped model whose global head is this one's to the bit (float16);
    the head is then left out and read from it (checked by digest when loading), so one learned
    whitening ships once."""
    from safetensors.torch import load_file, save

    from waldo.fsutil import atomic_write_text
    from waldo.models.checkpoint import SHARED_GLOBAL_HEAD, load_model, tensors_digest
    from waldo.models.shipped import SHIPPED_DIR, shipped_models, weights_package

    model, config = load_model(reranker_dir)
    if not config.weights_source.startswith("imagenet:"):
        raise ValueError(f"{reranker_dir}: only a model on the packaged ImageNet backbone can ship without it "
                         f"(its backbone weights: {config.weights_source})")
    rrt, info = load_rrt(reranker_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = {name: t for name, t in model.state_dict().items() if not name.startswith("backbone.")}
    shared = {}
    if share_global_from is not None:
        if share_global_from not in shipped_models():  # loading reads it from the package, by name
            raise ValueError(f"share_global_from names a shipped model, got {share_global_from!r}")
        donor = load_file(str(SHIPPED_DIR / share_global_from / "model.safetensors"))
        digest = tensors_digest(heads)
        if tensors_digest(donor) != digest:
            raise ValueError(f"{reranker_dir}'s global head is not {share_global_from}'s (float16): nothing to share")
        heads = {name: t for name, t in heads.items() if name not in SHARED_GLOBAL_HEAD}
        shared = {"global_head_weights": {"shipped": share_global_from, "sha256": digest}}
    atomic_write_bytes(out / "model.safetensors", save(_half(heads), metadata={"format": "pt"}))
    config = config.model_copy(deep=True)
    config.extra = {**config.extra, "backbone_weights": {"weights_source": config.weights_source,
                                                         "package": weights_package(config.backbone)}, **shared}
    atomic_write_text(out / "config.json", config_json(config))
    atomic_write_bytes(out / "rrt.safetensors", save(_half(rrt.state_dict()), metadata={"format": "pt"}))
    atomic_write_json(out / "rrt.json", info)
    atomic_write_json(out / "card.json", card)
    return out
