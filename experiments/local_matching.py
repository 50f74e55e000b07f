"""Issue 15 diagnostic: do the RRT's local descriptors carry anything the global one lacks?

The Reranking Transformer reads each image's grid of 128-d local descriptors (9x9 for make
demo's lite0-lw-rrt at 288 px). Every training variant tried so far ranks below global search on
validation once the transformer's part of the logit grows. If the locals themselves add
nothing to the global similarity, no training recipe will make the RRT earn its place and the
next step is finer locals; if a *training-free* match of the locals helps, the training is to
blame. This scores training-free local matching on the RRT's own validation (its held-out
training identities, searched like each protocol's test, the serving top-100; waldo.train.
rrt_online.validate_reranker's sets): global similarity + w x a local score, for

- ``chamfer``: mean over the query's cells of the best cosine with any candidate cell;
- ``chamfer-sym``: the mean of both directions;
- ``mnn-T``: the share of the query's cells whose best candidate cell is mutual and has cosine
  above T (a soft count of local correspondences).

The model's global head (`waldo train whiten` on the same training sources) was fitted on every
training identity, the held-out ones too, so on this validation global search is optimistic;
``--refit-global`` refits that head (same setting) without the held-out identities first, so the
global ranking is as blind to them as it is to a test's, and scores everything again.

    .venv/bin/python experiments/local_matching.py                  # ~1 min; results/rrt_views/local-matching.json
    .venv/bin/python experiments/local_matching.py --refit-global   # ~3 min; local-matching-refit.json
    .venv/bin/python experiments/local_matching.py --table [--refit-global]
    .venv/bin/python experiments/local_matching.py --both     # both side by side (docs/results.md)
    .venv/bin/python experiments/local_matching.py --refit-global --scale 2   # ~7 min: 18x18 locals, model at 576 px
    .venv/bin/python experiments/local_matching.py --refit-global --tap 4     # ~3 min: stage-4 cells (stride 16)
    .venv/bin/python experiments/local_matching.py --refit-global --tap 4 --test   # ~6 min: the tests, reported
    .venv/bin/python experiments/local_matching.py --model untrained --tap 4 [--test]   # the untrained default
    .venv/bin/python experiments/local_matching.py --finer    # the finer-locals table (docs/results.md)
    .venv/bin/python experiments/local_matching.py --refit-global --tap 4 --cells-dim 64 [--whiten]   # compact forms
    .venv/bin/python experiments/local_matching.py --refit-global --tap 4 --cells-dim 64 --test       # ~3 min
    .venv/bin/python experiments/local_matching.py --refit-global --tap 4 --cells-dim 32
    .venv/bin/python experiments/local_matching.py --compact  # their table (docs/results.md)
    .venv/bin/python experiments/local_matching.py --model untrained --local-stage 4 --cells-dim 64   # ~4 min
        the product's form: an untrained model whose locals *are* stage 4's cells (ModelConfig.local_stage,
        64-d PCA fitted on the fit images), described by the product's extraction, scored by the
        local-match reranker's own function at several thresholds: chooses its default setting
    .venv/bin/python experiments/local_matching.py --model untrained --local-stage 4 --cells-dim 64 --test
        the tests through `waldo eval --local-stage 4 --dim 64 --rerank local-match` (reported; ~4 min)
    .venv/bin/python experiments/local_matching.py --product   # their table (docs/results.md)
    .venv/bin/python experiments/local_matching.py --tap 4 --cells-dim 64 --store-choice waldo/pretrained/lite0-lw-rrt
        records the fair validation's local-match choice in the shipped model's config.json (the default
        reranker of an index built from it with match cells)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "results" / "rrt_views" / "local-matching.json"
SOURCES = ("grocery-open-cross", "coil100-open", "../shared/data/abo_sample")
SCORES = ("chamfer", "chamfer-sym", "mnn-0.5", "mnn-0.7")
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
#: --model value for the untrained default (views-whiten, 224 px), fitted without labels.
UNTRAINED = "untrained"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def local_scores(query_locals: np.ndarray, candidate_locals: np.ndarray, kind: str) -> np.ndarray:
    """(K,) scores of one query's (N, D) cells against (K, M, D) candidate cells; ``mnn-T`` is the
    local-match reranker's own score (waldo.rerank.local_match.mutual_match_share)."""
    if kind.startswith("mnn-"):
        from waldo.rerank.local_match import mutual_match_share

        return mutual_match_share(query_locals, candidate_locals, float(kind[len("mnn-"):]))
    sims = np.matmul(_unit(candidate_locals), _unit(query_locals).T).transpose(0, 2, 1)  # (K, N, M)
    if kind == "chamfer":
        return sims.max(2).mean(1)
    if kind == "chamfer-sym":
        return 0.5 * (sims.max(2).mean(1) + sims.max(1).mean(1))
    raise ValueError(kind)


