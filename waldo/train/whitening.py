"""Learned whitening: a trained global descriptor in closed form, on the frozen ImageNet backbone.

The instance-retrieval literature's supervised whitening (Radenovic, Tolias & Chum, "Fine-tuning
CNN image retrieval with no human annotation", learned whitening "Lw"): from labelled training
photos, the *within-identity* scatter S_w says which directions of the pooled feature are
nuisance (viewpoint, light, background changes of one thing); whitening by S_w^-1/2 shrinks them,
and a PCA of the whole collection in that whitened space keeps the ``dim`` directions that still
vary the most, i.e. tell things apart. No gradient steps: the backbone stays the ImageNet one
(nothing to forget), a fit takes seconds once the features are extracted, and the result is one
linear layer, the model's ``global_proj``.

Generalising to the next collection is the point, so two guards, both chosen on validation:

- ``shrink`` adds ``shrink`` x the mean eigenvalue of S_w to S_w, so directions the training
  identities never varied along are not blown up;
- ``mix`` blends the learned metric with the untrained default's (waldo.models.untrained): the
  metric is mix * M_untrained + (1 - mix) * M_learned (each scaled to the same total variance),
  and the projection keeps its top ``dim`` eigen-directions. mix 1 is the untrained default.

Validation (:func:`validate`, never test images): each labelled training source's identities in
two folds; the projection is fitted on everything but one fold and that fold is searched like
the protocol's test (its twin in waldo.data.protocols.VALIDATION_SPLITS, else leave-one-out);
``--check`` sources (e.g. another collection's training split) are only searched, never fitted
on, which is the "does it transfer" half of the choice. The setting with the best mean mAP wins.

    waldo train whiten --data grocery-open-cross --check coil100-open --out runs/lw-grocery
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from waldo.data.transforms import get_transform
from waldo.eval.metrics import retrieval_metrics
from waldo.fsutil import atomic_write_json
from waldo.models.checkpoint import save_model
from waldo.models.extract import extract_pooled_features
from waldo.models.untrained import untrained_model
from waldo.models.whitening import (
    WhiteningSetting,
    _FitStatistics,
    learned_projection,
    untrained_metric_projection,
    within_scatter,
)
from waldo.models.whitening import describe as _describe
from waldo.train.sources import PooledImages, TrainingSource, check_no_test_images, pool_sources

__all__ = ["WhiteningSetting", "learned_projection", "train_whitening", "untrained_metric_projection", "validate",
           "validation_searches", "within_scatter"]

#: The settings validation chooses among.
DIMS = (512, 1024)
SHRINKS = (0.1, 0.3, 1.0)
MIXES = (0.0, 0.25, 0.5)


def _search_map(queries: np.ndarray, gallery: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray,
                exclude_self: bool) -> float:
    similarity = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, : len(gallery) - int(exclude_self)]
    matches = gallery_ids[order] == query_ids[:, None]
    positives = (gallery_ids[None, :] == query_ids[:, None]).sum(1) - int(exclude_self)
    keep = positives > 0
    if not keep.any():
        return float("nan")
    return retrieval_metrics(matches[keep], positives[keep])["map"]


def _twin(pool: PooledImages, rows: np.ndarray, source: TrainingSource) -> tuple[np.ndarray, np.ndarray, bool]:
    """(query rows, gallery rows, exclude_self) searching ``rows`` the way their protocol's test
    searches (or leave-one-out)."""
    if source.validation_split is None:
        return rows, rows, True
    is_query, is_gallery = source.validation_split
    queries = np.array([r for r in rows if is_query(pool.records[r])], np.int64)
    gallery = np.array([r for r in rows if is_gallery(pool.records[r])], np.int64)
    return queries, gallery, False


def validation_searches(pool: PooledImages, n_fit_sources: int) -> list[tuple]:
    """The validation searches (module doc) as (name, fit rows, query rows, gallery rows,
    exclude_self): two identity folds of each labelled fit source, and each labelled check source
    searched whole. The first ``n_fit_sources`` sources of ``pool`` are fitted on."""
    searches = []
    fit_rows = np.flatnonzero(pool.source < n_fit_sources)
    for index, source in enumerate(pool.sources):
        rows = np.flatnonzero(pool.source == index)
        if index >= n_fit_sources:
            if source.labelled:
                searches.append((f"check:{source.name}", fit_rows, *_twin(pool, rows, source)))
            continue
        if not source.labelled:
            continue
        identities = np.unique(pool.identity[rows])
        for fold in (0, 1):
            held_ids = identities[fold::2]
            held = rows[np.isin(pool.identity[rows], held_ids)]
            searches.append((f"{source.name}:fold{fold}", np.setdiff1d(fit_rows, held), *_twin(pool, held, source)))
    if not searches:
        raise ValueError("nothing to validate on: pass at least one labelled --data or --check source")
    return searches


def validate(features: np.ndarray, pool: PooledImages, n_fit_sources: int,
             settings: list[WhiteningSetting], progress: bool = True) -> list[dict]:
    """mAP of every setting on every validation search (:func:`validation_searches`), best first
    by the mean over searches; each row also records every search's number of queries
    (``n_queries``), from which a query-weighted mean can be taken."""
    searches = validation_searches(pool, n_fit_sources)
    results = {setting: {} for setting in settings}
    bar = tqdm(total=len(searches) * len(settings), desc="validate whitening", unit="fit", disable=not progress)
    for name, fit, queries, gallery, exclude_self in searches:
        labelled_fit = fit[pool.labelled[fit]]
        statistics = _FitStatistics(features[labelled_fit], pool.identity[labelled_fit], features[fit])
        for setting in settings:
            mean, projection = statistics.projection(setting)
            q = _describe(features[queries], mean, projection)
            g = q if exclude_self else _describe(features[gallery], mean, projection)
            results[setting][name] = _search_map(q, g, pool.identity[queries], pool.identity[gallery], exclude_self)
            bar.update(1)
    bar.close()
    n_queries = {name: len(queries) for name, _, queries, _, _ in searches}
    table = [{"setting": asdict(s), "validation_map": results[s], "n_queries": n_queries,
              "mean_map": float(np.nanmean(list(results[s].values())))} for s in settings]
    return sorted(table, key=lambda row: (-row["mean_map"], row["setting"]["dim"], row["setting"]["mix"]))


def train_whitening(sources: list[TrainingSource], out: str | Path, *, check_sources: list[TrainingSource] = (),
                    backbone: str = "efficientnet_lite0", pooling: str | None = None,
                    settings: list[WhiteningSetting] | None = None, max_images: int = 0, seed: int = 0,
                    image_size: int = 224, progress: bool = True) -> dict:
    """Fit a learned-whitening model on ``sources`` (labelled ones teach, all give the collection
    statistics), choose its setting on validation (module doc), save the model folder ``out``
    (config.json, model.safetensors, whitening.json: the validation table). Returns the report."""
    start = time.perf_counter()
    sources, check_sources = list(sources), list(check_sources)
    check_no_test_images(sources + check_sources)
    if not any(source.labelled for source in sources):
        raise ValueError("learned whitening needs at least one labelled --data source (identities to learn from)")
    pool = pool_sources(sources + check_sources)
    if max_images and len(pool) > max_images:  # for quick runs and tests: a seeded sample
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), max_images, replace=False))
        pool = PooledImages(pool.sources, [pool.paths[i] for i in keep], [pool.records[i] for i in keep],
                            pool.identity[keep], pool.source[keep], pool.labelled[keep])
    fit_rows = np.flatnonzero(pool.source < len(sources))
    fit_paths = [pool.paths[i] for i in fit_rows]
    # pca-shrink: the locals as every untrained model's; the global projection is replaced below
    model, config = untrained_model(backbone, projection="pca-shrink", image_size=image_size,
                                    fit_paths=random.Random(seed).sample(fit_paths, min(1000, len(fit_paths))),
                                    fit_source="training sources", pooling=pooling, progress=progress, seed=seed)
    features, _ = extract_pooled_features(model, pool.paths, get_transform(config.transform, config.image_size),
                                          progress=progress)
    features = features.astype(np.float64)
    grid = settings or [WhiteningSetting(*values) for values in itertools.product(DIMS, SHRINKS, MIXES)]
    table = validate(features, pool, len(sources), grid, progress=progress)
    best = WhiteningSetting(**table[0]["setting"])
    labelled = fit_rows[pool.labelled[fit_rows]]
    mean, projection = learned_projection(features[labelled], pool.identity[labelled], features[fit_rows], best)
    # The chosen width may differ from the untrained model's: swap in a head of that width
    # (the backbone, pooling and locals stay; no second model load).
    import torch

    config.global_dim = None if best.dim == config.dim else best.dim
    model.global_proj = torch.nn.Linear(model.backbone.out_channels, best.dim)
    model.global_dim = best.dim
    with torch.no_grad():
        weight = torch.as_tensor(projection.T, dtype=torch.float32)
        model._set_global_projection(weight, torch.as_tensor(mean, dtype=torch.float32))
    trained = model
    names = "+".join(source.name for source in sources)
    config.projection = f"learned-whitening({best.describe()}):{names}"
    report = {"setting": asdict(best), "sources": [s.describe() for s in sources],
              "check_sources": [s.describe() for s in check_sources], "n_images": len(pool),
              "validation": table, "seconds": round(time.perf_counter() - start, 1)}
    config.extra = {**config.extra, "learned_whitening": {"setting": asdict(best),
                                                         "validation_map": table[0]["validation_map"]}}
    out = Path(out)
    save_model(trained.eval(), config, out)
    atomic_write_json(out / "whitening.json", report)
    return report


def load_report(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "whitening.json").read_text())
