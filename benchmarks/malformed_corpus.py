"""Malformed input: a seeded corpus of broken and unusual files made from real photos, fed to
the image loader, to indexing (the Python API's ``add``) and to the service's ``POST /search``.

Each file is made from a real photo (grocery JPEGs, COIL-100 and Oxford PNGs, ABO catalogue
JPEGs) by one mutation, and carries what a correct Waldo must do with it:

* ``ok``: valid but unusual (CMYK, 16-bit, palette with transparency, alpha, bilevel, float
  TIFF, animated GIF, EXIF rotation, WebP/BMP/TIFF/PPM, 1x1, the wrong extension, trailing
  bytes): decoded to 8-bit RGB of the right size (EXIF rotation applied), indexed, searchable.
* ``refuse``: not an image Waldo accepts (empty, zeros, random bytes, SVG/HTML/text/PDF/ZIP/EPS
  named ``.jpg``, an ICO, a header alone, a PNG/JPEG/GIF/BMP header declaring billions of
  pixels, a real 48-megapixel PNG, a JPEG of hundreds of scans, a JPEG claiming arithmetic
  coding, a 1-pixel strip): refused with a clear message, 4xx from the service.
* ``either``: damaged photos (truncated, bits flipped, bytes overwritten, header cut): refused
  with a clear message, or decoded if the damage left a decodable image.

Per stage, anything but an image or ``ImageLoadError`` from the loader, an exception out of
``Waldo.add``, a 5xx or a body without a ``detail`` sentence from the service counts as a
crash; a file that is refused where it should load (or the reverse), or a stage that disagrees
with the loader about a file, counts as unexpected. Files go to a temporary folder, never to
the repository.

    .venv/bin/python benchmarks/malformed_corpus.py --files 1000 --json results/malformed_corpus.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.decode_bombs import add_eob_scans  # noqa: E402
from waldo.data.datasets import read_labels_csv  # noqa: E402
from waldo.data.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, MAX_JPEG_SCANS, ImageLoadError, load_image)
from waldo.paths import data_root  # noqa: E402

__all__ = ["CorpusFile", "CorpusReport", "build_corpus", "run_corpus", "source_photos"]

SOURCE_SIDE = 320  # valid variants are made from a copy scaled to at most this side: light to index


@dataclass
class CorpusFile:
    path: Path
    kind: str
    expect: str  # "ok" | "refuse" | "either"
    size: tuple[int, int] | None = None  # (width, height) an "ok" file must decode to


@dataclass
class StageReport:
    """One stage's outcomes over the corpus."""

    processed: int = 0
    refused: int = 0
    crashes: int = 0  # an exception that is not a clear refusal, or a 5xx
    unexpected: int = 0  # refused although valid, accepted although invalid, or disagreeing with the loader
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(message)


@dataclass
class CorpusReport:
    files: int
    seed: int
    kinds: dict[str, int]
    expect: dict[str, int]
    loader: StageReport
    index: StageReport
    search: StageReport
    examples: dict[str, str]  # kind -> one refusal message, to show what a user reads

    @property
    def crashes(self) -> int:
        return self.loader.crashes + self.index.crashes + self.search.crashes

    @property
    def unexpected(self) -> int:
        return self.loader.unexpected + self.index.unexpected + self.search.unexpected

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.search.statuses.items() if status.startswith("5"))


# ----------------------------------------------------------------------------- sources
def source_photos(root: Path | None = None, rng: random.Random | None = None) -> list[Path]:
    """A seeded handful of real photos of every format the data folder holds."""
    root = root or data_root()
    rng = rng or random.Random(0)
    grocery = read_labels_csv(root / "grocery_store").paths
    coil = read_labels_csv(root / "coil100").paths
    abo = read_labels_csv(root / "abo_sample").paths
    oxford = sorted((root / "oxford_affine").rglob("*.png"))
    return [Path(p) for p in rng.sample(grocery, 8) + rng.sample(coil, 3) + rng.sample(abo, 2)] + oxford[:1]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _small(photo: Image.Image) -> Image.Image:
    small = photo.copy()
    small.thumbnail((SOURCE_SIDE, SOURCE_SIDE))
    return small