def _cached(name: str, key_parts: list[str], compute) -> np.ndarray:
    """``compute()``'s array, kept under runs/local-matching/<name>-<hash of key_parts>.npy."""
    import hashlib

    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    cache = ROOT / "runs" / "local-matching" / f"{name}-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    array = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def tapped_locals(descriptor_model, model_config, paths: list[str], stage: int) -> np.ndarray:
    """(N, L, C) float16 cells of the backbone's stage ``stage`` output (an earlier, finer map than
    the last: stride 16 for EfficientNet-Lite's stages 3-4) at the model's input size, centred on
    their mean cell (no learned projection), cached under runs/local-matching/."""
    import torch
    from torch.utils.data import DataLoader

    from waldo.data.transforms import get_transform
    from waldo.models.extract import _collate, _ImageFiles

    def compute() -> np.ndarray:
        stem, stages, _ = descriptor_model.backbone.stages()
        parts = []
        loader = DataLoader(_ImageFiles(paths, get_transform(model_config.transform, model_config.image_size)),
                            batch_size=32, num_workers=1, collate_fn=_collate)
        with torch.inference_mode():
            for _, batch, errors in loader:
                if errors:
                    raise ValueError(f"unreadable validation images: {errors}")
                x = descriptor_model.backbone.normalize(batch)
                for module in [*stem, *stages[: stage + 1]]:
                    x = module(x)
                parts.append(x.flatten(2).transpose(1, 2).float().numpy())
        cells = np.concatenate(parts)
        cells -= cells.reshape(-1, cells.shape[2]).mean(0)
        return cells.astype(np.float16)

    return _cached(f"tap{stage}", [model_config.model_dump_json(), f"tap{stage}", *paths], compute)


def scaled_locals(descriptor_model, model_config, paths: list[str], size: int) -> np.ndarray:
    """(N, L, D) float16 locals of ``paths`` with the model run at ``size`` px (a finer grid, the
    same local projection), cached under runs/local-matching/."""
    from waldo.data.transforms import get_transform
    from waldo.models.extract import extract_descriptors

    def compute() -> np.ndarray:
        out = extract_descriptors(descriptor_model, paths, get_transform(model_config.transform, size),
                                  runtime="eager", description=f"locals at {size} px")
        if not out.ok.all():
            raise ValueError("unreadable validation images")
        return out.local_desc

    return _cached(f"locals-{size}", [model_config.model_dump_json(), str(size), *paths], compute)


def refit_global(descriptor_model, model_config, model_dir: Path, pool, held_out: np.ndarray) -> tuple[np.ndarray, float]:
    """The model's global head refitted without the ``held_out`` rows (same learned-whitening
    setting, waldo.train.whitening's fit): (N, D) global descriptors of every pool row, and the
    smallest cosine between the model's own descriptors and a refit on *every* row (a check
    that this refit is the head's recipe)."""
    import torch

    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform
    from waldo.models.checkpoint import model_hash
    from waldo.models.extract import extract_pooled_features
    from waldo.models.whitening import WhiteningSetting, describe, learned_projection

    transform = get_transform(model_config.transform, model_config.image_size)
    # The pooled features depend on the backbone, pooling and input size only, never on the head.
    cache = ROOT / "runs" / "local-matching" / f"pooled-{model_hash(descriptor_model, exclude=('global_proj.',))[:16]}.npy"
    if cache.is_file():
        features = np.load(cache)
    else:
        features, _ = extract_pooled_features(descriptor_model, pool.paths, transform, progress=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, features)
    features = features.astype(np.float64)
    setting = WhiteningSetting(**json.loads((model_dir / "config.json").read_text())["extra"]["global_head"]["setting"])

    def fit(rows: np.ndarray) -> np.ndarray:
        labelled = rows[pool.labelled[rows]]
        mean, projection = learned_projection(features[labelled], pool.identity[labelled], features[rows], setting)
        return describe(features, mean, projection).astype(np.float32)

    everything = fit(np.arange(len(pool)))
    sample = np.linspace(0, len(pool) - 1, 64).round().astype(int)
    with torch.inference_mode():
        batch = torch.stack([transform(load_image(pool.paths[i]), int(i)) for i in sample])
        extract_sample = descriptor_model(batch).global_desc.float().numpy()
    with_model = float((extract_sample * everything[sample]).sum(1).min())
    return fit(np.flatnonzero(~held_out)), with_model


