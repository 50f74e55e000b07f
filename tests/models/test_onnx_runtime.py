"""The ONNX Runtime path: same descriptors as eager, any batch size, verified, safe fallback."""

from __future__ import annotations

import numpy as np
import onnxruntime  # noqa: F401 - a hard dependency: missing, this module fails instead of skipping
import pytest
import torch

import waldo.models.onnx_runtime as onnx_module
from waldo.data.datasets import read_labels_csv
from waldo.data.transforms import get_transform
from waldo.models.backbones import create_backbone
from waldo.models.compiled import AUTO_ONNX_CACHED_MIN_IMAGES, AUTO_ONNX_MIN_IMAGES, prepare_runtime
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_descriptors
from waldo.models.onnx_runtime import OnnxDescriptorModel


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test exports afresh into its own cache (the project cache is left alone)."""
    monkeypatch.setenv("WALDO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model() -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32).eval()


def test_onnx_descriptors_equal_eager_ones_for_any_batch_and_size():
    model = _model()
    runner = OnnxDescriptorModel(model)
    images = torch.rand(3, 3, 96, 96)
    with torch.inference_mode():
        expected = model(images)
        first = runner(images[:2])  # exports, then checks itself against eager
        last = runner(images[2:])  # another batch size: the same session (dynamic batch)
        wider = runner(torch.rand(1, 3, 64, 128))  # another input size: a second session
    assert not runner._failed
    assert runner.agreement[(96, 96)] >= 0.999 and set(runner.agreement) == {(96, 96), (64, 128)}
    got = torch.cat([first.global_desc, last.global_desc])
    assert torch.nn.functional.cosine_similarity(got, expected.global_desc).min() > 0.9999
    locals_ = torch.cat([first.local_desc, last.local_desc])
    assert torch.nn.functional.cosine_similarity(locals_, expected.local_desc, dim=-1).min() > 0.999
    assert last.local_desc.shape == expected.local_desc[2:].shape and last.grid == expected.grid == (3, 3)
    assert wider.grid == (2, 4) and wider.local_desc.shape == (1, 8, 32)


def test_a_session_that_disagrees_with_eager_is_not_used(monkeypatch):
    model = _model()
    runner = OnnxDescriptorModel(model)
    real = runner._run_session

    def corrupted(session, images):  # stands in for an exporter bug
        out = real(session, images)
        return type(out)(-out.global_desc, out.local_desc, out.grid)

    monkeypatch.setattr(runner, "_run_session", corrupted)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="differ from eager"):
        out = runner(images)
    with torch.inference_mode():
        torch.testing.assert_close(out.global_desc, model(images).global_desc)  # eager's answer
    assert runner._failed


def test_a_failing_export_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(onnx_module, "export_onnx", broken)
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="extracting in eager mode"):
        out = OnnxDescriptorModel(model)(images)
    with torch.inference_mode():
        torch.testing.assert_close(out.global_desc, model(images).global_desc)


def test_auto_picks_onnx_for_big_runs_only():
    model = _model()
    big = prepare_runtime(model, "auto", batch_size=8, n_images=AUTO_ONNX_MIN_IMAGES)
    assert isinstance(big, OnnxDescriptorModel) and not big.cached_only
    assert prepare_runtime(model, "auto", batch_size=8, n_images=AUTO_ONNX_CACHED_MIN_IMAGES - 1) is model
    assert isinstance(prepare_runtime(model, "onnx", batch_size=8, n_images=1), OnnxDescriptorModel)


def test_auto_uses_a_cached_export_for_smaller_runs_and_never_exports_for_them(fresh_cache):
    """A run too small to pay for an export runs eager (no export, no warning) until a big run
    has cached this model's export; then it runs on ONNX Runtime too."""
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    small = prepare_runtime(model, "auto", batch_size=8, n_images=AUTO_ONNX_MIN_IMAGES - 1)
    assert isinstance(small, OnnxDescriptorModel) and small.cached_only
    with torch.inference_mode():
        small(images)
    assert not small._sessions and not any(fresh_cache.rglob("*.onnx"))  # eager: nothing exported
    with torch.inference_mode():
        OnnxDescriptorModel(model)(images)  # a big run's export, now cached
    again = prepare_runtime(model, "auto", batch_size=8, n_images=AUTO_ONNX_MIN_IMAGES - 1)
    with torch.inference_mode():
        out = again(images)
        reference = model(images)
    assert (64, 64) in again._sessions and again.agreement[(64, 64)] > 0.9999
    torch.testing.assert_close(out.global_desc, reference.global_desc, atol=1e-4, rtol=1e-4)


