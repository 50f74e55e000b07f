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

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["SIGNATURE_DIM", "append_colour", "colour_signature", "colour_signatures", "colour_similarity"]

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
    hue, saturation, value = (torch.from_numpy(hsv[..., i].ravel()) for i in range(3))
    hist = np.bincount(_bins(hue, saturation, value).numpy(), minlength=SIGNATURE_DIM).astype(np.float64)
    return (hist / hist.sum()).astype(np.float32)


def _bins(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Each pixel's bin (same shape as the inputs), from hue, saturation and value in [0, 1]."""
    h = (hue * HUE_BINS).long().clamp(0, HUE_BINS - 1)
    s = ((saturation - GREY_SATURATION) / (1 - GREY_SATURATION) * SATURATION_BINS).long().clamp(0, SATURATION_BINS - 1)
    g = (value * GREY_BINS).long().clamp(0, GREY_BINS - 1)
    return torch.where(saturation >= GREY_SATURATION, h * SATURATION_BINS + s, HUE_BINS * SATURATION_BINS + g)


@torch.no_grad()
def colour_signatures(images: torch.Tensor) -> torch.Tensor:
    """The signatures of a batch of (B, 3, H, W) RGB images in [0, 1] (a model's input, before its
    normalisation): (B, SIGNATURE_DIM) float32, as :func:`colour_signature` computes them from a
    PIL image, to the rounding of the two resizes and of PIL's 8-bit HSV."""
    _, _, height, width = images.shape
    margin = (1 - CENTRAL) / 2
    top, bottom = round(margin * height), round((1 - margin) * height)
    left, right = round(margin * width), round((1 - margin) * width)
    if bottom > top and right > left:
        images = images[:, :, top:bottom, left:right]
    small = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    small = small.clamp(0, 1)
    red, green, blue = small[:, 0], small[:, 1], small[:, 2]
    value, _ = small.max(1)
    low, _ = small.min(1)
    spread = value - low
    saturation = torch.where(value > 0, spread / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = spread.clamp_min(1e-12)
    hue = torch.where(value == red, (green - blue) / safe,
                      torch.where(value == green, 2 + (blue - red) / safe, 4 + (red - green) / safe))
    hue = torch.where(spread > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    bins = _bins(hue, saturation, value).flatten(1)
    hist = torch.zeros(len(bins), SIGNATURE_DIM, dtype=torch.float32).scatter_add_(
        1, bins, torch.ones_like(bins, dtype=torch.float32))
    return hist / hist.sum(1, keepdim=True)


def append_colour(global_desc: torch.Tensor, signatures: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, G) unit global descriptors with their (B, SIGNATURE_DIM) signatures appended as square
    roots scaled by sqrt(``weight``), the whole renormalised: inner products of two such rows are
    (global similarity + weight x Bhattacharyya coefficient) / (1 + weight). Unchanged at weight 0."""
    if not weight:
        return global_desc
    roots = signatures.to(global_desc.device, global_desc.dtype).clamp_min(0).sqrt()
    return torch.cat([global_desc, math.sqrt(weight) * roots], dim=-1) / math.sqrt(1 + weight)


def colour_similarity(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Bhattacharyya coefficients of one signature ``query`` (D,) against ``candidates`` (N, D)
    (or of row-aligned (Q, D) / (Q, N, D) batches: the last axis is the signature's)."""
    query, candidates = np.asarray(query, np.float32), np.asarray(candidates, np.float32)
    roots_q, roots_c = np.sqrt(np.clip(query, 0, None)), np.sqrt(np.clip(candidates, 0, None))
    return (roots_c * roots_q[..., None, :]).sum(-1)