def project_cells(cells: np.ndarray, dim: int, whiten: bool, sample: int = 50_000, seed: int = 0) -> np.ndarray:
    """(N, L, dim) float16: ``cells`` projected by a label-free PCA (whitened if ``whiten``;
    waldo.models.whitening's PCA with power 0.5, else 0, no shrinkage) fitted on a seeded sample of
    the cells themselves, as an index would fit on its own images; what a compact stored form of
    the cells would keep."""
    from waldo.models.whitening import untrained_metric_projection

    flat = cells.reshape(-1, cells.shape[2]).astype(np.float32)
    fit = flat[np.random.default_rng(seed).choice(len(flat), min(sample, len(flat)), replace=False)]
    basis = untrained_metric_projection(fit, dim, power=0.5 if whiten else 0.0, shrink=0.0).astype(np.float32)
    return ((flat - fit.mean(0)) @ basis).reshape(*cells.shape[:2], dim).astype(np.float16)


#: thresholds of the product's local-match score scored with --local-stage
PRODUCT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


@dataclass
class ValidationSetup:
    """The shipped RRT run's validation (its held-out training identities, searched like each
    protocol's test, the serving top-100), described by one model: what every study on it reads."""

    pool: object
    held_out: np.ndarray
    sets: list
    validator: object
    descriptor_model: object
    model_config: object
    rrt: object | None
    train_config: dict
    global_desc: np.ndarray
    local_desc: np.ndarray
    needed: np.ndarray
    refit_check: float | None
    grid: tuple[int, int]


def validation_setup(model: str, refit: bool = False, local_stage: int | None = None, cells_dim: int = 0,
                     max_queries: int = 150, split_seed: int = 0, val_fraction: float = 0.2) -> ValidationSetup:
    """``model``: a shipped name or folder, or :data:`UNTRAINED`; ``refit``: the model's global
    head refitted without the held-out identities (:func:`refit_global`); ``max_queries``: per
    set (the RRT run's 150; 0 = every held-out query); ``split_seed``: which identities are held
    out (0: the shipped RRTs' split; another seed holds out identities those RRTs trained on, so
    only rankings without them are fair there); ``val_fraction``: the share of each source's
    identities held out (the shipped RRTs' 0.2; experiments/rrt_half.py holds out half)."""
    from waldo.models.checkpoint import load_model
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import load_rrt
    from waldo.train.rrt_online import (ViewAugment, ViewMaker, ViewValidator, clean_descriptors, default_cache_root,
                                        pool_sources, split_rows, validation_sets)
    from waldo.train.sources import parse_source

    pool = pool_sources([parse_source(str(ROOT / s) if s.startswith("..") else s) for s in SOURCES])
    # seed 0: the shipped RRT's run (val_fraction 0.2, seed 0: configs/rrt-views-lw-cpu.json)
    held_out = split_rows(pool, val_fraction, split_seed)
    if model == UNTRAINED:  # fitted without labels on the training rows, as an evaluation fits on training images
        from waldo.models.untrained import untrained_model

        if refit:
            raise ValueError("the untrained default learns nothing from labels: there is no head to refit")
        descriptor_model, model_config = untrained_model("efficientnet_lite0", progress=False,
                                                         fit_paths=[pool.paths[i] for i in np.flatnonzero(~held_out)],
                                                         fit_source="validation pool minus held-out",
                                                         local_stage=local_stage,
                                                         dim=(cells_dim or 64) if local_stage is not None else 128)
        model_dir, rrt, train_config = None, None, {}
    else:
        model_dir = resolve_model_dir(model)
        descriptor_model, model_config = load_model(model_dir)
        # Studies read the global head's own descriptors (the refit replaces them); a colour term
        # (make demo's since experiments/colour_weight.py --store) is appended by the study that
        # measures it (colour_weight.coloured), so every study's recorded figures stay reproducible.
        descriptor_model.colour_weight, model_config.colour_weight = 0.0, 0.0
        rrt, info = load_rrt(model_dir)
        train_config = info.get("training", {})
    sets = validation_sets(pool, held_out, max_queries=max_queries, seed=split_seed)
    needed = np.unique(np.concatenate([np.concatenate([s.queries, s.gallery]) for s in sets]))
    part_global, part_local, ok = clean_descriptors(descriptor_model, model_config, [pool.paths[i] for i in needed],
                                                    Path(default_cache_root()), progress=False)
    if not ok.all():
        raise ValueError("unreadable validation images")
    global_desc = np.zeros((len(pool), part_global.shape[1]), np.float32)
    local_desc = np.zeros((len(pool), *part_local.shape[1:]), np.float16)
    global_desc[needed], local_desc[needed] = part_global, part_local
    check = None
    if refit:
        refitted, check = refit_global(descriptor_model, model_config, model_dir, pool, held_out)
        global_desc = refitted
    grid = (model_config.image_size // descriptor_model.local_stride,) * 2
    views = ViewMaker(descriptor_model, pool.paths, model_config.image_size, ViewAugment())
    if any(s.augmented for s in sets):  # their queries would be described by the model, not the refit head
        raise ValueError("augmented validation sets are not supported here")
    validator = ViewValidator(sets, pool, global_desc, local_desc, views, top_k=100, seed=0, grid=grid)
    return ValidationSetup(pool, held_out, sets, validator, descriptor_model, model_config, rrt, train_config,
                           global_desc, local_desc, needed, check, grid)


def run(model: str, refit: bool = False, scale: float = 1.0, tap: int | None = None, cells_dim: int = 0,
        whiten: bool = False, local_stage: int | None = None) -> dict:
    setup = validation_setup(model, refit, local_stage, cells_dim)
    sets, validator, rrt, train_config = setup.sets, setup.validator, setup.rrt, setup.train_config
    descriptor_model, model_config, local_desc, needed = (setup.descriptor_model, setup.model_config,
                                                          setup.local_desc, setup.needed)
    pool, check = setup.pool, setup.refit_check
    if rrt is not None:
        shipped = validator(rrt, fusion_weight=train_config.get("fusion_weight"))
        rows = [{"ranking": name, **{m: round(v, 4) for m, v in shipped["macro"][name].items() if m != "recall@10"},
                 "per_set_map@100": [round(float(shipped["sets"][s.name][name]["map@100"]), 4) for s in sets]}
                for name in shipped["macro"]]
    else:
        plain = [validator._metrics(data, None) for data in validator.prepared]
        rows = [{"ranking": "none", **{m: round(float(np.mean([x[m] for x in plain])), 4) for m in ("recall@1", "map@100")},
                 "per_set_map@100": [round(float(x["map@100"]), 4) for x in plain]}]
    match_locals, size = local_desc, model_config.image_size
    if scale != 1 or tap is not None:
        size = int(round(model_config.image_size * scale))
        finer = (scaled_locals(descriptor_model, model_config, [pool.paths[i] for i in needed], size) if tap is None
                 else tapped_locals(descriptor_model, model_config, [pool.paths[i] for i in needed], tap))
        if cells_dim:
            finer = project_cells(finer, cells_dim, whiten)
        match_locals = np.zeros((len(pool), *finer.shape[1:]), np.float16)
        match_locals[needed] = finer
    for kind in SCORES if local_stage is None else [f"mnn-{t:g}" for t in PRODUCT_THRESHOLDS]:
        per_set = []
        for vset, data in zip(sets, validator.prepared):
            per_set.append(np.stack([local_scores(match_locals[query].astype(np.float32),
                                                  match_locals[candidates].astype(np.float32), kind)
                                     for query, candidates in zip(vset.queries, data["candidates"])]))
        for weight in WEIGHTS[1:]:
            metrics = [validator._metrics(data, data["scores"] + weight * s) for data, s in zip(validator.prepared, per_set)]
            rows.append({"ranking": f"global + {weight:g} x {kind}",
                         **{m: round(float(np.mean([x[m] for x in metrics])), 4) for m in ("recall@1", "map@100")},
                         "per_set_map@100": [round(float(x["map@100"]), 4) for x in metrics]})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": model, "refit_global": refit, "locals_size": size, "tap": tap, "local_stage": local_stage,
            "local_shape": list(local_desc.shape[1:]), "cells_dim": cells_dim or None,
            "whiten": whiten, "refit_check_min_cosine": check, "grid": list(setup.grid),
            "sets": [{"name": s.name, "queries": len(s.queries), "gallery": len(s.gallery)} for s in sets], "rows": rows}


