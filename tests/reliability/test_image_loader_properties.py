"""Property-based tests of ``load_image`` (hypothesis): whatever the bytes, the loader returns
an 8-bit RGB image or raises ``ImageLoadError`` with a message naming the input, and never
anything else; valid images of any mode and format decode to their own size; a header that
declares more pixels than the limit is refused before decoding.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from waldo.data.images import MAX_ASPECT_RATIO, ImageLoadError, load_image

# Decoding is quick, but the machine is shared: a fixed, modest number of examples, no deadline.
# No example database: it would leave a .hypothesis/ folder in the working tree.
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(data: bytes, **kwargs) -> Image.Image | ImageLoadError:
    """The loader's answer; any exception but ImageLoadError propagates and fails the test."""
    try:
        image = load_image(data, name="fuzzed.jpg", **kwargs)
    except ImageLoadError as error:
        assert "fuzzed.jpg" in str(error) and error.reason, str(error)
        return error
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    assert np.asarray(image).dtype == np.uint8
    return image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_photos(data_file) -> list[bytes]:
    """A grocery JPEG (shrunk: mutations are cheaper to decode) and a COIL-100 PNG."""
    photo = Image.open(data_file("grocery_store/dataset/test/Fruit/Apple/Golden-Delicious/"
                                 "Golden-Delicious_001.jpg")).convert("RGB")
    photo.thumbnail((96, 96))
    coil = data_file("coil100/images/obj1__0.png").read_bytes()
    return [_encode(photo, "JPEG", quality=90), coil]


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash_the_loader(data):
    _outcome(data)


@FUZZ
@given(st.sampled_from([b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
                        b"II*\x00", b"MM\x00*", b"P6\n"]), st.binary(max_size=2048))
def test_a_real_signature_before_garbage_never_crashes_the_loader(magic, tail):
    result = _outcome(magic + tail)
    if isinstance(result, ImageLoadError):  # a damaged image of a supported format is not "unsupported"
        assert "not a recognised image format" not in result.reason, result.reason


@FUZZ
@given(which=st.integers(0, 1), cut=st.floats(0.0, 1.0),
       edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=24))
def test_damaged_real_photos_are_refused_or_decoded(real_photos, which, cut, edits):
    data = bytearray(real_photos[which])
    for where, value in edits:
        data[int(where * len(data))] = value
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1.0 else bytes(data)
    _outcome(data)


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}, "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA",
           "CMYK", "I;16", "I", "F", "YCbCr"}, "JPEG": {"L", "RGB", "CMYK"}, "BMP": {"1", "L", "P", "RGB"},
           "GIF": {"L", "P"}, "WEBP": {"RGB", "RGBA"}, "PPM": {"1", "L", "RGB"}}


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)), width=st.integers(1, 48),
       height=st.integers(1, 48), seed=st.integers(0, 2**32 - 1))
def test_valid_images_of_every_mode_decode_to_rgb_of_their_size(mode, fmt, width, height, seed):
    assume(mode in FORMATS[fmt])  # other pairs the encoder cannot write: not the loader's concern
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
        "RGBA" if mode == "LA" else "RGB")
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width), dtype=np.float32))
    else:
        image = image.convert(mode)
    result = _outcome(_encode(image, fmt))
    assert isinstance(result, Image.Image), f"{mode} {fmt} {width}x{height}: {result}"
    assert result.size == (width, height)


@FUZZ
@given(st.integers(1, 80), st.integers(1, 80), st.sampled_from([2, 3, 4, 5, 6, 7, 8]))
def test_exif_orientation_is_applied(width, height, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.new("RGB", (width, height), (200, 30, 30)), "JPEG", exif=exif.tobytes())
    result = _outcome(data)
    assert isinstance(result, Image.Image)
    assert result.size == ((height, width) if orientation >= 5 else (width, height))


def _png_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# Small sides too: most huge pairs are over any pixel limit, small ones reach the strip and decode checks.
SIDE = st.one_of(st.integers(1, 2**31 - 1), st.integers(1, 3000))


@FUZZ
@given(SIDE, SIDE, st.integers(1, 10**7))
def test_declared_size_over_the_limit_is_refused_from_the_header(width, height, limit):
    result = _outcome(_png_declaring(width, height), max_pixels=limit)
    if width * height > limit:
        assert isinstance(result, ImageLoadError) and "pixels" in result.reason, result
    elif max(width, height) > MAX_ASPECT_RATIO * min(width, height):  # a strip: refused from the header too
        assert isinstance(result, ImageLoadError) and "too elongated" in result.reason, result
    elif (width, height) == (1, 1):
        assert isinstance(result, Image.Image) and result.size == (1, 1)  # the file as written
    else:
        # Under the limit the header passes; the missing pixel rows are found when decoding,
        # also for width 1, where the compressed stream ends cleanly on a row boundary and
        # Pillow alone would fill the missing rows with zeros.
        assert isinstance(result, ImageLoadError) and "corrupt or truncated" in result.reason, (width, height)
