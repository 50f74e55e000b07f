"""A multi-scale global descriptor as a model option (ModelConfig.global_scales)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from waldo.models.backbones import create_backbone
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel


def _model(**kwargs) -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=16, global_dim=40,
                           **kwargs).eval()


def test_the_global_descriptor_averages_the_input_and_its_resized_copies():
    single, multi = _model(), _model(global_scales=(0.75, 1.5))
    multi.load_state_dict(single.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        base, out = single(images), multi(images)
        by_hand = base.global_desc.clone()
        for size in (48, 96):  # 64 x 0.75, 64 x 1.5
            resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            by_hand += single(resized).global_desc
        by_hand = F.normalize(by_hand, dim=-1)
    assert torch.allclose(out.global_desc, by_hand, atol=1e-6)
    assert torch.equal(out.local_desc, base.local_desc)  # the locals stay the input size's
    assert not torch.allclose(out.global_desc, base.global_desc, atol=1e-3)


def test_scales_travel_with_the_checkpoint_and_change_the_hash_only_when_set(tmp_path):
    single, multi = _model(), _model(global_scales=(0.75,))
    assert model_hash(single) != model_hash(multi)
    save_model(single, ModelConfig(dim=16, global_dim=40), tmp_path / "single")
    assert "global_scales" not in (tmp_path / "single" / "config.json").read_text()  # as older Waldo wrote it
    save_model(multi, ModelConfig(dim=16, global_dim=40, global_scales=[0.75]), tmp_path / "multi")
    loaded, config = load_model(tmp_path / "multi")
    assert config.global_scales == [0.75] and loaded.global_scales == (0.75,)
    assert model_hash(loaded) == model_hash(multi)
    for bad in ([1.0], [0.1], [0.75, 0.75]):
        with pytest.raises(ValueError, match="scale"):
            ModelConfig(global_scales=bad)


def test_onnx_runtime_describes_like_the_multiscale_model(tmp_path, monkeypatch):
    from waldo.models.onnx_runtime import OnnxDescriptorModel

    monkeypatch.setenv("WALDO_CACHE", str(tmp_path / "cache"))
    model = _model(global_scales=(1.25,))
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = model(images), OnnxDescriptorModel(model)(images)
    assert F.cosine_similarity(got.global_desc, expected.global_desc).min() > 0.9999


def test_an_index_built_with_scales_records_them_and_describes_queries_the_same_way(tmp_path, grocery_dir):
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv

    images = read_labels_csv(grocery_dir).subset(range(0, 400, 40), "sample")
    engine = Waldo.create(tmp_path / "index", projection="random", global_scales=[0.75], progress=False,
                          gv_features=False)
    engine.add(images.paths, progress=False)
    assert engine.store.manifest["global_scales"] == [0.75]
    reopened = Waldo.open(tmp_path / "index")
    assert reopened.model.global_scales == (0.75,)
    hit = reopened.search(images.paths[3], k=1).hits[0]
    assert hit.path == images.paths[3] and hit.score == pytest.approx(1.0, abs=1e-3)


def test_a_trained_checkpoint_takes_scales_when_an_index_is_built_with_them(tmp_path):
    from waldo.api import Waldo

    folder = save_model(_model(), ModelConfig(dim=16, global_dim=40), tmp_path / "trained")
    engine = Waldo.create(tmp_path / "index", model_dir=folder, global_scales=[1.5], progress=False,
                          gv_features=False)
    assert engine.model.global_scales == (1.5,) and engine.store.manifest["global_scales"] == [1.5]
    assert load_model(folder)[1].global_scales == []  # the checkpoint itself is untouched


def test_the_command_line_reads_scales_and_refuses_bad_ones(capsys):
    from waldo.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["index", "build", "--data", "d", "--out", "o", "--global-scales", "0.5,1.5"])
    assert args.global_scales == [0.5, 1.5]
    assert parser.parse_args(["index", "build", "--data", "d", "--out", "o"]).global_scales == []
    for bad in ("1", "0.1", "0.5,0.5", "big"):
        with pytest.raises(SystemExit):
            parser.parse_args(["index", "build", "--data", "d", "--out", "o", "--global-scales", bad])
        assert "--global-scales" in capsys.readouterr().err