def choose(result: dict, guarded: bool = False) -> dict:
    """The local-matching row with the best validation map@100 (then R@1): its kind and weight.
    ``guarded``: only among rows below global search on no validation set (per-set map@100), the
    rule a default must pass (waldo.train.rrt_online.earns_default)."""
    rows = [r for r in result["rows"] if r["ranking"].startswith("global + ")]
    if guarded:
        none = next(r for r in result["rows"] if r["ranking"] == "none")["per_set_map@100"]
        rows = [r for r in rows if all(a >= b for a, b in zip(r["per_set_map@100"], none))]
        if not rows:
            raise ValueError("every local-matching row falls below global search on some validation set")
    best = max(rows, key=lambda r: (r["map@100"], r["recall@1"]))
    weight, kind = best["ranking"][len("global + "):].split(" x ")
    return {"kind": kind, "weight": float(weight), "validation": best}


def test(model: str, chosen: dict, tap: int | None, cells_dim: int = 0, whiten: bool = False) -> list[dict]:
    """Reported only: the test protocols' global top-100 (the model's own head, which never saw a
    test identity) reranked by global + weight x the chosen local score."""
    from waldo.data.protocols import get_protocol
    from waldo.eval.metrics import retrieval_metrics
    from waldo.eval.runner import run_eval_full
    from waldo.models.checkpoint import load_model
    from waldo.models.shipped import resolve_model_dir

    if model == UNTRAINED:  # each protocol's own untrained default (fitted on its training images); the tap needs only the backbone
        from waldo.models.untrained import untrained_model

        model_dir = None
        descriptor_model, model_config = untrained_model("efficientnet_lite0", projection="random", progress=False)
    else:
        model_dir = resolve_model_dir(model)
        descriptor_model, model_config = load_model(model_dir)
    out = []
    for name in ("grocery-open-cross", "coil100-open"):
        protocol = get_protocol(name)
        run, metrics = run_eval_full(name, model_dir=model_dir, progress=False)
        paths = list(protocol.queries.paths) + list(protocol.gallery.paths)
        cells = tapped_locals(descriptor_model, model_config, paths, tap) if tap is not None else \
            scaled_locals(descriptor_model, model_config, paths, model_config.image_size)
        if cells_dim:  # fitted on the protocol's own searched images' cells, as an index fits on its own
            cells = project_cells(cells, cells_dim, whiten)
        q_cells, g_cells = cells[: len(protocol.queries.paths)], cells[len(protocol.queries.paths):]
        k = min(100, run.knn_indices.shape[1])
        reranked = []
        for q in range(len(run.query_rows)):
            candidates = run.knn_indices[q, :k]
            local = local_scores(q_cells[run.query_rows[q]].astype(np.float32),
                                 g_cells[run.gallery_rows[candidates]].astype(np.float32), chosen["kind"])
            order = np.argsort(-(run.knn_scores[q, :k] + chosen["weight"] * local), kind="stable")
            reranked.append(np.concatenate([run.matches[q, :k][order], run.matches[q, k:]]))
        after = retrieval_metrics(np.stack(reranked), run.n_positives)
        before = retrieval_metrics(run.matches, run.n_positives)
        changed = np.stack(reranked)[:, 0] != run.matches[:, 0]
        out.append({"protocol": name, "queries": len(run.query_rows),
                    "global": {m: round(float(before[m]), 4) for m in ("recall@1", "map")},
                    "local_match": {m: round(float(after[m]), 4) for m in ("recall@1", "map")},
                    "top1_fixed": int((changed & np.stack(reranked)[:, 0]).sum()),
                    "top1_broken": int((changed & run.matches[:, 0]).sum())})
        print(json.dumps(out[-1]), flush=True)
    return out


