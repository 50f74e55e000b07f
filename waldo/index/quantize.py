"""Symmetric int8 quantisation of local descriptors, one scale per descriptor.

Local descriptors dominate an index's size: 49 x 128 values per image, 12.5 KB in float16.
Stored as int8 with one scale per 128-d descriptor they take 49 x 128 + 49 x 2 bytes
(6.2 KB), half as much, for an error of at most half a quantisation step per value.

Per-descriptor (not per-image or global) scales because descriptor norms vary a lot between
the 49 cells of one image (background cells are weak): a shared scale would waste most of
the 255 levels on the weak ones. Symmetric (no zero point) because the descriptors are
roughly centred, and it keeps dequantisation a single multiply.

The rule, for each row ``x`` of the last axis::

    scale = max|x| / 127            (rounded *up* to the scale dtype, see below)
    q     = round(x / scale)        in [-127, 127]; -128 is never used, so the range is symmetric
    x'    = q * scale               |x - x'| <= scale / 2 for every element

A row of zeros gets ``scale = 0`` and ``q = 0`` (and dequantises to exact zeros). Rows with
``max|x|`` below about 0.008 get a subnormal float16 scale: the bound still holds, but the
coarser scale leaves some of the 255 levels unused (pass ``scale_dtype=float32`` to avoid it).

Used by the index (``local_dtype="int8"``, see ``segments.py``) and by evaluation scripts
that measure what the rounding costs in retrieval quality.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT8_LEVELS", "SCALE_DTYPE", "dequantize_int8", "quantize_int8"]

INT8_LEVELS = 127  # symmetric range [-127, 127]
# float16 scales: 2 bytes per descriptor instead of 4. Rounding the scale *up* to float16
# keeps the error bound exact and never pushes a value outside [-127, 127].
SCALE_DTYPE = np.dtype(np.float16)


def quantize_int8(x: np.ndarray, scale_dtype: np.dtype | type = SCALE_DTYPE) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``x`` (..., D) to int8 with one symmetric scale per row of the last axis.

    Args:
        x: finite floating-point array, e.g. (n, L, D) local descriptors.
        scale_dtype: float16 (default, what the index stores) or float32.

    Returns:
        ``(q, scale)``: ``q`` (..., D) int8 in [-127, 127] and ``scale`` (...) of
        ``scale_dtype``, such that ``|x - q * scale| <= scale / 2`` element-wise. The stored
        scale is the float32 ``max|x| / 127`` rounded up to ``scale_dtype``: rounding down
        could make ``|x| / scale`` exceed 127.5 and clip, breaking the bound.

    Raises:
        ValueError: not floating point, no last axis, NaN/inf values, or a scale too large
            for ``scale_dtype`` (``max|x|`` beyond 127 x 65504 for float16).
    """
    a = np.asarray(x)
    sdt = np.dtype(scale_dtype)
    if sdt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"scale_dtype must be float16 or float32, got {sdt}")
    if a.ndim < 1 or a.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last axis (..., D), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("x holds NaN/inf values; they cannot be quantised")
    amax = np.asarray(np.abs(a).max(axis=-1))
    exact = np.asarray(amax / np.float32(INT8_LEVELS))  # float32 scale before rounding to scale_dtype
    with np.errstate(over="ignore"):
        scale = np.array(exact, dtype=sdt)
    if not np.isfinite(scale).all():
        raise ValueError(f"values up to {float(amax.max()):.4g} need a scale beyond the range of {sdt}; "
                         f"use scale_dtype=float32")
    low = scale.astype(np.float32) < exact
    if low.any():  # round up: the smallest representable scale >= the exact one
        scale[low] = np.nextafter(scale[low], np.array(np.inf, dtype=sdt))
    s32 = scale.astype(np.float32)[..., None]
    q = np.zeros(a.shape, dtype=np.float32)
    np.divide(a, s32, out=q, where=s32 > 0)  # zero rows keep q = 0
    q = np.clip(np.rint(q), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype: np.dtype | type = np.float16) -> np.ndarray:
    """``q * scale`` as ``dtype`` (float16 by default: what index readers return).

    Args:
        q: (..., D) int8 from :func:`quantize_int8`.
        scale: (...) float16 or float32, one per row of ``q``.
        dtype: float16 or float32. The product is computed in float32 first; float16 output
            adds its own rounding (relative 2^-11), well below the quantisation step.
    """
    q = np.asarray(q)
    scale = np.asarray(scale)
    out_dtype = np.dtype(dtype)
    if out_dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"dtype must be float16 or float32, got {out_dtype}")
    if q.dtype != np.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    if q.ndim < 1 or scale.shape != q.shape[:-1]:
        raise ValueError(f"scale must have shape {q.shape[:-1]} (one per row of q {q.shape}), got {scale.shape}")
    out = q.astype(np.float32) * scale.astype(np.float32)[..., None]
    return out.astype(out_dtype, copy=False)
