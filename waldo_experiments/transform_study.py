"""The test-time transform study: one model, every test-time preset, global and reranked.

For each preset of waldo.data.transforms, the study's own ``normalize-extra`` ablation, and
multi-scale averaging of the baseline's global descriptors (see waldo.eval.multiscale), the
protocol's queries and gallery are described once, searched exactly, and the global top-k is
reranked by each available reranker. The RRT scores a query's top-k once (``score_top_k``); the
``rrt`` and ``rrt-fusion`` orders both come from those logits, so the fusion row costs no extra
forward pass. Random presets (perspective) run once per seed, so the report can show the spread
next to the mean and a change can be told from noise.

Everything is kept as plain rows (one per transform, seed and method, with per-group figures)
for the CSV/JSON writers and plots in waldo_experiments.study_report and waldo_experiments.plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torchvision.transforms.functional as F

from waldo.data.datasets import ImageSet
from waldo.data.protocols import Protocol
from waldo.data.transforms import TestTransform, get_transform, resize_size_for, transform_names
from waldo.eval.evaluate import EvalRun, evaluate_descriptors
from waldo.eval.metrics import recall_curve
from waldo.eval.multiscale import extract_multiscale, scale_sizes, scale_transforms
from waldo.eval.rerank_eval import rerank_run, reranked_metrics, score_top_k
from waldo.models.checkpoint import load_model
from waldo.models.extract import Extracted, extract_descriptors
from waldo_experiments.groups import group_metrics, query_groups

__all__ = [
    "BASELINE", "DEFAULT_SCALES", "IMAGENET_MEAN", "IMAGENET_STD", "METRIC_KEYS", "MULTISCALE", "NORMALIZE_EXTRA",
    "MethodResult", "StudySettings", "TransformStudy", "available_methods", "default_transforms", "pick_examples",
    "rank_methods", "run_transform_study", "study_transform", "subset_protocol", "summarise",
]

BASELINE = "resize256-crop224"
MULTISCALE = "multiscale"
NORMALIZE_EXTRA = "normalize-extra"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = (0.75, 1.0, 1.25)
METRIC_KEYS = ("recall@1", "recall@10", "recall@100", "map", "map@100", "n_queries")
# The order rows appear in: the baseline, then the founding report's ablations, ours last.
_ORDER = ("resize256-crop224", "resize224", "flip", "grayscale", "contrast", "blur", "perspective",
          NORMALIZE_EXTRA)


def study_transform(name: str, image_size: int, seed: int = 0) -> TestTransform:
    """A shipped test-time preset, or the founding report's ``normalize-extra`` ablation.

    ``normalize-extra`` is deliberately wrong: it applies ImageNet mean/std in the data pipeline
    although the model normalises its input itself, so the model sees broken input statistics.
    It lives here, not among the shipped presets, so no model or index can be configured with it.
    """
    if name == NORMALIZE_EXTRA:
        return TestTransform(NORMALIZE_EXTRA, image_size, resize_size_for(image_size), True, seed,
                             lambda x, g: F.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    return get_transform(name, image_size, seed)


def default_transforms() -> list[str]:
    """Every shipped test-time preset and ``normalize-extra`` (baseline first), plus multi-scale."""
    names = transform_names() + [NORMALIZE_EXTRA]
    return [n for n in _ORDER if n in names] + [n for n in names if n not in _ORDER] + [MULTISCALE]


@dataclass
class MethodResult:
    """One ranking method over one evaluation: its metrics, its reordered rankings (positions
    in ``EvalRun.gallery_rows``) and matches, and its cost per query (None for global)."""

    metrics: dict
    knn_indices: np.ndarray
    matches: np.ndarray
    ms_per_query: float | None = None


def available_methods(model_dir: str | Path, wanted: Sequence[str] | None = None, gv: bool = False) -> list[str]:
    """``global`` plus the rerankers the model folder supports (rrt, and rrt-fusion when its
    rrt.json holds a fusion weight), intersected with ``wanted``; ``gv`` (slow) only on request."""
    from waldo.rerank.rrt_checkpoint import has_rrt, read_rrt_info

    methods = ["global"]
    if has_rrt(model_dir):
        methods.append("rrt")
        if read_rrt_info(model_dir).get("training", {}).get("fusion_weight") is not None:
            methods.append("rrt-fusion")
    if wanted is not None:
        unknown = [m for m in wanted if m not in ("global", "rrt", "rrt-fusion", "gv")]
        if unknown:
            raise ValueError(f"unknown ranking method(s) {unknown}; choose from global, rrt, rrt-fusion, gv")
        missing = [m for m in wanted if m not in methods and m != "gv"]
        if missing:
            raise ValueError(f"{model_dir} cannot rerank with {missing}: it has no rrt.json "
                             f"(or no fusion weight in it)")
        methods = ["global"] + [m for m in methods[1:] if m in wanted]
    if gv:
        methods.append("gv")
    return methods


def _reordered(run: EvalRun, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The run's knn_indices and matches with the first ``order.shape[1]`` columns permuted."""
    k = order.shape[1]
    indices, matches = run.knn_indices.copy(), run.matches.copy()
    indices[:, :k] = np.take_along_axis(indices[:, :k], order, axis=1)
    matches[:, :k] = np.take_along_axis(matches[:, :k], order, axis=1)
    return indices, matches


