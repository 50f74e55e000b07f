"""Bad and unusual inputs for waldo.data.images, generated in tmp_path from real images."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import resource
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

import waldo.data.images
from waldo.data.images import (DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, MAX_JPEG_SCANS, DecodeBudget, DecodeBusyError,
                               ImageLoadError, list_images, load_image)

JPEG_REL = "grocery_store/dataset/train/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg"
PNG_REL = "coil100/images/obj1__0.png"


@pytest.fixture(scope="module")
def jpeg_path(data_file) -> Path:
    return data_file(JPEG_REL)


@pytest.fixture(scope="module")
def png_path(data_file) -> Path:
    return data_file(PNG_REL)


@pytest.fixture(scope="module")
def photo(jpeg_path: Path) -> Image.Image:
    """A real RGB photo, cropped non-square so that rotations are visible in the size."""
    with Image.open(jpeg_path) as im:
        return im.convert("RGB").crop((0, 0, 300, 200))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _refuses(source, match: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image(source)
    return info.value


def test_real_jpeg_and_png_load_as_rgb(jpeg_path: Path, png_path: Path) -> None:
    for path in (jpeg_path, png_path):
        im = load_image(path)
        assert im.mode == "RGB"
        assert np.asarray(im).dtype == np.uint8 and np.asarray(im).ndim == 3


def test_truncated_images_are_never_tolerated() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bit_flips_in_jpeg(jpeg_path: Path, tmp_path: Path) -> None:
    data = bytearray(jpeg_path.read_bytes())
    for i in range(200, len(data) - 200, 50):
        data[i] ^= 0xFF
    err = _refuses(_write(tmp_path / "flipped.jpg", bytes(data)), "corrupt")
    assert "flipped.jpg" in str(err)


def test_corrupt_bytes_in_png(png_path: Path, tmp_path: Path) -> None:
    data = bytearray(png_path.read_bytes())
    for i in range(100, len(data) - 100, 97):
        data[i] ^= 0x55
    _refuses(_write(tmp_path / "corrupt.png", bytes(data)), "corrupt|unreadable")


def test_garbage_header_is_not_an_image(jpeg_path: Path, tmp_path: Path) -> None:
    data = bytearray(jpeg_path.read_bytes())
    data[:64] = b"\x00" * 64
    _refuses(_write(tmp_path / "nohead.jpg", bytes(data)), "not a recognised image")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg(jpeg_path: Path, tmp_path: Path, fraction: float) -> None:
    data = jpeg_path.read_bytes()
    _refuses(_write(tmp_path / "cut.jpg", data[: int(len(data) * fraction)]), "truncated")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_png(png_path: Path, tmp_path: Path, fraction: float) -> None:
    data = png_path.read_bytes()
    _refuses(_write(tmp_path / "cut.png", data[: int(len(data) * fraction)]), "truncated|corrupt")


@pytest.mark.parametrize(
    "content",
    [
        b"just some text, not a picture\n",
        b"<!DOCTYPE html><html><body><img src='x.jpg'></body></html>\n",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10"/></svg>\n',
        # EPS is a format Pillow knows but hands to Ghostscript: it must be refused unread.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
    ],
    ids=["text", "html", "svg", "eps"],
)
def test_non_images_renamed_jpg(tmp_path: Path, content: bytes) -> None:
    err = _refuses(_write(tmp_path / "fake.jpg", content), "not a recognised image format")
    assert "fake.jpg" in str(err)


def test_zero_byte_file(tmp_path: Path) -> None:
    _refuses(_write(tmp_path / "empty.jpg", b""), "empty")
    _refuses(b"", "empty")
    _refuses(io.BytesIO(b""), "empty")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    err = _refuses(tmp_path / "nope.jpg", "does not exist")
    assert isinstance(err, ValueError) and "nope.jpg" in str(err)
    _refuses(tmp_path, "directory")


def test_cmyk_jpeg(photo: Image.Image, tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB" and im.size == photo.size
    # Colours survive (no inverted CMYK): mean absolute error small on a 0..255 scale.
    assert np.abs(np.asarray(im, np.float64) - np.asarray(photo, np.float64)).mean() < 12


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((4, 6), np.uint16)
    values[0] = 65535
    values[1] = 257 * 100  # exactly 100 in 8 bit
    values[2] = 1000  # would clip to 255 if cast instead of scaled; 1000/257 ~ 3.9 -> 4
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (4, 6, 3)
    assert (out[0] == 255).all() and (out[1] == 100).all() and (out[2] == 4).all() and (out[3] == 0).all()


def test_32bit_int_and_float_tiff(tmp_path: Path) -> None:
    ints = np.array([[0, 65535], [257 * 50, 257 * 200]], np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "i.tif")
    assert np.asarray(load_image(tmp_path / "i.tif"))[..., 0].tolist() == [[0, 255], [50, 200]]
    floats = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[..., 0].tolist() == [[0, 255], [128, 64]]


def test_palette_png_with_transparency_becomes_white(photo: Image.Image, tmp_path: Path) -> None:
    pal = photo.quantize(colors=64)
    index = int(np.asarray(pal)[0, 0])
    pal.info["transparency"] = index
    path = tmp_path / "pal.png"
    pal.save(path, transparency=index)
    out = np.asarray(load_image(path))
    transparent = np.asarray(Image.open(path)) == index
    assert transparent.any() and (out[transparent] == 255).all()
    assert out.shape == (200, 300, 3)


def test_rgba_composited_over_white(photo: Image.Image, tmp_path: Path) -> None:
    rgba = photo.convert("RGBA")
    alpha = np.full((200, 300), 255, np.uint8)
    alpha[:, :150] = 0
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    out = np.asarray(load_image(path))
    assert (out[:, :150] == 255).all()
    assert np.array_equal(out[:, 150:], np.asarray(photo)[:, 150:])


def test_la_grey_and_bilevel(photo: Image.Image, tmp_path: Path) -> None:
    for mode in ("L", "LA", "1"):
        path = tmp_path / f"{mode}.png"
        photo.convert(mode).save(path)
        out = np.asarray(load_image(path))
        assert out.shape == (200, 300, 3)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert set(np.unique(np.asarray(load_image(tmp_path / "1.png")))) <= {0, 255}


def test_exif_orientation_6_swaps_width_and_height(photo: Image.Image, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    photo.save(path, exif=exif, quality=95)
    assert Image.open(path).size == (300, 200)
    out = load_image(path)
    assert out.size == (200, 300)
    expected = np.asarray(photo.transpose(Image.Transpose.ROTATE_270), np.float64)
    assert np.abs(np.asarray(out, np.float64) - expected).mean() < 6


def test_animated_gif_uses_first_frame(photo: Image.Image, tmp_path: Path) -> None:
    frames = [photo, photo.transpose(Image.Transpose.ROTATE_180), photo.convert("L").convert("RGB")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    out = np.asarray(load_image(path), np.float64)
    first = np.asarray(frames[0], np.float64)
    second = np.asarray(frames[1], np.float64)
    assert np.abs(out - first).mean() < np.abs(out - second).mean()


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG (valid chunks and CRCs) declaring width x height RGB pixels whose
    IDAT holds just a few rows: a decompression bomb's header without its gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress((b"\x00" + b"\x00" * 3 * width) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("pil_guard", [True, False], ids=["pil-guard-on", "pil-guard-off"])
def test_20000x20000_png_refused_without_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pil_guard: bool
) -> None:
    if not pil_guard:
        # Our own header check must hold even when Pillow's global guard is switched off.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = _write(tmp_path / "bomb.png", _png_header_only(20000, 20000))
    assert path.stat().st_size < 10_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    err = _refuses(path, "pixels")
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # < ~100 MB
    assert "bomb.png" in str(err)
    if not pil_guard:
        assert "400000000 pixels exceeds the limit of 40000000" in str(err)


def test_max_pixels_parameter(jpeg_path: Path) -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1000"):
        load_image(jpeg_path, max_pixels=1000)
    assert load_image(jpeg_path, max_pixels=348 * 348).size == (348, 348)


def test_load_from_bytes_and_file_objects(jpeg_path: Path) -> None:
    reference = np.asarray(load_image(jpeg_path))
    data = jpeg_path.read_bytes()
    assert np.array_equal(np.asarray(load_image(data)), reference)
    with open(jpeg_path, "rb") as f:
        assert np.array_equal(np.asarray(load_image(f)), reference)
        assert not f.closed  # the caller's file stays the caller's

    class Pipe(io.RawIOBase):  # a non-seekable stream, like a socket or an upload body
        def __init__(self, payload: bytes) -> None:
            self._buffer = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[override]
            chunk = self._buffer.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    assert np.array_equal(np.asarray(load_image(io.BufferedReader(Pipe(data)))), reference)
    err = _refuses(b"not an image", "<upload>")
    assert "not a recognised" in str(err)
    with pytest.raises(ImageLoadError, match="photo.bin"):
        load_image(b"garbage", name="photo.bin")


def test_list_images_recursive_sorted(png_path: Path, tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ("b/deep/z.PNG", "a/y.png", "x.jpeg", ".hidden/h.png", "a/._y.png"):
        (tmp_path / rel).symlink_to(png_path)
    (tmp_path / "notes.txt").write_text("not an image")
    found = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/y.png", "b/deep/z.PNG", "x.jpeg"]
    assert all(p.is_absolute() for p in found)


def test_list_images_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="no images found in"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")


# ----------------------------------------------------------------------------- decode bombs (issue 19)
def _bombs():
    """benchmarks/decode_bombs.py: the crafted attack files the benchmark measures."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_bombs.py"
    spec = importlib.util.spec_from_file_location("waldo_decode_bombs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bombs():
    return _bombs()


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch):
    """Fails the test if any image is decoded (Pillow's load) while it runs."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{self.format} image was decoded; it should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _scans(data: bytes) -> int:
    # Exact for files Pillow and decode_bombs write: entropy-coded 0xFF bytes are always stuffed.
    return data.count(b"\xff\xda")


def test_scan_bomb_is_refused_before_decoding(bombs, no_decode) -> None:
    data = bombs.scan_bomb_jpeg(64, 64, 3 * MAX_JPEG_SCANS)
    err = _refuses(data, f"more than {MAX_JPEG_SCANS} scans")
    assert "<upload>" in str(err)


def test_scan_limit_is_exact_and_a_keyword(bombs) -> None:
    data = bombs.scan_bomb_jpeg(40, 24, 25)
    scans = _scans(data)
    assert scans > 25  # Pillow's own progressive scans come first
    decoded = load_image(data, max_jpeg_scans=scans)
    # The extra scans are a legal progression that changes no coefficient: same pixels.
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(bombs.scan_bomb_jpeg(40, 24, 0))))
    with pytest.raises(ImageLoadError, match=f"more than {scans - 1} scans"):
        load_image(data, max_jpeg_scans=scans - 1)


@pytest.mark.parametrize("window", [None, 5], ids=["1MB-window", "5-byte-window"])
def test_scan_count_skips_segment_payloads_and_entropy_data(photo: Image.Image, bombs, window: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An APP1 holding a thumbnail JPEG (here one claiming arithmetic coding, with hundreds of
    scans) is skipped by its length; stuffed bytes and restart markers inside entropy-coded
    data are not markers. Counting any of them would refuse this valid photo. The file is
    read through a window; a 5-byte one puts markers and 0xFF runs across its edges."""
    if window is not None:
        monkeypatch.setattr(waldo.data.images._ChunkedStream, "CHUNK", window)
    thumbnail = bytearray(bombs.scan_bomb_jpeg(16, 16, 2 * MAX_JPEG_SCANS))
    thumbnail[thumbnail.index(b"\xff\xc2") + 1] = 0xCA  # "progressive, arithmetic-coded"
    noisy = np.clip(np.asarray(photo, np.int16) + np.random.default_rng(0).integers(-40, 40, (200, 300, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(out, format="JPEG", quality=95, progressive=True,
                                                 restart_marker_blocks=4)
    main = out.getvalue()
    assert b"\xff\x00" in main and b"\xff\xd0" in main  # stuffed bytes and restart markers present
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(thumbnail)) + b"Exif\x00\x00" + bytes(thumbnail)
    data = main[:2] + app1 + main[2:]
    image = load_image(data, max_jpeg_scans=_scans(main))
    assert image.size == (300, 200)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(main)))


