"""Tests for waldo.index.quantize: symmetric per-descriptor int8 quantisation."""

from __future__ import annotations

import numpy as np
import pytest

from waldo.index.quantize import dequantize_int8, quantize_int8


def _bound_holds(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> bool:
    deq = dequantize_int8(q, scale, dtype=np.float32).astype(np.float64)
    s = scale.astype(np.float64)[..., None]
    # scale / 2, plus float32 arithmetic slack (relative 1e-6 of the step, absolute 1e-30)
    return bool(np.all(np.abs(x.astype(np.float64) - deq) <= s * (0.5 + 1e-6) + 1e-30))


@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 37.0, 100.0])
def test_round_trip_error_is_at_most_half_a_step(magnitude):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20, 49, 128)) * magnitude).astype(np.float32)
    x[0, 0] *= 100  # (values stay within float16) descriptors of very different norms in one image: per-row scales matter
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert scale.dtype == np.float16 and scale.shape == (20, 49)
    assert q.min() >= -127 and q.max() <= 127
    assert _bound_holds(x, q, scale)
    if magnitude >= 1.0:  # smaller scales are float16 subnormals: coarser, so fewer levels are used
        # every row uses the full range: its largest |value| maps to +-127
        assert (np.abs(q).max(axis=-1) == 127).all()
    # default output is float16, the dtype index readers return
    assert dequantize_int8(q, scale).dtype == np.float16


def test_float32_scales_and_float16_input():
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float16)
    q, scale = quantize_int8(x, scale_dtype=np.float32)
    assert scale.dtype == np.float32 and _bound_holds(x, q, scale)


def test_zero_vectors_get_zero_scale():
    x = np.random.default_rng(2).standard_normal((4, 3, 8)).astype(np.float32)
    x[1, 2] = 0.0
    x[3] = 0.0
    q, scale = quantize_int8(x)
    assert scale[1, 2] == 0 and (scale[3] == 0).all() and (scale[0] > 0).all()
    assert (q[1, 2] == 0).all() and (q[3] == 0).all()
    deq = dequantize_int8(q, scale)
    assert (deq[1, 2] == 0).all() and (deq[3] == 0).all() and np.isfinite(deq).all()


def test_one_vector_and_tiny_values():
    x = np.array([3e-9, -1e-9, 0.0, 2e-9], dtype=np.float32)  # below float16's smallest scale
    q, scale = quantize_int8(x)
    assert scale.shape == () and scale > 0  # rounded up, never to 0 for a non-zero vector
    assert _bound_holds(x, q, scale)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_int8(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8(np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="beyond the range of float16"):
        quantize_int8(np.full((1, 4), 1e7, np.float32))
    q, scale = quantize_int8(np.full((1, 4), 1e7, np.float32), scale_dtype=np.float32)
    assert _bound_holds(np.full((1, 4), 1e7), q, scale)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_int8(np.ones((1, 4), np.float32), scale_dtype=np.int8)
    with pytest.raises(ValueError, match="shape"):
        dequantize_int8(np.zeros((2, 4), np.int8), np.zeros(3, np.float16))
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8(np.zeros((2, 4), np.int16), np.zeros(2, np.float16))
