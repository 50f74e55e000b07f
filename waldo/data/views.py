"""Strong augmented views of one photo: the self-supervised positives of reranker training.

A second view of the same photo is a positive pair that needs no label, so every image of any
collection is an identity of its own. For the pair to teach *matching* rather than
near-duplicate lookup, the view must differ the way two photos of one object differ: another
framing (random resized crop down to 30% of the area), another viewpoint (rotation and a
perspective / homography warp), other light and camera (colour jitter, blur, JPEG re-encoding)
and clutter in front (a partial occlusion). Flips are left out on purpose: a mirrored label or
logo is another product.

A *swapped* view (:func:`swap_centre`) puts the middle of one photo into the surroundings of
another before the view is made. Photos of products keep the product in the middle and a shelf,
a bin or a hand around it, and a plain view keeps both: a reranker trained only on plain views
can learn to match on the shelf. A swapped pair separates the two: the anchor's middle in another
photo's surroundings is a positive, another product's middle in the anchor's own surroundings a
negative (waldo.train.pairs.PairSampler's ``swap_prob``). Measured on this project's three
training sources it helped in none of three studies (docs/results.md "Swapped pairs"), so it is
an option, off by default.

Every draw comes from the ``numpy`` generator passed in (not the global RNGs), so a view is a
pure function of (image, seed): runs are reproducible, and threads can make views in parallel.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

__all__ = ["ViewAugment", "crop_box", "strong_view", "swap_centre", "SWAP_MIN_CROP"]


@dataclass(frozen=True)
class ViewAugment:
    """How far a view may stray from its photo. Probabilities are per view."""

    min_crop: float = 0.3  # smallest crop, as a fraction of the photo's area
    max_rotation: float = 25.0  # degrees, either way
    p_rotation: float = 0.5
    perspective: float = 0.3  # corner displacement, as a fraction of half the side
    p_perspective: float = 0.5
    jitter: float = 0.4  # brightness / contrast / saturation factors in [1 - j, 1 + j]
    hue: float = 0.05
    p_blur: float = 0.3
    max_blur: float = 2.0  # Gaussian radius in pixels at the output size
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 90)
    p_occlusion: float = 0.3
    max_occlusion: float = 0.25  # of the view's area


# A swapped view crops at least half the photo, so that the pasted middle (a quarter to 40% of
# the area) stays mostly in the view and a swapped positive still shows its anchor.
SWAP_MIN_CROP = 0.5


def swap_centre(surroundings: Image.Image, middle: Image.Image, rng: np.random.Generator,
                side: tuple[float, float] = (0.5, 0.65), shift: float = 0.05) -> Image.Image:
    """``surroundings`` with its middle replaced by the middle of ``middle`` (resized to the
    same size first): a box of ``side`` x each side (drawn), centred up to ``shift`` x the side
    off the photo's centre, the same box in both photos. RGB."""
    base = surroundings.convert("RGB")
    width, height = base.size
    fraction = float(rng.uniform(*side))
    box_w, box_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    cx = width / 2 + rng.uniform(-shift, shift) * width
    cy = height / 2 + rng.uniform(-shift, shift) * height
    left = int(min(max(0, round(cx - box_w / 2)), width - box_w))
    top = int(min(max(0, round(cy - box_h / 2)), height - box_h))
    box = (left, top, left + box_w, top + box_h)
    inner = middle.convert("RGB").resize((width, height), Image.BILINEAR).crop(box)
    out = base.copy()
    out.paste(inner, box[:2])
    return out


def crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.3, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, drawn as torchvision's
    RandomResizedCrop draws it (10 tries, then the whole photo)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w
    return 0, 0, height, width


def _perspective(image: Image.Image, distortion: float, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    dx, dy = distortion * width / 2, distortion * height / 2

    def jitter(x: float, y: float, sx: int, sy: int) -> list[int]:
        return [int(x + sx * rng.uniform(0, dx)), int(y + sy * rng.uniform(0, dy))]

    start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    end = [jitter(0, 0, 1, 1), jitter(width - 1, 0, -1, 1), jitter(width - 1, height - 1, -1, -1),
           jitter(0, height - 1, 1, -1)]
    return F.perspective(image, start, end, interpolation=F.InterpolationMode.BILINEAR)


def strong_view(image: Image.Image, size: int, rng: np.random.Generator,
                augment: ViewAugment = ViewAugment(), middle: Image.Image | None = None) -> torch.Tensor:
    """A strongly augmented ``size`` x ``size`` view of an RGB photo (see module doc); with
    ``middle``, of ``image``'s surroundings around ``middle``'s middle (:func:`swap_centre`),
    cropped to at least :data:`SWAP_MIN_CROP` of the area. Returns (3, size, size) float32 in [0, 1]."""
    a = augment
    image = image.convert("RGB")
    min_crop = a.min_crop
    if middle is not None:
        image = swap_centre(image, middle, rng)
        min_crop = max(min_crop, SWAP_MIN_CROP)
    box = crop_box(*image.size, rng, (min_crop, 1.0))
    image = F.resized_crop(image, *box, [size, size], interpolation=F.InterpolationMode.BILINEAR)
    if rng.random() < a.p_rotation:
        image = F.rotate(image, float(rng.uniform(-a.max_rotation, a.max_rotation)),
                         interpolation=F.InterpolationMode.BILINEAR)
    if rng.random() < a.p_perspective:
        image = _perspective(image, a.perspective, rng)
    for adjust in rng.permutation(3):  # colour jitter in a random order, as torchvision's ColorJitter
        factor = float(rng.uniform(1 - a.jitter, 1 + a.jitter))
        image = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)[adjust](image, factor)
    if a.hue > 0:
        image = F.adjust_hue(image, float(rng.uniform(-a.hue, a.hue)))
    if rng.random() < a.p_blur:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, a.max_blur))))
    if rng.random() < a.p_occlusion:
        fraction = rng.uniform(0.05, a.max_occlusion)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        h = min(size, max(1, round(size * math.sqrt(fraction / aspect))))
        w = min(size, max(1, round(size * math.sqrt(fraction * aspect))))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        image = image.copy()
        image.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (left, top, left + w, top + h))
    if rng.random() < a.p_jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(a.jpeg_quality[0], a.jpeg_quality[1] + 1)))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return F.pil_to_tensor(image).float().div_(255.0)
