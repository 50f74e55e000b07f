"""Safe image loading: every image that enters Waldo goes through :func:`load_image`.

Images come from datasets on disk and from uploads, so the loader must treat every file as
hostile: it checks the declared size and shape before decoding (decompression bombs, strips
no model can use), walks a JPEG's marker segments before libjpeg sees them (a file of thousands
of scans decodes for minutes; arithmetic coding turns mislabelled data into garbage silently),
forces a full decode so truncated files fail here rather than silently yielding grey rows, and
normalises every pixel format Pillow can produce to plain 8-bit RGB so that downstream code only
ever sees one kind of image.

Decoding costs memory far beyond the file's size (a 78 KB PNG can hold 40 megapixels). A
process that decodes on several threads at once (the service) shares one :class:`DecodeBudget`:
each decode reserves an estimate of its peak bytes before it allocates them and waits, for a
bounded time, while other decodes hold the budget. ``max_side`` decodes JPEGs at reduced scale
(libjpeg's DCT scaling), which is cheaper in both time and memory when only a small image is
needed (a query, a thumbnail).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_JPEG_SCANS",
    "SUPPORTED_FORMATS",
    "DecodeBudget",
    "DecodeBusyError",
    "ImageLoadError",
    "ImageSource",
    "decode_memory_estimate",
    "list_images",
    "load_image",
]

#: Largest width*height accepted by default (40 MP: above any phone photo, far below a bomb).
DEFAULT_MAX_PIXELS = 40_000_000

#: Most scans a JPEG may have. libjpeg's progressive mode writes 10 (6 for grey), mozjpeg and
#: jpegli about as many; every scan makes libjpeg visit every block of its component again,
#: whatever the scan holds, so a 2 MB file of 20,000 near-empty scans decodes for minutes.
#: Measured here (benchmarks/decode_bombs.py): each extra scan costs about 6 ms at 40 MP, so
#: 100 scans (10x what encoders write) bound the extra decode time to about 0.6 s. libjpeg-turbo's
#: tools offer the same guard (``-maxscans``); NVIDIA's nvImageCodec defaults to 256.
MAX_JPEG_SCANS = 100

#: Largest ratio of the longer side to the shorter one. Every transform squashes the image to a
#: square, so a 1x40,000,000 strip would become 256x256 pixels of one stretched column: no
#: descriptor of it can match anything. Such strips are also what makes decoding expensive
#: beyond the pixel count (Pillow keeps an 8-byte pointer per row: 320 MB for 40M rows, per
#: copy). Real photos, panoramas and scanned receipts stay far below 100 (the bundled datasets:
#: at most 4.9).
MAX_ASPECT_RATIO = 100

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


class DecodeBusyError(RuntimeError):
    """A decode waited its whole timeout for room in a :class:`DecodeBudget` that other decodes
    held: the image is fine, the process is busy (a service answers 503 and asks to retry)."""


class DecodeBudget:
    """Bytes that the image decodes of a process may hold at once; thread-safe.

    ``with budget.reserve(nbytes, timeout=...):`` waits until ``nbytes`` fit next to what other
    decodes hold, then holds them for the block. Waiters are served first come, first served:
    a big decode is never starved by a stream of small ones (a small one queued behind a big
    one waits too; decodes are short). ``in_use``, ``waiting`` and ``peak`` (the most ever
    held at once) are there for monitoring and tests.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._in_use = 0
        self._peak = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._changed:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Decodes waiting for room right now."""
        with self._changed:
            return len(self._queue)

    @property
    def peak(self) -> int:
        """The most bytes ever reserved at the same time."""
        with self._changed:
            return self._peak

    @contextlib.contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block.

        Args:
            nbytes: bytes to hold, at most ``max_bytes`` (more could never be granted).
            timeout: seconds to wait for room; None waits as long as it takes, 0 not at all.

        Raises:
            DecodeBusyError: no room within ``timeout``.
            ValueError: ``nbytes`` is negative or larger than the whole budget.
        """
        if nbytes < 0 or nbytes > self.max_bytes:
            raise ValueError(f"cannot reserve {nbytes} bytes of a {self.max_bytes}-byte decode budget")
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._in_use + nbytes > self.max_bytes:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DecodeBusyError(
                            f"too many images are being decoded at once: this one needs {_mb(nbytes)} of "
                            f"memory, {_mb(self._in_use)} of the {_mb(self.max_bytes)} decode budget are "
                            f"in use and none came free within {timeout:g} s; retry shortly")
                    self._changed.wait(left)
                self._in_use += nbytes
                self._peak = max(self._peak, self._in_use)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now (or be first now)
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()


