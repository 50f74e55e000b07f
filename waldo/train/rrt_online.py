"""Train the reranker alone on a fixed descriptor model, from online augmented views.

``waldo train rrt --mode rrt-only`` and ``waldo index adapt``. The descriptor model (backbone,
local and global projections) never changes, so a reranker trained here serves any index built
with that model, its stored descriptors included: only ``rrt.json``/``rrt.safetensors`` are new.

Per epoch (see waldo.train.pairs for the pairs): anchors are seen as the index sees a query (the
test transform, descriptors computed once and cached as ``.npy``); every candidate is a fresh
strong view (waldo.data.views) made now, for this step, and described by the frozen model
through ONNX Runtime where it is installed (eager PyTorch otherwise). So the reranker never sees
the same candidate map twice: with a fixed cache of maps (``online_views: false``, kept as an
option: ``views`` augmented views per image made once) it memorises them instead.

Validation and choice (waldo.train.pairs.validation_sets): per source, a gallery built like its
test; the checkpoint with the best macro-average (over sources) of ``select_metric`` after
reranking the global top-``val_top_k`` is ``best/``. At the end, on ``best/``: the fusion
weight, and the *default reranker* among none / rrt / rrt-fusion (the best on validation; ties
go to the cheaper), stored in its rrt.json with the figures they were chosen on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from waldo.data.images import load_image
from waldo.data.transforms import get_transform
from waldo.eval.metrics import retrieval_metrics
from waldo.fsutil import write_dir_atomically
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, without_match_cells
from waldo.models.compiled import prepare_runtime
from waldo.models.descriptor import DescriptorModel, rrt_global_inputs
from waldo.models.extract import extract_descriptors
from waldo.paths import default_cache_root
from waldo.rerank.rrt import RerankingTransformer
from waldo.rerank.rrt_checkpoint import load_rrt, save_rrt
from waldo.rerank.base import RerankCandidates, RerankQuery
from waldo.rerank.rrt_rerankers import RRTReranker, fuse_scores
from waldo.train.common import TrainState
from waldo.train.config import RRTTrainConfig
from waldo.train.loop import StepResult, Trainer, fit, start_run, write_checkpoint
from waldo.train.mining import list_hash
from waldo.train.pairs import PairBatch, PairSampler, ValidationSet, split_rows, top_k_neighbours, validation_sets
from waldo.train.sources import PooledImages, TrainingSource, check_no_test_images, pool_sources
from waldo.data.views import ViewAugment, strong_view

__all__ = ["OnlineRRTTrainer", "ViewMaker", "clean_descriptors", "train_rrt_on_views"]


# ----------------------------------------------------------------------------- descriptors
def clean_descriptors(model: DescriptorModel, model_config: ModelConfig, paths: list[str], cache_root: Path, *,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-transform descriptors of ``paths``: (global (N, D) float32, local (N, L, D) float16,
    ok (N,) bool), cached under ``<cache_root>/descriptors/`` by model hash and path list."""
    key = hashlib.sha256(f"{model_hash(model)}|{list_hash(paths)}|{model_config.transform}|"
                         f"{model_config.image_size}".encode()).hexdigest()[:20]
    folder = cache_root / "descriptors" / key
    if (folder / "ok.npy").is_file():
        return (np.load(folder / "global.npy"), np.load(folder / "local.npy"), np.load(folder / "ok.npy"))
    transform = get_transform(model_config.transform, model_config.image_size)
    out = extract_descriptors(model, paths, transform, progress=progress, description="describe training images",
                              runtime="auto")
    ok = out.ok
    global_desc = np.zeros((len(paths), model.descriptor_width), np.float32)
    local_desc = np.zeros((len(paths), *out.local_desc.shape[1:]), np.float16)
    global_desc[ok], local_desc[ok] = out.global_desc, out.local_desc
    def write(staging: Path) -> None:  # ok.npy last: its presence marks a complete cache
        for name, array in (("global.npy", global_desc), ("local.npy", local_desc), ("ok.npy", ok)):
            np.save(staging / name, array, allow_pickle=False)

    write_dir_atomically(folder, write)
    return global_desc, local_desc, ok


