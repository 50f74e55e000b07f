"""Batched descriptor extraction over image files.

Decoding runs in DataLoader worker processes while the model runs in the main one, so neither
waits for the other. An unreadable image is reported and skipped: one bad file never stops a run
over thousands.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from waldo.data.images import ImageLoadError, load_image
from waldo.data.transforms import to_unit_float
from waldo.models.compiled import prepare_runtime
from waldo.models.cpu_memory import BuffersWhileEager
from waldo.models.descriptor import DescriptorModel


@dataclass
class Extracted:
    """Descriptors of the images that could be read, in input order.

    global_desc: (N, D) float32, L2-normalised.   local_desc: (N, L, D) float16.
    ok: (len(paths),) bool, which inputs were read; N = ok.sum().
    errors: (path, reason) for each input that was skipped.
    timings: seconds of the run: ``wall``, ``model`` (inside the model calls, so ``wall - model``
    is time spent waiting for decoded batches) and ``setup`` (exporting or compiling, part of
    ``model``).
    """

    global_desc: np.ndarray
    local_desc: np.ndarray
    ok: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _ImageFiles(Dataset):
    """(index, image tensor or None, error) per path. A transform whose whole output fits in
    uint8 (``exact_in_uint8``, e.g. TestTransform without an ablation op) yields its uint8
    pixels, scaled by :func:`as_model_input` in the model's process: a quarter of the bytes
    through the worker queues, the same floats (about 14% faster on 2 cores, where decoding
    and the model share the cores; benchmarks/gv_cost.py)."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.uint8 = bool(getattr(transform, "exact_in_uint8", False))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index])
            return index, (self.transform.pixels(image) if self.uint8 else self.transform(image, index)), ""
        except ImageLoadError as error:
            return index, None, str(error)
        except Exception as error:  # a transform failing on an odd image must not kill the run
            return index, None, f"{self.paths[index]}: {type(error).__name__}: {error}"


def _collate(items):
    indices = [i for i, tensor, _ in items if tensor is not None]
    tensors = [tensor for _, tensor, _ in items if tensor is not None]
    errors = [(i, message) for i, tensor, message in items if tensor is None]
    batch = torch.stack(tensors) if tensors else None
    return indices, batch, errors


def as_model_input(batch: torch.Tensor) -> torch.Tensor:
    """A collated batch as the model takes it: float32 in [0, 1] (uint8 pixels scaled), NHWC."""
    if batch.dtype == torch.uint8:
        batch = to_unit_float(batch)
    return batch.contiguous(memory_format=torch.channels_last)


#: Fits (:func:`extract_pooled_features`, the untrained default's augmented views) of at least
#: this many forward passes run the backbone on ONNX Runtime, exporting it if needed (about 10 s,
#: once per backbone and input size: the export holds the backbone alone, so every untrained
#: index shares it); from waldo.models.compiled.AUTO_ONNX_CACHED_MIN_IMAGES when it is cached.
#: Eager PyTorch runs EfficientNet-Lite0 at about 60 images/s on 2 cores, ONNX Runtime at 200.
AUTO_FIT_ONNX_MIN_IMAGES = 1000