def test_product(chosen: dict, local_stage: int, dim: int) -> list[dict]:
    """Reported only: each test protocol through the product, `waldo eval --local-stage N --dim D
    --rerank local-match` (each protocol's untrained model fitted on its training images), whose
    default setting must be the one validation chose."""
    from waldo.eval.rerank_eval import rerank_run
    from waldo.eval.runner import run_eval_full
    from waldo.rerank import RERANKERS
    from waldo.rerank.local_match import LocalMatchSetting

    default = LocalMatchSetting()
    if (f"mnn-{default.threshold:g}", default.weight) != (chosen["kind"], chosen["weight"]):
        raise SystemExit(f"the local-match default ({default}) is not validation's choice {chosen}: set it first")
    out = []
    for name in ("grocery-open-cross", "coil100-open"):
        run, metrics = run_eval_full(name, local_stage=local_stage, dim=dim, progress=False)
        reranked = rerank_run(run, RERANKERS.create("local-match"), 100, progress=False).run
        changed = reranked.matches[:, 0] != run.matches[:, 0]
        out.append({"protocol": name, "queries": len(run.query_rows),
                    "global": {m: round(float(run.metrics[m]), 4) for m in ("recall@1", "map")},
                    "local_match": {m: round(float(reranked.metrics[m]), 4) for m in ("recall@1", "map")},
                    "top1_fixed": int((changed & reranked.matches[:, 0]).sum()),
                    "top1_broken": int((changed & run.matches[:, 0]).sum())})
        print(json.dumps(out[-1]), flush=True)
    return out


PRODUCT_FILE = "local-matching-untrained-stage4-pca64.json"


def product_table(result: dict) -> str:
    """The product form's validation (weight x threshold of the local-match score, R@1 / map@100),
    then its validation-chosen default on the test protocols through `waldo eval` (reported)."""
    rows = {r["ranking"]: r for r in result["rows"]}
    none = rows["none"]
    lines = ["| weight (validation: R@1 / map@100; global alone " + f"{none['recall@1']:.4f} / {none['map@100']:.4f}) | "
             + " | ".join(f"cosine > {t:g}" for t in PRODUCT_THRESHOLDS) + " |", "|---|" + "---|" * len(PRODUCT_THRESHOLDS)]
    for weight in WEIGHTS[1:]:
        cells = [rows[f"global + {weight:g} x mnn-{t:g}"] for t in PRODUCT_THRESHOLDS]
        lines.append(f"| {weight:g} | " + " | ".join(f"{c['recall@1']:.4f} / {c['map@100']:.4f}" for c in cells) + " |")
    if result.get("test"):
        c = result["test"]["chosen"]
        lines += ["", f"Chosen on validation (best map@100): weight {c['weight']:g}, cosine > {c['kind'][len('mnn-'):]}, "
                  "the reranker's default. Test (reported, never chosen on), `waldo eval --protocol P --local-stage "
                  f"{result['local_stage']} --dim {result['local_shape'][1]} --rerank local-match`:", "",
                  "| protocol | global R@1 / mAP | local-match R@1 / mAP | top-1 fixed / broken |", "|---|---|---|---|"]
        for row in result["test"]["rows"]:
            lines.append(f"| {row['protocol']} | {row['global']['recall@1']:.4f} / {row['global']['map']:.4f} | "
                         f"{row['local_match']['recall@1']:.4f} / {row['local_match']['map']:.4f} | "
                         f"{row['top1_fixed']} / {row['top1_broken']} |")
    return "\n".join(lines)