@pytest.mark.parametrize("sof", [0xC0, 0xC2])
def test_arithmetic_coded_jpeg_is_refused(photo: Image.Image, sof: int, no_decode) -> None:
    """A header claiming arithmetic coding over Huffman data decodes to noise without an error
    (libjpeg's arithmetic decoder reports nothing), so arithmetic coding is refused."""
    out = io.BytesIO()
    photo.save(out, format="JPEG", progressive=sof == 0xC2)
    data = bytearray(out.getvalue())
    at = data.index(bytes([0xFF, sof]))
    data[at + 1] = sof + 9  # SOF0 -> SOF9, SOF2 -> SOF10: the arithmetic-coded twins
    err = _refuses(bytes(data), "arithmetic-coded JPEG is not supported")
    assert f"SOF{sof - 0xC0 + 9}" in err.reason


def test_extreme_aspect_ratio_is_refused_from_the_header(bombs, no_decode) -> None:
    assert MAX_ASPECT_RATIO == 100
    _refuses(bombs.long_strip_png(), "too elongated")  # the 1x39,999,999 PNG: 78 KB, 1.2 GB to load
    _refuses(bombs.long_strip_png(101), "more than 100 times")


def test_aspect_ratio_limit_is_inclusive_and_a_keyword(bombs) -> None:
    assert load_image(bombs.long_strip_png(100)).size == (1, 100)
    with pytest.raises(ImageLoadError, match="more than 10 times"):
        load_image(bombs.long_strip_png(11), max_aspect_ratio=10)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92, **options)
    return out.getvalue()