class ViewMaker:
    """Strong views of pooled rows, described by the frozen model.

    Decoded photos are kept in memory, shrunk so the short side is at most ``keep_side`` (views
    are ``image_size`` px crops of at least 30% of the area, so little detail is lost), and the
    views are made by threads (PIL releases the GIL)."""

    def __init__(self, model: DescriptorModel, paths: list[str], image_size: int, augment: ViewAugment, *,
                 keep_side: int = 320, threads: int = 4) -> None:
        self.model, self.paths, self.image_size, self.augment = model.eval(), paths, image_size, augment
        self.keep_side = keep_side
        self.run_model = prepare_runtime(model, "auto", batch_size=64, n_images=10_000)
        self._images: dict[int, Image.Image] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads)

    def _photo(self, row: int) -> Image.Image:
        image = self._images.get(row)
        if image is None:
            image = load_image(self.paths[row])
            short = min(image.size)
            if short > self.keep_side:
                scale = self.keep_side / short
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BILINEAR)
            self._images[row] = image
        return image

    def images(self, rows: np.ndarray, seeds: list[list[int]], middles: np.ndarray | None = None) -> torch.Tensor:
        """One view per (row, seed); where ``middles`` >= 0, a swapped view: that row's middle in
        ``row``'s surroundings (waldo.data.views.swap_centre)."""
        middles = np.full(len(rows), -1) if middles is None else middles

        def one(row: int, middle: int, seed: list[int]) -> torch.Tensor:
            inner = self._photo(middle) if middle >= 0 else None
            return strong_view(self._photo(row), self.image_size, np.random.default_rng(seed), self.augment, inner)

        return torch.stack(list(self._pool.map(one, [int(r) for r in rows], [int(m) for m in middles], seeds)))

    @torch.inference_mode()
    def describe(self, rows: np.ndarray, seeds: list[list[int]], batch_size: int = 64,
                 middles: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (n, D), local (n, L, D)) float32 of one view per (row, seed) (``middles``: see
        :meth:`images`)."""
        globals_, locals_ = [], []
        for start in range(0, len(rows), batch_size):
            part = None if middles is None else middles[start:start + batch_size]
            images = self.images(rows[start:start + batch_size], seeds[start:start + batch_size], part)
            out = self.run_model(images.contiguous(memory_format=torch.channels_last))
            globals_.append(out.global_desc.float())
            locals_.append(out.local_desc.float())
        return torch.cat(globals_), torch.cat(locals_)


# ----------------------------------------------------------------------------- validation
class ViewValidator:
    """Scores global / rrt / rrt-fusion on every :class:`ValidationSet` (see module doc)."""

    def __init__(self, sets: list[ValidationSet], pool: PooledImages, global_desc: np.ndarray, local_desc: np.ndarray,
                 views: ViewMaker, *, top_k: int, seed: int, grid: tuple[int, int], precision: str = "fp32") -> None:
        if precision not in ("fp32", "reference"):
            raise ValueError(f"validation scores in fp32 or reference precision, got {precision!r}")
        self.sets, self.top_k, self.grid, self.precision = sets, top_k, grid, precision
        # logits by the weights that made them: choosing the default at the end rescored best/ and
        # last/, which their epochs' validations had already scored (2 of a run's ~6 passes)
        self._scored: dict[str, list[np.ndarray]] = {}
        self.prepared = []
        for vset in sets:
            if vset.augmented:  # fixed views, made once: every validation sees the same queries
                seeds = [[seed, 99, int(row)] for row in vset.queries]
                q_global, q_local = views.describe(vset.queries, seeds)
                q_global, q_local = q_global.numpy(), q_local.numpy()
            else:
                q_global, q_local = global_desc[vset.queries], local_desc[vset.queries].astype(np.float32)
            g_global = global_desc[vset.gallery]
            sims = q_global @ g_global.T
            if vset.exclude_self:
                sims[vset.queries[:, None] == vset.gallery[None, :]] = -np.inf
            k = min(top_k, len(vset.gallery) - (1 if vset.exclude_self else 0))
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(sims, order, 1)
            candidates = vset.gallery[order]
            same = pool.identity[candidates] == pool.identity[vset.queries][:, None]
            gallery_same = pool.identity[vset.gallery][None, :] == pool.identity[vset.queries][:, None]
            if vset.exclude_self:
                gallery_same &= vset.queries[:, None] != vset.gallery[None, :]
            self.prepared.append({"q_global": q_global, "q_local": q_local, "candidates": candidates,
                                  "scores": scores, "matches": same, "n_positives": gallery_same.sum(1)})
        self.local_desc, self.global_desc = local_desc, global_desc

    def logits(self, rrt: RerankingTransformer) -> list[np.ndarray]:
        """Each set's (queries, top_k) RRT logits, scored as serving scores them. ``fp32`` (the
        default): the fast scorer (waldo.rerank.rrt_fast), the training module's logits to float
        rounding in about a quarter of its time, and scoring is nearly all of a validation pass
        (benchmarks/rrt_validation.py); ``reference``: the training module's own forward. Weights
        scored before (same config and parameters) get their earlier logits back."""
        rrt.eval()
        key = f"{self.precision}|{rrt.config.model_dump_json()}|{model_hash(rrt)}"
        if key in self._scored:
            return [logits.copy() for logits in self._scored[key]]
        # fp32 copies the weights as they are now: one scorer per validation pass
        reranker = RRTReranker(rrt, grid=self.grid, precision=self.precision)
        out = []
        for data in self.prepared:
            logits = np.zeros(data["candidates"].shape, np.float32)
            for row, candidates in enumerate(data["candidates"]):
                query = RerankQuery(data["q_local"][row], data["q_global"][row])
                logits[row] = reranker.logits(query, RerankCandidates(self.local_desc[candidates],
                                                                      data["scores"][row].astype(np.float32),
                                                                      self.global_desc[candidates]))
            out.append(logits)
        self._scored[key] = [logits.copy() for logits in out]
        return out

    def _metrics(self, data: dict, scores: np.ndarray | None) -> dict:
        matches = data["matches"]
        if scores is not None:
            order = np.argsort(-scores, axis=1, kind="stable")
            matches = np.take_along_axis(matches, order, 1)
        return retrieval_metrics(matches, data["n_positives"], ks=(1, 10))

    def ranking(self, scores: list[np.ndarray]) -> dict:
        """Figures of any ranking given as each set's (queries, top_k) scores over its
        candidates (higher first, ties in global order): {"macro": means over the sets,
        "sets": {name: figures}}."""
        per_set = {vset.name: self._metrics(data, set_scores)
                   for vset, data, set_scores in zip(self.sets, self.prepared, scores)}
        macro = {metric: float(np.mean([entry[metric] for entry in per_set.values()]))
                 for metric in ("recall@1", "recall@10", "map@100")}
        return {"macro": macro, "sets": per_set}

    def __call__(self, rrt: RerankingTransformer, logits: list[np.ndarray] | None = None,
                 fusion_weight: float | None = None) -> dict:
        logits = self.logits(rrt) if logits is None else logits  # logits() scores in eval mode
        per_set = {}
        for vset, data, set_logits in zip(self.sets, self.prepared, logits):
            entry = {"kind": vset.kind, "n_queries": len(vset.queries), "gallery": len(vset.gallery),
                     "none": self._metrics(data, None), "rrt": self._metrics(data, set_logits)}
            if fusion_weight is not None:
                entry["rrt-fusion"] = self._metrics(data, fuse_scores(data["scores"], set_logits, fusion_weight))
            per_set[vset.name] = entry
        names = ["none", "rrt"] + (["rrt-fusion"] if fusion_weight is not None else [])
        macro = {name: {metric: float(np.mean([e[name][metric] for e in per_set.values()]))
                        for metric in ("recall@1", "recall@10", "map@100")} for name in names}
        return {"macro": macro, "sets": per_set, "top_k": self.top_k}


#: A reranker becomes the default only when it beats every cheaper choice on validation by more
#: than this (in the selection metric): a gain smaller than about one validation query is noise,
#: and noise should not buy a slower search.
DEFAULT_MARGIN = 0.005


def earns_default(candidate_per_set, reference_per_set, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether a ranking may replace ``reference`` as the default: its mean over the validation
    sets beats the reference's by more than ``margin`` *and* it scores below the reference on no
    set. The mean alone let one collection's gain hide another's loss (a local-match weight
    gained on grocery's held-out shelves while abo_sample's queries lost), and a default is what
    a user gets on a collection nobody validated: it should not be worse on any kind we did."""
    candidate = np.asarray(candidate_per_set, dtype=np.float64)
    reference = np.asarray(reference_per_set, dtype=np.float64)
    if candidate.shape != reference.shape or candidate.size == 0:
        raise ValueError("per-set figures of both rankings, one per validation set, are needed")
    return bool(candidate.mean() > reference.mean() + margin and np.all(candidate >= reference - 1e-9))


