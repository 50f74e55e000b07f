"""Test-time transform presets (and the one training augmentation).

Every preset returns a ``float32`` tensor of shape ``(3, H, W)`` with values in ``[0, 1]``:
backbones normalise inside the model, so the data pipeline must *not* normalise (the founding
report's ``normalize-extra`` ablation, which does, lives in the transform study only).

Random presets are deterministic per image: :meth:`TestTransform.__call__` seeds a private
``torch.Generator`` from ``(seed, key)`` (pass the image index as ``key``), so results never
depend on DataLoader worker order or on the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from waldo.registry import Registry

__all__ = [
    "TRANSFORMS",
    "TestTransform",
    "get_transform",
    "resize_size_for",
    "train_transform",
    "transform_names",
]

# Ablation strengths: fixed so that every run of an ablation sees exactly the same distortion.
CONTRAST_FACTOR = 1.5
PERSPECTIVE_DISTORTION = 0.3
BLUR_KERNEL = 5
BLUR_SIGMA = 1.5

# (image tensor (3,H,W) float32 in [0,1], generator) -> image tensor
TensorOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def resize_size_for(image_size: int) -> int:
    """The square resize side before the centre crop: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``uint8`` ``(3, H, W)``."""
    if image.mode != "RGB":
        # load_image() already yields RGB; this guards direct callers passing L/RGBA images.
        image = image.convert("RGB")
    return F.pil_to_tensor(image)


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels -> ``float32`` in ``[0, 1]``: the one scaling every transform uses, so
    scaling later (see :meth:`TestTransform.pixels`) gives the same floats bit for bit."""
    return pixels.to(torch.float32).div_(255.0)