def _drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size each JPEG decodes at after draft()."""
    seen: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        seen.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


def test_max_side_decodes_jpegs_at_reduced_scale(photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    big = photo.resize((1200, 800), Image.Resampling.BICUBIC)
    data = _jpeg(big)
    drafts = _drafts(monkeypatch)
    small = load_image(data, max_side=280)
    # 1/4 scale (300x200) is the smallest that keeps the longest side >= 280; then resized.
    assert drafts == [(300, 200)] and small.size == (280, 187)
    reference = load_image(data).resize(small.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(small, np.float64) - np.asarray(reference, np.float64)).mean() < 3
    assert load_image(data, max_side=150).size == (150, 100)  # 1/8 scale: 150x100 exactly, no resize
    assert drafts[-1] == (150, 100)
    assert load_image(data, max_side=5000).size == (1200, 800)  # never enlarged, full scale
    assert load_image(data).size == (1200, 800)  # without max_side: full resolution
    assert len(drafts) == 2  # neither of the last two drafted


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_max_side_keeps_exif_orientation(photo: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(photo.resize((1200, 800)), exif=exif)
    out = load_image(data, max_side=300)
    assert out.size == ((200, 300) if orientation in (6, 8) else (300, 200))
    full = load_image(data)
    assert full.size == ((800, 1200) if orientation in (6, 8) else (1200, 800))
    expected = full.resize(out.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(out, np.float64) - np.asarray(expected, np.float64)).mean() < 3


def test_max_side_other_formats(photo: Image.Image, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    photo.save(path)
    assert load_image(path, max_side=150).size == (150, 100)
    assert load_image(path, max_side=300).size == (300, 200)
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=0)


def _tall(mode: str) -> Image.Image:
    """An image taller than one conversion band (2**18 pixels), with different values per row."""
    rng = np.random.default_rng(3)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (700, 500), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 90000, (700, 500), dtype=np.int32))
    if mode == "F":
        values = rng.normal(0, 300, (700, 500)).astype(np.float32)
        values[3, 4], values[600, 7] = np.nan, np.inf
        return Image.fromarray(values)
    return Image.fromarray(rng.integers(0, 256, (700, 500, 4), dtype=np.uint8), "RGBA").convert(mode)


def _expected_grey(image: Image.Image) -> np.ndarray:
    """What the loader's documented rules give, computed on the whole image at once."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "I;16":
        return np.rint(values * 255 / 65535).astype(np.uint8)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = values.min(), values.max()
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_banded_high_depth_conversion_equals_the_whole_image_rule(mode: str, tmp_path: Path) -> None:
    image = _tall(mode)
    path = tmp_path / "deep.tif"
    image.save(path)
    out = np.asarray(load_image(path))
    assert np.array_equal(out[..., 0], _expected_grey(image)) and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_banded_alpha_conversion_equals_compositing_the_whole_image(mode: str, tmp_path: Path) -> None:
    image = _tall(mode)
    path = tmp_path / "alpha.png"
    image.save(path, **({"transparency": 7} if mode == "P" else {}))
    with Image.open(path) as stored:
        whole = Image.alpha_composite(Image.new("RGBA", stored.size, "white"), stored.convert("RGBA")).convert("RGB")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(whole))