#: make demo's local-match settings measured through `waldo eval` (results/local_match/): file
#: infix -> label. The first was the macro rule's choice, the second the guarded rule's (the default).
CHECKPOINT_SETTINGS = (("w1-", "weight 1, cosine > 0.7 (best mean; default before the guard)"),
                       ("", "weight 0.5, cosine > 0.7 (best below global on no set: make demo's default)"))


def checkpoint_table(folder: Path, which: Path) -> str:
    """make demo's checkpoint with stage locals through `waldo eval` (results/local_match/), beside
    the shipped index's own rankings (``which``: results/rrt_views/shipped-which-reranker.json)."""
    shipped = json.loads(which.read_text())["protocols"]
    protocols = ("grocery-open-cross", "coil100-open")
    cell = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    lines = ["| ranking (R@1 / mAP) | " + " | ".join(protocols) + " |", "|---|---|---|"]
    first = {p: json.loads((folder / f"lw-rrt-stage4-{p}.json").read_text()) for p in protocols}
    lines.append("| global | " + " | ".join(cell(first[p]["global"]) for p in protocols) + " |")
    lines.append("| gv (shipped index) | " + " | ".join(cell(shipped[p]["gv"]) for p in protocols) + " |")
    for infix, label in CHECKPOINT_SETTINGS:
        for kind, name in (("", "local-match"), ("gv-", "local-match+gv")):
            files = [folder / f"lw-rrt-stage4-{infix}{kind}{p}.json" for p in protocols]
            if all(f.is_file() for f in files):
                lines.append(f"| {name}, {label} | " + " | ".join(cell(json.loads(f.read_text())) for f in files) + " |")
    return "\n".join(lines)


def store_choice(model_dir: Path, result: dict, source: str) -> dict:
    """Record in ``model_dir``'s config.json (``extra["local_match"]``) the local-match setting
    this model's fair validation chose and whether it is the default reranker for an index with
    match cells. The setting is the best row below global search on no validation set; it is the
    default when it replaces global search as an RRT's own default must (waldo.train.rrt_online.
    earns_default: the mean map@100 by more than DEFAULT_MARGIN, below it on no set) and its mean
    also beats every RRT ranking's by the margin."""
    from waldo.models.checkpoint import ModelConfig, config_json
    from waldo.fsutil import atomic_write_text
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    chosen = choose(result, guarded=True)
    if not result.get("refit_global") or not chosen["kind"].startswith("mnn-"):
        raise SystemExit("store a choice of the fair validation (--refit-global) of an mnn score")
    rows = {r["ranking"]: r for r in result["rows"]}
    others = {name: rows[name] for name in ("none", "rrt", "rrt-fusion") if name in rows}
    if any("per_set_map@100" not in r for r in [chosen["validation"], *others.values()]):
        raise SystemExit("this validation predates per-set figures: run it again")
    sets = [s["name"] for s in result["sets"]]
    figures = lambda r: {"recall@1": r["recall@1"], "map@100": r["map@100"],  # noqa: E731
                         "per_set_map@100": dict(zip(sets, r["per_set_map@100"]))}
    entry = {"threshold": float(chosen["kind"][len("mnn-"):]), "weight": chosen["weight"],
             "default": (earns_default(chosen["validation"]["per_set_map@100"], others["none"]["per_set_map@100"],
                                       DEFAULT_MARGIN)
                         and chosen["validation"]["map@100"] > max(r["map@100"] for r in others.values()) + DEFAULT_MARGIN),
             "select_metric": "map@100", "margin": DEFAULT_MARGIN,
             "rule": "the best mean map@100 among settings below global search on no validation set; the default "
                     "when that mean beats global search's and each RRT ranking's by more than the margin",
             "chosen_on": source,
             "validation": {"local-match": figures(chosen["validation"]), **{n: figures(r) for n, r in others.items()}}}
    path = model_dir / "config.json"
    config = ModelConfig.model_validate_json(path.read_text())
    config.extra = {**config.extra, "local_match": entry}
    atomic_write_text(path, config_json(config))
    return entry


