"""A global descriptor that carries the photo's colours (ModelConfig.colour_weight)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from waldo.models.backbones import create_backbone
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.colour import SIGNATURE_DIM, colour_signatures
from waldo.models.descriptor import DescriptorModel


def _model(**kwargs) -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=16, global_dim=40,
                           **kwargs).eval()


def test_inner_products_are_global_plus_weighted_colour_over_one_plus_weight():
    plain, coloured = _model(), _model(colour_weight=0.75)
    coloured.load_state_dict(plain.state_dict())
    images = torch.rand(3, 3, 64, 64)
    images[0, 0] = 0.9  # a reddish image among noise
    with torch.inference_mode():
        base, out = plain(images), coloured(images)
    assert coloured.descriptor_width == 40 + SIGNATURE_DIM == out.global_desc.shape[1]
    assert torch.allclose(out.global_desc.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(out.local_desc, base.local_desc)
    colour = colour_signatures(images).sqrt()
    expected = (base.global_desc @ base.global_desc.T + 0.75 * colour @ colour.T) / 1.75
    assert torch.allclose(out.global_desc @ out.global_desc.T, expected, atol=1e-5)
    assert torch.allclose(out.global_desc[:, :40], base.global_desc / math.sqrt(1.75), atol=1e-6)
    assert plain.descriptor_width == 40 and torch.equal(plain.with_colour(images, base.global_desc), base.global_desc)
    with pytest.raises(ValueError, match="colour_weight"):
        _model(colour_weight=-1.0)


def test_the_weight_travels_with_the_checkpoint_and_changes_the_hash_only_when_set(tmp_path):
    plain, coloured = _model(), _model(colour_weight=0.5)
    assert model_hash(plain) != model_hash(coloured)
    save_model(plain, ModelConfig(dim=16, global_dim=40), tmp_path / "plain")
    assert "colour_weight" not in (tmp_path / "plain" / "config.json").read_text()  # as older Waldo wrote it
    save_model(coloured, ModelConfig(dim=16, global_dim=40, colour_weight=0.5), tmp_path / "coloured")
    loaded, config = load_model(tmp_path / "coloured")
    assert config.colour_weight == 0.5 and loaded.colour_weight == 0.5
    assert config.descriptor_width == loaded.descriptor_width == 40 + SIGNATURE_DIM
    assert model_hash(loaded) == model_hash(coloured)


def test_onnx_runtime_describes_like_the_coloured_model(tmp_path, monkeypatch):
    from waldo.models.onnx_runtime import OnnxDescriptorModel

    monkeypatch.setenv("WALDO_CACHE", str(tmp_path / "cache"))
    model = _model(colour_weight=0.5)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = model(images), OnnxDescriptorModel(model)(images)
    assert got.global_desc.shape == expected.global_desc.shape
    assert F.cosine_similarity(got.global_desc, expected.global_desc).min() > 0.9999


def test_an_index_of_a_coloured_model_searches_with_its_colours(tmp_path, data_root):
    """Built from a model folder with colour_weight: the store is as wide as the descriptor, a
    photo finds itself at similarity 1, and the same weights without colour are another model."""
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv
    from waldo.index import IndexMismatchError
    from waldo.models.untrained import untrained_model

    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    save_model(model, config, tmp_path / "plain")
    model.colour_weight = 1.0
    save_model(model, config.model_copy(update={"colour_weight": 1.0}), tmp_path / "coloured")
    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "index", model_dir=tmp_path / "coloured", gv_features=False, progress=False)
    engine.add(images.paths[:6], progress=False, num_workers=0)
    assert engine.store.manifest["global_dim"] == 32 + SIGNATURE_DIM
    reopened = Waldo.open(tmp_path / "index")
    hit = reopened.search(images.paths[2], k=1).hits[0]
    assert hit.path == images.paths[2] and hit.score == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(IndexMismatchError, match="model_hash"):
        Waldo.open(tmp_path / "index", model_dir=tmp_path / "plain")
    # match cells added at index time (index build --model X --local-stage 4) keep the colours
    matched = Waldo.create(tmp_path / "matched", model_dir=tmp_path / "coloured", local_stage=4, dim=16,
                           fit_paths=images.paths[:6], gv_features=False, progress=False)
    assert matched.model.colour_weight == 1.0 and matched.config.colour_weight == 1.0
    assert matched.store.manifest["global_dim"] == 32 + SIGNATURE_DIM


def test_an_rrt_whose_token_is_the_global_descriptor_refuses_a_coloured_model(tmp_path):
    """Its token would silently become the locals' mean; an RRT whose token already is the
    locals' mean (a wider global descriptor, as make demo's) loads."""
    import json

    from waldo.rerank import RerankingTransformer, RRTConfig, save_reranker
    from waldo.rerank.rrt_rerankers import RRTReranker

    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=32).eval()
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32, use_global_tokens=True))
    save_reranker(tmp_path / "plain", model, ModelConfig(dim=32), rrt, grid=(2, 2))
    RRTReranker.from_folder(tmp_path / "plain")
    config_file = tmp_path / "plain" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "colour_weight": 0.5}))
    with pytest.raises(ValueError, match="colour_weight"):
        RRTReranker.from_folder(tmp_path / "plain")
    wide = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=32, global_dim=64,
                           colour_weight=0.5).eval()
    save_reranker(tmp_path / "wide", wide, ModelConfig(dim=32, global_dim=64, colour_weight=0.5), rrt, grid=(2, 2))
    RRTReranker.from_folder(tmp_path / "wide")


def test_index_build_sets_or_turns_off_the_colour_term(tmp_path, data_root, capsys):
    """``Waldo.create(colour_weight=...)`` / ``waldo index build --colour-weight``: an untrained
    model gains the term, a coloured checkpoint loses it at 0 (and keeps its own when the option
    is absent), and the index is as wide as the descriptor it stores."""
    from waldo.api import Waldo
    from waldo.cli import main
    from waldo.data.datasets import read_labels_csv
    from waldo.models.untrained import untrained_model

    images = read_labels_csv(data_root / "abo_sample")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    model.colour_weight = 1.0
    save_model(model, config.model_copy(update={"colour_weight": 1.0}), tmp_path / "coloured")
    off = Waldo.create(tmp_path / "off", model_dir=tmp_path / "coloured", colour_weight=0, gv_features=False,
                       progress=False)
    assert off.config.colour_weight == 0 and off.store.manifest["global_dim"] == 32
    assert load_model(tmp_path / "off" / "model")[1].colour_weight == 0
    kept = Waldo.create(tmp_path / "kept", model_dir=tmp_path / "coloured", gv_features=False, progress=False)
    assert kept.config.colour_weight == 1.0
    with pytest.raises(ValueError, match="colour_weight"):
        Waldo.create(tmp_path / "negative", model_dir=tmp_path / "coloured", colour_weight=-1, progress=False)
    assert not (tmp_path / "negative").exists()
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in images.paths[:4]:
        (folder / path.split("/")[-1]).write_bytes(open(path, "rb").read())
    assert main(["index", "build", "--data", str(folder), "--out", str(tmp_path / "cli"), "--colour-weight", "0.5",
                 "--projection", "pca", "--dim", "16", "--local-features", "none", "--quiet"]) == 0
    built = Waldo.open(tmp_path / "cli")
    assert built.config.colour_weight == 0.5 and built.model.colour_weight == 0.5
    assert built.store.manifest["global_dim"] == 16 + SIGNATURE_DIM
    hit = built.search(str(folder / images.paths[1].split("/")[-1]), k=1).hits[0]
    assert hit.score == pytest.approx(1.0, abs=1e-3)
    capsys.readouterr()
    assert main(["index", "info", "--index", str(tmp_path / "cli")]) == 0
    assert f"global {16 + SIGNATURE_DIM}-d (a colour signature at weight 0.5 among them)" in capsys.readouterr().out


def test_a_token_rrt_refuses_colour_at_index_build(tmp_path):
    """An RRT that reads the global descriptor as its token cannot serve a coloured descriptor:
    the build says so before anything is written."""
    from waldo.api import Waldo
    from waldo.rerank import RerankingTransformer, RRTConfig, save_reranker

    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=32).eval()
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32, use_global_tokens=True))
    save_reranker(tmp_path / "plain", model, ModelConfig(dim=32), rrt, grid=(2, 2))
    with pytest.raises(ValueError, match="colour_weight"):
        Waldo.create(tmp_path / "index", model_dir=tmp_path / "plain", colour_weight=0.5, gv_features=False,
                     progress=False)
    assert not (tmp_path / "index").exists()


def test_eval_scores_a_model_with_the_colour_term_it_is_given(data_root):
    """``waldo eval --colour-weight`` (run_eval's ``colour_weight``): the metrics say which weight
    ran, and the coloured descriptors rank differently from the plain ones."""
    from waldo.eval.runner import run_eval_full

    options = dict(projection="random", dim=16, progress=False, num_workers=0)
    plain_run, plain = run_eval_full("loo", data_root / "abo_sample", **options)
    run, coloured = run_eval_full("loo", data_root / "abo_sample", colour_weight=2.0, **options)
    assert "colour_weight" not in plain and coloured["colour_weight"] == 2.0
    assert not (run.knn_scores == plain_run.knn_scores).all()