#: rrt-consensus's cells scored when a default is chosen (experiments/rrt_consensus.py's grid)
CONSENSUS_KS = (3, 5, 10)
CONSENSUS_WEIGHTS = (0.25, 0.5, 1.0)
CONSENSUS_GRID = tuple((k, weight) for k in CONSENSUS_KS for weight in CONSENSUS_WEIGHTS)


def consensus_cells(validator: ViewValidator, scores: list[np.ndarray], scale: float) -> list[dict]:
    """Each :data:`CONSENSUS_GRID` cell's figures (:meth:`ViewValidator.ranking`) for the ranking
    ``scores + weight * scale * neighbour_consensus(scores, candidates' global descriptors, k)``."""
    from waldo.rerank.rrt_rerankers import neighbour_consensus

    descriptors = [validator.global_desc[data["candidates"]].astype(np.float32) for data in validator.prepared]
    return [{"k": k, "weight": weight,
             **validator.ranking([set_scores + weight * scale * neighbour_consensus(set_scores, desc, k)
                                  for set_scores, desc in zip(scores, descriptors)])}
            for k, weight in CONSENSUS_GRID]


def choose_consensus(validator: ViewValidator, rrt: RerankingTransformer, logits: list[np.ndarray], metric: str,
                     reference_per_set: list[float], margin: float = DEFAULT_MARGIN) -> dict | None:
    """rrt-consensus's setting (waldo.rerank.rrt_rerankers.ConsensusReranker) on validation: every
    :data:`CONSENSUS_GRID` cell over the RRT's ``logits``; the best by the mean of ``metric`` (ties:
    the earlier cell) is ``adopted`` iff it :func:`earns_default` against ``reference_per_set``
    (the default chosen without it). None where it cannot be judged: an RRT without a global
    residual (its weight's unit), or a validation set of augmented views, whose queries have one
    true match each, so neighbours have nothing to agree on."""
    if not rrt.config.global_skip or not validator.sets or any(s.augmented for s in validator.sets):
        return None
    return pick_consensus(consensus_cells(validator, logits, float(rrt.global_skip_scale.detach())), metric,
                          reference_per_set, margin)