def table(result: dict) -> str:
    lines = ["| ranking (validation, macro over the held-out sets) | R@1 | map@100 |", "|---|---|---|"]
    lines += [f"| {r['ranking']} | {r['recall@1']:.4f} | {r['map@100']:.4f} |" for r in result["rows"]]
    return "\n".join(lines)


def combined_table(shipped_head: dict, refit_head: dict) -> str:
    """Both validations side by side (the rows are the same rankings in the same order)."""
    lines = ["| ranking (validation: the RRT's held-out training identities, macro over sets) | global head fitted on "
             "every training identity: R@1 / map@100 | global head refitted without the held-out ones: R@1 / map@100 |",
             "|---|---|---|"]
    for a, b in zip(shipped_head["rows"], refit_head["rows"]):
        assert a["ranking"] == b["ranking"], (a, b)
        lines.append(f"| {a['ranking']} | {a['recall@1']:.4f} / {a['map@100']:.4f} | {b['recall@1']:.4f} / {b['map@100']:.4f} |")
    return "\n".join(lines)


FINER = (("9x9 locals (the RRT's)", "local-matching-refit.json"),
         ("18x18 locals (model at 576 px)", "local-matching-refit-scale2.json"),
         ("18x18 stage-4 cells (288 px, stride 16)", "local-matching-refit-tap4.json"))


UNTRAINED_FILE = "local-matching-untrained-tap4.json"


def finer_table(results: list[dict], untrained: dict | None = None) -> str:
    """The fair validation (global head refitted) for each kind of locals side by side, then the
    validation-chosen setting of the stride-16 cells on the test protocols (reported only)."""
    header = " | ".join(f"{label}: R@1 / map@100" for label, _ in FINER)
    lines = [f"| ranking (validation, global head refitted without the held-out identities) | {header} |",
             "|---|" + "---|" * len(FINER)]
    for rows in zip(*(r["rows"] for r in results)):
        assert len({row["ranking"] for row in rows}) == 1, rows
        lines.append(f"| {rows[0]['ranking']} | " + " | ".join(f"{r['recall@1']:.4f} / {r['map@100']:.4f}" for r in rows)
                     + " |")
    tests = [("make demo's lite0-lw-rrt (288 px)", results[-1])] + ([("untrained default (224 px)", untrained)] if untrained else [])
    if any(r.get("test") for _, r in tests):
        lines += ["", "Test (reported, never chosen on): each model's own global top-100 reranked by global + w x the "
                  "local score on its stage-4 cells, the score and w with the best validation map@100 for that model "
                  "(the untrained default's validation: the same held-out sets, the model fitted without labels on the "
                  "other training images; `--model untrained --tap 4`):", "",
                  "| model | chosen on validation (validation R@1 / map@100, global alone) | protocol | global R@1 / mAP | "
                  "+ local matching R@1 / mAP | top-1 fixed / broken |", "|---|---|---|---|---|---|"]
        for label, result in tests:
            if not result.get("test"):
                continue
            c, none = result["test"]["chosen"], result["rows"][0]
            how = (f"w {c['weight']:g} x {c['kind']} ({c['validation']['recall@1']:.4f} / {c['validation']['map@100']:.4f}, "
                   f"{none['recall@1']:.4f} / {none['map@100']:.4f})")
            for row in result["test"]["rows"]:
                lines.append(f"| {label} | {how} | {row['protocol']} | {row['global']['recall@1']:.4f} / "
                             f"{row['global']['map']:.4f} | {row['local_match']['recall@1']:.4f} / "
                             f"{row['local_match']['map']:.4f} | {row['top1_fixed']} / {row['top1_broken']} |")
    return "\n".join(lines)


COMPACT = (("112 channels, centred, no projection", "local-matching-refit-tap4.json"),
           ("64-d PCA", "local-matching-refit-tap4-pca64.json"),
           ("64-d whitened PCA", "local-matching-refit-tap4-pca64w.json"),
           ("32-d PCA", "local-matching-refit-tap4-pca32.json"))


def compact_table(results: list[dict]) -> str:
    """Per stored form of the stage-4 cells: the best local-matching row of the fair validation."""
    lines = ["| stage-4 cells stored as | bytes per image (int8, 18x18 cells) | best on validation (fair head) | "
             "R@1 / map@100 | global alone | test, reported: grocery-open-cross / coil100-open R@1 / mAP "
             "(global 0.8906 / 0.6930, 0.9200 / 0.9083) |", "|---|---|---|---|---|---|"]
    for (label, _), result in zip(COMPACT, results):
        best = choose(result)
        none = result["rows"][0]
        dim = result.get("cells_dim") or 112
        tested = "; ".join(f"{r['local_match']['recall@1']:.4f} / {r['local_match']['map']:.4f}"
                           for r in result["test"]["rows"]) if result.get("test") else "-"
        lines.append(f"| {label} | {324 * dim:,} | w {best['weight']:g} x {best['kind']} | "
                     f"{best['validation']['recall@1']:.4f} / {best['validation']['map@100']:.4f} | "
                     f"{none['recall@1']:.4f} / {none['map@100']:.4f} | {tested} |")
    return "\n".join(lines)


