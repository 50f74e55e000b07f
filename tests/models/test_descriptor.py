"""The descriptor model: shapes, normalisation, label-free projections, checkpoints."""

import numpy as np
import pytest
import torch

from waldo.models.backbones import create_backbone
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=128).eval()


def test_shapes_and_normalisation(model):
    with torch.inference_mode():
        out = model(torch.rand(3, 3, 224, 224))
    assert out.global_desc.shape == (3, 128) and out.local_desc.shape == (3, 49, 128)
    assert out.grid == (7, 7)
    assert torch.allclose(out.global_desc.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(out.local_desc.norm(dim=2), torch.ones(3, 49))  # locals stay raw


def test_global_is_the_normalised_average_of_the_locals(model):
    """One projection serves both, so global = normalise(mean of locals), as the design says."""
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 224, 224))
    average = torch.nn.functional.normalize(out.local_desc.mean(1), dim=1)
    assert torch.allclose(average, out.global_desc, atol=1e-4)


def test_projection_size_is_configurable():
    small = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=32).eval()
    with torch.inference_mode():
        out = small(torch.rand(1, 3, 224, 224))
    assert out.global_desc.shape == (1, 32) and out.local_desc.shape == (1, 49, 32)
    with pytest.raises(ValueError, match="exceeds"):
        DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=4096)


def test_pca_recovers_the_principal_subspace(model):
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(1280, 128)))[0]  # a 128-d subspace of the 1280 channels
    data = rng.normal(size=(2000, 128)) * np.linspace(10, 1, 128) @ basis.T + 3.0
    data += 0.01 * rng.normal(size=data.shape)
    model.fit_pca(data)
    weight = model.global_proj.weight.detach().double().numpy()
    # The fitted rows span the same subspace: projecting the basis onto them keeps its energy.
    assert np.linalg.norm(weight @ basis) ** 2 / 128 > 0.99
    projected = model.global_proj(torch.tensor(data, dtype=torch.float32)).detach().numpy()
    assert np.allclose(projected.mean(0), 0, atol=1e-2)  # centred by the bias
    with pytest.raises(ValueError, match="at least 128"):
        model.fit_pca(data[:10])


def test_checkpoint_round_trip_scores_identically(model, tmp_path):
    config = ModelConfig(backbone="efficientnet_lite0", projection="random:0")
    save_model(model, config, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_config = load_model(tmp_path / "ckpt")
    assert loaded_config == config
    assert model_hash(loaded) == model_hash(model)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x).global_desc, loaded(x).global_desc)


