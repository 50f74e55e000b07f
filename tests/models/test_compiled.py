"""The compiled runtime: same descriptors as eager, any batch size, and a safe fallback."""

from __future__ import annotations

import pytest
import torch

import waldo.models.compiled as compiled_module
from waldo.models.backbones import create_backbone
from waldo.models.compiled import CompiledDescriptorModel, can_compile, prepare_runtime
from waldo.models.descriptor import DescriptorModel


def _model() -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32).eval()


@pytest.mark.skipif(not can_compile(), reason="torch.compile needs a C++ compiler")
def test_compiled_descriptors_equal_eager_ones_for_full_and_short_batches():
    model = _model()
    images = torch.rand(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(images)
        runner = CompiledDescriptorModel(model, batch_size=2)
        first = runner(images[:2])
        last = runner(images[2:])  # shorter: padded to the compiled shape, not recompiled
    assert not runner._failed
    got = torch.cat([first.global_desc, last.global_desc])
    assert torch.nn.functional.cosine_similarity(got, expected.global_desc).min() > 0.9999
    locals_ = torch.cat([first.local_desc, last.local_desc])
    assert torch.nn.functional.cosine_similarity(locals_, expected.local_desc, dim=-1).min() > 0.999
    assert last.global_desc.shape == (1, 32) and last.grid == expected.grid
    with pytest.raises(ValueError, match="larger than the compiled batch"):
        runner(images)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(module, **_):
        def run(_images):
            raise RuntimeError("no compiler today")
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    runner = CompiledDescriptorModel(model, batch_size=2)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="extracting in eager mode"):
        out = runner(images)
    with torch.inference_mode():
        torch.testing.assert_close(out.global_desc, model(images).global_desc)
    assert runner._failed


def test_runtime_choice():
    model = _model()
    assert prepare_runtime(model, "eager", batch_size=8, n_images=10**6) is model
    assert prepare_runtime(model, "auto", batch_size=8, n_images=10) is model  # too few to pay for compiling
    with pytest.raises(ValueError, match="runtime must be one of"):
        prepare_runtime(model, "turbo", batch_size=8, n_images=1)