def rank_methods(run: EvalRun, protocol: Protocol, methods: Sequence[str], *, reranker=None, top_k: int = 100,
                 progress: bool = False) -> dict[str, MethodResult]:
    """Global ranking plus each reranked one. ``reranker``: an ``RRTReranker`` (needed for rrt
    and rrt-fusion); its logits are computed once and shared by both orders."""
    results = {"global": MethodResult(dict(run.metrics), run.knn_indices, run.matches)}
    if "rrt" in methods or "rrt-fusion" in methods:
        if reranker is None:
            raise ValueError("rrt / rrt-fusion need a reranker")
        from waldo.rerank.rrt_rerankers import fuse_scores

        start = time.perf_counter()
        logits = score_top_k(run, reranker.logits, top_k, progress=progress)
        ms = 1000 * (time.perf_counter() - start) / max(1, len(logits))
        if "rrt" in methods:
            metrics, order = reranked_metrics(run, logits)
            results["rrt"] = MethodResult(metrics, *_reordered(run, order), round(ms, 2))
        if "rrt-fusion" in methods:
            global_scores = run.knn_scores[:, : logits.shape[1]]
            fused = np.where(np.isnan(logits), np.nan,
                             fuse_scores(global_scores, np.nan_to_num(logits), reranker.fusion_weight))
            metrics, order = reranked_metrics(run, fused)
            metrics["fusion_weight"] = reranker.fusion_weight
            results["rrt-fusion"] = MethodResult(metrics, *_reordered(run, order), round(ms, 2))
    if "gv" in methods:
        from waldo.eval.gv_eval import run_keypoints
        from waldo.rerank import RERANKERS

        verified = rerank_run(run, RERANKERS.create("gv"), top_k, keypoints=run_keypoints(protocol, progress=progress),
                              progress=progress)
        results["gv"] = MethodResult(verified.metrics, verified.run.knn_indices, verified.run.matches,
                                     verified.metrics["rerank_ms_per_query"])
    return results


def subset_protocol(protocol: Protocol, identities: int | None = None, per_identity: int | None = None,
                    max_train: int | None = None, seed: int = 0) -> Protocol:
    """A smaller protocol for quick runs: ``identities`` evaluation identities (seeded choice),
    at most ``per_identity`` queries and gallery images of each, and at most ``max_train``
    training images (a seeded sample; what an untrained model fits its projection on)."""
    if identities is None and per_identity is None and max_train is None:
        return protocol
    train = protocol.train
    if max_train is not None and len(train) > max_train:
        keep = np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train])
        train = train.subset(keep, name=f"{train.name}:subset")
    names = sorted(set(protocol.queries.identities) - {""})
    if identities is not None:
        chosen = set(np.random.default_rng(seed).permutation(names)[:identities].tolist())
    else:
        chosen = set(names)

    def cut(images: ImageSet, label: str) -> ImageSet:
        seen: dict[str, int] = {}
        keep = []
        for record in images:
            if record.identity in chosen and seen.get(record.identity, 0) < (per_identity or len(images)):
                seen[record.identity] = seen.get(record.identity, 0) + 1
                keep.append(record)
        return ImageSet(keep, images.root, f"{images.name}:{label}")

    queries = cut(protocol.queries, "subset")
    gallery = queries if protocol.leave_one_out else cut(protocol.gallery, "subset")
    return Protocol(f"{protocol.name}[subset]", train, queries, gallery, protocol.leave_one_out,
                    protocol.description + f" Subset: {len(chosen)} identities, <= {per_identity} images each.")


@dataclass
class StudySettings:
    """What to run. transforms: preset names (plus ``multiscale``); seeds: for random presets;
    scales: factors of the model's image size for ``multiscale``; methods: ranking methods."""

    transforms: list[str] = field(default_factory=default_transforms)
    seeds: tuple[int, ...] = (0, 1, 2)
    scales: tuple[float, ...] = DEFAULT_SCALES
    methods: list[str] = field(default_factory=lambda: ["global"])
    top_k: int = 100
    curve_k: int = 100
    n_examples: int = 4
    group_column: str | None = None
    batch_size: int = 32
    num_workers: int | None = None
    progress: bool = True