# ----------------------------------------------------------------------------- mutations
# Each takes (original bytes, decoded RGB photo, rng) and returns (bytes, extension, expected
# size or None). The registry below says what Waldo must do with the result.
Mutation = Callable[[bytes, Image.Image, random.Random], tuple[bytes, str, "tuple[int, int] | None"]]


def _truncate(data: bytes, _: Image.Image, rng: random.Random):
    return data[: rng.randint(1, len(data) - 1)], "jpg", None


def _cut_header(data: bytes, _: Image.Image, rng: random.Random):
    return data[: rng.randint(1, min(200, len(data) - 1))], "jpg", None


def _bit_flips(data: bytes, _: Image.Image, rng: random.Random):
    out = bytearray(data)
    for _ in range(rng.randint(1, 64)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out), "jpg", None


def _overwrite(data: bytes, _: Image.Image, rng: random.Random):
    out = bytearray(data)
    start = rng.randrange(len(out))
    length = rng.randint(1, 512)
    out[start:start + length] = bytes(rng.getrandbits(8) for _ in range(min(length, len(out) - start)))
    return bytes(out), "png", None


def _trailing(data: bytes, photo: Image.Image, rng: random.Random):
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096)))
    small = _small(photo)
    return _encode(small, "JPEG", quality=85) + junk, "jpg", small.size


def _empty(*_):
    return b"", "jpg", None


def _zeros(data: bytes, _: Image.Image, rng: random.Random):
    return bytes(rng.randint(1, 65536)), "jpg", None


def _random_bytes(_: bytes, __: Image.Image, rng: random.Random):
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8192))), rng.choice(["jpg", "png", "gif"]), None


_TEXTS = {
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000">'
           b'<rect width="100%" height="100%" fill="red"/><script>alert(1)</script></svg>',
    "html": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)><h1>not a photo</h1></body></html>",
    "text": b"This is a plain text file that someone renamed to photo.jpg\n" * 20,
    "json": b'{"image": "no", "width": 100000, "height": 100000}',
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n(x) print showpage\n",
    "zip": b"PK\x03\x04" + bytes(26) + b"evil.jpg",
    "gzip": b"\x1f\x8b\x08\x00" + bytes(16),
    "elf": b"\x7fELF\x02\x01\x01" + bytes(57),
    "jpeg-magic-then-text": b"\xff\xd8\xff\xe0 this starts like a JPEG and is not one",
}


def _text_as_image(_: bytes, __: Image.Image, rng: random.Random):
    name = rng.choice(sorted(_TEXTS))
    return _TEXTS[name], rng.choice(["jpg", "png", "jpeg"]), None


def _ico(_: bytes, photo: Image.Image, __: random.Random):
    return _encode(photo.resize((64, 64)), "ICO"), "jpg", None  # a real image, off the allowlist


def _header_only(_: bytes, photo: Image.Image, __: random.Random):
    return _encode(_small(photo), "PNG")[:33], "png", None  # signature + IHDR, no pixel data


def _huge_dims(rng: random.Random) -> tuple[int, int]:
    """A declared size over the 40 MP limit: from just over it to billions of pixels."""
    width = rng.choice([7000, 20000, 65000, 65535])
    height = DEFAULT_MAX_PIXELS // width + rng.choice([1, 100, 10000, 60000])
    return width, min(height, 65535)


def _huge_png(_: bytes, photo: Image.Image, rng: random.Random):
    data = bytearray(_encode(photo.resize((8, 8)), "PNG"))
    struct.pack_into(">II", data, 16, *_huge_dims(rng))
    if rng.random() < 0.7:  # a valid CRC: only the pixel limit can refuse it
        struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data), "png", None


def _huge_jpeg(data: bytes, photo: Image.Image, rng: random.Random):
    out = bytearray(_encode(_small(photo), "JPEG", quality=80))
    for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline or progressive start-of-frame
        at = out.find(marker)
        if at >= 0:
            width, height = _huge_dims(rng)
            struct.pack_into(">HH", out, at + 5, height, width)
            break
    return bytes(out), "jpg", None