def _budget_need(data: bytes, **kwargs) -> int:
    """What load_image reserves for ``data`` (read from a budget that never waits)."""
    probe = DecodeBudget(1 << 40)
    load_image(data, budget=probe, **kwargs)
    assert probe.in_use == 0  # released after the decode
    return probe.peak


def test_budget_estimate_follows_size_format_and_draft(photo: Image.Image, bombs) -> None:
    big = photo.resize((1600, 1200))
    baseline = _budget_need(_jpeg(big))
    progressive = _budget_need(_jpeg(big, progressive=True))
    # A progressive JPEG also holds libjpeg's coefficients: 64 x 2 bytes per block, 4:2:0.
    assert progressive - baseline >= 1600 * 1200 * 2 * 1.5 * 0.95
    assert _budget_need(_jpeg(big), max_side=200) < baseline
    bilevel = _budget_need(bombs.bilevel_png(1000))
    assert bilevel >= 1000 * 1000 * (1 + 4)  # the 1-byte decoded image and its 4-byte RGB copy


def test_image_over_the_whole_budget_is_refused(photo: Image.Image, no_decode) -> None:
    budget = DecodeBudget(20 * 2**20)
    err = _refuses_with(budget, _jpeg(Image.new("RGB", (3000, 3000))))
    assert "exceeds the decode memory limit" in err.reason and budget.peak == 0