@dataclass
class TransformStudy:
    """The study's numbers. rows: one per (transform, seed, method) with metrics, groups and
    seconds; summary: seeds aggregated; curves: method -> Recall@1..k of the baseline; examples:
    queries whose top-5 the best reranker changed (see :func:`pick_examples`)."""

    protocol: str
    model: str
    settings: dict
    rows: list[dict]
    summary: list[dict]
    curves: dict[str, list[float]]
    examples: list[dict]
    data_root: str
    seconds: float


def _describe(model, protocol: Protocol, transform: Callable, settings: StudySettings,
              extra: Sequence[Callable] = (), base: tuple[Extracted, Extracted] | None = None
              ) -> tuple[Extracted, Extracted]:
    """(queries, gallery) descriptors; with ``extra`` transforms, multi-scale globals reusing
    ``base`` (the baseline's extraction) for the base scale."""
    options = {"batch_size": settings.batch_size, "num_workers": settings.num_workers, "progress": settings.progress}

    def one(paths: list[str], label: str, previous: Extracted | None) -> Extracted:
        if extra:
            return extract_multiscale(model, paths, transform, extra, base=previous, description=label, **options)
        return extract_descriptors(model, paths, transform, description=label, **options)

    gallery = one(protocol.gallery.paths, "gallery", base[1] if base else None)
    if protocol.leave_one_out:
        return gallery, gallery
    return one(protocol.queries.paths, "queries", base[0] if base else None), gallery


def _variants(name: str, settings: StudySettings, image_size: int) -> list[tuple[int | None, Callable, list]]:
    """(seed or None, base transform, extra-scale transforms) for one study transform."""
    if name == MULTISCALE:
        return [(None, get_transform(BASELINE, image_size), scale_transforms(BASELINE, image_size, settings.scales))]
    probe = study_transform(name, image_size)
    if not probe.random:
        return [(None, probe, [])]
    return [(seed, study_transform(name, image_size, seed=seed), []) for seed in settings.seeds]


def _row(transform: str, seed: int | None, method: str, result: MethodResult, groups: dict, seconds: dict) -> dict:
    row = {"transform": transform, "seed": seed, "method": method,
           **{k: result.metrics[k] for k in METRIC_KEYS if k in result.metrics}}
    if result.ms_per_query is not None:
        row["rerank_ms_per_query"] = result.ms_per_query
    # Per-query top-1 hits ("1"/"0" in query order): lets a report pair two rows query by query.
    row["top1"] = "".join("1" if hit else "0" for hit in result.matches[:, 0])
    row["groups"] = groups
    row["seconds"] = seconds
    return row


def run_transform_study(protocol: Protocol, model_dir: str | Path, settings: StudySettings,
                        log: Callable[[str], None] = print) -> TransformStudy:
    """Run the study (see the module docstring). ``log`` gets one line per finished variant."""
    from waldo.rerank.rrt_rerankers import RRTReranker

    start = time.perf_counter()
    model, config = load_model(model_dir)
    reranker = RRTReranker.from_folder(model_dir) if {"rrt", "rrt-fusion"} & set(settings.methods) else None
    transforms = list(settings.transforms)
    if BASELINE not in transforms:
        transforms.insert(0, BASELINE)  # every change is measured against it
    transforms.sort(key=lambda n: n != BASELINE)  # the baseline runs first: multi-scale reuses it
    rows: list[dict] = []
    baseline: tuple[Extracted, Extracted] | None = None
    baseline_results: dict[str, MethodResult] = {}
    baseline_run: EvalRun | None = None
    for name in transforms:
        for seed, transform, extra in _variants(name, settings, config.image_size):
            t0 = time.perf_counter()
            queries, gallery = _describe(model, protocol, transform, settings, extra,
                                         base=baseline if extra else None)
            run = evaluate_descriptors(protocol, queries, gallery)
            t1 = time.perf_counter()
            results = rank_methods(run, protocol, settings.methods, reranker=reranker, top_k=settings.top_k,
                                   progress=settings.progress)
            seconds = {"describe": round(t1 - t0, 1), "rerank": round(time.perf_counter() - t1, 1)}
            groups_of_queries = query_groups(protocol, run.query_rows, settings.group_column)
            for method, result in results.items():
                groups = group_metrics(result.matches, run.n_positives, groups_of_queries)
                rows.append(_row(name, seed, method, result, groups, seconds))
            if name == BASELINE:
                baseline, baseline_results, baseline_run = (queries, gallery), results, run
            log(f"{name}{'' if seed is None else f' seed {seed}'}: " + ", ".join(
                f"{m} R@1 {r.metrics['recall@1']:.4f} mAP {r.metrics['map']:.4f}" for m, r in results.items())
                + f" ({seconds['describe']} s describe, {seconds['rerank']} s rerank)")
    curves = {m: recall_curve(r.matches, settings.curve_k) for m, r in baseline_results.items()}
    reranked = [m for m in ("rrt-fusion", "rrt", "gv") if m in baseline_results]
    examples = (pick_examples(protocol, baseline_run, baseline_results["global"], baseline_results[reranked[0]],
                              reranked[0], settings.n_examples) if reranked and baseline_run is not None else [])
    summary = summarise(rows)
    described = {**vars(settings), "scale_sizes": scale_sizes(config.image_size, settings.scales),
                 "image_size": config.image_size, "transforms": transforms}
    return TransformStudy(protocol.name, str(model_dir), described, rows, summary, curves, examples,
                          str(protocol.queries.root), round(time.perf_counter() - start, 1))


