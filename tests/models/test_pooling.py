"""Global pooling (waldo.models.pooling), a global descriptor wider than the locals, and the
shrunk partial whitening of the untrained default: what each computes, how it is saved and
reloaded, and that old models mean what they always meant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from waldo.models.backbones import create_backbone
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel, token_global
from waldo.models.pooling import GeMPool, make_pooling, pooling_names, validate_pooling


def _maps(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(4, 16, 3, 5, generator=generator) * 6  # >= 0, as after ReLU6


def _model(**kwargs) -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), **kwargs).eval()


def test_each_pooling_computes_what_its_name_says():
    x = _maps()
    assert torch.allclose(make_pooling("avg")(x), x.mean(dim=(2, 3)))
    assert torch.equal(make_pooling("max")(x), x.amax(dim=(2, 3)))
    assert torch.allclose(make_pooling("gem:1")(x), x.mean(dim=(2, 3)), atol=1e-5)  # p = 1 is the mean
    gem3 = make_pooling("gem:3")(x)
    assert torch.allclose(gem3, (x ** 3).mean(dim=(2, 3)) ** (1 / 3), rtol=1e-5)
    # The generalised mean grows with p, from the mean towards the max.
    assert torch.all(gem3 >= x.mean(dim=(2, 3)) - 1e-5) and torch.all(gem3 <= x.amax(dim=(2, 3)) + 1e-5)
    assert torch.allclose(make_pooling("gem:100")(x), x.amax(dim=(2, 3)), rtol=0.05)


def test_specs_are_normalised_and_bad_ones_name_the_known_poolings():
    assert pooling_names() == ["avg", "gem", "max"]
    assert validate_pooling("gem:3.0") == "gem:3" and validate_pooling(" avg ") == "avg"
    assert validate_pooling("gem") == "gem"
    for bad, message in (("mean", "unknown pooling 'mean'; known: avg, gem, max"), ("gem:x", "must be a number"),
                         ("gem:0", r"\(0, 100\]"), ("avg:2", "takes no argument")):
        with pytest.raises(ValueError, match=message):
            make_pooling(bad)
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig(pooling="median")


def test_learnable_gem_learns_p():
    pool = make_pooling("gem")
    assert isinstance(pool, GeMPool) and pool.learnable and float(pool.p.detach()) == 3.0
    pool(_maps()).sum().backward()
    assert pool.p.grad is not None and float(pool.p.grad) != 0.0
    assert [name for name, _ in make_pooling("gem:3").named_parameters()] == []  # fixed p: not trained


def test_a_wider_global_descriptor_keeps_the_locals_at_dim():
    model = _model(dim=32, global_dim=96, pooling="gem:3")
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 96, 96))
    assert out.global_desc.shape == (2, 96) and out.local_desc.shape == (2, 9, 32)
    assert torch.allclose(out.global_desc.norm(dim=1), torch.ones(2))
    assert not model.shared_projection and _model(dim=32).shared_projection
    # token_global: the locals' normalised mean, which *is* the global of a shared-projection model.
    shared = _model(dim=32)
    with torch.inference_mode():
        plain = shared(torch.rand(2, 3, 96, 96))
    assert torch.allclose(token_global(plain.local_desc), plain.global_desc, atol=1e-5)
    with pytest.raises(ValueError, match="global descriptor dim 2000 exceeds"):
        _model(dim=32, global_dim=2000)


def test_shrunk_partial_whitening_scales_the_principal_axes():
    model = _model(dim=16, global_dim=48)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 1280)) * np.linspace(3, 0.1, 1280)
    model.fit_global_whitening(data, power=0.25, shrink=0.1)
    weight = model.global_proj.weight.detach().double()
    gram = weight @ weight.T
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    assert off_diagonal.abs().max() < 1e-6 * gram.diagonal().max()  # orthogonal axes
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(data.T)))[::-1][:48]
    expected = (eigenvalues + 0.1 * eigenvalues.mean()) ** -0.5  # row norm^2 = scale^2
    assert np.allclose(gram.diagonal().numpy(), expected, rtol=1e-4)
    # Power 0 is plain PCA (unit rows); the locals were not touched.
    locals_before = model.local_proj.weight.clone()
    model.fit_global_whitening(data, power=0.0)
    assert torch.allclose(model.global_proj.weight.norm(dim=1), torch.ones(48, dtype=torch.float32), atol=1e-5)
    assert torch.equal(model.local_proj.weight, locals_before)
    # Fewer images than dimensions: the shrinkage keeps every scale finite.
    model.fit_global_whitening(data[:10])
    assert torch.isfinite(model.global_proj.weight).all()
    with pytest.raises(ValueError, match="power"):
        model.fit_global_whitening(data, power=0.7)


def test_pooling_and_width_travel_with_the_checkpoint(tmp_path):
    model = _model(dim=32, global_dim=64, pooling="gem")
    with torch.no_grad():
        model.pool.p.fill_(2.5)  # as training would have moved it
    config = ModelConfig(dim=32, pooling="gem", global_dim=64)
    save_model(model, config, tmp_path / "wide")
    text = (tmp_path / "wide" / "config.json").read_text()
    assert '"pooling": "gem"' in text and '"global_dim": 64' in text
    loaded, loaded_config = load_model(tmp_path / "wide")
    assert loaded_config.pooling == "gem" and loaded_config.global_width == 64
    assert float(loaded.pool.p.detach()) == 2.5 and model_hash(loaded) == model_hash(model)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded(images).global_desc, model(images).global_desc, atol=1e-6)
    # avg and max pooling have the same weights; the hash an index checks still tells them apart.
    avg, mx = _model(dim=32), _model(dim=32, pooling="max")
    assert model_hash(avg) != model_hash(mx)
    # A config that asks for another width than its weights is refused, naming both.
    (tmp_path / "wide" / "config.json").write_text(text.replace('"global_dim": 64', '"global_dim": 48'))
    with pytest.raises(ValueError, match="global dim 48"):
        load_model(tmp_path / "wide")


def test_onnx_runtime_pools_like_the_model(tmp_path, monkeypatch):
    from waldo.models.onnx_runtime import OnnxDescriptorModel

    monkeypatch.setenv("WALDO_CACHE", str(tmp_path / "cache"))
    model = _model(dim=16, global_dim=40, pooling="gem:3")
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = model(images), OnnxDescriptorModel(model)(images)
    assert got.global_desc.shape == (2, 40)
    assert torch.nn.functional.cosine_similarity(got.global_desc, expected.global_desc).min() > 0.9999
    # Same weights, other pooling: another export, not the cached one.
    other = _model(dim=16, global_dim=40, pooling="max")
    with torch.inference_mode():
        got_max = OnnxDescriptorModel(other)(images)
        assert torch.nn.functional.cosine_similarity(got_max.global_desc, other(images).global_desc).min() > 0.9999


def test_an_index_from_before_pooling_opens_and_searches_unchanged(tmp_path, grocery_dir):
    """An index written before pooling and global_dim existed (no such keys in its model's
    config.json nor in its manifest) opens as average pooling, global width = dim, and answers
    exactly as before."""
    import json as json_module

    from waldo.api import MODEL_FOLDER, Waldo
    from waldo.data.datasets import read_labels_csv

    paths = [r.path for r in read_labels_csv(grocery_dir).records if r.attrs.get("split") == "val"][:12]
    root = tmp_path / "old"
    engine = Waldo.create(root, dim=32, projection="random", progress=False, gv_features=False)
    engine.add(paths, progress=False)
    before = [(h.id, round(h.score, 6)) for h in engine.search(paths[0], k=5).hits]
    engine.store.close()
    config_text = (root / MODEL_FOLDER / "config.json").read_text()
    assert "pooling" not in config_text and "global_dim" not in config_text  # what older versions wrote
    manifest_path = root / "manifest.json"
    manifest = json_module.loads(manifest_path.read_text())
    manifest.pop("pooling")  # (global_dim was always there: the store's own size record)
    manifest_path.write_text(json_module.dumps(manifest))
    reopened = Waldo.open(root)
    try:
        assert reopened.model.pooling == "avg" and reopened.model.global_dim == 32
        assert [(h.id, round(h.score, 6)) for h in reopened.search(paths[0], k=5).hits] == before
    finally:
        reopened.store.close()


def test_views_whiten_learns_from_each_photo_and_its_views(grocery_dir, monkeypatch):
    """The label-free learned whitening: every fit photo and its strong views form one group; the
    global projection is that whitening (not the PCA one), the locals stay PCA-whitened."""
    import waldo.models.untrained as untrained
    from waldo.data.datasets import read_labels_csv

    monkeypatch.setattr(untrained, "VIEW_IMAGES", 12)  # a quick fit
    paths = [r.path for r in read_labels_csv(grocery_dir).records if r.attrs.get("split") == "val"][:20]
    model, config = untrained.untrained_model("efficientnet_lite0", projection="views-whiten", fit_paths=paths,
                                              progress=False, global_dim=256)
    assert config.projection == "views-whiten(shrink=3,views=2x12):custom:20 images"
    assert config.global_width == 256 and model.global_proj.weight.shape == (256, 1280)
    plain, _ = untrained.untrained_model("efficientnet_lite0", projection="pca-shrink", fit_paths=paths,
                                         progress=False, global_dim=256)
    assert torch.equal(model.local_proj.weight, plain.local_proj.weight)  # same locals
    assert not torch.allclose(model.global_proj.weight, plain.global_proj.weight, atol=1e-3)
    groups_x, groups = untrained._view_groups(model, paths[:3], "resize256-crop224", 224, 0, False)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and groups_x.shape == (9, 1280)
