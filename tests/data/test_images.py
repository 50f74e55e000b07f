"""Bad and unusual inputs for waldo.data.images, generated in tmp_path from real images."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from waldo.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, list_images, load_image

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
