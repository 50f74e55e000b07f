"""Decode bombs: small files whose decode costs far more time or memory than their size says.

Issue 19 (items 2 and 3): a 2.2 MB progressive JPEG with 20,000 scans took 71 s to decode; a
78 KB 1x39,999,999 PNG raised the server's RSS by 1.6 GB. This module crafts such files (in
memory or in a temporary folder, never in the repository) and measures, per file, what
:func:`waldo.data.images.load_image` costs: wall time, the peak RSS it added, each in a fresh
subprocess (``/proc/self/clear_refs`` resets ``VmHWM``; peak minus the RSS before), so one
file's heap never inflates the next file's figure, and the loader's own estimate of that peak
(what it reserves in a :class:`~waldo.data.images.DecodeBudget`).

    .venv/bin/python benchmarks/decode_bombs.py --max-side 2048 --json results/decode_bombs.json
    # the loader of another version (say, before a change), from a copy of its file:
    .venv/bin/python benchmarks/decode_bombs.py --loader-file /tmp/images_before.py

The crafting functions are importable (tests and other benchmarks use them):
:func:`scan_bomb_jpeg` (and :func:`add_eob_scans` for any progressive JPEG),
:func:`long_strip_png`, :func:`bilevel_png`, :func:`deep_png`, :func:`alpha_png`,
:func:`baseline_jpeg`, :func:`progressive_jpeg`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["FILES", "add_eob_scans", "alpha_png", "baseline_jpeg", "bilevel_png", "deep_png", "long_strip_png",
           "measure_file", "progressive_jpeg", "scan_bomb_jpeg"]


# --- JPEG ------------------------------------------------------------------------------------

def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment before the first SOS (``end`` exclusive)."""
    segments = []
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"expected a marker at byte {pos}")
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segments.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return segments


def _frame_components(data: bytes) -> tuple[int, int, list[tuple[int, int, int]], int]:
    """Width, height, (id, h, v sampling) per component and the SOF marker code of a JPEG."""
    for marker, start, _ in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width, count = struct.unpack(">HHB", data[start + 5:start + 10])
            components = []
            for i in range(count):
                cid, sampling, _ = data[start + 10 + 3 * i:start + 13 + 3 * i]
                components.append((cid, sampling >> 4, sampling & 0x0F))
            return width, height, components, marker
    raise ValueError("no start-of-frame segment")


