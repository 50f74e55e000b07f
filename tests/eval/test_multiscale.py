"""Multi-scale global descriptors: the normalised mean, opt-in, reusing the base scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from waldo.data.datasets import ImageSet
from waldo.data.protocols import Protocol, get_protocol
from waldo.data.transforms import get_transform
from waldo.eval.evaluate import evaluate_protocol
from waldo.eval.multiscale import average_global, extract_multiscale, scale_sizes, scale_transforms
from waldo.models.extract import extract_descriptors

SIZE = 64
BASELINE = "resize256-crop224"


def test_average_global_is_the_normalised_mean():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    out = average_global([a, b])
    np.testing.assert_allclose(out[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 1.0])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert scale_sizes(224, (0.75, 1, 1.25)) == [224, 168, 280]
    with pytest.raises(ValueError):
        average_global([a, b[:1]])


def test_multiscale_is_opt_in_and_reuses_the_base_scale(grocery_dir):
    from waldo.models.untrained import untrained_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches on a busy 2-core machine: one thread is faster
    try:
        model, _ = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=SIZE,
                                   progress=False)
        gallery = get_protocol("grocery-open-cross", grocery_dir).gallery
        images = ImageSet(gallery.records[:4], gallery.root, "four")
        paths = images.paths
        transform = get_transform(BASELINE, SIZE)
        base = extract_descriptors(model, paths, transform, num_workers=0, progress=False)
        extra = scale_transforms(BASELINE, SIZE, (0.75, 1.0, 1.25))
        fresh = extract_multiscale(model, paths, transform, extra, num_workers=0, progress=False)
        reused = extract_multiscale(model, paths, transform, extra, base=base, num_workers=0, progress=False)
        np.testing.assert_allclose(fresh.global_desc, reused.global_desc, atol=1e-6)
        np.testing.assert_array_equal(reused.local_desc, base.local_desc)  # locals: the base scale only
        assert not np.allclose(reused.global_desc, base.global_desc)
        # The default evaluation path is single-scale: the base extraction's descriptors, unchanged.
        tiny = Protocol("four", ImageSet([], None, "empty"), images, images, True, "four gallery images")
        run = evaluate_protocol(model, tiny, transform, num_workers=0, progress=False)
        np.testing.assert_array_equal(run.gallery.global_desc, base.global_desc)
    finally:
        torch.set_num_threads(previous)
