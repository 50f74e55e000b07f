"""waldo.models.cpu_memory: eager passes keep their large buffers in the heap (glibc), results unchanged."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import waldo.models.cpu_memory as cpu_memory
from waldo.data.datasets import read_labels_csv
from waldo.data.transforms import get_transform
from waldo.models.backbones import create_backbone
from waldo.models.cpu_memory import reuse_large_buffers, runs_eager, tuning_available
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_descriptors


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks mapped on their own (mallinfo2's hblkhd)."""
    return int(_mallinfo().hblkhd)


def _heap_free_bytes() -> int:
    """Free bytes inside glibc's main heap (mallinfo2's fordblks)."""
    return int(_mallinfo().fordblks)


def _mapped_while_holding(nbytes: int) -> int:
    """How many more bytes are mapped on their own while a ``nbytes`` buffer is alive."""
    before = _mapped_bytes()
    buffer = np.ones(nbytes, np.uint8)  # numpy allocates through malloc
    held = _mapped_bytes() - before
    del buffer
    return held


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not tuning_available() or not _has_mallinfo2(), reason="the tuning acts on glibc only; "
                    "reading the mapped bytes needs glibc >= 2.33")
def test_a_large_buffer_comes_from_the_heap_inside_and_is_mapped_again_after():
    size = 80 << 20  # above the 32 MiB ceiling of glibc's own adaptive threshold
    with reuse_large_buffers() as active:
        assert active
        with reuse_large_buffers():  # nested: still in effect...
            pass
        assert _mapped_while_holding(size) == 0  # ...after the inner one left
    # Restored: a large buffer is mapped on its own again. Measured holding the module's lock, so no
    # other thread (one an earlier test left running) can raise the thresholds meanwhile, and with
    # a buffer larger than all the heap's free bytes, which free chunks that earlier tests' buffers
    # left between live ones could otherwise serve without mapping anything.
    with cpu_memory._lock:
        assert cpu_memory._depth == 0
        restored = max(size, _heap_free_bytes() + (16 << 20))
        assert _mapped_while_holding(restored) >= restored


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("WALDO_MALLOC_TUNING", "0")
    assert not tuning_available()
    with reuse_large_buffers() as active:
        assert not active
    assert cpu_memory._depth == 0


def test_runs_eager_tells_the_model_from_an_onnx_wrapper():
    class Wrapper:
        fell_back = False

    model, wrapper = object(), Wrapper()
    assert runs_eager(model, model) and runs_eager(None, None)
    assert not runs_eager(wrapper, model)
    wrapper.fell_back = True
    assert runs_eager(wrapper, model)


def test_eager_descriptors_are_the_same_with_and_without(monkeypatch, grocery_dir):
    paths = read_labels_csv(grocery_dir).paths[:6]
    transform = get_transform("resize256-crop224")
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32).eval()
    tuned = extract_descriptors(model, paths, transform, batch_size=4, runtime="eager", progress=False,
                                num_workers=0)
    monkeypatch.setenv("WALDO_MALLOC_TUNING", "0")
    plain = extract_descriptors(model, paths, transform, batch_size=4, runtime="eager", progress=False,
                                num_workers=0)
    np.testing.assert_array_equal(tuned.global_desc, plain.global_desc)
    np.testing.assert_array_equal(tuned.local_desc, plain.local_desc)
