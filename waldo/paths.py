"""Where Waldo finds the shared datasets, and where it keeps caches.

The images are never copied into the repository: they are read where they lie. ``WALDO_DATA``
overrides the location; the default is ``../shared/data`` beside the project root.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The folder that holds the shared datasets (may not exist on a user's machine)."""
    env = os.environ.get("WALDO_DATA")
    if env:
        return Path(env).expanduser().resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", PROJECT_ROOT / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[-1].resolve()


def dataset_dir(name: str) -> Path:
    """A named dataset folder under :func:`data_root`, e.g. ``dataset_dir("grocery_store")``."""
    return data_root() / name


def default_cache_root() -> Path:
    """``$WALDO_CACHE`` or ``<project>/cache`` (git-ignored): mined neighbours, exported models."""
    return Path(os.environ.get("WALDO_CACHE", PROJECT_ROOT / "cache"))
