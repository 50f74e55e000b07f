"""Untrained descriptor models: ImageNet backbone + label-free projections.

"Untrained" means no retrieval training; the 128-d projections are fitted without labels (PCA)
on images the caller chooses: a protocol's *training* images for evaluation (never its test
images), or the user's own collection when building an index of it.
"""

from __future__ import annotations

import random
import warnings
from typing import Sequence

import numpy as np
import torch

from waldo.data.transforms import get_transform
from waldo.models.checkpoint import ModelConfig, build_model
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_pooled_features

PROJECTIONS = ("pca", "pca-whiten", "random", "identity")


def untrained_model(backbone: str, *, dim: int = 128, projection: str = "pca-whiten",
                    fit_paths: Sequence[str] = (), fit_source: str = "", transform: str = "resize256-crop224",
                    image_size: int = 224, max_fit_images: int = 1000, cells_per_image: int = 8,
                    seed: int = 0, progress: bool = True,
                    pretrained: bool | str = True) -> tuple[DescriptorModel, ModelConfig]:
    """Build an untrained model and initialise its projections.

    projection: ``pca`` / ``pca-whiten`` fit on the pooled features of up to ``max_fit_images``
    of ``fit_paths`` (seeded sample) plus ``cells_per_image`` local cells of each, so the locals'
    statistics shape the basis too; ``random`` is a seeded orthogonal matrix; ``identity`` keeps
    the raw backbone features (needs ``dim`` = backbone channels).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
    config = ModelConfig(backbone=backbone, dim=dim, image_size=image_size, transform=transform)
    model = build_model(config, pretrained=pretrained)
    config.weights_source = model.backbone.weights_source
    if projection == "identity":
        if dim != model.backbone.out_channels:
            raise ValueError(f"identity projection needs dim = {model.backbone.out_channels}")
        with torch.no_grad():
            model._set_projection(torch.eye(dim), torch.zeros(dim))
        config.projection = "identity"
    elif projection == "random":
        model.init_random_orthogonal(seed)
        config.projection = f"random:{seed}"
    else:
        paths = list(fit_paths)
        if len(paths) > max_fit_images:
            paths = random.Random(seed).sample(paths, max_fit_images)
        pooled, cells = extract_pooled_features(model, paths, get_transform(transform, image_size),
                                                progress=progress, local_per_image=cells_per_image,
                                                seed=seed)
        features = np.concatenate([pooled, cells]) if len(cells) else pooled
        if len(features) < dim:
            warnings.warn(f"only {len(features)} feature vectors to fit a {dim}-d PCA; using a random "
                          f"orthogonal projection instead", stacklevel=2)
            model.init_random_orthogonal(seed)
            config.projection = f"random:{seed}"
        else:
            model.fit_pca(features, whiten=projection == "pca-whiten")
            config.projection = f"{projection}:{fit_source or 'custom'}:{len(pooled)} images"
    model.eval()
    return model, config
