"""Safe image loading: every image that enters Waldo goes through :func:`load_image`.

Images come from datasets on disk and from uploads, so the loader must treat every file as
hostile: it checks the declared size before decoding (decompression bombs), forces a full
decode so truncated files fail here rather than silently yielding grey rows, and normalises
every pixel format Pillow can produce to plain 8-bit RGB so that downstream code only ever
sees one kind of image.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "ImageLoadError",
    "ImageSource",
    "list_images",
    "load_image",
]

#: Largest width*height accepted by default (40 MP: above any phone photo, far below a bomb).
DEFAULT_MAX_PIXELS = 40_000_000

#: File suffixes (lower case, without the dot) that :func:`list_images` treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm"}
)

#: Pillow decoders that load_image will use. An allowlist, because Pillow otherwise sniffs ~40
#: formats, some with a long history of decoder bugs, and EPS even runs Ghostscript.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

ImageSource = Union[str, "os.PathLike[str]", bytes, BinaryIO]

# Modes that carry an alpha channel; they are composited over white (a transparent product
# shot on white is how catalogue images are meant to be seen, black would invent dark edges).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file (or ``<upload>``) and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot load image {name}: {reason}")
        self.name = name
        self.reason = reason


def _open_source(source: ImageSource, name: str) -> BinaryIO:
    """Return a seekable binary stream for ``source``; refuses missing and empty inputs."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(name, "empty input (0 bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            raise ImageLoadError(name, "file does not exist") from None
        except IsADirectoryError:
            raise ImageLoadError(name, "is a directory, not a file") from None
        except OSError as exc:
            raise ImageLoadError(name, f"cannot open file ({exc.strerror or exc})") from None
        if os.fstat(stream.fileno()).st_size == 0:
            stream.close()
            raise ImageLoadError(name, "empty file (0 bytes)")
        return stream
    if hasattr(source, "read"):
        # Pillow needs to seek (it re-reads the header); a pipe or socket is buffered whole.
        seekable = getattr(source, "seekable", None)
        if not (callable(seekable) and seekable()):
            source = io.BytesIO(source.read())
        start = source.tell()
        if not source.read(1):
            raise ImageLoadError(name, "empty input (0 bytes)")
        source.seek(start)
        return source
    raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}")


# Leading bytes of the supported formats (WebP: RIFF....WEBP; PPM/PGM/PBM: P1..P6).
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"), (b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"), (b"BM", 0, "BMP"), (b"WEBP", 8, "WEBP"), (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
) + tuple((f"P{n}".encode(), 0, "PPM") for n in range(1, 7))


def _signature_format(stream: BinaryIO, start: int) -> str | None:
    """The supported format whose signature the bytes of ``stream`` from ``start`` begin with."""
    try:
        stream.seek(start)
        head = stream.read(16)
    except (OSError, ValueError):
        return None
    for magic, offset, fmt in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic and (fmt != "WEBP" or head.startswith(b"RIFF")):
            return fmt
    return None