def _huge_gif(_: bytes, photo: Image.Image, __: random.Random):
    out = bytearray(_encode(photo.resize((8, 8)), "GIF"))
    struct.pack_into("<HH", out, 6, 65535, 65535)  # logical screen
    at = out.find(b"\x2c")  # image descriptor: its own size too
    if at >= 0:
        struct.pack_into("<HH", out, at + 5, 65535, 65535)
    return bytes(out), "gif", None


def _huge_bmp(_: bytes, photo: Image.Image, rng: random.Random):
    out = bytearray(_encode(photo.resize((8, 8)), "BMP"))
    struct.pack_into("<ii", out, 18, *_huge_dims(rng))
    return bytes(out), "bmp", None


_BOMB: dict[str, bytes] = {}


def _bomb_png(*_):
    """A real, decodable 8000x6000 PNG (48 MP, 48 KB compressed): over the limit, refused from
    its header before 144 MB of pixels are allocated. Made once and reused."""
    if "png" not in _BOMB:
        _BOMB["png"] = _encode(Image.new("L", (8000, 6000)), "PNG", optimize=True)
    return _BOMB["png"], "png", None


def _scan_bomb(_: bytes, photo: Image.Image, rng: random.Random):
    """The photo as a progressive JPEG plus hundreds of end-of-band scans: valid, decodes to
    the photo, but each scan costs a pass over the image (minutes at 6000x6000 and 20,000
    scans), so files over the scan limit are refused before decoding."""
    jpeg = _encode(_small(photo), "JPEG", quality=85, progressive=True)
    return add_eob_scans(jpeg, MAX_JPEG_SCANS + rng.choice([1, 50, 500])), "jpg", None


def _arithmetic_jpeg(_: bytes, photo: Image.Image, rng: random.Random):
    """A Huffman-coded JPEG whose start-of-frame claims arithmetic coding (SOF9/SOF10):
    libjpeg would decode it to noise without an error."""
    progressive = rng.random() < 0.5
    out = bytearray(_encode(_small(photo), "JPEG", quality=85, progressive=progressive))
    at = out.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    out[at + 1] += 9
    return bytes(out), "jpg", None


def _long_strip(_: bytes, photo: Image.Image, rng: random.Random):
    """A strip far thinner than any photo (a real one decodes fine but squashes to nonsense
    in the square model input; at 1x40,000,000 it took 1.2 GB to load)."""
    length = rng.choice([MAX_ASPECT_RATIO + 1, 1000, 20000])
    size = (1, length) if rng.random() < 0.5 else (length, 1)
    return _encode(photo.resize(size), "PNG"), "png", None