def _mb(nbytes: int) -> str:
    """``nbytes`` for people: "412.3 MB"."""
    return f"{nbytes / 1e6:.1f} MB"


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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# JPEG start-of-frame markers (C4 is DHT, C8 reserved, CC is DAC) and the processes they name.
_SOF_PROCESS = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless",
                0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
                0xC9: "extended sequential", 0xCA: "progressive", 0xCB: "lossless",
                0xCD: "differential sequential", 0xCE: "differential progressive", 0xCF: "differential lossless"}
_SOF_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOF_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7})  # Huffman-coded; libjpeg cannot decode any of them
_SOF_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# The next marker: 0xFF, any number of 0xFF fill bytes, then a byte other than 0x00 (FF 00 is
# a stuffed data byte inside entropy-coded data). RST0-7 and TEM stand alone, without a length.
# Written with a literal first byte, which lets the regex engine skip ahead to each 0xFF
# (30x faster than "\xff+" on a 17 MB photo: 11 ms).
_NEXT_MARKER = re.compile(rb"\xff(?:\xff)*([\x01-\xfe])")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA


@dataclass(frozen=True)
class _JpegLayout:
    """What the marker segments of a JPEG's first image declare."""

    sof: int  # its start-of-frame marker code, 0 when it has none (libjpeg will refuse it)
    scans: int  # SOS markers up to its EOI (or the end of the data)
    width: int = 0
    height: int = 0
    sampling: tuple[tuple[int, int], ...] = ()  # (horizontal, vertical) factor per component

    def coefficient_bytes(self) -> int:
        """The whole-image coefficient buffer libjpeg keeps for a progressive (or any
        multi-scan) file: 64 16-bit coefficients per block of every component, at full
        resolution whatever the output scale; 0 for a single-scan file (decoded row by row)."""
        if not self.sampling or (self.sof not in _SOF_PROGRESSIVE and self.scans <= 1):
            return 0
        h_max = max(h for h, _ in self.sampling)
        v_max = max(v for _, v in self.sampling)
        total = 0
        for h, v in self.sampling:
            blocks_wide = _ceil_div(_ceil_div(self.width * h, h_max), 8)
            blocks_high = _ceil_div(_ceil_div(self.height * v, v_max), 8)
            # libjpeg rounds each component's blocks up to whole MCUs (jdcoefct.c)
            total += _ceil_div(blocks_wide, h) * h * _ceil_div(blocks_high, v) * v * 64 * 2
        return total


class _ChunkedStream:
    """Random access to a stream's bytes through one window of at most about 1 MB: a file is
    read once, front to back, never held whole (and never mapped: a file truncated while
    mapped would kill the process with SIGBUS)."""

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO, start: int) -> None:
        self._stream = stream
        self._offset = start  # stream position of self._window[0]
        self._window = b""
        self._eof = False

    def _load(self, pos: int, need: int) -> None:
        """Make the window cover [pos, pos + need) (less at the end of the stream)."""
        if self._offset <= pos and pos + need <= self._offset + len(self._window):
            return
        self._stream.seek(pos)
        self._window = self._stream.read(max(need, self.CHUNK))
        self._offset = pos
        self._eof = len(self._window) < max(need, self.CHUNK)

    def read(self, pos: int, count: int) -> bytes:
        """Up to ``count`` bytes from ``pos`` (fewer at the end of the stream)."""
        self._load(pos, count)
        return self._window[pos - self._offset:pos - self._offset + count]

    def search(self, pattern: re.Pattern[bytes], pos: int) -> tuple[int, int] | None:
        """(first group's byte, end) of the next match of ``pattern`` from ``pos``; the pattern
        must start with 0xFF and may only span further 0xFF bytes and one more byte."""
        while True:
            self._load(pos, 2)
            found = pattern.search(self._window, pos - self._offset)
            if found is not None:
                return found.group(1)[0], self._offset + found.end()
            if self._eof:
                return None
            # Go on from the window's end, keeping a last 0xFF: it may begin a marker.
            end = self._offset + len(self._window)
            pos = end - 1 if self._window.endswith(b"\xff") else end


