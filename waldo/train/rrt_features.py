"""What the reranker trainer feeds its trainable part: cached backbone activations, or images.

Only the last few backbone stages (or none, in frozen mode) change during RRT training, so
everything before them computes the same activations every epoch. :func:`cache_features` runs
that frozen prefix once per image and view and keeps its output as a float16 ``.npy`` memmap;
an epoch then costs only the trainable tail, the projections and the RRT. View 0 is the
test-time transform; views 1.. are seeded random-resized-crop + flip augmentations, so the
cache is a fixed sample of the augmentation distribution (a few views per image instead of a
fresh one every epoch: the price of training on 2 cores). With the whole backbone trainable
(``trainable_blocks = -1``, the paper config) there is nothing to cache and
:class:`OnlineImages` decodes and augments images for every batch instead.

Cache folder (keyed like the neighbour cache, see waldo.train.mining)::

    <cache_root>/features/<key>/manifest.json   inputs, shape
                                features.npy    (N, V, C, h, w) float16, prefix output
                                ok.npy          (N,) bool, which images could be read
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from waldo.data.images import load_image
from waldo.data.transforms import TestTransform
from waldo.models.backbones import Backbone
from waldo.train.mining import list_hash
from waldo.data.views import crop_box

__all__ = ["CachedFeatures", "FeatureSource", "OnlineImages", "augment", "cache_features", "prefix_forward"]

CACHE_FORMAT = 1
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, as the reference's train transform
CROP_RATIO = (3 / 4, 4 / 3)


class FeatureSource(Protocol):
    """Gives the input of the trainable tail for (image row, view) pairs."""

    n_views: int
    ok: np.ndarray  # (N,) bool, rows that can be used

    def get(self, rows: np.ndarray, views: np.ndarray, seed: int = 0) -> torch.Tensor:
        """rows, views (n,) int -> (n, C, h, w) float32."""
        ...


def augment(image: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip drawn from ``rng`` (torchvision's uses the
    global RNG, which neither worker processes nor threads can share reproducibly).
    Returns (3, size, size) float32 in [0, 1]."""
    box = crop_box(*image.size, rng, CROP_SCALE, CROP_RATIO)
    image = F.resized_crop(image, *box, [size, size], interpolation=F.InterpolationMode.BILINEAR)
    if rng.random() < 0.5:
        image = F.hflip(image)
    return F.pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def _view(image: Image.Image, view: int, test_transform: TestTransform, seed: int, key: int) -> torch.Tensor:
    if view == 0:
        return test_transform(image, key)
    return augment(image, test_transform.image_size, np.random.default_rng([seed, key, view]))


def prefix_forward(backbone: Backbone, prefix: Sequence[nn.Module] | None):
    """``images (B, 3, H, W) in [0, 1] -> tail input``: normalisation then the frozen modules;
    ``prefix`` None means the whole backbone (frozen mode: the tail is empty)."""
    def forward(images: torch.Tensor) -> torch.Tensor:
        if prefix is None:
            return backbone.forward_features(images)
        x = backbone.normalize(images)
        for module in prefix:
            x = module(x)
        return x

    return forward


class _Views(Dataset):
    def __init__(self, paths: Sequence[str], n_views: int, transform: TestTransform, seed: int) -> None:
        self.paths, self.n_views, self.transform, self.seed = list(paths), n_views, transform, seed

    def __len__(self) -> int:
        return len(self.paths) * self.n_views

    def __getitem__(self, index: int):
        row, view = divmod(index, self.n_views)
        try:
            return row, view, _view(load_image(self.paths[row]), view, self.transform, self.seed, row)
        except Exception as error:  # noqa: BLE001 - one unreadable image must not stop a cache of thousands
            return row, view, str(error)


def _collate(items):
    good = [(r, v, t) for r, v, t in items if isinstance(t, torch.Tensor)]
    bad = [r for r, _, t in items if not isinstance(t, torch.Tensor)]
    if not good:
        return [], [], None, bad
    rows, views, tensors = zip(*good)
    return list(rows), list(views), torch.stack(tensors), bad


