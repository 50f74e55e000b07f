"""The index's static ``manifest.json``: what the descriptors mean.

Descriptors from different models (or the same model with a different transform) live in
unrelated spaces; comparing them gives confident nonsense. The manifest, written once at
creation, records the format and the caller's model information (backbone, weights hash,
transform, descriptor sizes) so that :meth:`IndexStore.open` can refuse a mismatched index
with a message that says exactly what differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from waldo.index.errors import IndexCorruptError, IndexMismatchError, is_resource_error, resource_error

FORMAT_NAME = "waldo-index"
# Version 2 added int8 local descriptors. An index is written with the lowest version that
# can describe it, so float16 indexes stay readable by Waldo versions that only know 1 (they
# ignore ``global_index`` and search exactly, which is the correct answer anyway), and an
# int8 index is refused by them with "upgrade Waldo" instead of misread.
FORMAT_VERSION = 2
GLOBAL_DTYPE = "float32"
LOCAL_DTYPE = "float16"  # half precision halves the dominant on-disk cost; rerankers tolerate it
# How local descriptors are stored. float16: (n, L, D) half floats. int8: (n, L, D) int8 plus
# one float16 scale per descriptor (see quantize.py): half the bytes again. Readers return
# float16 either way.
LocalDtype = Literal["float16", "int8"]
_FORMAT_FOR_LOCAL_DTYPE = {"float16": 1, "int8": 2}
DEFAULT_GLOBAL_INDEX = "Flat"  # exact search; see global_index.py for the approximate ones

# Keys the index owns. The caller may repeat the descriptor sizes and the storage options
# (with equal values, e.g. a manifest copied from another index), but must not override the
# format fields.
_OWNED = ("format", "format_version", "created_at", "global_dtype", "local_dtype")
_SIZES = ("global_dim", "local_shape")
_OPTIONS = ("global_index", "global_search_params")


class StorageOptions(BaseModel):
    """The index's storage and search choices, fixed at creation.

    ``local_dtype``: "float16" or "int8". ``global_index``: faiss factory string ("Flat" =
    exact; the spec itself is checked by ``global_index.check_spec``). ``global_search_params``:
    default search-time parameters (``nprobe``, ``efSearch``). Manifests written before these
    existed read as float16 / "Flat" / {}.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    local_dtype: LocalDtype = LOCAL_DTYPE
    global_index: str = Field(DEFAULT_GLOBAL_INDEX, min_length=1)
    global_search_params: dict[str, int] = Field(default_factory=dict)


def storage_options(data: Mapping[str, Any], where: Path | str = "manifest") -> StorageOptions:
    """The :class:`StorageOptions` of a manifest (defaults for keys it lacks or holds as null)."""
    try:
        return StorageOptions.model_validate({k: data[k] for k in StorageOptions.model_fields if data.get(k) is not None})
    except ValidationError as e:
        raise IndexCorruptError(f"{where}: invalid storage options: {e}") from None


def to_json_value(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or a clear ValueError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {e}") from None


def build_manifest(
    user: Mapping[str, Any],
    global_dim: int,
    local_shape: tuple[int, int],
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """The full manifest: the caller's keys plus the format, descriptor layout and ``options``
    (already validated by the caller; default: float16, exact search).

    Raises:
        ValueError: not JSON-serialisable, a reserved key given, or sizes/options that disagree.
    """
    options = options or StorageOptions()
    if not isinstance(user, Mapping):
        raise ValueError(f"manifest must be a dict, got {type(user).__name__}")
    for key in user:
        if not isinstance(key, str):
            raise ValueError(f"manifest keys must be strings, got {key!r}")
    clash = [k for k in _OWNED if k in user]
    if clash:
        raise ValueError(f"manifest keys {clash} are reserved by the index format; rename them")
    sizes = {"global_dim": int(global_dim), "local_shape": [int(local_shape[0]), int(local_shape[1])]}
    data = to_json_value(dict(user), "manifest")
    for key in _SIZES:
        if key in data and data[key] != sizes[key]:
            raise ValueError(f"manifest says {key}={data[key]!r} but the index is created with {key}={sizes[key]!r}")
    chosen = {"global_index": options.global_index, "global_search_params": dict(options.global_search_params)}
    for key in _OPTIONS:
        if key in data and data[key] != chosen[key]:
            raise ValueError(f"manifest says {key}={data[key]!r} but the index is created with {key}={chosen[key]!r}")
    data.update(sizes)
    data.update(chosen)
    data.update(
        format=FORMAT_NAME,
        format_version=_FORMAT_FOR_LOCAL_DTYPE[options.local_dtype],
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        global_dtype=GLOBAL_DTYPE,
        local_dtype=options.local_dtype,
    )
    return data


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json``; any problem is an :class:`IndexCorruptError`, except
    running out of file descriptors or memory (:class:`IndexResourceError`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexCorruptError(f"{path.parent} is not a Waldo index: {path.name} is missing") from None
    except OSError as e:
        if is_resource_error(e):
            raise resource_error(e, str(path)) from None
        raise IndexCorruptError(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise IndexCorruptError(f"{path} is not valid JSON ({e}); the index manifest is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{path} is not a Waldo index manifest (no 'format': {FORMAT_NAME!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise IndexCorruptError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"index format_version {version} is newer than this Waldo supports ({FORMAT_VERSION}); upgrade Waldo"
        )
    parse_sizes(data, path)
    options = storage_options(data, path)
    if _FORMAT_FOR_LOCAL_DTYPE[options.local_dtype] > version:
        raise IndexCorruptError(f"{path}: local_dtype {options.local_dtype!r} needs format_version "
                                f"{_FORMAT_FOR_LOCAL_DTYPE[options.local_dtype]}, the manifest says {version}")
    return data


def parse_sizes(data: Mapping[str, Any], where: Path | str) -> tuple[int, tuple[int, int]]:
    """``(global_dim, (L, D_local))`` from a manifest, validated."""
    d = data.get("global_dim")
    ls = data.get("local_shape")
    ok = (
        isinstance(d, int)
        and d > 0
        and isinstance(ls, list)
        and len(ls) == 2
        and all(isinstance(v, int) and v > 0 for v in ls)
    )
    if not ok:
        raise IndexCorruptError(f"{where}: invalid descriptor sizes global_dim={d!r}, local_shape={ls!r}")
    return d, (ls[0], ls[1])  # type: ignore[index]


def check_expected(manifest: Mapping[str, Any], expected: Mapping[str, Any] | None) -> None:
    """Raise :class:`IndexMismatchError` unless every ``expected`` key equals the manifest's.

    Values are compared as they read back from JSON, so ``(49, 128)`` equals ``[49, 128]``.
    """
    if not expected:
        return
    wanted = to_json_value(dict(expected), "expected")
    differences: dict[str, tuple[Any, Any]] = {}
    parts = []
    for key, want in wanted.items():
        if key not in manifest:
            differences[key] = (None, want)
            parts.append(f"index manifest has no {key!r}, this model has {key}={want!r}")
        elif manifest[key] != want:
            differences[key] = (manifest[key], want)
            parts.append(f"index was built with {key}={manifest[key]!r}, this model has {key}={want!r}")
    if differences:
        raise IndexMismatchError(
            "index does not match the current model: " + "; ".join(parts)
            + ". Rebuild the index with this model, or open it with the model it was built with.",
            differences,
        )