def _cmyk_jpeg(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    return _encode(small.convert("CMYK"), "JPEG", quality=85), "jpg", small.size


def _cmyk_tiff(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    return _encode(small.convert("CMYK"), "TIFF"), "tif", small.size


def _png16(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    grey = np.asarray(small.convert("L"), np.uint16) * 257
    return _encode(Image.fromarray(grey), "PNG"), "png", small.size


def _float_tiff(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    grey = np.asarray(small.convert("L"), np.float32) / 255.0
    return _encode(Image.fromarray(grey, mode="F"), "TIFF"), "tiff", small.size


def _palette(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    paletted = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=rng.choice([2, 16, 256]))
    options = {"transparency": 0} if rng.random() < 0.5 else {}
    return _encode(paletted, "PNG", **options), "png", small.size


def _alpha(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    rgba = small.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, small.width, dtype=np.uint8), (small.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    image = rgba if rng.random() < 0.5 else rgba.convert("LA")
    return _encode(image, "PNG"), "png", small.size


def _bilevel(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    return _encode(small.convert("1"), "PNG"), "png", small.size


def _grey_jpeg(_: bytes, photo: Image.Image, __: random.Random):
    small = _small(photo)
    return _encode(small.convert("L"), "JPEG"), "jpg", small.size


def _animated_gif(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    frames = [small.rotate(angle) for angle in (0, 90, 180)][: rng.randint(2, 3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "gif", small.size


def _exif_rotation(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    orientation = rng.choice([2, 3, 4, 5, 6, 7, 8])
    exif = Image.Exif()
    exif[0x0112] = orientation
    size = (small.height, small.width) if orientation >= 5 else small.size  # 5..8 swap the sides
    return _encode(small, "JPEG", quality=85, exif=exif.tobytes()), "jpg", size


def _other_format(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    fmt, ext = rng.choice([("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif"), ("PPM", "ppm")])
    return _encode(small, fmt), ext, small.size


def _wrong_extension(_: bytes, photo: Image.Image, rng: random.Random):
    small = _small(photo)
    fmt, ext = rng.choice([("PNG", "jpg"), ("JPEG", "png"), ("WEBP", "jpg"), ("GIF", "png"), ("BMP", "jpeg"),
                           ("TIFF", "gif")])
    return _encode(small, fmt), ext, small.size


def _tiny(_: bytes, photo: Image.Image, rng: random.Random):
    size = rng.choice([(1, 1), (1, 7), (7, 1), (2, 2)])
    return _encode(photo.resize(size), "PNG"), "png", size


#: kind -> (mutation, what Waldo must do with it)
MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "truncated": (_truncate, "either"),
    "header-cut": (_cut_header, "either"),
    "bit-flips": (_bit_flips, "either"),
    "overwritten-bytes": (_overwrite, "either"),
    "trailing-bytes": (_trailing, "ok"),
    "empty": (_empty, "refuse"),
    "zeros": (_zeros, "refuse"),
    "random-bytes": (_random_bytes, "refuse"),
    "text-as-image": (_text_as_image, "refuse"),
    "ico": (_ico, "refuse"),
    "header-only": (_header_only, "refuse"),
    "huge-png": (_huge_png, "refuse"),
    "huge-jpeg": (_huge_jpeg, "refuse"),
    "huge-gif": (_huge_gif, "refuse"),
    "huge-bmp": (_huge_bmp, "refuse"),
    "bomb-png": (_bomb_png, "refuse"),
    "scan-bomb-jpeg": (_scan_bomb, "refuse"),
    "arithmetic-jpeg": (_arithmetic_jpeg, "refuse"),
    "long-strip": (_long_strip, "refuse"),
    "cmyk-jpeg": (_cmyk_jpeg, "ok"),
    "cmyk-tiff": (_cmyk_tiff, "ok"),
    "16-bit-png": (_png16, "ok"),
    "float-tiff": (_float_tiff, "ok"),
    "palette": (_palette, "ok"),
    "alpha": (_alpha, "ok"),
    "bilevel": (_bilevel, "ok"),
    "grey-jpeg": (_grey_jpeg, "ok"),
    "animated-gif": (_animated_gif, "ok"),
    "exif-rotation": (_exif_rotation, "ok"),
    "webp-bmp-tiff-ppm": (_other_format, "ok"),
    "wrong-extension": (_wrong_extension, "ok"),
    "tiny": (_tiny, "ok"),
}
#: Damage is where decoders break, so the damaging mutations are drawn three times as often.
_WEIGHTS = {kind: 3 if expect == "either" else 1 for kind, (_, expect) in MUTATIONS.items()}


def build_corpus(out_dir: Path, n: int, seed: int = 0, sources: list[Path] | None = None) -> list[CorpusFile]:
    """Write ``n`` files into ``out_dir``: every mutation at least once, then a seeded mix."""
    rng = random.Random(seed)
    sources = sources or source_photos(rng=random.Random(seed))
    originals = [(p.read_bytes(), load_image(p)) for p in sources]
    kinds = list(MUTATIONS) + rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()), k=max(0, n - len(MUTATIONS)))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = []
    for i, kind in enumerate(kinds[:n]):
        mutation, expect = MUTATIONS[kind]
        data, photo = rng.choice(originals)
        payload, ext, size = mutation(data, photo, rng)
        path = out_dir / f"{i:04d}-{kind}.{ext}"
        path.write_bytes(payload)
        corpus.append(CorpusFile(path, kind, expect, size))
    return corpus


# ----------------------------------------------------------------------------- stages
def _clear(message: str) -> bool:
    """A refusal a person can act on: it names the file and gives a reason."""
    return message.startswith("cannot load image ") and ": " in message and len(message) > 30


def _has_signature(path: Path) -> str | None:
    """PNG, JPEG or GIF when the file starts with that format's unmistakable signature."""
    head = path.read_bytes()[:8]
    for magic, fmt in ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF")):
        if head.startswith(magic):
            return fmt
    return None


def check_loader(corpus: list[CorpusFile], report: StageReport, examples: dict[str, str]) -> dict[Path, bool]:
    """``load_image`` on every file; returns path -> decoded."""
    start = time.perf_counter()
    decoded: dict[Path, bool] = {}
    for item in corpus:
        try:
            image = load_image(item.path)
        except ImageLoadError as error:
            decoded[item.path] = False
            report.refused += 1
            examples.setdefault(item.kind, str(error))
            if not _clear(str(error)) or str(item.path) not in str(error):
                report.crashes += 1
                report.problem(f"{item.path.name}: unclear refusal {str(error)!r}")
            if item.expect == "ok":
                report.unexpected += 1
                report.problem(f"{item.path.name}: a valid file was refused: {error}")
            elif "not a recognised image format" in str(error) and _has_signature(item.path):
                # A damaged PNG/JPEG/GIF called "not an image" sends the user to the wrong fix.
                report.unexpected += 1
                report.problem(f"{item.path.name}: a damaged {_has_signature(item.path)} called unsupported")
            continue
        except Exception as error:  # noqa: BLE001 - exactly what this stage looks for
            decoded[item.path] = False
            report.crashes += 1
            report.problem(f"{item.path.name}: {type(error).__name__}: {error}")
            continue
        decoded[item.path] = True
        report.processed += 1
        if image.mode != "RGB" or min(image.size) < 1:
            report.crashes += 1
            report.problem(f"{item.path.name}: decoded to mode {image.mode} size {image.size}")
        elif item.expect == "refuse":
            report.unexpected += 1
            report.problem(f"{item.path.name}: an invalid file was accepted ({image.size})")
        elif item.size is not None and image.size != item.size:
            report.unexpected += 1
            report.problem(f"{item.path.name}: decoded to {image.size}, expected {item.size}")
    report.seconds = round(time.perf_counter() - start, 1)
    return decoded


def check_index(corpus: list[CorpusFile], decoded: dict[Path, bool], index_dir: Path, report: StageReport,
                batch: int = 100) -> None:
    """``Waldo.add`` of the whole corpus (in batches, like a folder of mixed files): every file
    is added or reported, exactly as the loader decided; the index passes its check after."""
    from waldo.api import Waldo

    start = time.perf_counter()
    engine = Waldo.create(index_dir, backbone="efficientnet_lite0", projection="random", progress=False)
    try:
        for offset in range(0, len(corpus), batch):
            chunk = corpus[offset:offset + batch]
            try:
                result = engine.add([str(c.path) for c in chunk], ["malformed"] * len(chunk),
                                    [{"kind": c.kind} for c in chunk], num_workers=0, progress=False)
            except Exception as error:  # noqa: BLE001
                report.crashes += len(chunk)
                report.problem(f"add of files {offset}..{offset + len(chunk) - 1} raised {type(error).__name__}: {error}")
                continue
            errors = dict(result.errors)
            added = {r.path for r in engine.store.records(result.added)}
            for item in chunk:
                path = str(item.path.resolve())
                if path in added:
                    report.processed += 1
                    ok = decoded[item.path]
                elif path in errors:
                    report.refused += 1
                    ok = not decoded[item.path]
                    if not errors[path]:
                        report.crashes += 1
                        report.problem(f"{item.path.name}: refused without a message")
                else:
                    report.crashes += 1
                    report.problem(f"{item.path.name}: neither added nor reported")
                    continue
                if not ok:
                    report.unexpected += 1
                    report.problem(f"{item.path.name}: indexing and the loader disagree "
                                   f"(loader {'decoded' if decoded[item.path] else 'refused'} it)")
        problems = engine.store.check()
        if problems:
            report.crashes += 1
            report.problem(f"the index fails its check: {problems[:3]}")
    finally:
        engine.store.close()
    report.seconds = round(time.perf_counter() - start, 1)


def check_search(corpus: list[CorpusFile], decoded: dict[Path, bool], index_dir: Path, report: StageReport) -> None:
    """``POST /search`` with every file through the real app (TestClient): 200 for what the
    loader decodes, a 4xx with a ``detail`` sentence for the rest, never a 5xx."""
    from fastapi.testclient import TestClient

    from waldo.serve import ServeSettings, create_app

    start = time.perf_counter()
    statuses: Counter[str] = Counter()
    with TestClient(create_app(index_dir, ServeSettings()), raise_server_exceptions=False) as client:
        for item in corpus:
            response = client.post("/search?k=3", files={"image": (item.path.name, item.path.read_bytes(),
                                                                   "application/octet-stream")})
            status = response.status_code
            statuses[str(status)] += 1
            try:
                body = response.json()
            except ValueError:
                body = None
            if status >= 500 or not isinstance(body, dict):
                report.crashes += 1
                report.problem(f"{item.path.name}: {status} {response.text[:200]}")
                continue
            if status == 200:
                report.processed += 1
                if not body.get("results"):
                    report.unexpected += 1
                    report.problem(f"{item.path.name}: 200 without results")
            else:
                report.refused += 1
                if status not in (400, 413, 415) or not isinstance(body.get("detail"), str) or len(body["detail"]) < 20:
                    report.unexpected += 1
                    report.problem(f"{item.path.name}: {status} {body}")
            if (status == 200) != decoded[item.path]:
                report.unexpected += 1
                report.problem(f"{item.path.name}: /search answered {status}, the loader "
                               f"{'decoded' if decoded[item.path] else 'refused'} it")
    report.statuses = dict(sorted(statuses.items()))
    report.seconds = round(time.perf_counter() - start, 1)


def run_corpus(workdir: Path, n: int, seed: int = 0, sources: list[Path] | None = None) -> CorpusReport:
    corpus = build_corpus(workdir / "corpus", n, seed, sources)
    loader, index, search = StageReport(), StageReport(), StageReport()
    examples: dict[str, str] = {}
    decoded = check_loader(corpus, loader, examples)
    check_index(corpus, decoded, workdir / "index", index)
    check_search(corpus, decoded, workdir / "index", search)
    expect: defaultdict[str, int] = defaultdict(int)
    for item in corpus:
        expect[item.expect] += 1
    return CorpusReport(files=len(corpus), seed=seed, kinds=dict(Counter(c.kind for c in corpus)), expect=dict(expect),
                        loader=loader, index=index, search=search, examples=examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the corpus and index go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="waldo-malformed-"))
    if workdir.resolve() == REPO or REPO in workdir.resolve().parents:
        parser.error("the corpus must not be written inside the repository")
    start = time.perf_counter()
    try:
        report = run_corpus(workdir, args.files, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    body = {"command": "benchmarks/malformed_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "crashes": report.crashes, "server_errors": report.server_errors, "unexpected": report.unexpected,
            "seconds": round(time.perf_counter() - start, 1), **asdict(report)}
    for name in ("loader", "index", "search"):
        stage: StageReport = getattr(report, name)
        print(f"{name:>7}: {stage.processed} processed, {stage.refused} refused, {stage.crashes} crashes, "
              f"{stage.unexpected} unexpected ({stage.seconds} s){' ' + str(stage.statuses) if stage.statuses else ''}")
        for problem in stage.problems[:10]:
            print(f"    {problem}")
    print(f"{report.files} files ({report.expect}); crashes {report.crashes}, 5xx {report.server_errors}, "
          f"unexpected {report.unexpected}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(body, indent=2, default=str) + "\n")
    return 0 if report.crashes == 0 and report.unexpected == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
