"""untrained_model(backbone_from=...): a trained checkpoint's backbone, the projections fitted anew."""

from __future__ import annotations

import pytest
import torch

from waldo.data.datasets import read_labels_csv
from waldo.models.checkpoint import save_model
from waldo.models.untrained import untrained_model


def _saved(tmp_path, backbone="efficientnet_lite0"):
    """A 'trained' checkpoint: random-init backbone (unlike ImageNet's), random projections."""
    model, config = untrained_model(backbone, dim=32, projection="random", image_size=64, progress=False,
                                    pretrained=False, seed=3)
    save_model(model, config, tmp_path / "trained")
    return model, tmp_path / "trained"


def test_the_backbone_comes_from_the_checkpoint_and_the_projection_is_fitted_anew(tmp_path, grocery_dir):
    trained, folder = _saved(tmp_path)
    paths = read_labels_csv(grocery_dir).paths[:12]
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="pca-whiten", image_size=64,
                                    fit_paths=paths, progress=False, backbone_from=folder)
    for key, value in trained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=0)
    assert config.weights_source.startswith("backbone of trained:")
    # the projection is this fit's, not the checkpoint's random one
    assert not torch.equal(model.global_proj.weight, trained.global_proj.weight)
    imagenet, _ = untrained_model("efficientnet_lite0", dim=32, projection="pca-whiten", image_size=64,
                                  fit_paths=paths, progress=False)
    assert not torch.equal(imagenet.backbone.state_dict()["body.conv_head.weight"],
                           model.backbone.state_dict()["body.conv_head.weight"])


def test_another_backbone_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    with pytest.raises(ValueError, match="efficientnet_lite0 backbone, not efficientnet_lite1"):
        untrained_model("efficientnet_lite1", dim=32, projection="random", image_size=64, progress=False,
                        backbone_from=folder)


def test_an_index_built_on_a_trained_backbone_searches_and_says_where_its_weights_came_from(tmp_path, grocery_dir):
    from waldo.api import Waldo

    trained, folder = _saved(tmp_path)
    paths = read_labels_csv(grocery_dir).paths[:10]
    with pytest.raises(ValueError, match="one or the other"):
        Waldo.create(tmp_path / "both", model_dir=folder, backbone_from=folder, fit_paths=paths, progress=False)
    engine = Waldo.create(tmp_path / "index", dim=32, projection="pca-whiten", fit_paths=paths, progress=False,
                          gv_features=False, backbone_from=folder)
    engine.add(paths, progress=False)
    assert engine.config.weights_source.startswith("backbone of trained:")
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(engine.model.backbone.state_dict()[key], value)
    hits = engine.search(paths[0], k=3).hits
    assert hits[0].path == paths[0]


def test_the_cli_refuses_a_checkpoint_and_a_backbone_at_once(tmp_path, grocery_dir, capsys):
    from waldo.cli import main

    _, folder = _saved(tmp_path)
    code = main(["index", "build", "--data", str(grocery_dir), "--model", str(folder), "--backbone-from", str(folder),
                 "--out", str(tmp_path / "index"), "--quiet"])
    assert code != 0 and "one or the other" in capsys.readouterr().err
