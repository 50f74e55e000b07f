"""Checking uploaded images and storing them, content-addressed, inside the index folder.

An upload is decoded (with the pixel limit) before anything is written, so a corrupt file or a
decompression bomb never reaches the disk. The stored name is ``<sha256>.<ext>`` with the
extension taken from the decoded format, never from the client's file name: a client cannot
choose where a file lands, and sending the same bytes twice stores (and indexes) them once.

A file is stored before its add commits, so a process killed in between leaves a file that no
catalogue row names (and a remove killed after its commit leaves one too). Every writer holds
:func:`uploads_lock` from storing a file until its add has committed or been undone; a service
starting up takes the same lock and deletes what no live row names (:func:`clean_orphan_uploads`).
The lock is an advisory ``flock`` that the kernel drops when its holder dies, so a SIGKILLed
writer never leaves it held.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from waldo.data.images import SUPPORTED_FORMATS, DecodeBudget, load_image
from waldo.fsutil import atomic_write_bytes, file_lock, fsync_dir
from waldo.serve.errors import ClientError

__all__ = ["MAX_IDENTITY_CHARS", "UPLOADS_DIR", "CheckedUpload", "check_identity", "check_upload", "clean_name",
           "clean_orphan_uploads", "store_upload", "uploads_lock"]

#: Folder, inside the index folder, that holds the images added through the service.
UPLOADS_DIR = "uploads"
#: Lock file inside the uploads folder (hidden, so it is never taken for an upload).
LOCK_NAME = ".lock"

#: Longest identity label an upload may carry (characters).
MAX_IDENTITY_CHARS = 200

# Pillow format name -> stored suffix. MPO is how Pillow names multi-picture phone JPEGs.
_SUFFIX = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
           "TIFF": "tif", "PPM": "ppm"}


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that decoded cleanly: its bytes, pixels (RGB) and content address."""

    data: bytes
    image: Image.Image | None  # None when the caller asked not to keep the pixels (adds)
    sha256: str
    suffix: str
    name: str  # the client's file name, cleaned, for display only

    @property
    def stored_name(self) -> str:
        return f"{self.sha256}.{self.suffix}"


def clean_name(filename: str | None, limit: int = 120) -> str:
    """A client file name reduced to something safe to store and display: the last path
    component, without control characters, at most ``limit`` characters. Never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:limit] or "upload"


def check_identity(identity: str) -> str:
    """The identity an upload is stored under: exactly as given, or a :class:`ClientError`
    (422) when it is too long, blank but not empty, or holds control characters. Never
    rewritten: "brand/model 7" stays "brand/model 7" (it is a label, not a path)."""
    if len(identity) > MAX_IDENTITY_CHARS:
        raise ClientError(422, f"identity: at most {MAX_IDENTITY_CHARS} characters, got {len(identity)}")
    if identity and not identity.strip():
        raise ClientError(422, "identity: must not be only white space (leave it empty for no identity)")
    bad = sorted({f"U+{ord(c):04X}" for c in identity if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")})
    if bad:
        raise ClientError(422, f"identity: control or unassigned characters are not allowed ({', '.join(bad[:5])})")
    return identity


def check_upload(data: bytes, filename: str | None, *, max_bytes: int, max_pixels: int,
                 budget: DecodeBudget | None = None, budget_timeout: float | None = None,
                 max_side: int | None = None, keep_pixels: bool = True) -> CheckedUpload:
    """Decode an upload fully; raises :class:`ClientError` (too large, empty) or
    :class:`~waldo.data.images.ImageLoadError` (not an image, corrupt, too many pixels).

    ``budget``: the process's decode memory budget (wait up to ``budget_timeout`` s for room);
    ``max_side``: return the pixels reduced to this longest side (JPEGs decode at reduced
    scale); ``keep_pixels=False``: decode to check, then drop the pixels (an add re-reads the
    stored file, so holding 32 decoded uploads at once would only cost memory)."""
    name = clean_name(filename)
    if not data:
        raise ClientError(400, f"the upload {name!r} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ClientError(413, f"the upload {name!r} is {len(data)} bytes; the limit is {max_bytes} bytes")
    image: Image.Image | None = load_image(data, max_pixels=max_pixels, name=name, budget=budget,
                                           budget_timeout=budget_timeout, max_side=max_side)
    if not keep_pixels:
        image = None
    # The header is parsed again only to learn the format (load_image returns bare RGB pixels).
    with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as header:
        suffix = _SUFFIX.get(header.format or "", "img")
    return CheckedUpload(data=data, image=image, sha256=hashlib.sha256(data).hexdigest(), suffix=suffix, name=name)


def store_upload(upload: CheckedUpload, uploads_dir: Path) -> tuple[Path, bool]:
    """Write ``upload`` to ``uploads_dir/<sha256>.<ext>`` atomically; returns (path, created).

    Written to a temporary file in the same folder, fsynced, then renamed: a crash leaves the
    old state or the whole file, never half an image under its final name.
    """
    target = uploads_dir / upload.stored_name
    if target.is_file():
        return target, False  # content-addressed: same name means same bytes
    return atomic_write_bytes(target, upload.data), True


def uploads_lock(uploads_dir: Path, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
    """Hold the uploads folder's exclusive lock across processes, waiting at most ``timeout``
    seconds (None: for ever)."""
    return file_lock(uploads_dir / LOCK_NAME, timeout=timeout)


def clean_orphan_uploads(uploads_dir: Path, is_live: Callable[[Sequence[str]], list[bool]]) -> list[Path]:
    """Delete the files in ``uploads_dir`` that no live catalogue row names, and temporary
    files of interrupted writes. ``is_live(paths)`` answers for each path whether a live image
    has it. Takes :func:`uploads_lock`, so no writer is between storing a file and committing it
    while this runs. Returns the deleted paths."""
    if not uploads_dir.is_dir():
        return []
    with uploads_lock(uploads_dir):
        candidates = sorted(p for p in uploads_dir.iterdir() if p.is_file() and p.name != LOCK_NAME)
        temporary = [p for p in candidates if p.name.startswith(".") and p.name.endswith(".tmp")]
        stored = [p for p in candidates if p not in temporary]
        live = is_live([str(p) for p in stored])
        doomed = temporary + [p for p, alive in zip(stored, live) if not alive]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(uploads_dir)
    return doomed