# Adam7 passes as (x start, y start, x step, y step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def _png_missing_rows(stream: BinaryIO, start: int) -> int:
    """How many scanlines of a PNG's first image its compressed data does not hold.

    Pillow refuses a PNG whose zlib stream is cut mid-way, but when the stream ends cleanly
    before the last row (a crafted file, or one re-compressed short) it fills the missing rows
    with zeros and says nothing. This inflates the IDAT data once more, counting bytes without
    keeping them, and compares with what the header declares. 0 when complete; malformed
    chunk structure is left to Pillow, which has decoded the file already.
    """
    stream.seek(start + 8)  # after the signature, already checked by Pillow
    header = None
    inflater = zlib.decompressobj()
    produced = 0
    seen_data = False
    while True:
        head = stream.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", stream.read(13))
            stream.seek(length - 13 + 4, io.SEEK_CUR)
        elif kind == b"IDAT":
            seen_data = True
            remaining = length
            while remaining and not inflater.eof:
                chunk = stream.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
                data = chunk
                while data and not inflater.eof:  # bounded output: a bomb cannot allocate here
                    produced += len(inflater.decompress(data, 1 << 20))
                    data = inflater.unconsumed_tail
            stream.seek(remaining + 4, io.SEEK_CUR)
        elif seen_data or kind == b"IEND":
            break  # IDAT chunks are consecutive; later chunks (APNG frames) are not frame 0
        else:
            stream.seek(length + 4, io.SEEK_CUR)
    if header is None or header[3] not in _PNG_CHANNELS:
        return 0
    width, height, depth, colour, _, _, interlace = header
    bits = _PNG_CHANNELS[colour] * depth
    if interlace:
        passes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7]
    else:
        passes = [(width, height)]
    expected = rows = 0
    for pass_width, pass_height in passes:
        if pass_width > 0 and pass_height > 0:
            expected += pass_height * (1 + (pass_width * bits + 7) // 8)
            rows += pass_height
    if produced >= expected:
        return 0
    # Short by this many bytes: report it in scanlines of the (full) image, at least one.
    row_bytes = 1 + (width * bits + 7) // 8
    return max(1, (expected - produced + row_bytes - 1) // row_bytes)


def _to_uint8_rgb(array: np.ndarray) -> Image.Image:
    """Grey ``uint8`` array (H, W) -> RGB image (3 identical channels)."""
    return Image.fromarray(array, mode="L").convert("RGB")


def _high_depth_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Scale 16/32-bit integer and float grey images to 8 bit without clipping.

    * ``I;16*`` (uint16): full scale is 65535, so ``v * 255 / 65535`` (65535 -> 255).
    * ``I`` (int32): Pillow stores 16-bit PNG/TIFF data in this mode too; values within
      0..65535 are scaled as 16 bit, anything else (true 32-bit data has no fixed white
      point) is min-max stretched to 0..255.
    * ``F`` (float32): values within [0, 1] are scaled by 255, within [0, 255] kept,
      otherwise min-max stretched; NaN/inf become 0.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) * (255.0 / 65535.0)
    elif image.mode == "I":
        values = values.astype(np.float64)
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if lo >= 0 and hi <= 65535:
            scaled = values * (255.0 / 65535.0)
        else:
            scaled = (values - lo) * (255.0 / max(hi - lo, 1.0))
    elif image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1.0:
            scaled = values * 255.0
        elif lo >= 0 and hi <= 255.0:
            scaled = values
        else:
            scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    else:  # pragma: no cover - guarded by the caller
        raise ImageLoadError(name, f"unexpected mode {image.mode}")
    return _to_uint8_rgb(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit ``RGB``; see the module docstring for why each rule exists."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image, name)
    if mode == "P":
        # A palette may mark one index (or a tRNS table) transparent: go through RGBA so the
        # transparent pixels become white instead of whatever colour the palette holds there.
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        # CMYK, L, 1, YCbCr and friends: Pillow's own conversion is exact for these.
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(name, f"unsupported pixel mode {mode!r} ({exc})") from None


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Load one image as a fully decoded 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        source: a path, the raw file bytes, or a binary file object (an upload).
        max_pixels: refuse images whose declared ``width * height`` exceeds this. The check
            reads only the header, so a 20000x20000 PNG is refused without allocating it.
        name: how to name the image in errors; defaults to the path, or ``<upload>``.

    Returns:
        An ``RGB`` image (``np.asarray`` gives ``uint8`` of shape ``(H, W, 3)``) with EXIF
        orientation applied. Animated images yield their first frame.

    Raises:
        ImageLoadError: missing/empty/non-image/truncated/corrupt input, too many pixels, or
            a pixel mode that cannot be converted to RGB.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    stream = _open_source(source, name)
    owns_stream = stream is not source
    try:
        start = stream.tell()
        try:
            # Lazy: parses the header only. MPO (multi-picture phone JPEGs) opens via "JPEG".
            image = Image.open(stream, formats=SUPPORTED_FORMATS)
        except Image.DecompressionBombError as exc:
            # Pillow's own (global) bomb guard fired while reading the header.
            raise ImageLoadError(name, f"too many pixels ({exc})") from None
        except UnidentifiedImageError:
            # Pillow says "unidentified" both for bytes of no known format and for a supported
            # format whose header fails to parse (a PNG with a broken IHDR, a header alone).
            # The second is a damaged image, not an unsupported one: say so.
            claimed = _signature_format(stream, start)
            if claimed is not None:
                raise ImageLoadError(name, f"corrupt or truncated image data (starts like {claimed} but its "
                                           f"header cannot be parsed)") from None
            raise ImageLoadError(
                name, f"not a recognised image format (supported: {', '.join(SUPPORTED_FORMATS)})"
            ) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(name, f"unreadable header ({exc})") from None
        with image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageLoadError(name, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                raise ImageLoadError(
                    name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            try:
                # Frame 0 is current after open; load() decodes it fully, so truncation and
                # corrupt compressed data raise here (LOAD_TRUNCATED_IMAGES must stay False).
                image.load()
            except Image.DecompressionBombError as exc:
                raise ImageLoadError(name, f"too many pixels ({exc})") from None
            except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
                raise ImageLoadError(name, f"corrupt or truncated image data ({exc})") from None
            if image.format == "PNG":
                missing = _png_missing_rows(stream, start)
                if missing:
                    raise ImageLoadError(name, f"corrupt or truncated image data (the PNG's pixel data ends "
                                               f"{missing} row(s) short of its declared {width}x{height})")
            try:
                oriented = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - broken EXIF must not reject good pixels
                oriented = image
            rgb = _to_rgb(oriented, name)
            # Detach from the file: copy when conversion returned the very same object.
            return rgb.copy() if rgb is image else rgb
    finally:
        if owns_stream:
            stream.close()


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``folder`` (recursive), as absolute paths sorted by path.

    A file is an image when its suffix (case-insensitive) is in :data:`IMAGE_EXTENSIONS`.
    Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.jpg`` resource forks)
    are skipped because they are never real images.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images.
    """
    root = Path(os.path.abspath(folder))
    if not root.exists():
        raise ValueError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            suffix = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
            if not filename.startswith(".") and suffix in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / filename)
    if not found:
        raise ValueError(
            f"no images found in {root} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return sorted(found)
