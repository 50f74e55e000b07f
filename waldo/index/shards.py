"""A sharded index on disk: N ordinary indexes in one folder, and which image each one owns.

Layout::

    INDEX/
      shards.json     {"format": "waldo-sharded", "version": 1, "shards": N,
                       "hash": "blake2b-64", "key": "path"}
      shard-000/      an ordinary index (manifest.json, index.sqlite, segments/, model/)
      shard-001/      ... every shard built by the identical model (same manifest model_hash)

An image belongs to shard :func:`shard_of` ``(key, N)`` where the key is its path as the index
stores it (``Waldo.add`` resolves paths to absolute ones first). The hash is BLAKE2b, never
Python's ``hash()`` (salted per process): the same path lands in the same shard on every
machine and run, so adds, removes and lookups agree without asking every shard.

Ids: each shard numbers its own images; a sharded index shows ``local_id * N + shard``
(:func:`global_id`, :func:`split_id`), unique across shards, and equal to the local id when
N = 1. A reshard (another N) gives every image a new id.

Creation (:func:`create_sharded_dir`) fills a hidden sibling folder, writes ``shards.json``
last and renames the folder into place: a crash leaves a hidden ``.<name>.creating-*`` folder
and never a folder that claims to be a sharded index with shards missing.

Storage level: nothing here imports torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waldo.fsutil import atomic_write_json, fsync_dir
from waldo.index import db
from waldo.index.errors import IndexCorruptError, IndexMismatchError
from waldo.index.maintenance import DB_FILE, MANIFEST_FILE
from waldo.index.manifest import read_manifest

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HASH_NAME", "KEY_NAME", "MAX_SHARDS", "SHARDS_FILE", "ShardLayout",
           "create_sharded_dir", "distinct_identities", "global_id", "is_sharded", "layout_record", "read_layout",
           "shard_dir_name", "shard_of", "split_id"]

SHARDS_FILE = "shards.json"
FORMAT_NAME = "waldo-sharded"
FORMAT_VERSION = 1
HASH_NAME = "blake2b-64"  # the first 8 bytes of BLAKE2b of the UTF-8 key, big-endian, modulo N
KEY_NAME = "path"  # the image's path as the index stores it
# Each shard keeps its own SQLite connections, segment files and faiss index open: a typo such
# as --shards 10000 should fail at once rather than open tens of thousands of files.
MAX_SHARDS = 1024
# Manifest keys that must agree between shards: the descriptors of one model live in one
# space, and a reranker chosen for one shard must be available in every other.
SHARED_MANIFEST_KEYS = ("backbone", "model_hash", "transform", "global_dim", "local_shape", "gv_features")


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"the number of shards must be an integer from 1 to {MAX_SHARDS}, got {n!r}")
    return n


def shard_of(key: str, n: int) -> int:
    """The shard (0 .. n-1) that owns the image with this key (its stored path): stable across
    processes, machines and Python versions."""
    _check_count(n)
    if not isinstance(key, str):
        raise TypeError(f"a shard key is a str (the image's stored path), got {type(key).__name__}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def global_id(local_id: int, shard: int, n: int) -> int:
    """The id a sharded index of ``n`` shards shows for image ``local_id`` of ``shard``."""
    if not 0 <= shard < n:
        raise ValueError(f"shard {shard} out of range for {n} shards")
    return int(local_id) * n + shard


def split_id(image_id: int, n: int) -> tuple[int, int]:
    """``(shard, local_id)`` of an id shown by a sharded index of ``n`` shards."""
    if isinstance(image_id, bool) or int(image_id) != image_id or image_id < 0:
        raise ValueError(f"image ids are non-negative integers, got {image_id!r}")
    return int(image_id) % n, int(image_id) // n


def shard_dir_name(shard: int) -> str:
    return f"shard-{shard:03d}"


def layout_record(n: int) -> dict[str, Any]:
    """The content of ``shards.json`` for ``n`` shards."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shards": _check_count(n), "hash": HASH_NAME,
            "key": KEY_NAME}


@dataclass(frozen=True)
class ShardLayout:
    """A sharded index folder as :func:`read_layout` found it: ``root``, the number of
    ``shards``, and each shard's manifest (in shard order)."""

    root: Path
    shards: int
    manifests: tuple[dict[str, Any], ...]

    @property
    def shard_dirs(self) -> list[Path]:
        return [self.root / shard_dir_name(i) for i in range(self.shards)]

    def shard_of(self, key: str) -> int:
        return shard_of(key, self.shards)


