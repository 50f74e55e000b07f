"""Shared test helpers: where the real data lives, and how to react when it is missing.

Tests read real images from the shared data folder (never copies in the repo). On a developer
machine without that folder the data tests are skipped; in CI (``CI=true``) missing data, or a
missing optional test dependency (Ray, Playwright, Chromium), is a failure, so a broken data
mount or install can never turn the suite silently green.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from waldo.paths import data_root as _data_root


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Skip the test locally; fail it in CI, where everything the suite needs is installed."""
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_data(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it exists; otherwise skip the test locally, or fail it in CI."""
    path = Path(path)
    if not path.exists():
        missing(f"test data not found: {path} (set WALDO_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def missing_dependency():
    """``missing_dependency(message)``: :func:`missing` for test modules (which cannot import
    ``conftest`` under every pytest import mode)."""
    return missing


@pytest.fixture(scope="session")
def require_module():
    """``require_module("ray.data", "pip install -e '.[ray]'") -> module``: import an optional
    test dependency, or skip locally / fail in CI with the install hint. A fixture for the same
    reason as :func:`data_file`."""

    def load(name: str, hint: str) -> ModuleType:
        try:
            return importlib.import_module(name)
        except ImportError as error:
            missing(f"{name} is not installed ({error}); {hint}")

    return load


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data folder (``waldo.paths.data_root()``), required to exist."""
    return require_data(_data_root())


@pytest.fixture(scope="session")
def data_file(data_root: Path):
    """``data_file("grocery_store/labels.csv") -> Path``: a path under the shared data folder,
    passed through :func:`require_data`. Tests use this fixture rather than importing
    ``require_data`` because ``conftest`` is not importable under every pytest import mode."""

    def resolve(relative: str | os.PathLike[str]) -> Path:
        return require_data(data_root / relative)

    return resolve


@pytest.fixture(scope="session")
def grocery_dir(data_root: Path) -> Path:
    """The Grocery Store dataset folder (labels.csv + dataset/)."""
    return require_data(data_root / "grocery_store")


@pytest.fixture(scope="session")
def flip_last_byte():
    """``flip_last_byte(path, mask=0xFF)``: XOR the file's last byte with ``mask`` in place (a
    one-byte corruption that checksums must catch)."""

    def flip(path: Path, mask: int = 0xFF) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= mask
        path.write_bytes(bytes(data))

    return flip