class _BitWriter:
    """MSB-first bits into JPEG entropy-coded bytes (0xFF is stuffed with 0x00, pad with 1s)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self._acc = 0
        self._bits = 0

    def write(self, value: int, nbits: int) -> None:
        self._acc = (self._acc << nbits) | (value & ((1 << nbits) - 1))
        self._bits += nbits
        while self._bits >= 8:
            self._bits -= 8
            byte = (self._acc >> self._bits) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0x00)
        self._acc &= (1 << self._bits) - 1

    def flush(self) -> bytes:
        if self._bits:
            self.write((1 << (8 - self._bits)) - 1, 8 - self._bits)
        return bytes(self.out)


def _eob_scan(component_id: int, blocks: int) -> bytes:
    """One progressive AC first scan (Ss=1, Se=63, Ah=Al=0) of one component made only of
    end-of-band runs: it changes no coefficient, yet libjpeg visits every block of the
    component to count the runs down, which is what makes thousands of them slow.

    Uses AC table 0 as :func:`_eob_table` defines it: symbol ``r << 4`` (EOBr, a run of
    ``2**r + r extra bits`` blocks) has the 4-bit code ``r``.
    """
    header = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, component_id, 0x00, 1, 63, 0x00)
    bits = _BitWriter()
    left = blocks
    while left:
        run = min(left, 32767)  # EOB14 with 14 extra bits is the longest run
        r = run.bit_length() - 1
        bits.write(r, 4)
        bits.write(run - (1 << r), r)
        left -= run
    return header + bits.flush()


def _eob_table() -> bytes:
    """DHT segment: AC table 0 holding EOB0..EOB14, all with 4-bit codes (0000..1110)."""
    counts = [0] * 16
    counts[3] = 15
    symbols = bytes(r << 4 for r in range(15))
    body = bytes([0x10]) + bytes(counts) + symbols
    return b"\xff\xc4" + struct.pack(">H", 2 + len(body)) + body


def add_eob_scans(jpeg: bytes, scans: int) -> bytes:
    """``jpeg`` (a progressive JPEG ending with EOI) with ``scans`` extra AC scans of its first
    component spliced in before the EOI, each made of end-of-band runs only (about 40 bytes
    each at 6000x6000). The extra scans are a legal progression (an AC first scan with Ah=0
    after the band is complete triggers no libjpeg warning) and change no coefficient, so the
    file decodes to the very same pixels, only slower: libjpeg visits every block of the
    component once per scan."""
    if scans < 0:
        raise ValueError(f"scans must be >= 0, got {scans}")
    if not jpeg.endswith(b"\xff\xd9"):
        raise ValueError("the JPEG does not end with EOI")
    frame_width, frame_height, components, sof = _frame_components(jpeg)
    if sof != 0xC2:
        raise ValueError(f"extra AC scans need a progressive JPEG (SOF2), this one is SOF{sof - 0xC0}")
    first_id, h, v = components[0]
    h_max = max(c[1] for c in components)
    v_max = max(c[2] for c in components)
    # A non-interleaved scan covers the component's own blocks (not whole MCUs).
    comp_width = -(-frame_width * h // h_max)
    comp_height = -(-frame_height * v // v_max)
    blocks = -(-comp_width // 8) * -(-comp_height // 8)
    return jpeg[:-2] + _eob_table() + _eob_scan(first_id, blocks) * scans + b"\xff\xd9"


def scan_bomb_jpeg(width: int = 6000, height: int = 6000, scans: int = 20000) -> bytes:
    """A valid progressive JPEG of ``width`` x ``height`` whose decode takes time in proportion
    to ``scans`` times its pixel count, not to its size in bytes: a smooth image Pillow writes
    progressive (~10 scans) plus ``scans`` scans of :func:`add_eob_scans`. Today's loader must
    decode it, only slowly (minutes at the defaults)."""
    if width <= 0 or height <= 0 or scans < 0:
        raise ValueError(f"need a positive size and scans >= 0, got {width}x{height}, {scans}")
    ramp_x = np.linspace(0, 255, num=width, dtype=np.float32)
    ramp_y = np.linspace(0, 255, num=height, dtype=np.float32)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = ramp_x[None, :].astype(np.uint8)
    pixels[..., 1] = ramp_y[:, None].astype(np.uint8)
    pixels[..., 2] = 128
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=75, progressive=True)
    del pixels
    return add_eob_scans(out.getvalue(), scans)


def baseline_jpeg(width: int = 6000, height: int = 6000, quality: int = 90, seed: int = 0) -> bytes:
    """A baseline (sequential) JPEG of ``width`` x ``height`` with photo-like detail: smooth
    ramps plus seeded noise, so its entropy-coded data is not trivially small."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    row = np.linspace(0, 200, num=width, dtype=np.float32)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, 1024):  # in bands: the float noise of the whole image is 430 MB
        rows = min(1024, height - top)
        noise = rng.normal(0.0, 18.0, size=(rows, width, 3)).astype(np.float32)
        pixels[top:top + rows] = np.clip(row[None, :, None] + noise + 30, 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


# --- PNG -------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, colour: int, rows) -> bytes:
    """A PNG whose IDAT is the zlib stream of ``rows`` (an iterable of filtered scanlines,
    each starting with its filter byte), compressed as it is produced: never held whole."""
    compressor = zlib.compressobj(9)
    idat = bytearray()
    for row in rows:
        idat += compressor.compress(row)
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bytes(idat))
            + _png_chunk(b"IEND", b""))


def long_strip_png(length: int = 39_999_999) -> bytes:
    """An 8-bit grey PNG 1 pixel wide and ``length`` pixels tall (at the default, 78 KB that
    decode to 40 MB of grey, 120 MB of RGB, and an aspect ratio no model can use)."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    block_rows = 1 << 16
    block = b"\x00\x80" * block_rows  # filter None, one mid-grey pixel per row
    full, rest = divmod(length, block_rows)
    return _png(1, length, 8, 0, [block] * full + [b"\x00\x80" * rest])


def bilevel_png(side: int = 6300, seed: int = 0) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` (5 KB at the default; 40 MP once decoded): white with
    a few black seeded rectangles, so each seed gives different bytes (and pixels)."""
    if side <= 0:
        raise ValueError(f"side must be positive, got {side}")
    rng = np.random.default_rng(seed)
    bits = np.ones((side, side), dtype=bool)
    for _ in range(8):
        x0, y0 = (int(v) for v in rng.integers(0, side, size=2))
        bits[y0:y0 + 1 + side // 20, x0:x0 + 1 + side // 20] = False
    packed = np.packbits(bits, axis=1)
    del bits
    zero = b"\x00"
    return _png(side, side, 1, 0, (zero + packed[y].tobytes() for y in range(side)))


def deep_png(width: int = 6325, height: int = 6324) -> bytes:
    """A 16-bit grey PNG of ``width`` x ``height`` (40 MP at the default) holding a smooth
    ramp: small on disk, 80 MB of samples once decoded (Pillow mode ``I;16`` or ``I``)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"need a positive size, got {width}x{height}")
    row = np.linspace(0, 65535, num=width).astype(">u2").tobytes()
    line = b"\x00" + row
    return _png(width, height, 16, 0, (line for _ in range(height)))


def alpha_png(width: int = 6325, height: int = 6324) -> bytes:
    """An 8-bit RGBA PNG of ``width`` x ``height`` (40 MP at the default) with a horizontal
    alpha ramp: the conversion that composites over white is the most memory-hungry one."""
    if width <= 0 or height <= 0:
        raise ValueError(f"need a positive size, got {width}x{height}")
    pixels = np.zeros((width, 4), dtype=np.uint8)
    pixels[:, 0] = 200
    pixels[:, 3] = np.linspace(0, 255, num=width).astype(np.uint8)
    line = b"\x00" + pixels.tobytes()
    return _png(width, height, 8, 6, (line for _ in range(height)))


def progressive_jpeg(width: int = 6000, height: int = 6000, seed: int = 0) -> bytes:
    """:func:`baseline_jpeg`'s photo saved progressive (libjpeg's 10 scans): an honest file
    whose decode holds libjpeg's whole-image coefficient buffer."""
    with Image.open(io.BytesIO(baseline_jpeg(width, height, seed=seed))) as photo:
        out = io.BytesIO()
        photo.save(out, format="JPEG", quality=90, progressive=True)
    return out.getvalue()


