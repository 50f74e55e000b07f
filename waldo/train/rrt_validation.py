"""Validation of a reranker on held-out *training* identities, and the choice of fusion weight.

The reference selected its RRT checkpoint on the test set's Recall@1 (with a top-15 rerank for
speed). Here the selection, and the fusion weight of ``rrt-fusion``, come from a leave-one-out
evaluation over identities split off the training images; the protocol's queries and gallery
are never read. Validation images use view 0 (the test transform) of the feature source, so
validation costs the trainable tail plus ``n_queries x top_k`` RRT pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from waldo.data.datasets import ImageSet
from waldo.data.protocols import Protocol
from waldo.eval.evaluate import EvalRun, evaluate_descriptors
from waldo.eval.metrics import retrieval_metrics
from waldo.eval.rerank_eval import reranked_metrics, score_top_k
from waldo.models.descriptor import DescriptorModel, Descriptors
from waldo.models.extract import Extracted
from waldo.rerank.rrt_rerankers import RRTReranker, fuse_scores
from waldo.rerank.rrt import RerankingTransformer
from waldo.train.common import split_backbone
from waldo.train.rrt_features import FeatureSource

if TYPE_CHECKING:
    from waldo.train.config import RRTTrainConfig

__all__ = ["RRTValidator", "choose_fusion_weight", "describe_rows", "record_fusion_weight", "tail_project"]


def tail_project(model: DescriptorModel, tail: Sequence[nn.Module], features: torch.Tensor) -> Descriptors:
    """Tail input (B, C, h, w) float32 -> Descriptors (global (B, D) L2, local (B, L, D))."""
    x = features
    for module in tail:
        x = module(x)
    return model.project(x)


@torch.inference_mode()
def describe_rows(model: DescriptorModel, tail: Sequence[nn.Module], source: FeatureSource, rows: np.ndarray,
                  *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """View-0 descriptors of ``rows``: (global (n, D) float32, local (n, L, D) float32, grid)."""
    globals_, locals_, grid = [], [], (0, 0)
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start:start + batch_size])
        out = tail_project(model, tail, source.get(chunk, np.zeros(len(chunk), np.int64)))
        globals_.append(out.global_desc.float().numpy())
        locals_.append(out.local_desc.float().numpy())
        grid = out.grid
    if not globals_:
        raise ValueError("no rows to describe")
    return np.concatenate(globals_), np.concatenate(locals_), grid


@dataclass
class ValidationResult:
    metrics: dict  # {"global": {...}, "rrt": {...}, "top_k", "n_queries"}
    run: EvalRun
    queries: np.ndarray  # (q,) positions in run.query_rows that were reranked
    logits: np.ndarray  # (q, top_k) float32, aligned with run.knn_indices[queries, :top_k]


class RRTValidator:
    """Leave-one-out over the validation images; reranks a fixed, seeded sample of queries."""

    def __init__(self, images: ImageSet, rows: np.ndarray, *, max_queries: int = 0, seed: int = 0,
                 ks: tuple[int, ...] = (1, 10, 100)) -> None:
        if len(rows) < 2:
            raise ValueError(f"validation needs at least 2 images, got {len(rows)}")
        self.rows = np.asarray(rows, np.int64)
        self.protocol = Protocol("rrt-validation", ImageSet([], images.root, "empty"), images, images, True,
                                 f"leave-one-out over {images.name}")
        self.max_queries, self.seed, self.ks = max_queries, seed, ks

    def _queries(self, n: int) -> np.ndarray:
        if not self.max_queries or n <= self.max_queries:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).choice(n, self.max_queries, replace=False))

    def __call__(self, model: DescriptorModel, tail: Sequence[nn.Module], rrt: RerankingTransformer,
                 source: FeatureSource, top_k: int) -> ValidationResult:
        """Global search over the validation images, then the RRT on each sampled query's top_k."""
        global_desc, local_desc, grid = describe_rows(model, tail, source, self.rows)
        extracted = Extracted(global_desc, local_desc, np.ones(len(self.rows), bool))
        run = evaluate_descriptors(self.protocol, extracted, extracted, ks=self.ks)
        queries = self._queries(len(run.query_rows))
        reranker = RRTReranker(rrt, grid=grid)
        logits = score_top_k(run, reranker.logits, top_k, queries=queries)
        rrt_metrics, _ = reranked_metrics(run, logits, queries=queries, ks=self.ks)
        global_metrics = retrieval_metrics(run.matches[queries], run.n_positives[queries], self.ks)
        metrics = {"global": global_metrics, "rrt": rrt_metrics, "top_k": int(logits.shape[1]),
                   "n_queries": len(queries), "n_images": len(self.rows)}
        return ValidationResult(metrics, run, queries, logits)


def choose_fusion_weight(result: ValidationResult, metric: str, grid: int) -> tuple[float, dict]:
    """The lambda in {0, 1/grid, ..., 1} whose fused ranking scores best on ``metric``; ties go
    to the larger lambda (closer to plain global search, the safer side). Returns (lambda,
    {"weights": [...], "scores": [...], "metrics": metrics at lambda})."""
    top_k = result.logits.shape[1]
    global_scores = result.run.knn_scores[result.queries, :top_k]
    global_scores = np.where(np.isfinite(global_scores), global_scores, 0.0)  # -inf padding; re-marked below
    weights = [i / grid for i in range(grid, -1, -1)]  # 1 -> 0, so ties keep the larger lambda
    best, best_metrics, scores = None, None, []
    for weight in weights:
        fused = fuse_scores(global_scores, result.logits, weight)
        fused[np.isnan(result.logits)] = np.nan  # padding stays padding
        metrics, _ = reranked_metrics(result.run, fused, queries=result.queries)
        scores.append(metrics[metric])
        if best is None or metrics[metric] > best_metrics[metric] + 1e-12:
            best, best_metrics = weight, metrics
    return float(best), {"weights": weights, "scores": scores, "metrics": best_metrics}


def record_fusion_weight(best: Path, has_tail: bool, source: FeatureSource, validator: RRTValidator,
                         config: RRTTrainConfig) -> float:
    """Score the best checkpoint's validation top-``fusion_top_k`` once, pick the fusion weight
    (:func:`choose_fusion_weight`) and record it, with the validation figures, in its rrt.json
    and metrics.json. ``has_tail``: the backbone tail trained (finetune), so it must run."""
    from waldo.models.checkpoint import load_model, without_match_cells
    from waldo.rerank.rrt_checkpoint import load_rrt, update_rrt_training
    from waldo.fsutil import atomic_write_json

    model, _ = without_match_cells(*load_model(best))
    rrt, _ = load_rrt(best)
    # The tail modules of the *saved* model: same positions in the backbone as the training tail.
    tail = split_backbone(model.backbone, config.trainable_blocks)[1] if has_tail else []
    result = validator(model, tail, rrt, source, config.fusion_top_k)
    weight, details = choose_fusion_weight(result, config.select_metric, config.fusion_grid)
    update_rrt_training(best, fusion_weight=weight, fusion_metric=config.select_metric,
                        fusion_val={"global": result.metrics["global"], "rrt": result.metrics["rrt"],
                                    "fusion": details["metrics"], "top_k": result.metrics["top_k"],
                                    "n_queries": result.metrics["n_queries"], "grid": details["weights"],
                                    "grid_scores": details["scores"]})
    metrics_path = best / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    atomic_write_json(metrics_path, {**metrics, "fusion_weight": weight, "fusion_val": result.metrics,
                                     "fusion_val_metrics": details["metrics"]})
    return weight