def test_extract_descriptors_with_onnx_matches_eager_on_real_photos(grocery_dir):
    paths = read_labels_csv(grocery_dir).paths[:5]
    transform = get_transform("resize256-crop224")
    model = _model()
    eager = extract_descriptors(model, paths, transform, batch_size=4, runtime="eager", progress=False)
    fast = extract_descriptors(model, paths, transform, batch_size=4, runtime="onnx", progress=False)
    assert fast.ok.all() and eager.ok.all()
    cos = (fast.global_desc * eager.global_desc).sum(1)
    assert cos.min() > 0.9999
    assert np.abs(fast.local_desc.astype(np.float32) - eager.local_desc.astype(np.float32)).max() < 0.05


def test_the_export_is_cached_and_a_corrupt_cache_file_is_dropped(monkeypatch, fresh_cache):
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(images)
        OnnxDescriptorModel(model)(images)  # exports and caches
    cached = onnx_module.cache_path(model, 64, 64)
    assert cached.is_file() and cached.parent == fresh_cache / "onnx"

    def no_export(*_args):
        raise AssertionError("exported again although the cache holds this model")

    monkeypatch.setattr(onnx_module, "export_onnx", no_export)
    runner = OnnxDescriptorModel(model)
    with torch.inference_mode():
        out = runner(images)  # from the cache, still verified against eager
    assert not runner._failed and runner.agreement[(64, 64)] >= 0.999
    torch.testing.assert_close(out.global_desc, expected.global_desc, atol=1e-5, rtol=1e-4)
    other = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32).eval()  # new weights
    assert onnx_module.cache_path(other, 64, 64) != cached

    cached.write_bytes(b"not an onnx model")  # a damaged cache file: eager now, re-export next time
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="extracting in eager mode"):
        out = OnnxDescriptorModel(model)(images)
    torch.testing.assert_close(out.global_desc, expected.global_desc)
    assert not cached.exists()


def test_the_agreement_check_treats_two_zero_descriptors_as_equal_and_nothing_else():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(onnx_module._cosines(a, b), torch.tensor([1.0, 1.0, 0.0]))


def test_onnx_describes_a_model_whose_locals_read_an_earlier_stage():
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32, local_stage=4).eval()
    runner = OnnxDescriptorModel(model)
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        expected, got = model(images), runner(images)
    assert not runner._failed and got.grid == expected.grid == (6, 6)
    assert torch.nn.functional.cosine_similarity(got.local_desc, expected.local_desc, dim=-1).min() > 0.999
    assert torch.nn.functional.cosine_similarity(got.global_desc, expected.global_desc).min() > 0.9999


def test_onnx_describes_a_model_with_match_cells():
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), 32, match_stage=4,
                            match_dim=16).eval()
    runner = OnnxDescriptorModel(model)
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        expected, got = model(images), runner(images)
    assert not runner._failed and got.local_desc.shape == expected.local_desc.shape == (2, 9 + 18, 32)
    assert torch.nn.functional.cosine_similarity(got.local_desc, expected.local_desc, dim=-1).min() > 0.999