def _to_float_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``float32`` ``(3, H, W)`` in ``[0, 1]``."""
    return to_unit_float(_to_uint8_tensor(image))


def _random_perspective(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perspective warp with corners moved inward by up to ``PERSPECTIVE_DISTORTION`` of half
    the side, drawn from ``generator`` (torchvision's RandomPerspective uses the global RNG).
    Pixels outside the warped image are black."""
    _, height, width = image.shape
    dx = int(PERSPECTIVE_DISTORTION * (width // 2)) + 1
    dy = int(PERSPECTIVE_DISTORTION * (height // 2)) + 1

    def draw(upper: int) -> int:
        return int(torch.randint(0, upper, (1,), generator=generator).item())

    top_left = [draw(dx), draw(dy)]
    top_right = [width - 1 - draw(dx), draw(dy)]
    bottom_right = [width - 1 - draw(dx), height - 1 - draw(dy)]
    bottom_left = [draw(dx), height - 1 - draw(dy)]
    corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    warped = F.perspective(
        image, corners, [top_left, top_right, bottom_right, bottom_left],
        interpolation=F.InterpolationMode.BILINEAR, fill=[0.0, 0.0, 0.0],
    )  # fmt: skip
    return warped.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class TestTransform:
    """Resize (square, ignoring aspect ratio) -> optional centre crop -> tensor -> ablation op.

    Attributes:
        name: preset name. image_size: output side ``H == W``. resize: square resize side.
        crop: whether to centre-crop ``resize`` down to ``image_size``. seed: base seed.
        op: the ablation applied to the ``[0, 1]`` tensor (identity for the plain presets).
        random: whether ``op`` draws random numbers (then ``key`` matters).
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    image_size: int
    resize: int
    crop: bool
    seed: int = 0
    op: TensorOp | None = field(default=None, repr=False)
    random: bool = False

    def generator(self, key: int = 0) -> torch.Generator:
        """A generator seeded from ``(seed, key)`` via SeedSequence (no collisions between
        e.g. seed=0,key=1 and seed=1,key=0)."""
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, key & 0xFFFFFFFF, key >> 32 & 0xFFFFFFFF])
        return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))

    def cell_centres(self, grid: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
        """(h * w, 2) float32 ``[x, y]``, row-major: the centre of each cell of an (h, w) feature
        grid over this transform's output, in the pixels of the ``(width, height)`` image it was
        given (the square resize and centre crop undone; an ablation op's warp is not)."""
        h, w = grid
        offset = (self.resize - self.image_size) / 2 if self.crop else 0.0
        xs = ((np.arange(w) + 0.5) * self.image_size / w + offset) * original_size[0] / self.resize
        ys = ((np.arange(h) + 0.5) * self.image_size / h + offset) * original_size[1] / self.resize
        grid_x, grid_y = np.meshgrid(xs, ys)
        return np.stack([grid_x, grid_y], -1).reshape(-1, 2).astype(np.float32)

    @property
    def exact_in_uint8(self) -> bool:
        """Whether :meth:`pixels` holds this transform's whole output (no ablation op after it)."""
        return self.op is None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized and cropped image as ``uint8`` ``(3, image_size, image_size)``: for a
        transform without an op, :func:`to_unit_float` of it is exactly ``self(image)``, in a
        quarter of the bytes (what extraction's decoding workers hand to the model's process)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"transform {self.name!r} expects a PIL image, got {type(image).__name__}")
        image = F.resize(image, [self.resize, self.resize], interpolation=F.InterpolationMode.BILINEAR)
        if self.crop:
            image = F.center_crop(image, [self.image_size, self.image_size])
        return _to_uint8_tensor(image)

    def __call__(self, image: Image.Image, key: int = 0) -> torch.Tensor:
        """PIL image -> ``float32`` ``(3, image_size, image_size)``; deterministic per ``(seed, key)``."""
        tensor = to_unit_float(self.pixels(image))
        if self.op is not None:
            tensor = self.op(tensor, self.generator(key) if self.random else torch.Generator())
        return tensor.contiguous()


#: name -> builder ``(image_size: int, seed: int) -> TestTransform``.
TRANSFORMS: Registry[TestTransform] = Registry("transform")


def _default(name: str, image_size: int, seed: int, op: TensorOp | None = None, random: bool = False) -> TestTransform:
    """The paper's pipeline (resize to 256/224 of the size, centre crop) plus an ablation op."""
    return TestTransform(name, image_size, resize_size_for(image_size), True, seed, op, random)


@TRANSFORMS.register("resize256-crop224")
def _resize_crop(image_size: int, seed: int) -> TestTransform:
    return _default("resize256-crop224", image_size, seed)


@TRANSFORMS.register("resize224")
def _resize_only(image_size: int, seed: int) -> TestTransform:
    return TestTransform("resize224", image_size, image_size, False, seed)


@TRANSFORMS.register("grayscale")
def _grayscale(image_size: int, seed: int) -> TestTransform:
    return _default("grayscale", image_size, seed, lambda x, g: F.rgb_to_grayscale(x, num_output_channels=3))


@TRANSFORMS.register("contrast")
def _contrast(image_size: int, seed: int) -> TestTransform:
    return _default("contrast", image_size, seed, lambda x, g: F.adjust_contrast(x, CONTRAST_FACTOR))


@TRANSFORMS.register("perspective")
def _perspective(image_size: int, seed: int) -> TestTransform:
    return _default("perspective", image_size, seed, _random_perspective, random=True)


@TRANSFORMS.register("blur")
def _blur(image_size: int, seed: int) -> TestTransform:
    def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA]).clamp_(0.0, 1.0)

    return _default("blur", image_size, seed, blur)


@TRANSFORMS.register("flip")
def _flip(image_size: int, seed: int) -> TestTransform:
    return _default("flip", image_size, seed, lambda x, g: F.hflip(x))


def transform_names() -> list[str]:
    """All test-time preset names, sorted."""
    return TRANSFORMS.names()


def get_transform(name: str = "resize256-crop224", image_size: int = 224, seed: int = 0) -> TestTransform:
    """Build test-time preset ``name`` for square outputs of side ``image_size``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a non-positive size.
    """
    builder = TRANSFORMS.get(name)
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return builder(image_size, seed)


def train_transform(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation: RandomResizedCrop + horizontal flip -> ``float32`` ``(3, S, S)`` in
    ``[0, 1]``. Uses the global torch RNG (training wants fresh randomness every epoch)."""
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), _to_float_tensor])
