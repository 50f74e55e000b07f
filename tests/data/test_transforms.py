"""Test-time transform presets: shapes, dtypes, ranges, determinism, the ablations."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from waldo.data.images import load_image
from waldo.data.transforms import (
    get_transform,
    resize_size_for,
    train_transform,
    transform_names,
)

EXPECTED = {
    "resize256-crop224", "resize224", "grayscale", "contrast", "perspective", "blur", "flip",
}  # fmt: skip


@pytest.fixture(scope="module")
def image(data_file) -> Image.Image:
    # A non-square catalogue photo, so "ignore the aspect ratio" is actually exercised.
    return load_image(data_file("abo_sample/B074M5HPBD/9ea6992d.jpg"))


def test_names() -> None:
    assert set(transform_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", [224, 112])
def test_shape_dtype_range(image: Image.Image, name: str, size: int) -> None:
    out = get_transform(name, image_size=size)(image, key=7)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_uint8_pixels_scale_to_the_transforms_output_exactly(image: Image.Image, name: str) -> None:
    """Extraction's workers hand uint8 pixels to the model's process when that loses nothing."""
    from waldo.data.transforms import to_unit_float
    from waldo.models.extract import _ImageFiles, as_model_input

    transform = get_transform(name, image_size=224)
    assert transform.exact_in_uint8 == (name in {"resize256-crop224", "resize224"})
    pixels = transform.pixels(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    if transform.exact_in_uint8:
        assert torch.equal(to_unit_float(pixels), transform(image, key=7))
    files = _ImageFiles(["/nonexistent.jpg"], transform)
    assert files.uint8 == transform.exact_in_uint8 and files[0][1] is None  # unreadable: skipped, not raised
    batch = torch.stack([pixels, pixels])
    assert torch.equal(as_model_input(batch), to_unit_float(batch).contiguous(memory_format=torch.channels_last))


def test_resize_sizes() -> None:
    assert resize_size_for(224) == 256 and resize_size_for(112) == 128 and resize_size_for(384) == 439
    default = get_transform("resize256-crop224")
    assert (default.resize, default.crop) == (256, True)
    assert (get_transform("resize224").resize, get_transform("resize224").crop) == (224, False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deterministic_for_same_seed_and_key(image: Image.Image, name: str) -> None:
    a = get_transform(name, seed=3)(image, key=11)
    b = get_transform(name, seed=3)(image, key=11)
    assert torch.equal(a, b)


def test_perspective_depends_on_key_and_seed_only(image: Image.Image) -> None:
    t = get_transform("perspective", seed=0)
    first = t(image, key=0)
    torch.manual_seed(1234)  # the global RNG must not matter
    assert torch.equal(t(image, key=0), first)
    assert not torch.equal(t(image, key=1), first)
    assert not torch.equal(get_transform("perspective", seed=1)(image, key=0), first)


def test_ablations_change_the_default(image: Image.Image) -> None:
    base = get_transform("resize256-crop224")(image)
    for name in ("grayscale", "contrast", "perspective", "blur", "flip"):
        assert not torch.allclose(get_transform(name)(image), base), name
    assert torch.equal(get_transform("flip")(image), base.flip(-1))
    grey = get_transform("grayscale")(image)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_non_rgb_input_is_converted(image: Image.Image) -> None:
    out = get_transform("resize224")(image.convert("L"))
    assert out.shape == (3, 224, 224)


def test_errors(image: Image.Image) -> None:
    with pytest.raises(ValueError, match="unknown transform 'sharpen'; known: blur, contrast"):
        get_transform("sharpen")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        get_transform("resize224", image_size=0)
    with pytest.raises(TypeError, match="expects a PIL image"):
        get_transform("resize224")(torch.zeros(3, 8, 8))  # type: ignore[arg-type]


def test_train_transform(image: Image.Image) -> None:
    out = train_transform(96)(image)
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_cell_centres_undo_the_resize_and_the_crop():
    from waldo.data.transforms import get_transform

    crop = get_transform("resize256-crop224", 224)
    centres = crop.cell_centres((7, 7), (512, 256))  # (width, height): the square resize stretches
    # a 32 px cell's centre (16) plus the crop's 16 px margin, in the 256 px resize, scaled back
    assert centres.shape == (49, 2) and tuple(centres[0]) == (64.0, 32.0)
    assert tuple(centres[-1]) == (2 * (16 + 6 * 32 + 16), 16 + 6 * 32 + 16)
    plain = get_transform("resize224", 224)
    assert tuple(plain.cell_centres((14, 14), (224, 224))[15]) == (24.0, 24.0)  # row 1, column 1
