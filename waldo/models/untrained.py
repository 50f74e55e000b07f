"""Untrained descriptor models: ImageNet backbone + label-free projections.

"Untrained" means no retrieval training; the 128-d projections are fitted without labels (PCA)
on images the caller chooses: a protocol's *training* images for evaluation (never its test
images), or the user's own collection when building an index of it.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from waldo.data.transforms import get_transform
from waldo.models.checkpoint import ModelConfig, build_model
from waldo.models.cpu_memory import reuse_large_buffers, runs_eager
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import backbone_runner, extract_pooled_features
from waldo.models.whitening import WHITEN_POWER, WHITEN_SHRINK, WhiteningSetting, learned_projection

PROJECTIONS = ("views-whiten", "pca-shrink", "pca", "pca-whiten", "random", "identity")
#: projections whose global descriptor is fitted on its own, wider than the locals by default
_WIDE = ("views-whiten", "pca-shrink")

#: The untrained default, chosen on *validation* identities, never test queries: each protocol's
#: training identities in two folds, the other half searched like the test, with the projection
#: fitted both ways it is fitted in use: on other images (an evaluation fits on training images)
#: and on the searched images themselves (an index fits on its own collection, where strong
#: whitening hurts: it flattens the very directions that tell that collection's identities
#: apart). The best mean validation mAP over both: experiments/global_sweep.py, results/global/,
#: docs/results.md "Global descriptors". Locals stay 128-d PCA-whitened (the RRT's tokens);
#: the global descriptor keeps 1024 of the 1280 channels: ``views-whiten`` (validation mAP
#: 0.8132 over both fits, ``pca-shrink`` 0.8007, plain 1280-d pooling 0.7929).
DEFAULT_POOLING = "avg"
DEFAULT_GLOBAL_DIM = 1024
#: ``views-whiten``: learned whitening without labels, each photo and its strong augmented views
#: one group (waldo.models.whitening); up to VIEW_IMAGES photos of the fit set, VIEWS views each.
VIEW_SHRINK = 3.0
VIEW_IMAGES = 600
VIEWS = 2


def untrained_model(backbone: str, *, dim: int = 128, projection: str = "views-whiten",
                    fit_paths: Sequence[str] = (), fit_source: str = "", transform: str = "resize256-crop224",
                    image_size: int = 224, max_fit_images: int = 1000, cells_per_image: int = 8,
                    seed: int = 0, progress: bool = True, pooling: str | None = None,
                    global_dim: int | None = None, whiten_power: float = WHITEN_POWER,
                    whiten_shrink: float = WHITEN_SHRINK, global_scales: Sequence[float] = (),
                    pretrained: bool | str = True, local_stage: int | None = None,
                    fit_runtime: str = "eager",
                    backbone_from: str | Path | None = None) -> tuple[DescriptorModel, ModelConfig]:
    """Build an untrained model and initialise its projections.

    projection: ``pca`` / ``pca-whiten`` fit on the pooled features of up to ``max_fit_images``
    of ``fit_paths`` (seeded sample) plus ``cells_per_image`` local cells of each, so the locals'
    statistics shape the basis too, one projection for locals and global; ``views-whiten`` (the
    default) fits the locals the ``pca-whiten`` way and the global descriptor on its own,
    ``global_dim`` wide (default :data:`DEFAULT_GLOBAL_DIM`), by learned whitening without labels:
    each of up to :data:`VIEW_IMAGES` fit photos and its :data:`VIEWS` strong augmented views are
    one group, so what changes under cropping, light and viewpoint is whitened away
    (waldo.models.whitening); ``pca-shrink`` fits the same width by a PCA whose components are
    scaled by (eigenvalue + ``whiten_shrink`` * mean)^-``whiten_power`` (DescriptorModel.
    fit_global_whitening), quicker to fit; ``random`` is a seeded orthogonal matrix; ``identity`` keeps the raw
    backbone features (needs ``dim`` = backbone channels). ``pooling``: waldo.models.pooling spec
    (default :data:`DEFAULT_POOLING`). ``global_scales``: extra input scales of a multi-scale
    global descriptor (ModelConfig.global_scales; the projections are fitted at the input size).
    ``local_stage``: the locals read that backbone stage's finer map (ModelConfig.local_stage),
    projected by a plain PCA fitted on its cells (the last map's projections fit as above).
    ``fit_runtime``: how the fit's passes run the backbone (waldo.models.extract.backbone_runner):
    ``eager`` (the default, what every documented figure was fitted with) or ``auto`` (what index
    builds use: ONNX Runtime for a fit of 1,000 passes or more, 3x eager's speed, the same maps to
    1e-6; the fitted projection is not bit-identical: docs/performance.md "Fitting an untrained
    index").
    ``backbone_from``: a trained checkpoint folder (e.g. a ``waldo train global`` run's ``best/``)
    or a shipped trained backbone (waldo.models.shipped, e.g. ``lite0-global``'s folder) whose
    backbone weights replace the ImageNet ones; its heads are not used: the projections are
    fitted as above, on ``fit_paths`` (experiments/global_refit.py: with the projection fitted on
    the searched collection, 14 of 18 trained backbones are at or above the untrained default on
    the collection they never saw, where trained projections were below).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
    if projection in _WIDE:
        global_dim = DEFAULT_GLOBAL_DIM if global_dim is None else global_dim
    pooling = DEFAULT_POOLING if pooling is None else pooling
    config = ModelConfig(backbone=backbone, dim=dim, image_size=image_size, transform=transform, pooling=pooling,
                         global_dim=None if global_dim in (None, dim) else global_dim,
                         global_scales=list(global_scales), local_stage=local_stage)
    model = build_model(config, pretrained=pretrained if backbone_from is None else False)  # replaced below
    if projection in _WIDE and config.global_width > model.backbone.out_channels:
        raise ValueError(f"global dim {config.global_width} exceeds the backbone's {model.backbone.out_channels} "
                         f"channels")
    config.weights_source = model.backbone.weights_source
    if backbone_from is not None:
        from waldo.models.checkpoint import load_model, model_hash
        from waldo.models.shipped import is_trained_backbone, load_trained_backbone, resolve_model_dir

        backbone_from = resolve_model_dir(backbone_from)  # a folder, or a shipped name ("lite0-global")
        if is_trained_backbone(backbone_from):  # a shipped trained backbone (waldo/pretrained/lite0-global)
            state, source_label = load_trained_backbone(backbone_from, backbone)
            model.backbone.load_state_dict(state)
            config.weights_source = f"backbone of {source_label}"
        else:
            source, source_config = load_model(backbone_from)
            if source_config.backbone != backbone:
                raise ValueError(f"{backbone_from} holds a {source_config.backbone} backbone, not {backbone}")
            model.backbone.load_state_dict(source.backbone.state_dict())
            config.weights_source = f"backbone of {Path(backbone_from).name}:{model_hash(source)[:16]}"
    if projection == "identity":
        if dim != model.backbone.out_channels or config.global_width != dim or local_stage is not None:
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
        # One backbone runner for every pass of the fit: the photos, the averaged pass of a
        # non-average pooling and the augmented views (1 + VIEWS passes of up to VIEW_IMAGES).
        passes = len(paths) * (1 + (model.pooling != "avg")) + (
            (1 + VIEWS) * min(len(paths), VIEW_IMAGES) if projection == "views-whiten" else 0)
        maps = backbone_runner(model.backbone, local_stage, passes, fit_runtime)
        pooled, cells = extract_pooled_features(model, paths, get_transform(transform, image_size),
                                                progress=progress, local_per_image=cells_per_image,
                                                seed=seed, maps=maps)
        # The locals' basis sees average-pooled vectors beside the cells, as it always has.
        averaged = pooled if model.pooling == "avg" else _average_pooled(model, paths, transform, image_size, progress,
                                                                        maps)
        stage_cells = local_stage is not None  # the locals' cells come from another map: fitted apart
        features = np.concatenate([averaged, cells]) if len(cells) and not stage_cells else averaged
        too_few = len(cells) < dim or (config.global_width == dim and len(averaged) < dim) if stage_cells \
            else len(features) < dim
        if too_few or (projection in _WIDE and len(pooled) < 2):
            warnings.warn(f"only {len(features)} feature vectors to fit a {dim}-d PCA; using a random "
                          f"orthogonal projection instead", stacklevel=2)
            model.init_random_orthogonal(seed)
            config.projection = f"random:{seed}"
        else:
            if not stage_cells or config.global_width == dim:  # else fit_pca would fit nothing
                model.fit_pca(features, whiten=projection in ("pca-whiten", *_WIDE))
            if stage_cells:  # plain PCA: as good as whitened for matching cells (docs/results.md, compact forms)
                model.fit_local_pca(cells)
            name = projection
            shrink_pca = projection == "pca-shrink"
            if projection == "views-whiten":
                groups_x, groups = _view_groups(model, paths, transform, image_size, seed, progress, maps)
                n_groups = len(np.unique(groups))
                if n_groups < 2:
                    warnings.warn("no readable photos to make views of; fitting pca-shrink instead", stacklevel=2)
                    shrink_pca = True
                else:
                    setting = WhiteningSetting(config.global_width, VIEW_SHRINK, 0.0)
                    mean, projection_matrix = learned_projection(groups_x, groups, pooled, setting)
                    with torch.no_grad():
                        model._set_global_projection(torch.as_tensor(projection_matrix.T, dtype=torch.float32),
                                                     torch.as_tensor(mean, dtype=torch.float32))
                    name = f"views-whiten(shrink={VIEW_SHRINK:g},views={VIEWS}x{n_groups})"
            if shrink_pca:
                model.fit_global_whitening(pooled, power=whiten_power, shrink=whiten_shrink)
                name = f"pca-shrink(power={whiten_power:g},shrink={whiten_shrink:g})"
            config.projection = f"{name}:{fit_source or 'custom'}:{len(pooled)} images"
    model.eval()
    return model, config


@torch.inference_mode()
def _view_groups(model: DescriptorModel, paths: Sequence[str], transform: str, image_size: int, seed: int,
                 progress: bool, maps=None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of up to :data:`VIEW_IMAGES` photos (seeded sample) and :data:`VIEWS`
    strong augmented views of each (waldo.data.views), with a group number per photo: the
    labels of a label-free learned whitening. Unreadable photos are skipped."""
    from tqdm import tqdm

    from waldo.data.images import ImageLoadError, load_image
    from waldo.data.views import strong_view

    chosen = list(paths) if len(paths) <= VIEW_IMAGES else random.Random(seed + 1).sample(list(paths), VIEW_IMAGES)
    base = get_transform(transform, image_size)
    model.eval()
    pending, groups, features = [], [], []

    def flush() -> None:  # a batch at a time: 600 photos x 3 views of tensors would be ~1 GB
        batch = torch.stack(pending).contiguous(memory_format=torch.channels_last)
        fmap = model.backbone.forward_features(batch) if maps is None else maps(batch)[0]
        features.append(model.pool(fmap.float()).numpy())
        pending.clear()

    # An eager backbone keeps its large buffers in the heap (waldo.models.cpu_memory); ONNX Runtime
    # (a runner that did not fall back) is left alone. The pooled pass ran first, so a cached-only
    # runner has already said which it is.
    with reuse_large_buffers() if runs_eager(maps, None) else contextlib.nullcontext():
        for group, path in enumerate(tqdm(chosen, desc="views", unit="img", disable=not progress, leave=False)):
            try:
                image = load_image(path)
            except ImageLoadError:
                continue
            rng = np.random.default_rng([seed, group])
            pending += [base(image, group)] + [strong_view(image, image_size, rng) for _ in range(VIEWS)]
            groups += [group] * (1 + VIEWS)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    x = np.concatenate(features) if features else np.zeros((0, model.backbone.out_channels), np.float32)
    return x.astype(np.float64), np.array(groups, np.int64)


def _average_pooled(model: DescriptorModel, paths: Sequence[str], transform: str, image_size: int,
                    progress: bool, maps=None) -> np.ndarray:
    from waldo.models.pooling import AvgPool

    pooling, model.pool = model.pool, AvgPool()
    try:
        return extract_pooled_features(model, paths, get_transform(transform, image_size), progress=progress,
                                       maps=maps)[0]
    finally:
        model.pool = pooling



#: photos an index reads to fit a checkpoint's match cells (with_match_cells)
MATCH_FIT_IMAGES = 300


def with_match_cells(model: DescriptorModel, config: ModelConfig, stage: int, *, dim: int,
                     fit_paths: Sequence[str], fit_source: str = "", max_fit_images: int = MATCH_FIT_IMAGES,
                     cells_per_image: int = 16, seed: int = 0, progress: bool = True,
                     fit_runtime: str = "eager") -> tuple[DescriptorModel, ModelConfig]:
    """``model`` (e.g. a trained checkpoint) with match cells added: backbone stage ``stage``'s
    cells, projected to ``dim`` by a plain PCA fitted without labels on up to ``max_fit_images``
    of ``fit_paths`` and stored after its locals (DescriptorModel.match_stage). Its global
    descriptor, locals and any RRT stay as they are; the ``local-match`` reranker reads the cells.
    The layout of the stored rows is recorded in the config (``extra["match_cells"]``). The fit is
    a pass of its own over the photos (the checkpoint's other projections are fitted already), so
    it reads fewer photos than an untrained model's fit: 300 x 16 cells for a 64-d basis."""
    if not fit_paths:
        raise ValueError("match cells are fitted on images: give the images about to be indexed (fit_paths)")
    if config.local_stage is not None or config.match_stage is not None:
        raise ValueError("this model's locals already are finer cells, or it has match cells")
    matched = DescriptorModel(model.backbone, dim=config.dim, pooling=config.pooling, global_dim=config.global_width,
                              global_scales=tuple(config.global_scales), match_stage=stage, match_dim=dim,
                              colour_weight=config.colour_weight)
    missing = matched.load_state_dict(model.state_dict(), strict=False).missing_keys
    if sorted(missing) != ["match_proj.bias", "match_proj.weight"]:
        raise ValueError(f"cannot carry the model's weights over: {missing}")
    # the stage's cells, sampled as an index with locals of that stage samples them
    tapped = DescriptorModel(model.backbone, dim=dim, local_stage=stage)
    paths = list(fit_paths)
    if len(paths) > max_fit_images:
        paths = random.Random(seed).sample(paths, max_fit_images)
    # A small collection gives more cells per photo (a photo has hundreds), so that a handful of
    # photos still fits the basis: at least 4 cells per dimension in all.
    per_image = max(cells_per_image, -(-4 * dim // max(1, len(paths))))
    _, cells = extract_pooled_features(tapped, paths, get_transform(config.transform, config.image_size),
                                       progress=progress, local_per_image=per_image, seed=seed, pooled_too=False,
                                       runtime=fit_runtime)
    if len(cells) < dim:
        raise ValueError(f"only {len(cells)} readable cells to fit {dim}-d match cells on; give more images")
    matched.fit_match_pca(cells)
    matched.eval()
    layout = matched.match_layout(config.image_size)
    data = config.model_dump()
    data.update(match_stage=stage, match_dim=dim, extra={**data["extra"], "match_cells": {
        **layout.to_json(), "fitted_on": f"{fit_source or 'custom'}:{len(paths)} images"}})
    return matched, ModelConfig.model_validate(data)