def test_backbone_maps_through_onnx_equal_eager_ones_and_share_one_cached_export(fresh_cache):
    """The fit of an untrained index runs the backbone alone through ONNX Runtime: its maps (and
    a stage's) are eager's to float rounding, and the export is keyed by the backbone's weights,
    so a second runner (another index on the same weights) reuses it."""
    from waldo.models.onnx_runtime import OnnxBackboneMaps

    backbone = _model().backbone
    images = torch.rand(3, 3, 96, 96)
    runner = OnnxBackboneMaps(backbone, stage=4)
    with torch.inference_mode():
        last, stage = runner(images[:2])
        more_last, _ = runner(images[2:])
        expected_last, expected_stage = backbone.forward_tapped(images, 4)
    assert not runner._failed and runner.agreement[(96, 96)] >= 0.999
    assert last.shape == (2, 1280, 3, 3) and stage.shape == (2, 112, 6, 6)
    torch.testing.assert_close(torch.cat([last, more_last]), expected_last, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stage, expected_stage[:2], rtol=1e-4, atol=1e-4)
    exports = sorted((fresh_cache / "onnx").glob("backbone-*.onnx"))
    assert len(exports) == 1
    again = OnnxBackboneMaps(backbone, stage=4, cached_only=True)  # cached: used even for a small fit
    with torch.inference_mode():
        again(images[:1])
    assert not again._failed and sorted((fresh_cache / "onnx").glob("backbone-*.onnx")) == exports
    plain = OnnxBackboneMaps(backbone, stage=None, cached_only=True)  # no export of the last map alone yet
    with torch.inference_mode():
        only_last, nothing = plain(images[:1])
    assert plain._failed and nothing is None  # eager, not an error
    torch.testing.assert_close(only_last, expected_last[:1], rtol=1e-4, atol=1e-4)  # eager at another batch size


def test_backbone_maps_that_disagree_with_eager_are_not_used(monkeypatch):
    from waldo.models.onnx_runtime import OnnxBackboneMaps

    backbone = _model().backbone
    runner = OnnxBackboneMaps(backbone)
    real = runner._run_session
    monkeypatch.setattr(runner, "_run_session", lambda session, images: tuple(
        -x if x is not None else None for x in real(session, images)))  # stands in for an exporter bug
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="differ from eager"):
        last, _ = runner(images)
    with torch.inference_mode():
        torch.testing.assert_close(last, backbone.forward_features(images))
    assert runner._failed


def test_a_fit_uses_onnx_only_when_asked_or_big_enough(fresh_cache, data_root):
    """Evaluations fit eagerly (the documented figures' fits); an index build's fit (``auto``)
    runs ONNX Runtime from AUTO_FIT_ONNX_MIN_IMAGES passes, or from the cached threshold when
    the backbone's export is cached; the fitted model agrees with the eager fit's."""
    from waldo.models.extract import AUTO_FIT_ONNX_MIN_IMAGES, backbone_runner, extract_pooled_features
    from waldo.models.onnx_runtime import OnnxBackboneMaps

    backbone = _model().backbone
    assert backbone_runner(backbone, None, 10 ** 6, "eager") is None
    assert backbone_runner(backbone, None, 10, "auto") is None
    assert backbone_runner(backbone, None, AUTO_ONNX_CACHED_MIN_IMAGES, "auto").cached_only
    big = backbone_runner(backbone, None, AUTO_FIT_ONNX_MIN_IMAGES, "auto")
    assert isinstance(big, OnnxBackboneMaps) and not big.cached_only
    assert isinstance(backbone_runner(backbone, None, 1, "onnx"), OnnxBackboneMaps)
    with pytest.raises(ValueError, match="auto, onnx or eager"):
        backbone_runner(backbone, None, 1, "compile")
    abo = read_labels_csv(data_root / "abo_sample")
    model = _model()
    transform = get_transform("resize256-crop224", 96)
    eager, eager_cells = extract_pooled_features(model, abo.paths[:6], transform, progress=False, local_per_image=4,
                                                 num_workers=0)
    onnx, onnx_cells = extract_pooled_features(model, abo.paths[:6], transform, progress=False, local_per_image=4,
                                               num_workers=0, runtime="onnx")
    np.testing.assert_allclose(onnx, eager, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(onnx_cells, eager_cells, rtol=1e-3, atol=1e-4)
