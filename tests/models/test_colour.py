"""The colour signature: a normalised hue-saturation histogram that tells colours apart."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from PIL import Image

from waldo.models.colour import SIGNATURE_DIM, colour_signature, colour_similarity


def _solid(rgb, size=(120, 80), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, rgb).convert(mode)


def test_signature_is_a_distribution_over_its_bins():
    signature = colour_signature(_solid((200, 30, 30)))
    assert signature.shape == (SIGNATURE_DIM,) and signature.dtype == np.float32
    assert signature.sum() == pytest.approx(1.0) and (signature >= 0).all()
    assert np.count_nonzero(signature) == 1  # one colour, one bin


def test_same_colours_score_one_and_different_ones_less():
    red, orange, green = (colour_signature(_solid(c)) for c in ((200, 30, 30), (230, 130, 20), (30, 180, 40)))
    scores = colour_similarity(red, np.stack([red, orange, green]))
    assert scores[0] == pytest.approx(1.0) and scores[1] < 0.5 and scores[2] == pytest.approx(0.0)


def test_grey_pixels_count_by_brightness_not_by_their_noisy_hue():
    dark, light = colour_signature(_solid((40, 40, 44))), colour_signature(_solid((220, 222, 220)))
    assert dark[:-3].sum() == 0 and light[:-3].sum() == 0  # no hue bin
    assert colour_similarity(dark, light[None])[0] == pytest.approx(0.0)


def test_only_the_centre_counts():
    image = _solid((30, 180, 40), size=(100, 100))
    image.paste((200, 30, 30), (0, 0, 100, 8))  # a red strip along the top edge: outside the central 80%
    assert colour_similarity(colour_signature(image), colour_signature(_solid((30, 180, 40)))[None])[0] == \
        pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_any_mode_gives_a_signature(mode):
    signature = colour_signature(_solid((200, 30, 30), mode=mode))
    assert signature.shape == (SIGNATURE_DIM,) and signature.sum() == pytest.approx(1.0)


def test_tiny_images_and_batches():
    assert colour_signature(_solid((1, 2, 3), size=(1, 1))).sum() == pytest.approx(1.0)
    batch = np.stack([colour_signature(_solid(c)) for c in ((200, 30, 30), (30, 180, 40))])
    assert colour_similarity(batch, np.stack([batch, batch[::-1]])).shape == (2, 2)


def test_the_batch_version_agrees_with_the_pil_one_on_photos(data_root):
    """colour_signatures (a model's input tensors) against colour_signature (PIL) on real
    photos: the same signature to the rounding of the resizes and of PIL's 8-bit HSV."""
    import torchvision.transforms.functional as TF

    from waldo.data.datasets import read_labels_csv
    from waldo.data.images import load_image
    from waldo.models.colour import colour_signatures

    paths = read_labels_csv(data_root / "abo_sample").paths[:6]
    images = [load_image(path) for path in paths]
    for image in images:
        batch = colour_signatures(TF.to_tensor(image)[None]).numpy()
        assert batch.shape == (1, SIGNATURE_DIM) and batch.sum() == pytest.approx(1.0, abs=1e-5)
        assert colour_similarity(colour_signature(image), batch)[0] > 0.98
    solid = TF.to_tensor(_solid((200, 30, 30)))[None]
    assert np.argmax(colour_signatures(solid)[0].numpy()) == np.argmax(colour_signature(_solid((200, 30, 30))))
    # a batch is its images one by one
    same = [TF.to_tensor(image.resize((160, 120))) for image in images[:3]]
    together = colour_signatures(torch.stack(same)).numpy()
    alone = np.concatenate([colour_signatures(t[None]).numpy() for t in same])
    np.testing.assert_allclose(together, alone, atol=1e-6)