def _jpeg_layout(stream: BinaryIO, start: int, max_scans: int) -> _JpegLayout:
    """Walk the marker segments of the JPEG at ``start`` in ``stream`` the way libjpeg will.

    Segment payloads are skipped by their length fields (so an EXIF thumbnail, itself a JPEG
    inside APP1, is never mistaken for markers); after a scan's header the entropy-coded data
    is searched for the next marker that is neither a stuffed byte nor RST0-7. Stops at the
    first EOI (an MPO's further pictures are never decoded), a second SOI (libjpeg refuses the
    file there), or as soon as there are more than ``max_scans`` scans, so a bomb costs no more
    than its first ``max_scans`` scans to walk. Malformed structure is left to libjpeg.
    """
    data = _ChunkedStream(stream, start)
    sof, scans, width, height, sampling = 0, 0, 0, 0, ()
    pos = start + 2  # after SOI
    while scans <= max_scans:
        found = data.search(_NEXT_MARKER, pos)
        if found is None:
            break
        code, pos = found
        if code in _STANDALONE:
            continue
        head = data.read(pos, 2)
        if code in (_EOI, _SOI) or len(head) < 2:
            break
        length = (head[0] << 8) | head[1]
        if length < 2:
            break
        if code in _SOF_PROCESS and not sof:
            segment = data.read(pos, length)
            if len(segment) >= 8:
                sof = code
                height, width, count = struct.unpack(">HHB", segment[3:8])
                # (0 is invalid and refused by libjpeg; 1 keeps the arithmetic above defined)
                sampling = tuple((segment[i] >> 4 or 1, segment[i] & 0x0F or 1)
                                 for i in range(9, min(8 + 3 * count, len(segment)), 3))
        elif code == _SOS:
            scans += 1
        pos += length
    return _JpegLayout(sof, scans, width, height, sampling)


def _check_jpeg(stream: BinaryIO, start: int, name: str, max_scans: int) -> _JpegLayout:
    """The JPEG's layout, or ImageLoadError for a coding libjpeg should not be given."""
    layout = _jpeg_layout(stream, start, max_scans)
    if layout.sof in _SOF_ARITHMETIC:
        # libjpeg-turbo (as bundled with Pillow) decodes genuine arithmetic-coded files, but its
        # arithmetic decoder never reports bad data: a file whose header claims arithmetic
        # coding over Huffman data decodes, without an error, to noise (which was then indexed).
        # Browsers do not decode arithmetic JPEGs either, so real ones are vanishingly rare.
        raise ImageLoadError(name, f"arithmetic-coded JPEG is not supported (SOF{layout.sof - 0xC0}, "
                                   f"{_SOF_PROCESS[layout.sof]}); save it as a baseline or progressive JPEG")
    if layout.sof in _SOF_HIERARCHICAL:
        raise ImageLoadError(name, f"hierarchical JPEG is not supported (SOF{layout.sof - 0xC0}, "
                                   f"{_SOF_PROCESS[layout.sof]}); save it as a baseline or progressive JPEG")
    if layout.scans > max_scans:
        raise ImageLoadError(name, f"the JPEG has more than {max_scans} scans (the limit; encoders write about "
                                   f"10): libjpeg decodes every scan over the whole image, so thousands of "
                                   f"them take minutes; refused before decoding")
    return layout


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


# Conversions that need big temporaries (float arrays, RGBA compositing) run on bands of rows of
# about this many pixels, so their temporaries stay near a few MB whatever the image size.
_BAND_PIXELS = 1 << 18


