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