def is_sharded(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` claims to be a sharded index (holds ``shards.json``); whether it is a
    sound one is :func:`read_layout`'s question."""
    return (Path(folder) / SHARDS_FILE).is_file()


def read_layout(folder: str | os.PathLike[str]) -> ShardLayout:
    """Read and check a sharded index's layout: ``shards.json``, every shard folder's manifest,
    and that every shard was built by the same model.

    Raises:
        IndexCorruptError: no or unreadable ``shards.json``, an unknown format, version, hash or
            key, a missing shard folder or a damaged shard manifest.
        IndexMismatchError: shards whose manifests differ in the model or what it stores
            (:data:`SHARED_MANIFEST_KEYS`); ``differences`` maps each key to (that shard's
            value, shard 0's value).
    """
    root = Path(folder).expanduser().absolute()
    path = root / SHARDS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexCorruptError(f"{root} is not a sharded Waldo index: {SHARDS_FILE} is missing") from None
    except OSError as e:
        raise IndexCorruptError(f"cannot read {path}: {e}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise IndexCorruptError(f"{path} is not valid JSON ({e}); the sharded index's layout file is damaged") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{path} is not a sharded index layout (no 'format': {FORMAT_NAME!r})")
    version = record.get("version")
    if not isinstance(version, int) or version < 1:
        raise IndexCorruptError(f"{path} has an invalid version {version!r}")
    if version > FORMAT_VERSION:
        raise IndexCorruptError(f"{path} has layout version {version}, newer than this Waldo supports "
                                f"({FORMAT_VERSION}); upgrade Waldo")
    n = record.get("shards")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
        raise IndexCorruptError(f"{path}: 'shards' must be an integer from 1 to {MAX_SHARDS}, got {n!r}")
    # Another hash or key would send every image to another shard: refuse rather than misroute.
    if record.get("hash") != HASH_NAME:
        raise IndexCorruptError(f"{path}: unknown shard hash {record.get('hash')!r} (this Waldo knows {HASH_NAME!r})")
    if record.get("key") != KEY_NAME:
        raise IndexCorruptError(f"{path}: unknown shard key {record.get('key')!r} (this Waldo knows {KEY_NAME!r})")
    manifests = []
    for i in range(n):
        shard = root / shard_dir_name(i)
        if not shard.is_dir():
            raise IndexCorruptError(f"{root} is a damaged sharded index: {shard_dir_name(i)} of {n} shards is missing")
        manifests.append(read_manifest(shard / MANIFEST_FILE))
    for i, manifest in enumerate(manifests[1:], start=1):
        differences = {key: (manifest.get(key), manifests[0].get(key)) for key in SHARED_MANIFEST_KEYS
                       if manifest.get(key) != manifests[0].get(key)}
        if differences:
            parts = "; ".join(f"{key}={a!r} where {shard_dir_name(0)} has {b!r}" for key, (a, b) in differences.items())
            raise IndexMismatchError(f"the shards of {root} were not built by the same model: {shard_dir_name(i)} "
                                     f"has {parts}", differences)
    return ShardLayout(root, n, tuple(manifests))


def create_sharded_dir(root: str | os.PathLike[str], n: int, make_shard: Callable[[Path, int], None]) -> Path:
    """Create a sharded index of ``n`` shards at ``root`` (absent or an empty folder).

    ``make_shard(folder, i)`` creates shard ``i`` as an ordinary index in ``folder`` (which does
    not exist yet). Everything is built in a hidden sibling folder; ``shards.json`` is written
    (atomically) after every shard, then the folder is renamed to ``root``. If anything fails the
    hidden folder is removed and ``root`` is as it was; after a crash only a hidden
    ``.<name>.creating-*`` folder remains, never a folder that claims to be a sharded index.
    Returns ``root`` as an absolute path.
    """
    record = layout_record(n)
    root = Path(root).expanduser().absolute()
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder; refusing to create an index there")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.creating-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for i in range(n):
            make_shard(staging / shard_dir_name(i), i)
        for i in range(n):  # every shard must be a complete index before the layout names it
            read_manifest(staging / shard_dir_name(i) / MANIFEST_FILE)
        atomic_write_json(staging / SHARDS_FILE, record)  # last: it is what makes the folder an index
        try:
            os.rename(staging, root)  # replaces only an empty folder
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{root} was populated concurrently; not overwriting it") from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(root.parent)
    return root


def distinct_identities(shard_dirs: Sequence[Path]) -> int:
    """How many distinct identities the shards hold together (an identity's photos are spread
    over shards by their paths, so the shards' own counts cannot simply be added)."""
    seen: set[str] = set()
    for folder in shard_dirs:
        if not (folder / DB_FILE).is_file():  # connecting would create an empty catalogue
            raise IndexCorruptError(f"{folder} is not a usable index: {DB_FILE} is missing")
        conn = db.connect(folder / DB_FILE)
        try:
            seen.update(row[0] for row in conn.execute("SELECT DISTINCT identity FROM images"))
        finally:
            conn.close()
    return len(seen)
