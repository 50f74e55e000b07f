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


def _trained_on_imagenet(tmp_path):
    """A checkpoint whose backbone is the packaged ImageNet one with its last stage changed, as
    `waldo train global` leaves it."""
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False,
                                    seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.backbone.named_parameters():
            if name.startswith(("body.blocks.6.", "body.conv_head.", "body.bn2.")):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator) * tensor.abs().mean())
    save_model(model, config, tmp_path / "trained")
    return model, tmp_path / "trained"


def test_a_shipped_trained_backbone_is_its_differences_and_rebuilds_the_trained_one(tmp_path, grocery_dir):
    from waldo.models.checkpoint import load_model
    from waldo.models.shipped import export_trained_backbone, is_trained_backbone, load_trained_backbone

    trained, folder = _trained_on_imagenet(tmp_path)
    info = export_trained_backbone(folder, tmp_path / "shipped", {"name": "test"})
    assert is_trained_backbone(tmp_path / "shipped") and not is_trained_backbone(folder)
    changed = {name for name, tensor in trained.backbone.state_dict().items()
               if name.startswith(("body.blocks.6.", "body.conv_head.", "body.bn2."))
               and not name.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert set(info["trained_tensors"]) == changed
    # int8 kernels: about a quarter of the float32 tensors they replace
    floats = sum(trained.backbone.state_dict()[name].numel() * 4 for name in changed)
    assert info["bytes"] < 0.3 * floats
    state, label = load_trained_backbone(tmp_path / "shipped", "efficientnet_lite0")
    for name, tensor in trained.backbone.state_dict().items():
        if name in changed:
            assert (state[name] - tensor).abs().max() <= info["max_abs_rounding_error"] + 1e-7
            assert not torch.equal(state[name], tensor) or tensor.dim() < 2
        else:
            assert torch.equal(state[name], tensor), name
    with pytest.raises(ValueError, match="not efficientnet_lite1"):
        load_trained_backbone(tmp_path / "shipped", "efficientnet_lite1")
    with pytest.raises(FileNotFoundError, match="--backbone-from"):
        load_model(tmp_path / "shipped")
    # an index is built on it the same way as on a checkpoint
    paths = read_labels_csv(grocery_dir).paths[:12]
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="pca-whiten", image_size=64,
                                    fit_paths=paths, progress=False, backbone_from=tmp_path / "shipped")
    assert config.weights_source.startswith("backbone of shipped:imagenet:")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        rebuilt, original = (m.eval().backbone.forward_features(images) for m in (model, trained))
    assert (rebuilt - original).abs().max() < 3e-3 * original.abs().max(), (rebuilt - original).abs().max()


def test_only_a_backbone_trained_from_the_packaged_weights_ships(tmp_path):
    from waldo.models.shipped import export_trained_backbone

    _, folder = _saved(tmp_path)  # random init: not a difference from the package
    with pytest.raises(ValueError, match="cannot ship as a difference"):
        export_trained_backbone(folder, tmp_path / "shipped", {})
    imagenet, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64,
                                       progress=False)
    save_model(imagenet, config, tmp_path / "imagenet")
    with pytest.raises(ValueError, match="nothing to ship"):
        export_trained_backbone(tmp_path / "imagenet", tmp_path / "shipped", {})


def test_a_blend_moves_the_trained_backbone_toward_the_packaged_one_and_keeps_the_heads(tmp_path):
    from waldo.models.backbones import create_backbone
    from waldo.models.checkpoint import load_model
    from waldo.models.shipped import blend_with_package

    trained, folder = _trained_on_imagenet(tmp_path)
    imagenet = create_backbone("efficientnet_lite0", pretrained=True).state_dict()
    for alpha in (0.0, 0.25, 1.0):
        blended, config = load_model(blend_with_package(folder, alpha, tmp_path / f"blend-{alpha}"))
        assert config.weights_source == load_model(folder)[1].weights_source  # still a difference from ImageNet
        for name, tensor in blended.backbone.state_dict().items():
            if tensor.is_floating_point():
                expected = imagenet[name] + alpha * (trained.backbone.state_dict()[name] - imagenet[name])
                torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
        assert torch.equal(blended.global_proj.weight, trained.global_proj.weight)
    changed = "body.conv_head.weight"
    half = load_model(tmp_path / "blend-0.25")[0].backbone.state_dict()[changed]
    assert not torch.equal(half, imagenet[changed]) and not torch.equal(half, trained.backbone.state_dict()[changed])
    with pytest.raises(ValueError, match="not in"):
        blend_with_package(folder, 1.5, tmp_path / "bad")
    _, random_init = _saved(tmp_path / "r")
    with pytest.raises(ValueError, match="nothing to blend"):
        blend_with_package(random_init, 0.5, tmp_path / "bad")