class CachedFeatures:
    """A feature cache opened read-only (memory-mapped: the OS pages it in as batches need it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.features = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)  # (N, V, C, h, w) f16
        self.ok = np.load(folder / "ok.npy", allow_pickle=False)
        self.n_views = int(self.features.shape[1])

    def get(self, rows: np.ndarray, views: np.ndarray, seed: int = 0) -> torch.Tensor:
        # Fancy indexing of a memmap copies just these rows into memory.
        return torch.from_numpy(np.asarray(self.features[np.asarray(rows), np.asarray(views)])).float()


def _module_hash(backbone: Backbone, prefix: Sequence[nn.Module] | None) -> str:
    digest = hashlib.sha256(backbone.name.encode())
    modules = [backbone] if prefix is None else list(prefix)
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{index}.{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@torch.inference_mode()
def cache_features(backbone: Backbone, prefix: Sequence[nn.Module] | None, paths: Sequence[str],
                   transform: TestTransform, *, n_views: int = 1, seed: int = 0, cache_root: str | Path,
                   batch_size: int = 32, num_workers: int = 2, progress: bool = True) -> CachedFeatures:
    """Run the frozen prefix over every (image, view) once and cache its output (see module doc).
    Returns the cache, reused as is when a previous run made it from the same inputs."""
    inputs = {"format": CACHE_FORMAT, "prefix_hash": _module_hash(backbone, prefix),
              "prefix_modules": -1 if prefix is None else len(prefix), "list_hash": list_hash(paths),
              "n_images": len(paths), "transform": transform.name, "image_size": transform.image_size,
              "views": n_views, "seed": seed, "crop_scale": list(CROP_SCALE), "crop_ratio": list(CROP_RATIO)}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root) / "features" / f"{backbone.name}-{transform.name}-v{n_views}-{key}"
    if (folder / "manifest.json").is_file():
        cached = CachedFeatures(folder)
        if cached.manifest.get("inputs") != inputs:
            raise ValueError(f"{folder} holds features of other inputs; delete it to rebuild")
        return cached
    start = time.perf_counter()
    forward = prefix_forward(backbone, prefix)
    backbone.eval()
    probe = forward(torch.zeros(1, 3, transform.image_size, transform.image_size))
    shape = (len(paths), n_views, *probe.shape[1:])
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    features = np.lib.format.open_memmap(staging / "features.npy", mode="w+", dtype=np.float16, shape=shape)
    ok = np.ones(len(paths), bool)
    loader = DataLoader(_Views(paths, n_views, transform, seed), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    bar = tqdm(total=len(paths) * n_views, desc="cache features", unit="img", disable=not progress, leave=False)
    for rows, views, batch, bad in loader:
        ok[bad] = False
        if batch is not None:
            features[rows, views] = forward(batch.contiguous(memory_format=torch.channels_last)).half().numpy()
        bar.update(len(rows) + len(bad))
    bar.close()
    features.flush()
    del features
    np.save(staging / "ok.npy", ok, allow_pickle=False)
    manifest = {"inputs": inputs, "shape": list(shape), "n_unreadable": int((~ok).sum()),
                "seconds": round(time.perf_counter() - start, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(staging, folder)
    except OSError:  # published concurrently by another run with the same inputs
        shutil.rmtree(staging, ignore_errors=True)
    return CachedFeatures(folder)


class OnlineImages:
    """Decode and transform images per batch (threads: PIL decoding releases the GIL).

    View 0 is the test transform; any other view is a fresh augmentation drawn from
    (seed, row, view), where the trainer passes a per-step seed, so runs are reproducible.
    Returns normalised images: the tail is then the whole backbone.
    """

    def __init__(self, backbone: Backbone, paths: Sequence[str], transform: TestTransform, *,
                 n_views: int = 2, threads: int = 4) -> None:
        self.backbone, self.paths, self.transform = backbone, list(paths), transform
        self.n_views = n_views
        self.ok = np.ones(len(self.paths), bool)  # unreadable images raise: the data must be clean
        self._pool = ThreadPoolExecutor(max_workers=threads)

    def get(self, rows: np.ndarray, views: np.ndarray, seed: int = 0) -> torch.Tensor:
        def one(row: int, view: int) -> torch.Tensor:
            return _view(load_image(self.paths[row]), view, self.transform, seed, int(row))

        images = torch.stack(list(self._pool.map(one, np.asarray(rows).tolist(), np.asarray(views).tolist())))
        return self.backbone.normalize(images)