#: name -> (what it is, how to make it). Sizes are the reviewer's (issue 19).
FILES = {
    "scan-bomb-jpeg": ("6000x6000 progressive JPEG with 20,000 extra EOB-only scans",
                       lambda scans: scan_bomb_jpeg(6000, 6000, scans)),
    "long-strip-png": ("1x39,999,999 8-bit grey PNG", lambda _: long_strip_png()),
    "bilevel-png": ("6300x6300 1-bit PNG", lambda _: bilevel_png()),
    "deep-png": ("6325x6324 16-bit grey PNG (40 MP)", lambda _: deep_png()),
    "alpha-png": ("6325x6324 RGBA PNG (40 MP)", lambda _: alpha_png()),
    "baseline-jpeg": ("6000x6000 baseline JPEG", lambda _: baseline_jpeg()),
    "progressive-jpeg": ("6000x6000 progressive JPEG (10 scans)", lambda _: progressive_jpeg()),
}


def _memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in kB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def _child(path: str, max_side: int | None, loader_file: str | None) -> dict:
    """Runs in the fresh subprocess: one load_image of ``path``; time, peak RSS added, and the
    decode budget the loader reserved (its own estimate of the peak)."""
    if loader_file:  # another version of the loader, e.g. the one before a change
        import importlib.util

        spec = importlib.util.spec_from_file_location("loader_under_test", loader_file)
        images = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(images)
    else:
        from waldo.data import images
    kwargs = {}
    budget = None
    if hasattr(images, "DecodeBudget"):
        budget = images.DecodeBudget(1 << 40)  # never waits: only records the reservation
        kwargs = {"budget": budget, "max_side": max_side}
    elif max_side is not None:
        return {"skipped": "this loader has no max_side"}
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _memory_kb()["VmRSS"]
    start = time.perf_counter()
    try:
        image = images.load_image(path, **kwargs)
        outcome = {"size": list(image.size)}
    except images.ImageLoadError as error:
        outcome = {"refused": error.reason}
    seconds = time.perf_counter() - start
    peak = _memory_kb()["VmHWM"]
    result = {**outcome, "seconds": round(seconds, 3), "peak_rss_added_mib": round((peak - before) / 1024, 1)}
    if budget is not None and budget.peak:
        result["estimated_peak_mib"] = round(budget.peak / 2**20, 1)
    return result


def measure_file(path: Path, max_side: int | None = None, loader_file: str | None = None,
                 timeout: float = 600.0) -> dict:
    """load_image of ``path`` in a fresh Python process (so no heap of an earlier file counts):
    seconds, peak RSS it added (MB), and the loader's own peak estimate (MB)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
    if max_side is not None:
        command += ["--max-side", str(max_side)]
    if loader_file:
        command += ["--loader-file", loader_file]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    if done.returncode != 0:
        return {"failed": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--files", nargs="*", default=list(FILES), choices=list(FILES), help="which files")
    parser.add_argument("--scans", type=int, default=20000, help="extra scans of the scan bomb")
    parser.add_argument("--max-side", type=int, default=None,
                        help="also measure load_image(..., max_side=N) (thumbnails, queries)")
    parser.add_argument("--loader-file", default=None,
                        help="measure the load_image of this file instead of waldo.data.images")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.max_side, args.loader_file)))
        return None
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode-bombs-") as folder:
        for key in args.files:
            what, make = FILES[key]
            data = make(args.scans)
            path = Path(folder) / f"{key}.{'jpg' if key.endswith('jpeg') else 'png'}"
            path.write_bytes(data)
            del data
            entry = {"what": what, "bytes": path.stat().st_size,
                     "full": measure_file(path, None, args.loader_file, args.timeout)}
            if args.max_side is not None:
                entry[f"max_side_{args.max_side}"] = measure_file(path, args.max_side, args.loader_file, args.timeout)
            results[key] = entry
            print(key, json.dumps(entry), file=sys.stderr, flush=True)
    report = {"loader": args.loader_file or "waldo.data.images", "scans": args.scans, "files": results,
              "cpu_count": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