def pick_consensus(cells: list[dict], metric: str, reference_per_set: list[float],
                   margin: float = DEFAULT_MARGIN) -> dict:
    """The rule of :func:`choose_consensus` on scored :func:`consensus_cells`."""
    best = max(cells, key=lambda cell: (cell["macro"][metric], -cells.index(cell)))
    per_set = [entry[metric] for entry in best["sets"].values()]
    return {"k": best["k"], "weight": best["weight"], "validation": best["macro"], "select_metric": metric,
            "margin": margin, "adopted": earns_default(per_set, reference_per_set, margin),
            "grid_scores": [[cell["k"], cell["weight"], cell["macro"][metric]] for cell in cells]}


def choose_default(validator: ViewValidator, rrt: RerankingTransformer, metric: str, grid: int,
                   margin: float = DEFAULT_MARGIN) -> dict:
    """The fusion weight (grid search; ties go to the larger global weight) and the default
    reranker: the best of none / rrt / rrt-fusion on ``metric``, where a costlier one (none,
    then rrt, then rrt-fusion, which needs both scores) must win by more than ``margin`` on the
    mean over validation sets and lose on none of them (:func:`earns_default`); then
    rrt-consensus, where it can be judged (:func:`choose_consensus`), by the same rule against
    that choice."""
    logits = validator.logits(rrt)
    best_weight, best_score = 1.0, -1.0
    grid_scores = []
    for weight in [i / grid for i in range(grid, -1, -1)]:
        score = validator(rrt, logits, weight)["macro"]["rrt-fusion"][metric]
        grid_scores.append(score)
        if score > best_score + 1e-12:
            best_weight, best_score = weight, score
    metrics = validator(rrt, logits, best_weight)
    per_set = lambda name: [entry[name][metric] for entry in metrics["sets"].values()]  # noqa: E731
    default = "none"
    for name in ("rrt", "rrt-fusion"):  # better than everything cheaper by the margin, on no set worse, or not chosen
        if earns_default(per_set(name), per_set(default), margin):
            default = name
    # rrt-consensus costs what rrt costs: it must beat whatever was chosen without it
    consensus = choose_consensus(validator, rrt, logits, metric, per_set(default), margin)
    if consensus is not None and consensus["adopted"]:
        default = "rrt-consensus"
    return {"fusion_weight": best_weight, "default_reranker": default, "select_metric": metric, "margin": margin,
            "validation": metrics, "fusion_grid_scores": grid_scores, "consensus": consensus}