def backbone_runner(backbone: torch.nn.Module, stage: int | None, n_images: int, runtime: str = "auto"):
    """The ONNX Runtime runner of ``backbone``'s maps (waldo.models.onnx_runtime.OnnxBackboneMaps)
    a fit of ``n_images`` forward passes should use, or None for eager PyTorch. ``runtime``:
    ``auto`` (by :data:`AUTO_FIT_ONNX_MIN_IMAGES`), ``onnx`` or ``eager``."""
    from waldo.models.compiled import AUTO_ONNX_CACHED_MIN_IMAGES
    from waldo.models.onnx_runtime import OnnxBackboneMaps, onnx_available

    if runtime not in ("auto", "onnx", "eager"):
        raise ValueError(f"a fit's runtime is auto, onnx or eager, got {runtime!r}")
    if runtime == "eager" or not onnx_available():
        return None
    if runtime == "onnx" or n_images >= AUTO_FIT_ONNX_MIN_IMAGES:
        return OnnxBackboneMaps(backbone, stage)
    if n_images >= AUTO_ONNX_CACHED_MIN_IMAGES:
        return OnnxBackboneMaps(backbone, stage, cached_only=True)
    return None


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@torch.inference_mode()
def extract_descriptors(model: DescriptorModel, paths: Sequence[str], transform: Callable, *,
                        batch_size: int = 32, num_workers: int | None = None,
                        progress: bool = True, description: str = "extract",
                        runtime: str = "eager") -> Extracted:
    """Run ``model`` over image files. ``transform(image, key)`` maps a PIL image to a (3, H, W)
    tensor in [0, 1] (see waldo.data.transforms). ``runtime``: ``eager``, ``onnx``, ``compile`` or
    ``auto`` (see waldo.models.compiled.RUNTIMES; all give eager's descriptors to float rounding)."""
    start = time.perf_counter()
    model.eval().to(memory_format=torch.channels_last)  # NHWC kernels are faster on CPU
    run_model = prepare_runtime(model, runtime, batch_size=batch_size, n_images=len(paths))
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    n = len(paths)
    ok = np.zeros(n, dtype=bool)
    global_parts: list[np.ndarray] = []
    local_parts: list[np.ndarray] = []
    errors: list[tuple[str, str]] = []
    bar = tqdm(total=n, desc=description, unit="img", disable=not progress, leave=False)
    model_seconds = 0.0
    with BuffersWhileEager(run_model, model) as buffers:  # eager batches reuse their large buffers
        for indices, batch, batch_errors in loader:
            for index, message in batch_errors:
                errors.append((paths[index], message))
            if batch is not None:
                buffers.before_batch()
                model_start = time.perf_counter()
                out = run_model(as_model_input(batch))
                model_seconds += time.perf_counter() - model_start
                global_parts.append(out.global_desc.float().numpy())
                local_parts.append(out.local_desc.to(torch.float16).numpy())
                ok[indices] = True
            bar.update(len(indices) + len(batch_errors))
    bar.close()
    dim = model.dim
    if global_parts:
        global_desc = np.concatenate(global_parts)
        local_desc = np.concatenate(local_parts)
    else:
        global_desc = np.zeros((0, model.descriptor_width), np.float32)
        local_desc = np.zeros((0, 0, dim), np.float16)
    timings = {"wall": time.perf_counter() - start, "model": model_seconds,
               "setup": float(getattr(run_model, "setup_seconds", 0.0))}
    return Extracted(global_desc, local_desc, ok, errors, timings)


@torch.inference_mode()
def extract_pooled_features(model: DescriptorModel, paths: Sequence[str], transform: Callable, *,
                            batch_size: int = 32, num_workers: int | None = None,
                            progress: bool = True, local_per_image: int = 0,
                            seed: int = 0, pooled_too: bool = True, runtime: str = "eager",
                            maps=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw backbone features for fitting label-free projections (PCA).

    Returns (pooled (N, C) float32, locals (N * local_per_image, Cl) float32): each image's
    feature map pooled the model's way (waldo.models.pooling) and, optionally, a seeded sample of
    the cells its locals read (the last map's, or stage ``model.local_stage``'s: Cl channels).
    ``pooled_too=False`` (a fit of stage cells only): pooled is (0, C) and the backbone stops at
    the local stage. ``runtime``: how the backbone runs (:func:`backbone_runner`); ``maps``: a
    runner already made for it (shared by several passes of one fit)."""
    if not pooled_too and (model.local_stage is None or not local_per_image):
        raise ValueError("pooled_too=False fits a local stage's cells: the model needs local_stage and local_per_image")
    model.eval()
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    generator = torch.Generator().manual_seed(seed)
    if maps is None:
        maps = backbone_runner(model.backbone, model.local_stage, len(paths), runtime)
    pooled, cells = [], []
    with BuffersWhileEager(maps) as buffers:  # eager batches reuse their large buffers
        for _, batch, _ in tqdm(loader, desc="fit features", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            buffers.before_batch()
            batch = as_model_input(batch)
            if maps is not None:
                fmap, local_map = maps(batch)
                local_map = fmap if local_map is None else local_map
            elif not pooled_too:
                local_map = model.backbone.forward_to(batch, model.local_stage)
            elif model.local_stage is None:
                fmap = local_map = model.backbone.forward_features(batch)
            else:
                fmap, local_map = model.backbone.forward_tapped(batch, model.local_stage)
            if pooled_too:
                pooled.append(model.pool(fmap.float()).float().numpy())
            if local_per_image:
                flat = local_map.flatten(2).transpose(1, 2)  # (B, h*w, Cl)
                pick = torch.randint(flat.shape[1], (flat.shape[0], local_per_image), generator=generator)
                cells.append(torch.gather(flat, 1, pick[..., None].expand(-1, -1, flat.shape[2])).reshape(-1, flat.shape[2]).float().numpy())
    c = model.backbone.out_channels
    pooled_all = np.concatenate(pooled) if pooled else np.zeros((0, c), np.float32)
    cells_all = np.concatenate(cells) if cells else np.zeros((0, model.local_channels), np.float32)
    return pooled_all, cells_all