def test_mismatched_checkpoint_is_a_clear_error(model, tmp_path):
    save_model(model, ModelConfig(backbone="efficientnet_lite0"), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(config_path.read_text().replace('"dim": 128', '"dim": 64'))
    with pytest.raises(ValueError, match="does not match"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a Waldo model folder"):
        load_model(tmp_path)


def test_model_config_is_validated_and_its_json_is_unchanged(model, tmp_path):
    # config.json as Waldo wrote it before ModelConfig became a pydantic model: still loads,
    # and a save writes the same bytes again (sorted keys, no trailing newline).
    before = ('{\n  "backbone": "efficientnet_lite0",\n  "dim": 128,\n  "extra": {\n    "note": 1\n  },\n'
              '  "format_version": 1,\n  "image_size": 224,\n  "projection": "random",\n'
              '  "transform": "resize256-crop224",\n  "weights_source": "imagenet"\n}')
    save_model(model, ModelConfig(extra={"note": 1}), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").read_text() == before
    assert ModelConfig.model_validate_json(before) == ModelConfig(extra={"note": 1})
    config = ModelConfig()
    config.transform = "resize224"  # callers assign fields; assignments are validated too
    with pytest.raises(ValueError, match="dim"):
        config.dim = "wide"
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.model_validate({"bogus": 1})
    with pytest.raises(ValueError, match="upgrade Waldo"):
        ModelConfig(format_version=2)
    (tmp_path / "ckpt" / "config.json").write_text(before.replace('"dim"', '"dims"'))
    with pytest.raises(ValueError, match="(?s)config.json.*dims"):
        load_model(tmp_path / "ckpt")


def test_model_hash_can_leave_out_the_global_head(model):
    """What a Reranking Transformer reads (backbone and locals) hashes alike whatever the global
    head; a change to the locals still shows."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.global_proj.weight.add_(1.0)
    assert model_hash(other) != model_hash(model)
    assert model_hash(other, exclude=("global_proj.",)) == model_hash(model, exclude=("global_proj.",))
    with torch.no_grad():
        other.local_proj.bias.add_(1.0)
    assert model_hash(other, exclude=("global_proj.",)) != model_hash(model, exclude=("global_proj.",))


def test_a_tapped_forward_is_the_same_pass_with_an_earlier_stage_kept():
    backbone = create_backbone("efficientnet_lite0", pretrained=False).eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        last, stage4 = backbone.forward_tapped(images, 4)
        assert torch.equal(last, backbone.forward_features(images))
        assert torch.equal(backbone.forward_to(images, 4), stage4)  # the same cells, the rest not run
    assert stage4.shape == (2, 112, 14, 14)
    assert backbone.stage_shape(4) == (112, 16) and backbone.stage_shape(2) == (40, 8)
    with pytest.raises(ValueError, match="stages 0-5"):
        backbone.forward_tapped(images, 6)  # the last stage is the last map itself
    with pytest.raises(ValueError, match="stages 0-5"):
        backbone.forward_to(images, 6)


def test_locals_from_a_finer_stage_keep_the_global_descriptor_of_the_last_map():
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=False).eval()
    plain = DescriptorModel(backbone, dim=64, global_dim=256).eval()
    staged = DescriptorModel(backbone, dim=64, global_dim=256, local_stage=4).eval()
    staged.global_proj.load_state_dict(plain.global_proj.state_dict())
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        a, b = plain(images), staged(images)
    assert b.local_desc.shape == (2, 196, 64) and b.grid == (14, 14) and staged.local_stride == 16
    assert a.local_desc.shape == (2, 49, 64) and plain.local_stride == 32
    assert torch.allclose(a.global_desc, b.global_desc, atol=1e-6)  # the same last map, the same head
    assert not staged.shared_projection
    with pytest.raises(ValueError, match="stage 4's 112 channels"):
        DescriptorModel(backbone, dim=128, local_stage=4)
    with pytest.raises(ValueError, match="pass its map too"):
        staged.project(torch.rand(1, 1280, 7, 7))


def test_fit_local_pca_fits_the_locals_alone_on_the_stage_cells():
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=16, local_stage=4).eval()
    global_before = model.global_proj.weight.detach().clone()
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(112, 16)))[0]
    cells = rng.normal(size=(500, 16)) * np.linspace(10, 1, 16) @ basis.T + 1.0
    model.fit_local_pca(cells)
    weight = model.local_proj.weight.detach().double().numpy()[:, :, 0, 0]
    assert np.linalg.norm(weight @ basis) ** 2 / 16 > 0.99  # the cells' principal subspace
    assert torch.equal(model.global_proj.weight, global_before)
    with pytest.raises(ValueError, match=r"\(M, 112\)"):
        model.fit_local_pca(rng.normal(size=(500, 1280)))


def test_a_model_with_a_local_stage_saves_and_loads_it(tmp_path):
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0", pretrained=False), dim=32, local_stage=4).eval()
    config = ModelConfig(backbone="efficientnet_lite0", dim=32, projection="random:0", local_stage=4,
                         weights_source="random")
    save_model(model, config, tmp_path / "m")
    loaded, loaded_config = load_model(tmp_path / "m")
    assert loaded_config.local_stage == 4 and loaded.local_stage == 4
    images = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(images).local_desc, loaded(images).local_desc)
    assert model_hash(loaded) == model_hash(model)
    assert ModelConfig.model_validate_json('{"backbone": "efficientnet_lite0"}').local_stage is None  # older configs


def test_match_cells_are_packed_after_the_locals_and_split_back():
    from waldo.models.checkpoint import without_match_cells
    from waldo.models.descriptor import pack_cells

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=False).eval()
    plain = DescriptorModel(backbone, dim=128).eval()
    matched = DescriptorModel(backbone, dim=128, match_stage=4, match_dim=64).eval()
    matched.load_state_dict(plain.state_dict(), strict=False)
    images = torch.rand(2, 3, 240, 240)  # 225 stage-4 cells: an odd count, padded by one zero cell
    with torch.inference_mode():
        a, b = plain(images), matched(images)
        tapped = backbone.forward_tapped(images, 4)[1]
        cells = matched.match_proj(tapped).flatten(2).transpose(1, 2)
    layout = matched.match_layout(240)
    # 240 px: an 8x8 last map ("same" padding rounds up), 15x15 stage-4 cells
    assert (layout.tokens, layout.cells, layout.rows) == (64, 225, 64 + 113) and matched.local_rows(240) == 177
    assert b.local_desc.shape == (2, 177, 128) and b.grid == a.grid == (8, 8)
    tokens, split = layout.split(b.local_desc)
    assert torch.equal(tokens, a.local_desc) and torch.equal(split, cells)
    assert \
        np.array_equal(layout.split(b.local_desc.numpy())[1], cells.numpy())
    assert pack_cells(torch.ones(1, 3, 64), 128)[0, 1, 64:].abs().sum() == 0  # the pad cell is zeros
    with pytest.raises(ValueError, match="divide the locals"):
        DescriptorModel(backbone, dim=128, match_stage=4, match_dim=48)
    with pytest.raises(ValueError, match="not both"):
        DescriptorModel(backbone, dim=64, local_stage=4, match_stage=4)
    config = ModelConfig(match_stage=4, match_dim=64, extra={"match_cells": layout.to_json()})
    stripped, stripped_config = without_match_cells(matched, config)
    with torch.inference_mode():
        assert torch.equal(stripped(images).local_desc, a.local_desc)
    assert stripped_config.match_stage is None and "match_cells" not in stripped_config.extra
