"""Backbones: registry, key mapping, and proof that the ImageNet weights are really loaded."""

import numpy as np
import pytest
import torch
from PIL import Image

from waldo.models.backbones import (backbone_names, create_backbone, imagenet_categories,
                                    lite_checkpoint_to_timm, lite_weights_file, load_state_dict_file)

# Grocery class folder -> the ImageNet class that names it.
GROCERY_TO_IMAGENET = {
    "Fruit/Banana": "banana",
    "Fruit/Apple/Granny-Smith": "Granny Smith",
    "Fruit/Orange": "orange",
    "Fruit/Lemon": "lemon",
    "Fruit/Pineapple": "pineapple",
    "Vegetables/Cucumber": "cucumber",
    "Vegetables/Zucchini": "zucchini",
    "Vegetables/Pepper/Green-Bell-Pepper": "bell pepper",
    "Vegetables/Pepper/Red-Bell-Pepper": "bell pepper",
    "Vegetables/Mushroom/Brown-Cap-Mushroom": "mushroom",
}
PER_CLASS = 4


def _grocery_batch(grocery_dir):
    images, targets = [], []
    categories = imagenet_categories()
    for folder, name in GROCERY_TO_IMAGENET.items():
        files = sorted((grocery_dir / "dataset" / "test" / folder).glob("*.jpg"))[:PER_CLASS]
        assert files, f"no test photos in {folder}"
        for path in files:
            image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
            images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
            targets.append(categories.index(name))
    return torch.stack(images), torch.tensor(targets)


def _top5_hit_rate(backbone, images, targets) -> float:
    with torch.inference_mode():
        top5 = backbone.eval().forward_logits(images).topk(5, dim=1).indices
    return (top5 == targets[:, None]).any(dim=1).float().mean().item()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_pretrained_lite_recognises_grocery_photos(name, grocery_dir):
    images, targets = _grocery_batch(grocery_dir)
    rate = _top5_hit_rate(create_backbone(name, pretrained=True), images, targets)
    assert rate >= 0.7, f"{name}: right ImageNet class in top-5 for only {rate:.0%} of photos"


def test_random_init_does_not_recognise_them(grocery_dir):
    """The check above can fail: without the weights the same photos are not recognised."""
    torch.manual_seed(0)
    images, targets = _grocery_batch(grocery_dir)
    assert _top5_hit_rate(create_backbone("efficientnet_lite0", pretrained=False), images, targets) < 0.3


def test_registry_lists_and_rejects():
    assert {"efficientnet_lite0", "efficientnet_lite2", "resnet50"} <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*efficientnet_lite0"):
        create_backbone("vgg")


def test_lite_key_mapping_is_complete_and_exact():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw = load_state_dict_file(lite_weights_file(0))
    mapped = lite_checkpoint_to_timm(raw, model)
    assert set(mapped) == set(model.state_dict())
    assert all(mapped[k].shape == v.shape for k, v in model.state_dict().items())
    assert lite_checkpoint_to_timm(mapped, model).keys() == mapped.keys()  # native keys pass through
    with pytest.raises(ValueError, match="unexpected"):
        lite_checkpoint_to_timm({"_blocks.0._mystery.weight": torch.zeros(1)}, model)


@pytest.mark.parametrize("name,channels", [("efficientnet_lite0", 1280), ("efficientnet_lite2", 1280),
                                           ("resnet50", 2048)])
def test_feature_map_is_7x7_at_224(name, channels):
    with pytest.warns(UserWarning) if name == "resnet50" else _nullcontext():
        backbone = create_backbone(name, pretrained=False)
    with torch.inference_mode():
        fmap = backbone.eval().forward_features(torch.rand(2, 3, 224, 224))
    assert fmap.shape == (2, channels, 7, 7)


def test_input_normalisation_per_backbone():
    lite = create_backbone("efficientnet_lite0", pretrained=False)
    x = torch.full((1, 3, 2, 2), 127 / 255)
    assert torch.allclose(lite.normalize(x), torch.zeros_like(x), atol=1e-6)  # (127 - 127) / 128
    assert torch.allclose(lite.normalize(torch.ones(1, 3, 1, 1)), torch.full((1, 3, 1, 1), 128 / 128))
    with pytest.warns(UserWarning):
        resnet = create_backbone("resnet50", pretrained=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(resnet.normalize(mean), torch.zeros(1, 3, 1, 1), atol=1e-6)


def test_resnet50_loads_a_local_state_dict(tmp_path):
    """Users without internet pass a local ImageNet file; a saved state dict round-trips."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = create_backbone("resnet50", pretrained=False)
    path = tmp_path / "resnet50.pth"
    torch.save(source.body.state_dict(), path)
    loaded = create_backbone("resnet50", pretrained=str(path))
    assert loaded.weights_source.startswith("file:")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(source.eval().forward_features(x), loaded.eval().forward_features(x))


def test_resnet50_offline_falls_back_to_random_with_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: a download is the only way
    from torchvision.models import ResNet50_Weights

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.warns(UserWarning, match="could not be loaded"):
        backbone = create_backbone("resnet50", pretrained=True)
    assert backbone.weights_source == "random"


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": Exploit()}))
    with pytest.raises(ValueError, match="refused"):
        load_state_dict_file(path)
    assert not (tmp_path / "pwned").exists()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
