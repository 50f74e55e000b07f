"""Keypoints of an evaluation run, for rerankers that verify geometry (see rerank_eval).

SIFT features of every query and gallery image are computed once (in threads; OpenCV releases
the GIL) and cached under ``cache_dir/<key>/`` as ``.npy`` files, where ``key`` hashes the
feature config and the exact image list (paths, sizes, modification times): a changed image or
config is a different key, so a stale cache can never be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.data.protocols import Protocol
from waldo.index.keypoints import RaggedKeypoints
from waldo.models.keypoints import LocalFeatures, SiftConfig, extract_many, pack_features
from waldo.paths import PROJECT_ROOT

DEFAULT_CACHE_DIR = PROJECT_ROOT / "cache" / "gv"  # git-ignored
_FILES = ("keypoints.npy", "descriptors.npy", "offsets.npy")


def cache_key(paths: Sequence[str], config: SiftConfig) -> str:
    """sha256 of the config and every image's path, size and mtime (first 20 hex digits)."""
    digest = hashlib.sha256(json.dumps(config.model_dump(), sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{p}\0missing\n".encode())
    return digest.hexdigest()[:20]


def _load_cached(folder: Path, n: int) -> RaggedKeypoints | None:
    if not all((folder / f).is_file() for f in _FILES):
        return None
    try:
        arrays = [np.load(folder / f, allow_pickle=False) for f in _FILES]
        ragged = RaggedKeypoints(*arrays)
    except (OSError, ValueError):
        return None  # a damaged cache is recomputed, never trusted
    return ragged if len(ragged) == n else None


def _save_cached(folder: Path, ragged: RaggedKeypoints, paths: Sequence[str], config: SiftConfig) -> None:
    """Write into a temporary sibling, then rename: a reader sees a complete cache or none."""
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, array in zip(_FILES, (ragged.keypoints, ragged.descriptors, ragged.offsets)):
            np.save(tmp / name, np.ascontiguousarray(array), allow_pickle=False)
        (tmp / "manifest.json").write_text(json.dumps({"config": config.model_dump(), "n_images": len(paths),
                                                       "paths": list(paths)}, indent=1))
        os.rename(tmp, folder)
    except OSError:
        pass  # another process wrote the same cache first: theirs is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_features(paths: Sequence[str], config: SiftConfig = SiftConfig(), *,
                     cache_dir: str | Path | None = DEFAULT_CACHE_DIR, workers: int | None = None,
                     progress: bool = False) -> RaggedKeypoints:
    """SIFT features of ``paths`` (one ragged row per path, in order), cached when
    ``cache_dir`` is set. Unreadable images get zero keypoints (they can never verify)."""
    paths = [os.fspath(p) for p in paths]
    folder = Path(cache_dir) / cache_key(paths, config) if cache_dir is not None else None
    if folder is not None and (cached := _load_cached(folder, len(paths))) is not None:
        return cached

    start = time.perf_counter()
    features = extract_many(paths, config, workers=workers)
    if progress:
        print(f"gv: SIFT of {len(paths)} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    ragged = pack_features(features, config.descriptor_bytes)
    if folder is not None:
        _save_cached(folder, ragged, paths, config)
    return ragged


@dataclass(frozen=True)
class RunKeypoints:
    """SIFT of a protocol's query and gallery images, one ragged row per protocol row."""

    queries: RaggedKeypoints
    gallery: RaggedKeypoints

    def query(self, row: int) -> LocalFeatures:
        return LocalFeatures(*self.queries[row])

    def candidate(self, row: int) -> LocalFeatures:
        return LocalFeatures(*self.gallery[row])


def run_keypoints(protocol: Protocol, sift: SiftConfig = SiftConfig(), *,
                  cache_dir: str | Path | None = DEFAULT_CACHE_DIR, progress: bool = False) -> RunKeypoints:
    """The keypoints of every image of ``protocol`` (cached, see :func:`extract_features`)."""
    gallery = extract_features(protocol.gallery.paths, sift, cache_dir=cache_dir, progress=progress)
    queries = gallery if protocol.queries is protocol.gallery else extract_features(
        protocol.queries.paths, sift, cache_dir=cache_dir, progress=progress)
    return RunKeypoints(queries, gallery)
