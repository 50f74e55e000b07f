"""A photo's colour signature: what the CNN descriptors leave out when two products differ by colour.

The held-out grocery queries that Waldo's RRT still gets wrong are mostly products told apart by
colour (red apple varieties, an orange against a grapefruit, milk cartons of one brand in
different colours; docs/results.md "Would the photos' colours help?"). The signature is a
hue-saturation histogram of the photo's central 80% (where the subject of a product photo
usually is) at 96 x 96 pixels: 18 hue x 3 saturation bins for the coloured pixels and 3
brightness bins for the near-grey ones (saturation below 0.15, whose hue is noise), 57 numbers
summing to 1. Two signatures compare by the Bhattacharyya coefficient (the sum of the square roots
of the bins' products: 1 for the same colours, 0 for disjoint ones).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIGNATURE_DIM", "colour_signature", "colour_similarity"]

HUE_BINS, SATURATION_BINS, GREY_BINS = 18, 3, 3
GREY_SATURATION = 0.15  # below it a pixel's hue is noise: it counts by brightness instead
SIGNATURE_DIM = HUE_BINS * SATURATION_BINS + GREY_BINS
CENTRAL = 0.8  # the share of each side kept around the centre
SIZE = 96


def colour_signature(image: Image.Image) -> np.ndarray:
    """The (SIGNATURE_DIM,) float32 signature of ``image`` (any PIL mode: converted to RGB)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    margin = (1 - CENTRAL) / 2
    box = (round(margin * width), round(margin * height), round((1 - margin) * width), round((1 - margin) * height))
    if box[2] <= box[0] or box[3] <= box[1]:  # a photo a few pixels wide: all of it
        box = (0, 0, width, height)
    hsv = np.asarray(image.crop(box).resize((SIZE, SIZE), Image.BILINEAR).convert("HSV"), np.float32) / 255.0
    hue, saturation, value = (hsv[..., i].ravel() for i in range(3))
    coloured = saturation >= GREY_SATURATION
    hist = np.zeros(SIGNATURE_DIM, np.float64)
    h = np.minimum((hue[coloured] * HUE_BINS).astype(np.int64), HUE_BINS - 1)
    s = np.minimum(((saturation[coloured] - GREY_SATURATION) / (1 - GREY_SATURATION) * SATURATION_BINS)
                   .astype(np.int64), SATURATION_BINS - 1)
    np.add.at(hist, h * SATURATION_BINS + s, 1.0)
    g = np.minimum((value[~coloured] * GREY_BINS).astype(np.int64), GREY_BINS - 1)
    np.add.at(hist, HUE_BINS * SATURATION_BINS + g, 1.0)
    return (hist / hist.sum()).astype(np.float32)


def colour_similarity(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Bhattacharyya coefficients of one signature ``query`` (D,) against ``candidates`` (N, D)
    (or of row-aligned (Q, D) / (Q, N, D) batches: the last axis is the signature's)."""
    query, candidates = np.asarray(query, np.float32), np.asarray(candidates, np.float32)
    roots_q, roots_c = np.sqrt(np.clip(query, 0, None)), np.sqrt(np.clip(candidates, 0, None))
    return (roots_c * roots_q[..., None, :]).sum(-1)