def _model_label(model: str) -> str:
    """A results-file label for ``--model``: a shipped name as is, a folder by its name (a training
    run's ``best/`` or ``last/`` by the run's)."""
    path = Path(model)
    return path.parent.name if path.name in ("best", "last") else path.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0-lw-rrt")
    parser.add_argument("--refit-global", action="store_true",
                        help="refit the global head without the held-out identities first (module doc)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="match locals of the model run at this many times its input size (a finer grid)")
    parser.add_argument("--tap", type=int, default=None,
                        help="match the cells of this backbone stage's output instead (centred, unprojected)")
    parser.add_argument("--cells-dim", type=int, default=0,
                        help="project the --tap / --scale cells to this many dimensions by a label-free PCA first")
    parser.add_argument("--whiten", action="store_true", help="with --cells-dim: a whitened PCA")
    parser.add_argument("--local-stage", type=int, default=None,
                        help="with --model untrained: the product's model option, locals from this stage "
                             "(--cells-dim wide, default 64), scored by the local-match reranker's function")
    parser.add_argument("--test", action="store_true",
                        help="report the validation-chosen local score on the test protocols (needs the saved "
                             "--refit-global validation with the same --tap / --scale)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the saved JSON")
    parser.add_argument("--both", action="store_true", help="print both saved validations side by side")
    parser.add_argument("--finer", action="store_true", help="print the saved fair validations of every kind of locals")
    parser.add_argument("--compact", action="store_true", help="print the stored-form table of the stage-4 cells")
    parser.add_argument("--product", action="store_true", help="print the product form's table (--local-stage)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="print make demo's checkpoint with stage locals (results/local_match/, from waldo eval)")
    parser.add_argument("--store-choice", metavar="MODEL_DIR", default=None,
                        help="write the saved fair validation's local-match choice into MODEL_DIR/config.json")
    args = parser.parse_args()
    if args.store_choice:
        name = ("local-matching-refit" + (f"-tap{args.tap}" if args.tap is not None else "")
                + (f"-pca{args.cells_dim}" if args.cells_dim else "") + ".json")
        command = (f"experiments/local_matching.py --refit-global --tap {args.tap} --cells-dim {args.cells_dim} "
                   f"(results/rrt_views/{name})")
        print(json.dumps(store_choice(Path(args.store_choice), json.loads(OUT.with_name(name).read_text()), command),
                         indent=1))
        return 0
    if args.checkpoint:
        print(checkpoint_table(ROOT / "results" / "local_match", OUT.with_name("shipped-which-reranker.json")))
        return 0
    if args.product:
        print(product_table(json.loads(OUT.with_name(PRODUCT_FILE).read_text())))
        return 0
    if args.compact:
        print(compact_table([json.loads(OUT.with_name(name).read_text()) for _, name in COMPACT]))
        return 0
    if args.finer:
        print(finer_table([json.loads(OUT.with_name(name).read_text()) for _, name in FINER],
                          json.loads(OUT.with_name(UNTRAINED_FILE).read_text())))
        return 0
    if args.both:
        print(combined_table(json.loads(OUT.read_text()), json.loads(OUT.with_name("local-matching-refit.json").read_text())))
        return 0
    out = OUT.with_name("local-matching" + ("" if args.model == "lite0-lw-rrt" else f"-{_model_label(args.model)}")
                        + ("-refit" if args.refit_global else "")
                        + (f"-scale{args.scale:g}" if args.scale != 1 else "")
                        + (f"-tap{args.tap}" if args.tap is not None else "")
                        + (f"-stage{args.local_stage}" if args.local_stage is not None else "")
                        + (f"-pca{args.cells_dim}" + ("w" if args.whiten else "") if args.cells_dim else "") + ".json")
    if args.test:
        if not args.refit_global and args.model != UNTRAINED:
            raise SystemExit("--test reads the choice of the fair validation: pass --refit-global too")
        result = json.loads(out.read_text())
        chosen = choose(result)
        rows = test_product(chosen, args.local_stage, args.cells_dim or 64) if args.local_stage is not None else \
            test(args.model, chosen, args.tap, args.cells_dim, args.whiten)
        result["test"] = {"chosen": chosen, "rows": rows}
        out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if not args.table:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.local_stage is not None and args.model != UNTRAINED:
            raise SystemExit("--local-stage builds an untrained model: pass --model untrained")
        out.write_text(json.dumps(run(args.model, args.refit_global, args.scale, args.tap, args.cells_dim, args.whiten,
                                      args.local_stage), indent=1) + "\n")
    print(table(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