def _banded_rgb(image: Image.Image, convert_band: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``image`` converted to RGB band by band (for point-wise conversions: same pixels as
    converting it whole, with the temporaries of one band instead of the whole image)."""
    width, height = image.size
    out = Image.new("RGB", (width, height))
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        out.paste(convert_band(band), (0, top))
    return out


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """Grey ``uint8`` array (H, W) -> RGB image (3 identical channels)."""
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _high_depth_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Scale 16/32-bit integer and float grey images to 8 bit without clipping.

    * ``I;16*`` (uint16): full scale is 65535, so ``round(v * 255 / 65535)`` (65535 -> 255),
      computed exactly in integers: 65535 = 255 * 257, so it is ``(v + 128) // 257``.
    * ``I`` (int32): Pillow stores 16-bit PNG/TIFF data in this mode too; values within
      0..65535 are scaled as 16 bit, anything else (true 32-bit data has no fixed white
      point) is min-max stretched to 0..255.
    * ``F`` (float32): values within [0, 1] are scaled by 255, within [0, 255] kept,
      otherwise min-max stretched; NaN/inf become 0.

    Runs band by band (the min-max stretch first finds the whole image's range): the float64
    arrays of a 40 MP image would take 320 MB each.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return _banded_rgb(image, lambda band: _grey_to_rgb(
            ((np.asarray(band).astype(np.uint32) + 128) // 257).astype(np.uint8)))
    if mode == "I":
        lo, hi = image.getextrema()  # one pass in C, no copy
        if lo >= 0 and hi <= 65535:
            return _banded_rgb(image, lambda band: _grey_to_rgb(
                ((np.asarray(band).astype(np.int64) + 128) // 257).astype(np.uint8)))
        return _banded_rgb(image, lambda band: _grey_to_rgb(_stretch(np.asarray(band).astype(np.float64), lo, hi)))
    if mode == "F":
        def finite(band: Image.Image) -> np.ndarray:
            return np.nan_to_num(np.asarray(band).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)

        rows = max(1, _BAND_PIXELS // image.width)
        lo, hi = np.inf, -np.inf
        for top in range(0, image.height, rows):
            values = finite(image.crop((0, top, image.width, min(top + rows, image.height))))
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        if lo >= 0 and hi <= 1.0:
            return _banded_rgb(image, lambda band: _grey_to_rgb(_clip_round(finite(band) * 255.0)))
        if lo >= 0 and hi <= 255.0:
            return _banded_rgb(image, lambda band: _grey_to_rgb(_clip_round(finite(band))))
        return _banded_rgb(image, lambda band: _grey_to_rgb(_stretch(finite(band), lo, hi, floor=1e-12)))
    raise ImageLoadError(name, f"unexpected mode {mode}")  # pragma: no cover - guarded by the caller


def _clip_round(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float, floor: float = 1.0) -> np.ndarray:
    """Min-max stretch of ``values`` from [lo, hi] to 0..255 (``floor``: the smallest range)."""
    return _clip_round((values - lo) * (255.0 / max(hi - lo, floor)))


def _alpha_band_over_white(band: Image.Image) -> Image.Image:
    rgba = band.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit ``RGB``; see the module docstring for why each rule exists.
    Returns ``image`` itself when it is RGB already, else a new image."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image, name)
    if mode == "P":
        # A palette may mark one index (or a tRNS table) transparent: go through RGBA so the
        # transparent pixels become white instead of whatever colour the palette holds there.
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        if not has_alpha:
            return image.convert("RGB")
        return _banded_rgb(image, _alpha_band_over_white)  # crop() keeps the palette and its transparency
    if mode in _ALPHA_MODES:
        # Whole, this would hold the image, its RGBA copy, a white RGBA and the composite at once.
        return _banded_rgb(image, _alpha_band_over_white)
    try:
        # CMYK, L, 1, YCbCr and friends: Pillow's own conversion is exact for these.
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(name, f"unsupported pixel mode {mode!r} ({exc})") from None


# Bytes per pixel of Pillow's in-memory modes ("RGB" and every other 3- or 4-band mode, "I"
# and "F" take 4); each image also keeps a pointer per row.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# What a decode holds besides the images (decoder state and row buffers, the PNG re-inflate's
# output chunks, band temporaries): measured at most 6 MB at 40 MP (benchmarks/decode_bombs.py);
# counted with a margin.
_DECODE_OVERHEAD_BYTES = 16 << 20


def _image_bytes(mode: str, width: int, height: int) -> int:
    """Memory of a Pillow image of this mode and size."""
    return width * height * _PIXEL_BYTES.get(mode, 4) + 8 * height


def _decode_peak_bytes(image: Image.Image, layout: _JpegLayout | None, transposes: bool,
                       target: tuple[int, int] | None) -> int:
    """An upper estimate of the memory :func:`load_image` holds at once for ``image`` (opened,
    drafted, not yet decoded): the largest of its stages, each of which frees what the next
    does not need.

    * decode: the decoded image, plus what the decoder keeps: libjpeg's whole-image
      coefficient buffer for a progressive JPEG (at full resolution whatever the draft), three
      more RGBA canvases for WebP (libwebp's animation decoder keeps two, and the frame's
      bytes are copied once more before Pillow unpacks them: 16 bytes a pixel in all,
      measured), libtiff's strip buffer for a compressed TIFF (up to the whole image);
    * orientation (``transposes``): the decoded image and its transposed copy;
    * conversion to RGB (any other mode): the decoded image and its RGB copy (the banded
      conversions add one band's temporaries, within the fixed overhead);
    * ``max_side`` (``target``): the RGB image, Pillow's reduce() of it and the resize's
      intermediate.
    """
    width, height = image.size
    decoded = _image_bytes(image.mode, width, height)
    rgb = _image_bytes("RGB", width, height)
    extra = 0
    if layout is not None:
        extra = layout.coefficient_bytes()
    elif image.format == "WEBP":
        extra = 3 * width * height * 4
    elif image.format == "TIFF" and image.info.get("compression", "raw") != "raw":
        extra = decoded
    stages = [decoded + extra]
    if transposes:
        stages.append(2 * decoded)
    if image.mode != "RGB":
        stages.append(decoded + rgb)
    if target is not None:
        target_width, target_height = target
        stages.append(rgb + rgb // 4 + _image_bytes("RGB", target_width, height)
                      + _image_bytes("RGB", target_width, target_height))
    return max(stages) + _DECODE_OVERHEAD_BYTES


def _transposes(image: Image.Image, stream: BinaryIO, start: int) -> bool:
    """Whether the EXIF orientation will transpose ``image``, known without decoding it (the
    EXIF of a JPEG, TIFF or WebP is in its header; a PNG's eXIf chunk may follow the pixels)."""
    if image.format == "PNG" and "exif" not in image.info:
        return _png_has_late_exif(stream, start)
    try:
        return image.getexif().get(_ORIENTATION, 1) in range(2, 9)
    except Exception:  # noqa: BLE001 - broken EXIF: exif_transpose fails the same way and is skipped
        return False


_ORIENTATION = 0x0112  # the EXIF tag


def _png_has_late_exif(stream: BinaryIO, start: int) -> bool:
    """Whether a PNG has an eXIf chunk after its image data (Pillow reads it only on load);
    walks the chunk headers only, seeking over their data."""
    stream.seek(start + 8)
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return False
        length, kind = struct.unpack(">I4s", head)
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        stream.seek(length + 4, io.SEEK_CUR)


def _draft_jpeg(image: Image.Image, max_side: int) -> None:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale (DCT scaling: far less time, and memory
    for the output) when the longest side stays at least ``max_side``."""
    width, height = image.size
    longest = max(width, height)
    scale = next((s for s in (8, 4, 2) if _ceil_div(longest, s) >= max_side), 1)
    if scale > 1:
        # Pillow picks the largest scale s with s <= min(width // w, height // h); asking for
        # (width // scale, height // scale) yields ``scale`` unless the short side is below it.
        image.draft(None, (max(1, width // scale), max(1, height // scale)))


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The size of ``size`` scaled so its longest side is ``max_side``, or None when it fits."""
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return None
    return max(1, round(width * max_side / longest)), max(1, round(height * max_side / longest))


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    max_side: int | None = None,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    budget: DecodeBudget | None = None,
    budget_timeout: float | None = None,
) -> Image.Image:
    """Load one image as a fully decoded 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        source: a path, the raw file bytes, or a binary file object (an upload).
        max_pixels: refuse images whose declared ``width * height`` exceeds this. The check
            reads only the header, so a 20000x20000 PNG is refused without allocating it.
        name: how to name the image in errors; defaults to the path, or ``<upload>``.
        max_side: when given, the returned image's longest side is at most this: JPEGs decode
            at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least ``max_side``,
            every image is then resized (antialiased bilinear). None (the default) keeps the full
            resolution, which is what indexing needs (stored descriptors must not change).
        max_jpeg_scans: refuse a JPEG with more scans than this (read from its markers,
            before decoding).
        max_aspect_ratio: refuse images whose longer side is more than this many times the
            shorter (from the header).
        budget: the process's :class:`DecodeBudget`: the decode's estimated peak memory is
            reserved in it before anything is allocated.
        budget_timeout: seconds to wait for room in ``budget`` (None: as long as it takes).

    Returns:
        An ``RGB`` image (``np.asarray`` gives ``uint8`` of shape ``(H, W, 3)``) with EXIF
        orientation applied. Animated images yield their first frame.

    Raises:
        ImageLoadError: missing/empty/non-image/truncated/corrupt input, too many pixels, an
            extreme aspect ratio, too many JPEG scans, an arithmetic-coded JPEG, a pixel mode
            that cannot be converted to RGB, or an image whose decode alone needs more memory
            than the whole ``budget`` ("exceeds the decode memory limit").
        DecodeBusyError: ``budget`` had no room within ``budget_timeout``.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    with _opened(source, name) as (image, stream, start):
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(name, f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ImageLoadError(
                name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageLoadError(name, f"{width}x{height} is too elongated to be a photo: the longer side is "
                                       f"more than {max_aspect_ratio:g} times the shorter")
        layout, target = _plan(image, stream, start, name, max_jpeg_scans, max_side)
        if budget is None:
            return _decode(image, stream, start, name, max_side)
        need = _decode_peak_bytes(image, layout, _transposes(image, stream, start), target)
        if need > budget.max_bytes:
            raise ImageLoadError(name, f"{width}x{height} {image.format} needs about {_mb(need)} to decode, "
                                       f"which exceeds the decode memory limit of {_mb(budget.max_bytes)}")
        with budget.reserve(need, timeout=budget_timeout):
            return _decode(image, stream, start, name, max_side)


def decode_memory_estimate(source: ImageSource, *, max_side: int | None = None,
                           max_jpeg_scans: int = MAX_JPEG_SCANS, name: str | None = None) -> int:
    """The memory :func:`load_image` would reserve to decode ``source`` (from its header, plus
    the JPEG markers): for a caller that decodes it through code that takes no budget (an add
    re-reads the stored file) and wants to reserve the same amount around that.

    Raises ImageLoadError where ``load_image`` would refuse the header or the JPEG structure."""
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    with _opened(source, name) as (image, stream, start):
        layout, target = _plan(image, stream, start, name, max_jpeg_scans, max_side)
        return _decode_peak_bytes(image, layout, _transposes(image, stream, start), target)


@contextlib.contextmanager
def _opened(source: ImageSource, name: str) -> Iterator[tuple[Image.Image, BinaryIO, int]]:
    """``source`` opened (header only) as ``(image, stream, start)``; the stream is closed
    afterwards when it was opened here, and the image's pixels are released (the decoded
    result holds its own reference when it shares them)."""
    stream = _open_source(source, name)
    owns_stream = stream is not source
    try:
        start = stream.tell()
        image = _open_header(stream, start, name)
        try:
            yield image, stream, start
        finally:
            _release_pixels(image)
    finally:
        if owns_stream:
            stream.close()


def _plan(image: Image.Image, stream: BinaryIO, start: int, name: str, max_jpeg_scans: int,
          max_side: int | None) -> tuple[_JpegLayout | None, tuple[int, int] | None]:
    """Check a JPEG's structure (scans, coding) and draft it for ``max_side``; returns its
    layout (None for other formats) and the size ``max_side`` resizes to (None: no resize)."""
    layout = None
    if image.format in ("JPEG", "MPO"):  # MPO: multi-picture phone JPEGs
        layout = _check_jpeg(stream, start, name, max_jpeg_scans)
        if max_side is not None:
            _draft_jpeg(image, max_side)
    return layout, None if max_side is None else _fit(image.size, max_side)


def _open_header(stream: BinaryIO, start: int, name: str) -> Image.Image:
    """``Image.open`` (header only) with its failures as ImageLoadError."""
    try:
        # Lazy: parses the header only. MPO (multi-picture phone JPEGs) opens via "JPEG".
        return Image.open(stream, formats=SUPPORTED_FORMATS)
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


def _release_pixels(image: Image.Image) -> None:
    """Free ``image``'s pixels now rather than when the object is collected (a traceback can
    keep it for long). Image.close() of the base class: the file's close() would also close
    the stream, which may be the caller's file object."""
    Image.Image.close(image)


def _decode(image: Image.Image, stream: BinaryIO, start: int, name: str, max_side: int | None) -> Image.Image:
    """Decode the opened ``image`` fully, orient, convert to RGB and fit in ``max_side``."""
    width, height = image.size
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
        # In place: a copy of an unrotated image would only double the memory.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - broken EXIF must not reject good pixels
        pass
    rgb = _to_rgb(image, name)
    if rgb is image:
        # A plain Image sharing the decoded pixels, detached from the file (and from the
        # decoder's state): what Image.copy() does, without copying the pixels.
        rgb = image._new(image.im)
    else:
        _release_pixels(image)  # not needed any more, and the resize below may be big
    if max_side is not None:
        target = _fit(rgb.size, max_side)
        if target is not None:
            # Antialiased bilinear, the filter of the model's own transforms: callers reduce
            # further, and it takes 0.36 s from 40 MP to 2048x2048 here where Lanczos takes
            # 0.89 s. reducing_gap: a box reduce by an integer factor first when the ratio is
            # large (thumbnails), which Pillow documents as indistinguishable at 3.
            rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return rgb


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
