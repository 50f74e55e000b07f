"""Multi-scale global descriptors: describe each image at several sizes and average.

An object photographed from further away looks smaller; a descriptor that has seen the image at
a few sizes is less sensitive to that. Each scale's global descriptor is already L2-normalised,
so the average weighs every scale equally; the mean is L2-normalised again so inner products stay
cosines. Local descriptors (for the rerankers) come from the base scale only: the RRT was
trained on that grid, and other sizes give grids of other shapes.

Off by default everywhere: ``evaluate_protocol(..., extra_transforms=())`` is the single-scale
path, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from waldo.data.transforms import get_transform
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import Extracted, extract_descriptors

__all__ = ["average_global", "extract_multiscale", "scale_sizes", "scale_transforms"]


def average_global(descriptors: Sequence[np.ndarray]) -> np.ndarray:
    """The L2-normalised mean of equally shaped (N, D) L2-normalised descriptor arrays."""
    if not descriptors:
        raise ValueError("average_global needs at least one descriptor array")
    shapes = {d.shape for d in descriptors}
    if len(shapes) != 1:
        raise ValueError(f"descriptor arrays differ in shape: {sorted(shapes)}")
    mean = np.mean(np.stack([np.asarray(d, np.float64) for d in descriptors]), axis=0)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    # Opposite descriptors could cancel to zero; leave such a row at zero rather than divide by 0.
    return (mean / np.maximum(norms, 1e-12)).astype(np.float32)


def scale_sizes(base_size: int, factors: Sequence[float]) -> list[int]:
    """Image sides for ``factors`` of ``base_size`` (rounded), without repeats, base first."""
    sizes = [base_size]
    for factor in factors:
        if factor <= 0:
            raise ValueError(f"scale factors must be positive, got {factor}")
        size = max(32, round(base_size * factor))
        if size not in sizes:
            sizes.append(size)
    return sizes


def scale_transforms(name: str, base_size: int, factors: Sequence[float], seed: int = 0) -> list[Callable]:
    """The extra-scale transforms (every size of :func:`scale_sizes` except the base one)."""
    return [get_transform(name, size, seed=seed) for size in scale_sizes(base_size, factors)[1:]]


def extract_multiscale(model: DescriptorModel, paths: Sequence[str], transform: Callable,
                       extra_transforms: Sequence[Callable], *, base: Extracted | None = None,
                       **extract_options) -> Extracted:
    """Descriptors of ``paths`` with globals averaged over ``transform`` and ``extra_transforms``.

    ``base``: an extraction already done with ``transform`` (reused, not repeated). Locals are the
    base scale's. Images unreadable at any scale are dropped from all of them alike.
    """
    if base is None:
        base = extract_descriptors(model, paths, transform, **extract_options)
    parts = [extract_descriptors(model, paths, extra, **{**extract_options, "description": f"scale {i + 2}"})
             for i, extra in enumerate(extra_transforms)]
    ok = base.ok.copy()
    for part in parts:
        ok &= part.ok
    if not parts:
        return base

    def rows(extracted: Extracted) -> np.ndarray:  # rows of extracted's arrays for the kept images
        return np.searchsorted(np.flatnonzero(extracted.ok), np.flatnonzero(ok))

    global_desc = average_global([base.global_desc[rows(base)]] + [p.global_desc[rows(p)] for p in parts])
    errors = list(base.errors) + [e for p in parts for e in p.errors if e not in base.errors]
    return Extracted(global_desc, base.local_desc[rows(base)], ok, errors)
