"""Validation of what callers hand to :meth:`IndexStore.add`.

Everything is checked before the writer lock is taken and before a byte is written, so a bad
batch costs nothing and leaves no orphan. Errors name the offending rows: with thousands of
images per batch "some descriptor is wrong" is not actionable.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from waldo.index.errors import describe_keys

# Global descriptors must be unit vectors: the index searches by inner product, which only
# equals cosine similarity for unit vectors. 1e-3 is loose enough for float16 round trips.
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AddBatch:
    """A validated batch: ``global_desc`` (n, D) float32, ``local_desc`` (n, L, Dl) float16,
    ``attrs_json`` one JSON object string per image."""

    paths: list[str]
    identities: list[str]
    global_desc: np.ndarray
    local_desc: np.ndarray
    attrs_json: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int]) -> AddBatch:
        """The batch restricted to ``rows`` (positions, in the order given)."""
        index = np.asarray(rows, dtype=np.int64)
        return AddBatch([self.paths[i] for i in rows], [self.identities[i] for i in rows], self.global_desc[index],
                        self.local_desc[index], [self.attrs_json[i] for i in rows])


def _strings(name: str, values: Sequence[Any], allow_pathlike: bool, allow_empty: bool = False) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of strings, not a single string")
    out = []
    for i, v in enumerate(values):
        if allow_pathlike and isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or (not v and not allow_empty):
            raise ValueError(f"{name}[{i}] must be a {'' if allow_empty else 'non-empty '}string, got {v!r}")
        out.append(v)
    return out


def _float_array(name: str, x: Any, shape: tuple[int, ...], dtype: type[np.floating]) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    with np.errstate(over="ignore"):  # overflow to inf is reported below, with the rows
        a = np.ascontiguousarray(a, dtype=dtype)
    finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1) if a.size else np.ones(len(a), bool)
    if not finite.all():
        rows = np.flatnonzero(~finite).tolist()
        extra = " (values beyond +-65504 overflow float16)" if dtype is np.float16 else ""
        raise ValueError(f"{name} has NaN/inf values{extra} in rows {describe_keys(rows)}")
    return a


def validate_add(
    paths: Sequence[str],
    identities: Sequence[str],
    global_desc: Any,
    local_desc: Any,
    attrs: Sequence[Mapping[str, Any]] | None,
    global_dim: int,
    local_shape: tuple[int, int],
) -> AddBatch:
    """Check and normalise one ``add`` call; raises ``ValueError`` with the offending rows."""
    p = _strings("paths", paths, allow_pathlike=True)
    # An identity may be unknown ('') for images a user indexes without labels.
    ident = _strings("identities", identities, allow_pathlike=False, allow_empty=True)
    n = len(p)
    if len(ident) != n:
        raise ValueError(f"got {n} paths but {len(ident)} identities")
    dups = sorted(path for path, c in Counter(p).items() if c > 1)
    if dups:
        raise ValueError(f"duplicate paths within one add call: {describe_keys(dups)}")
    g = _float_array("global_desc", global_desc, (n, global_dim), np.float32)
    loc = _float_array("local_desc", local_desc, (n, *local_shape), np.float16)
    if n:
        norms = np.linalg.norm(g.astype(np.float64), axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if len(bad):
            raise ValueError(
                "global_desc rows must be L2-normalised (search is by inner product); rows "
                f"{describe_keys(bad.tolist())} have norms {describe_keys(np.round(norms[bad], 4).tolist())}. "
                "Normalise with g / np.linalg.norm(g, axis=1, keepdims=True)."
            )
    if attrs is None:
        attrs_json = ["{}"] * n
    else:
        if len(attrs) != n:
            raise ValueError(f"got {n} paths but {len(attrs)} attrs")
        attrs_json = []
        for i, a in enumerate(attrs):
            if not isinstance(a, Mapping):
                raise ValueError(f"attrs[{i}] must be a dict, got {type(a).__name__}")
            try:
                attrs_json.append(json.dumps(dict(a), sort_keys=True, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise ValueError(f"attrs[{i}] is not JSON-serialisable: {e}") from None
    return AddBatch(p, ident, g, loc, attrs_json)