def summarise(rows: list[dict], keys: Sequence[str] = ("recall@1", "recall@10", "recall@100", "map", "map@100")
              ) -> list[dict]:
    """One row per (transform, method): mean, population std, min and max over seeds of each
    metric, and the change of the mean against the baseline transform with the same method."""
    order: list[tuple[str, str]] = []
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = (row["transform"], row["method"])
        if key not in grouped:
            order.append(key)
            grouped[key] = []
        grouped[key].append(row)
    out = []
    for transform, method in order:
        items = grouped[(transform, method)]
        entry: dict = {"transform": transform, "method": method, "n_seeds": len(items),
                       "seeds": [r["seed"] for r in items], "n_queries": items[0].get("n_queries")}
        for key in keys:
            values = np.array([r[key] for r in items], float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
            entry[f"{key}_min"], entry[f"{key}_max"] = float(values.min()), float(values.max())
        out.append(entry)
    base = {e["method"]: e for e in out if e["transform"] == BASELINE}
    for entry in out:
        if entry["method"] in base:
            for key in keys:
                entry[f"{key}_delta"] = entry[key] - base[entry["method"]][key]
    return out


def _result_list(protocol: Protocol, run: EvalRun, indices: np.ndarray, matches: np.ndarray, q: int,
                 n: int, root: PurePath) -> list[dict]:
    out = []
    for position, hit in zip(indices[q, :n], matches[q, :n]):
        if position < 0:
            break
        record = protocol.gallery.records[int(run.gallery_rows[position])]
        out.append({"path": _relative(record.path, root), "identity": record.identity, "correct": bool(hit)})
    return out


def _relative(path: str, root: PurePath) -> str:
    try:
        return PurePath(path).relative_to(root).as_posix()
    except ValueError:
        return path


def pick_examples(protocol: Protocol, run: EvalRun, before: MethodResult, after: MethodResult, method: str,
                  n: int = 4, seed: int = 0, top: int = 5) -> list[dict]:
    """Up to ``n`` queries whose top-``top`` the reranker changed: first where it fixed the top-1
    (about two thirds), then where it broke it, then any other change; seeded choice within each.
    Paths are relative to the dataset root (the JSON stays portable)."""
    if n <= 0:
        return []
    before_ok, after_ok = before.matches[:, 0], after.matches[:, 0]
    changed = np.flatnonzero((before.knn_indices[:, :top] != after.knn_indices[:, :top]).any(axis=1))
    rng = np.random.default_rng(seed)
    pools = {"fixed": changed[~before_ok[changed] & after_ok[changed]],
             "broken": changed[before_ok[changed] & ~after_ok[changed]]}
    pools["other"] = np.setdiff1d(changed, np.concatenate([pools["fixed"], pools["broken"]]))
    shuffled = {kind: [(kind, int(q)) for q in rng.permutation(pool)] for kind, pool in pools.items()}
    n_fixed = -(-2 * n // 3)  # ceil(2n/3)
    chosen = shuffled["fixed"][:n_fixed] + shuffled["broken"][: n - n_fixed]
    # A short pool's share goes to the other top-1 changes first, then to any other change.
    spare = shuffled["fixed"][n_fixed:] + shuffled["broken"][n - n_fixed:] + shuffled["other"]
    chosen += spare[: n - len(chosen)]
    root = PurePath(protocol.queries.root)
    examples = []
    for kind, q in chosen:
        record = protocol.queries.records[int(run.query_rows[q])]
        examples.append({"kind": kind, "method": method, "query": _relative(record.path, root),
                         "identity": record.identity, "label": record.attrs.get("class_name", record.identity),
                         "before": _result_list(protocol, run, before.knn_indices, before.matches, q, top, root),
                         "after": _result_list(protocol, run, after.knn_indices, after.matches, q, top, root)})
    return examples