def _refuses_with(budget: DecodeBudget, data: bytes) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(data, budget=budget, budget_timeout=0)
    return info.value


def test_budget_timeout_raises_decode_busy(photo: Image.Image) -> None:
    data = _jpeg(photo)
    budget = DecodeBudget(_budget_need(data) + 1000)
    with budget.reserve(2000):
        with pytest.raises(DecodeBusyError, match="retry"):
            load_image(data, budget=budget, budget_timeout=0.05)
    assert isinstance(DecodeBusyError("x"), RuntimeError)
    assert load_image(data, budget=budget, budget_timeout=0).size == photo.size  # room again
    assert budget.in_use == 0


def test_concurrent_decodes_never_hold_more_than_the_budget(bombs) -> None:
    """Eight threads decode big images through one budget that fits two of them: the bytes
    held at once (counted independently of the budget's own books) never exceed it."""
    files = [bombs.bilevel_png(1500, seed=i) for i in range(8)]
    need = _budget_need(files[0])

    class Counted(DecodeBudget):
        def __init__(self, max_bytes: int) -> None:
            super().__init__(max_bytes)
            self.lock = threading.Lock()
            self.held = self.most = self.holders = self.most_holders = 0

        @contextlib.contextmanager
        def reserve(self, nbytes: int, timeout: float | None = None):
            with super().reserve(nbytes, timeout):
                with self.lock:
                    self.held += nbytes
                    self.holders += 1
                    self.most, self.most_holders = max(self.most, self.held), max(self.most_holders, self.holders)
                try:
                    yield
                finally:
                    with self.lock:
                        self.held -= nbytes
                        self.holders -= 1

    budget = Counted(2 * need + need // 2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(lambda data: load_image(data, budget=budget), files))
    assert [im.size for im in images] == [(1500, 1500)] * 8
    assert 0 < budget.most <= budget.max_bytes and budget.most_holders <= 2
    assert budget.held == 0 and budget.in_use == 0


def test_budget_serves_waiters_in_order() -> None:
    """A big reservation queued first is served before small ones queued after it, so a
    stream of small decodes cannot starve a big one."""
    budget = DecodeBudget(100)
    order: list[str] = []

    def take(label: str, nbytes: int) -> None:
        with budget.reserve(nbytes, timeout=10):
            order.append(label)

    with budget.reserve(60):
        big = threading.Thread(target=take, args=("big", 90))
        big.start()
        while not budget.waiting:  # the big one is waiting
            time.sleep(0.001)
        small = threading.Thread(target=take, args=("small", 20))
        small.start()
        while budget.waiting < 2:  # the small one would fit now, yet waits behind the big one
            time.sleep(0.001)
        assert order == []
    big.join(10)
    small.join(10)
    assert order == ["big", "small"]  # and the small one only once the big one was done (90 + 20 > 100)
    with pytest.raises(ValueError, match="cannot reserve"):
        with budget.reserve(101):
            pass


def test_render_thumbnail_decodes_small_and_uses_the_budget(photo: Image.Image, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from waldo.serve.thumbnails import render_thumbnail

    path = tmp_path / "big.jpg"
    photo.resize((2400, 1600)).save(path, quality=90)
    drafts = _drafts(monkeypatch)
    budget = DecodeBudget(1 << 30)
    data = render_thumbnail(str(path), 128, DEFAULT_MAX_PIXELS, budget=budget, budget_timeout=1)
    width, height = Image.open(io.BytesIO(data)).size
    assert width == 128 and abs(height - 128 * 1600 / 2400) <= 1  # rounded twice: 85 or 86
    assert drafts == [(300, 200)]  # 1/8 scale: still at least twice the thumbnail
    assert 0 < budget.peak < _budget_need(path.read_bytes())
    with budget.reserve(budget.max_bytes), pytest.raises(DecodeBusyError):
        render_thumbnail(str(path), 128, DEFAULT_MAX_PIXELS, budget=budget, budget_timeout=0)


def _rgb_noise(width: int, height: int) -> Image.Image:
    """A ramp with noise: photo-like entropy, so the encoders write realistic files."""
    ramp = np.linspace(0, 215, width).astype(np.uint8)[None, :, None]
    return Image.fromarray(ramp + np.random.default_rng(5).integers(0, 40, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["1-bit-png", "16-bit-png", "rgba-png", "progressive-444-jpeg", "webp"])
def test_budget_estimate_bounds_the_measured_peak(kind: str, bombs, tmp_path: Path) -> None:
    """What load_image reserves covers the peak RSS its decode adds, measured (VmHWM) in a fresh
    process, and is not far above it (an estimate twice too high would halve the service's
    concurrency for nothing)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    side = 3000
    path = tmp_path / f"{kind}.{kind.rsplit('-', 1)[-1]}"
    if kind == "1-bit-png":
        path.write_bytes(bombs.bilevel_png(side))
    elif kind == "16-bit-png":
        path.write_bytes(bombs.deep_png(side, side))
    elif kind == "rgba-png":
        path.write_bytes(bombs.alpha_png(side, side))
    elif kind == "progressive-444-jpeg":
        _rgb_noise(side, side).save(path, quality=90, progressive=True, subsampling=0)
    else:
        _rgb_noise(side, side).save(path, quality=80, method=0)  # method 0: the fastest encoder
    measured = bombs.measure_file(path)
    assert measured.get("size") == [side, side], measured
    estimate, peak = measured["estimated_peak_mib"], measured["peak_rss_added_mib"]
    assert peak <= estimate <= peak * 1.25 + 16, measured


def test_decode_memory_estimate_is_what_load_image_reserves(tmp_path):
    from waldo.data.images import DecodeBudget, decode_memory_estimate

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(path, format="JPEG", progressive=True)
    for max_side in (None, 200):
        need = decode_memory_estimate(path, max_side=max_side)
        assert need > 640 * 480 * 3 // (4 if max_side else 1)
        assert load_image(path, max_side=max_side, budget=DecodeBudget(need)).size[0] <= (max_side or 640)
        with pytest.raises(ImageLoadError, match="exceeds the decode memory limit"):
            load_image(path, max_side=max_side, budget=DecodeBudget(need - 1))
    assert decode_memory_estimate(path, max_side=200) < decode_memory_estimate(path)