# ----------------------------------------------------------------------------- trainer
def anchor_softmax_loss(logits: torch.Tensor, anchors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over positive pairs of -log softmax(logit) among the pairs of the same anchor: each
    anchor's positive must outrank its own negatives; logits of different anchors never meet."""
    n = int(anchors.max()) + 1
    peak = torch.full((n,), float("-inf"), dtype=logits.dtype).scatter_reduce(0, anchors, logits.detach(), "amax")
    total = torch.zeros(n, dtype=logits.dtype).index_add(0, anchors, torch.exp(logits - peak[anchors]))
    log_norm = torch.log(total) + peak
    positive = targets == 1
    return (log_norm[anchors[positive]] - logits[positive]).mean()


class OnlineRRTTrainer(Trainer):
    unit = "pairs"
    finish_flag = "default_chosen"

    def __init__(self, config: RRTTrainConfig, rrt: RerankingTransformer, sampler: PairSampler, views: ViewMaker,
                 global_desc: np.ndarray, local_desc: np.ndarray, validator: ViewValidator, grid: tuple[int, int],
                 save_model_files, info: dict) -> None:
        self.config, self.module, self.sampler, self.views = config, rrt, sampler, views
        self.global_desc, self.local_desc, self.validator, self.grid = global_desc, local_desc, validator, grid
        self.save_model_files, self.info = save_model_files, info
        self.metric = config.select_metric
        groups: list[dict] = [{"params": list(rrt.parameters())}]
        if config.global_skip_lr_scale != 1.0:  # the residual's scale in a group of its own (config doc)
            scale = rrt.global_skip_scale
            groups = [{"params": [q for q in rrt.parameters() if q is not scale]},
                      {"params": [scale], "lr_scale": config.global_skip_lr_scale}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self._cached_views = None
        if not config.online_views:  # the option: a fixed cache of `views` augmented views per image
            rows = np.arange(len(global_desc))
            g, l_ = [], []
            for view in range(config.views):
                gv, lv = views.describe(rows, [[config.seed, 1000 + view, int(r)] for r in rows])
                g.append(gv.half())
                l_.append(lv.half())
            self._cached_views = (torch.stack(g, 1), torch.stack(l_, 1))  # (N, V, D), (N, V, L, D)

    def batches(self, epoch: int) -> Iterator[PairBatch]:
        return self.sampler.epoch(epoch, self.config.batch_triplets)

    def batches_per_epoch(self) -> int:
        return -(-self.sampler.anchors_per_epoch // self.config.batch_triplets)

    def _candidates(self, epoch: int, index: int, rows: np.ndarray,
                    middles: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        seed = self.config.seed
        if self._cached_views is not None:  # swap_prob needs online views (RRTTrainConfig checks)
            pick = np.random.default_rng([seed, epoch, index, 5]).integers(self.config.views, size=len(rows))
            g, l_ = self._cached_views
            return g[rows, pick].float(), l_[rows, pick].float()
        return self.views.describe(rows, [[seed, epoch, index, j] for j in range(len(rows))], middles=middles)

    def step(self, epoch: int, index: int, batch: PairBatch) -> StepResult:
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(epoch, epoch * self.batches_per_epoch() + index) * group.get("lr_scale", 1.0)
        c_global, c_local = self._candidates(epoch, index, batch.candidates, batch.middles)
        a_global = torch.from_numpy(self.global_desc[batch.anchors])
        a_local = torch.from_numpy(self.local_desc[batch.anchors].astype(np.float32))
        qa, qc = torch.from_numpy(batch.pair_anchor), torch.from_numpy(batch.pair_candidate)
        a_inputs = rrt_global_inputs(self.module, a_global, a_local)
        c_inputs = rrt_global_inputs(self.module, c_global, c_local)
        a_token, a_skip = (None if x is None else x[qa] for x in a_inputs)
        c_token, c_skip = (None if x is None else x[qc] for x in c_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.module(a_local[qa], c_local[qc], grid=self.grid, query_global=a_token, cand_global=c_token,
                             query_skip=a_skip, cand_skip=c_skip)
        targets = torch.from_numpy(batch.targets)
        if config.pair_loss == "softmax":
            loss = anchor_softmax_loss(logits, torch.from_numpy(batch.pair_anchor), targets)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), config.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            positive, negative = logits[targets == 1], logits[targets == 0]
            ranked = float((positive[:, None] > negative[None, :]).float().mean()) if len(negative) else 1.0
        return StepResult({"loss": float(loss.detach()), "pair_auc": ranked}, weight=len(targets),
                          count=len(targets), images=len(batch.candidates), counters=batch.counters)

    def validate(self) -> dict:
        return self.validator(self.module)

    def score(self, metrics: dict) -> float:
        return metrics["macro"]["rrt"][self.metric]

    def save(self, target: Path, epoch: int, metrics: dict | None) -> None:
        write_checkpoint(target, self.config, metrics, lambda folder: (
            self.save_model_files(folder),
            save_rrt(folder, self.module, grid=self.grid, training={**self.info, "epoch": epoch})))

    def finish(self, best: Path) -> None:
        # last/ too: when validation keeps the starting model as best/, the trained one stays
        # usable (and honestly labelled) beside it.
        for folder in (best, best.parent / "last"):
            if (folder / "rrt.json").is_file():
                record_choice(folder, self.validator, self.metric, self.config.fusion_grid)


def record_choice(folder: Path, validator: ViewValidator, metric: str, grid: int) -> dict:
    """:func:`choose_default` for the reranker in ``folder``, written into its rrt.json and
    metrics.json."""
    from waldo.fsutil import atomic_write_json
    from waldo.rerank.rrt_checkpoint import update_rrt_training

    rrt, _ = load_rrt(folder)
    chosen = choose_default(validator, rrt, metric, grid)
    consensus = chosen.get("consensus")
    # default_fallbacks cleared: a chain stored by a study for the weights this run started from
    # (e.g. make demo's, under index adapt) says nothing about the new ones
    update_rrt_training(folder, fusion_weight=chosen["fusion_weight"], default_reranker=chosen["default_reranker"],
                        default_fallbacks=[], fusion_metric=metric, fusion_val={"macro": chosen["validation"]["macro"],
                                                          "grid_scores": chosen["fusion_grid_scores"]},
                        **({"consensus": consensus} if consensus is not None else {}))
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    atomic_write_json(metrics_path, {**metrics, "choice": chosen})
    return chosen


def train_rrt_on_views(config: RRTTrainConfig, sources: list[TrainingSource], init_dir: str | Path,
                       out_dir: str | Path, *, cache_root: str | Path | None = None, progress: bool = True,
                       stop_after: int | None = None, allow_test_images: bool = False,
                       init_rrt: str | Path | None = None, copy_model: bool = True) -> Path:
    """Train (or resume) an RRT on ``sources`` over the fixed model in ``init_dir`` (module doc).
    ``init_rrt``: a reranker folder to start from (its RRT config must equal the config's), e.g.
    the shipped one; ``copy_model``: checkpoints are complete reranker folders (the model files
    copied beside rrt.*), else rrt.* alone. Returns ``out_dir / "best"``."""
    if config.mode != "rrt-only":
        raise ValueError(f"train_rrt_on_views needs an rrt-only config, got mode {config.mode!r}")
    out, state = start_run(out_dir, config)
    cache_root = Path(cache_root or default_cache_root())
    if not allow_test_images:
        check_no_test_images(sources)
    model, model_config = without_match_cells(*load_model(init_dir))
    init_hash = model_hash(model)
    rrt_config = config.rrt_config()
    if rrt_config.d_model != model.dim:
        raise ValueError(f"the RRT's d_model ({rrt_config.d_model}) must equal the model's descriptor dim ({model.dim})")
    # A global descriptor wider than the locals (e.g. a trained learned whitening) mines the
    # negatives; the RRT's global tokens are then the locals' normalised mean, as at serving.
    if init_rrt is not None:
        rrt, _ = load_rrt(init_rrt)
        if rrt.config != rrt_config:
            raise ValueError(f"{init_rrt}/rrt.json differs from the config's rrt settings")
        rrt.train()
    else:
        torch.manual_seed(config.seed)
        rrt = RerankingTransformer(rrt_config)
    pool = pool_sources(sources)
    global_desc, local_desc, ok = clean_descriptors(model, model_config, pool.paths, cache_root, progress=progress)
    if not ok.all():
        tqdm.write(f"warning: {int((~ok).sum())} unreadable training images are left out")
    held_out = split_rows(pool, config.val_fraction, config.held_out_seed)
    train = ok & ~held_out
    neighbours = top_k_neighbours(global_desc, np.flatnonzero(train), config.negatives_top_k)
    sampler = PairSampler(pool, train, neighbours, seed=config.seed, real_positive_prob=config.real_positive_prob,
                          hard_negative_prob=config.hard_negative_prob, hard_negative_k=config.hard_negative_k,
                          in_batch_negatives=config.in_batch_negatives, anchors_per_epoch=config.anchors_per_epoch,
                          swap_prob=config.swap_prob)
    grid = (model_config.image_size // model.local_stride,) * 2
    views = ViewMaker(model, pool.paths, model_config.image_size, ViewAugment(**config.augment))
    sets = validation_sets(pool, held_out & ok, max_queries=config.val_max_queries, seed=config.held_out_seed)
    validator = ViewValidator(sets, pool, global_desc, local_desc, views, top_k=config.val_top_k,
                              seed=config.held_out_seed, grid=grid)
    info = {"mode": "rrt-only", "init_model_hash": init_hash, "online_views": config.online_views,
            "trained_on": [source.describe() for source in sources],
            "validation_sets": [{"name": s.name, "kind": s.kind, "queries": len(s.queries), "gallery": len(s.gallery)}
                                for s in sets]}
    init_dir = Path(init_dir)

    def save_model_files(folder: Path) -> None:
        if copy_model:
            for name in ("config.json", "model.safetensors"):
                shutil.copyfile(init_dir / name, folder / name)

    trainer = OnlineRRTTrainer(config, rrt, sampler, views, global_desc, local_desc, validator, grid,
                               save_model_files, info)
    resume = state is not None
    if state is None:
        state = TrainState(seed=config.seed, extra={"init_model_hash": init_hash, "n_train": int(train.sum()),
                                                    "n_held_out": int(held_out.sum())})
    elif state.extra.get("init_model_hash") != init_hash:
        raise ValueError(f"{out} was started from another model; pass the same --init")
    return fit(trainer, out, state, resume=resume, progress=progress, stop_after=stop_after)


def validate_reranker(model_dir: str | Path, sources: list[TrainingSource], *, val_fraction: float, seed: int,
                      max_queries: int = 0, top_k: int = 100, cache_root: str | Path | None = None,
                      progress: bool = False, record: str | None = None, only: list[str] | None = None,
                      precision: str = "fp32") -> dict:
    """The validation of :func:`train_rrt_on_views` (same split, same sets) for a finished
    reranker folder: lets anyone recheck the figures a model card quotes. ``record`` (a metric
    name): first choose and write the folder's fusion weight and default on it. ``only``: the
    names of the validation sets to score (the split still comes from all ``sources``, so it is
    the training run's). ``precision``: :class:`ViewValidator`'s."""
    model, model_config = without_match_cells(*load_model(model_dir))
    rrt, info = load_rrt(model_dir)
    pool = pool_sources(sources)
    held_out = split_rows(pool, val_fraction, seed)
    sets = validation_sets(pool, held_out, max_queries=max_queries, seed=seed)
    if only is not None:
        sets = [s for s in sets if s.name in only]
        if not sets:
            raise ValueError(f"no validation set named {only}")
    # Only the images the validation reads are described (the rest stay zero, never read).
    needed = np.unique(np.concatenate([np.concatenate([s.queries, s.gallery]) for s in sets]))
    part_global, part_local, part_ok = clean_descriptors(model, model_config, [pool.paths[i] for i in needed],
                                                         Path(cache_root or default_cache_root()), progress=progress)
    if not part_ok.all():
        raise ValueError(f"{int((~part_ok).sum())} validation images could not be read")
    global_desc = np.zeros((len(pool), part_global.shape[1]), np.float32)
    local_desc = np.zeros((len(pool), *part_local.shape[1:]), np.float16)
    global_desc[needed], local_desc[needed] = part_global, part_local
    grid = (model_config.image_size // model.local_stride,) * 2
    views = ViewMaker(model, pool.paths, model_config.image_size, ViewAugment())
    validator = ViewValidator(sets, pool, global_desc, local_desc, views, top_k=top_k, seed=seed, grid=grid,
                              precision=precision)
    if record:
        record_choice(Path(model_dir), validator, record, grid=20)
        _, info = load_rrt(model_dir)
    return validator(rrt, fusion_weight=info.get("training", {}).get("fusion_weight"))
