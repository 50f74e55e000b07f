"""Issue 20: does a sharded index give the same answers as a single one?

ShardedWaldo (waldo/sharded.py) searches N shards and merges their lists by score. Global
search is exact: the merge of every shard's exact top-k is the whole index's top-k. Reranking
is not: each shard reranks *its own* global top-100, so with N shards up to N x 100 candidates
are verified, some of which the single index never reranked (ranked past its top-100), and
the reranked lists are merged by the reranker's score. This study measures what that changes,
with the untrained default model and the product's geometric reranker (GVConfig() defaults,
local features LocalFeatureConfig() defaults), on the test queries of grocery-open-cross and
coil100-open, for 1, 2 and 4 shards:

1. Each gallery image goes to shard ``shard_of(resolved path, N)``, as ShardedWaldo.add stores it.
2. **Global**: every shard's exact ranking by inner product (faiss IndexFlatIP over its own
   images, one query per call as Waldo.search runs a request), merged by score (ties to the
   lower shard): compared with the single index's global top-100 (an IndexFlatIP over the whole
   gallery, searched the same way) for equality, positions and float scores.
3. **Reranked**: each shard reranks its own top-100 with GeometricReranker.rerank_features;
   the heads are merged by the reranker's score, then the shards' tails by global similarity
   (exactly ShardedWaldo.search's merge). R@1 / R@10 / mAP of the merged ranking, queries whose
   top-1 / top-10 differ from N = 1 (the single index), top-1 results fixed / broken, and the
   candidates verified per query. Each (query, candidate) pair is verified once and reused by
   every N (the verification of a pair does not depend on the shard that asks).

    .venv/bin/python experiments/shard_rerank.py         # ~50 min on 2 cores; results/shard_rerank.json
    .venv/bin/python experiments/shard_rerank.py --doc   # docs/results.md block from the JSON
    .venv/bin/python experiments/shard_rerank.py --max-queries 15 --protocols coil100-open --shards 1,2 \\
        --out /tmp/shard_rerank.json                     # a quick check of the script
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from waldo.api import RERANK_TOP_K  # noqa: E402
from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.eval.evaluate import EvalRun  # noqa: E402
from waldo.eval.gv_eval import RunKeypoints, run_keypoints  # noqa: E402
from waldo.eval.runner import run_eval_full  # noqa: E402
from waldo.index.knn import search_flat_index  # noqa: E402
from waldo.index.shards import shard_of  # noqa: E402
from waldo.models.keypoints import LocalFeatureConfig, LocalFeatures  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig, GVRerank, Verification  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402
from waldo_experiments.gv_study import ranking_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "shard_rerank.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- shard-rerank:start -->", "<!-- shard-rerank:end -->"
HEADING = "## Sharded search: the same answers? (issue 20)"
PROTOCOLS = ("grocery-open-cross", "coil100-open")
SHARDS = (1, 2, 4)
#: What an index built by `waldo index build` stores for verification (the product's default).
FEATURES = LocalFeatureConfig()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def metrics_of(metrics: dict) -> dict:
    return {key: round(float(metrics[key]), 4) for key in ("recall@1", "recall@10", "map")}


def json_safe(value):
    """``value`` with non-finite floats as strings ("inf"): GVConfig's max_anisotropy is inf by
    default, and strict JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class CachedGeometricReranker(GeometricReranker):
    """The product's GeometricReranker whose verifications are remembered per query, by gallery
    position: the shard layouts rerank overlapping candidate sets, and verifying a pair again
    would only cost time (a pair's verification depends on the two images and the config, not on
    the other candidates). Ordering and scoring stay the product's own ``rerank_features``.

    Per query: :meth:`start_query`, :meth:`verify_rows` with every candidate any layout will ask
    for (one parallel batch keeps the worker threads busy), then :meth:`rerank_rows` per shard.
    """

    def __init__(self, config: GVConfig, keypoints: RunKeypoints, gallery_rows: np.ndarray) -> None:
        super().__init__(config)
        self.keypoints = keypoints
        self.gallery_rows = gallery_rows
        self.pairs_verified = 0
        self.verify_seconds = 0.0
        self._known: dict[int, Verification] = {}
        self._asking_rows: Sequence[int] | None = None

    def candidate(self, position: int) -> LocalFeatures:
        return self.keypoints.candidate(int(self.gallery_rows[position]))

    def start_query(self) -> None:
        self._known = {}

    def verify_rows(self, query: LocalFeatures, positions: Sequence[int]) -> None:
        missing = [int(p) for p in dict.fromkeys(positions) if int(p) not in self._known]
        if not missing:
            return
        started = time.perf_counter()
        found = super().verify_many(query, [self.candidate(p) for p in missing])
        self.verify_seconds += time.perf_counter() - started
        self.pairs_verified += len(missing)
        self._known.update(zip(missing, found))

    def rerank_rows(self, query: LocalFeatures, positions: np.ndarray, global_scores: np.ndarray) -> GVRerank:
        """``rerank_features`` of the candidates at these gallery positions (best global first)."""
        self._asking_rows = [int(p) for p in positions]
        try:
            return self.rerank_features(query, [self.candidate(p) for p in self._asking_rows], global_scores)
        finally:
            self._asking_rows = None

    def verify_many(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[Verification]:
        if self._asking_rows is None:  # not through rerank_rows: no position to remember it by
            return super().verify_many(query, candidates)
        if len(candidates) != len(self._asking_rows):
            raise RuntimeError("rerank_rows asked for other candidates than it was given")
        self.verify_rows(query, self._asking_rows)
        return [self._known[p] for p in self._asking_rows]


class ShardedGlobalSearch(NamedTuple):
    """Every shard's exact global ranking of all its images, for every query.

    positions[s]: (Q, n_s) gallery positions (into run.gallery_rows), best first; scores[s]:
    (Q, n_s) float32 inner products."""

    shard_sizes: list[int]
    positions: list[np.ndarray]
    scores: list[np.ndarray]
    seconds: float


def query_descriptors(run: EvalRun) -> np.ndarray:
    """(Q, D) global descriptors of the run's queries, in run.query_rows order
    (Extracted.global_desc holds only the images that were read, in input order)."""
    read_rows = np.flatnonzero(run.queries.ok)
    return run.queries.global_desc[np.searchsorted(read_rows, run.query_rows)]


def search_one_query_at_a_time(gallery_desc: np.ndarray, query_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the whole ranking of ``gallery_desc`` for each query, one query per
    faiss call as Waldo.search runs a request. Batched calls go through BLAS, whose rounding
    depends on the matrix shapes (one ulp between a shard and the whole gallery); one query at a
    time, each inner product is computed alone and is the same in every shard."""
    index = faiss.IndexFlatIP(gallery_desc.shape[1])
    index.add(np.ascontiguousarray(gallery_desc, np.float32))
    rows = [search_flat_index(index, query_desc[q:q + 1], len(gallery_desc)) for q in range(len(query_desc))]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def search_shards(gallery_desc: np.ndarray, query_desc: np.ndarray, owners: np.ndarray,
                  n_shards: int) -> ShardedGlobalSearch:
    """Each shard's exact search of its own images (an IndexFlatIP over them, as its index holds)."""
    started = time.perf_counter()
    sizes, positions, scores = [], [], []
    for shard in range(n_shards):
        members = np.flatnonzero(owners == shard)
        sizes.append(len(members))
        if len(members) == 0:  # a shard that owns nothing answers nothing
            positions.append(np.zeros((len(query_desc), 0), np.int64))
            scores.append(np.zeros((len(query_desc), 0), np.float32))
            continue
        shard_scores, local_positions = search_one_query_at_a_time(gallery_desc[members], query_desc)
        positions.append(members[local_positions])
        scores.append(shard_scores)
    return ShardedGlobalSearch(sizes, positions, scores, time.perf_counter() - started)


def merge_by_score(positions: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One query's lists (each best first) merged by score, ties to the earlier list and within
    a list its own order: a stable sort of their concatenation, which is what heapq.merge (used
    by ShardedWaldo.search) gives. Returns (positions, scores) in merged order."""
    all_positions, all_scores = np.concatenate(positions), np.concatenate(scores)
    order = np.argsort(-all_scores.astype(np.float64), kind="stable")
    return all_positions[order], all_scores[order]


def subset(run: EvalRun, keep: np.ndarray) -> EvalRun:
    return dataclasses.replace(run, query_rows=run.query_rows[keep], knn_indices=run.knn_indices[keep],
                               knn_scores=run.knn_scores[keep], matches=run.matches[keep],
                               n_positives=run.n_positives[keep])


def study_protocol(name: str, shard_counts: Sequence[int], max_queries: int | None) -> dict:
    protocol = get_protocol(name)
    if protocol.leave_one_out:  # each shard would have to drop the query itself: not needed for these protocols
        raise ValueError(f"{name} is a leave-one-out protocol; this study handles separate query and gallery sets")
    started = time.perf_counter()
    run, _ = run_eval_full(name, progress=False)
    log(f"{name}: {len(run.query_rows)} queries, {len(run.gallery_rows)} gallery images extracted and searched "
        f"in {time.perf_counter() - started:.0f} s")
    keypoints = run_keypoints(protocol, FEATURES, progress=True)
    n_all = len(run.query_rows)
    keep = (np.linspace(0, n_all - 1, min(max_queries, n_all)).round().astype(int) if max_queries
            else np.arange(n_all))
    keep = np.unique(keep)
    chosen = subset(run, keep)
    # The key the product shards by: the resolved absolute path, as ShardedWaldo.add stores it.
    keys = [str(Path(protocol.gallery.paths[int(row)]).resolve()) for row in run.gallery_rows]

    query_desc = query_descriptors(chosen)
    searches = {}
    for n in shard_counts:
        owners = np.array([shard_of(key, n) for key in keys], np.int64)
        searches[n] = search_shards(run.gallery.global_desc, query_desc, owners, n)
    # The single index's global top-100: the whole gallery in one IndexFlatIP, searched the same
    # way (for N = 1 this is the same computation as the layout's own, so the check bites at N > 1).
    single_scores, single_positions = search_one_query_at_a_time(run.gallery.global_desc, query_desc)
    reference_top, reference_scores = single_positions[:, :RERANK_TOP_K], single_scores[:, :RERANK_TOP_K]
    # The evaluation searched all queries in one batched call: the same images, but its scores can
    # be one ulp off and near-ties may swap; recorded, not required to be zero.
    batched_differs = int(np.any(chosen.knn_indices[:, :RERANK_TOP_K] != reference_top, axis=1).sum())

    config = GVConfig()
    merged = {n: np.zeros((len(keep), len(run.gallery_rows)), np.int64) for n in shard_counts}
    global_merged = {n: np.zeros_like(merged[n]) for n in shard_counts}
    merged_scores = {n: np.zeros(merged[n].shape, np.float32) for n in shard_counts}
    global_merged_scores = {n: np.zeros(merged[n].shape, np.float32) for n in shard_counts}
    candidates_verified = {n: 0 for n in shard_counts}
    rerank_seconds = {n: 0.0 for n in shard_counts}
    with CachedGeometricReranker(config, keypoints, run.gallery_rows) as reranker:
        for q in tqdm(range(len(keep)), desc=f"{name} queries", unit="query"):
            query = keypoints.query(int(chosen.query_rows[q]))
            reranker.start_query()
            heads = {n: [search.positions[s][q, :RERANK_TOP_K] for s in range(n)] for n, search in searches.items()}
            # Every pair any layout will verify, in one parallel batch.
            reranker.verify_rows(query, np.concatenate([p for lists in heads.values() for p in lists]))
            for n, search in searches.items():
                step = time.perf_counter()
                global_merged[n][q], global_merged_scores[n][q] = merge_by_score([p[q] for p in search.positions],
                                                                                 [s[q] for s in search.scores])
                head_positions, head_scores, tail_positions, tail_scores = [], [], [], []
                for s in range(n):
                    candidates = search.positions[s][q, :RERANK_TOP_K]
                    if len(candidates) == 0:
                        continue
                    reranked = reranker.rerank_rows(query, candidates, search.scores[s][q, :RERANK_TOP_K])
                    head_positions.append(candidates[reranked.order])
                    head_scores.append(reranked.scores)
                    tail_positions.append(search.positions[s][q, RERANK_TOP_K:])
                    tail_scores.append(search.scores[s][q, RERANK_TOP_K:])
                    candidates_verified[n] += len(candidates)
                # The reranked heads by the reranker's score, then the tails by global similarity.
                heads_merged = merge_by_score(head_positions, head_scores)
                tails_merged = merge_by_score(tail_positions, tail_scores)
                merged[n][q] = np.concatenate([heads_merged[0], tails_merged[0]])
                merged_scores[n][q] = np.concatenate([heads_merged[1], tails_merged[1]])
                rerank_seconds[n] += time.perf_counter() - step

    seconds_per_pair = reranker.verify_seconds / max(1, reranker.pairs_verified)
    single = 1  # the single index: main() makes sure it is among the layouts
    gallery_identity = np.array([protocol.gallery.identities[int(r)] for r in run.gallery_rows])
    query_identity = np.array([protocol.queries.identities[int(r)] for r in chosen.query_rows])
    top1_correct = {n: gallery_identity[merged[n][:, 0]] == query_identity for n in shard_counts}
    per_n = {}
    for n in shard_counts:
        search = searches[n]
        global_top = global_merged[n][:, :RERANK_TOP_K]
        same_positions = np.all(global_top == reference_top, axis=1)
        # Scores too: a mismatch of positions with equal scores would only be an order of ties.
        same_scores = np.all(global_merged_scores[n][:, :RERANK_TOP_K] == reference_scores, axis=1)
        top10 = merged[n][:, :10]
        top10_single = merged[single][:, :10]
        top10_differs = np.any(top10 != top10_single, axis=1)
        # Equal float32 scores in another order: the merge sends ties to the lower shard, a single
        # index keeps them in global order (fused scores of close global similarities can round equal).
        only_ties = top10_differs & np.all(merged_scores[n][:, :10] == merged_scores[single][:, :10], axis=1) & \
            np.array([set(a) == set(b) for a, b in zip(top10, top10_single)])
        per_n[str(n)] = {
            "shard_sizes": search.shard_sizes,
            "global_top100_equal": bool((same_positions & same_scores).all()),
            "global_top100_queries_differing": int((~(same_positions & same_scores)).sum()),
            "global_top100_scores_equal": bool(same_scores.all()),
            "reranked": metrics_of(ranking_metrics(protocol, chosen, merged[n])),
            "top1_differs_from_single": int((merged[n][:, 0] != merged[single][:, 0]).sum()),
            "top10_differs_from_single": int(top10_differs.sum()),
            "top10_differs_only_in_order_of_equal_scores": int(only_ties.sum()),
            "top10_set_differs_from_single": int(sum(set(a) != set(b) for a, b in zip(top10, top10_single))),
            "top1_fixed_vs_single": int((top1_correct[n] & ~top1_correct[single]).sum()),
            "top1_broken_vs_single": int((~top1_correct[n] & top1_correct[single]).sum()),
            "candidates_verified_per_query": round(candidates_verified[n] / len(keep), 2),
            "global_search_seconds": round(search.seconds, 3),
            "rerank_and_merge_seconds": round(rerank_seconds[n], 3),
            "verification_seconds_estimated": round(candidates_verified[n] * seconds_per_pair, 1),
        }
        log(f"{name} N={n}: {per_n[str(n)]}")
    return {
        "protocol": name,
        "n_queries": len(keep),
        "n_queries_in_protocol": n_all,
        "n_gallery": int(len(run.gallery_rows)),
        "global": metrics_of(ranking_metrics(protocol, chosen, single_positions)),
        "batched_evaluation_top100_queries_differing": batched_differs,
        "pairs_verified": reranker.pairs_verified,
        "verification_seconds": round(reranker.verify_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "shards": per_n,
    }


def markdown(results: dict) -> str:
    lines = [START, "",
             f"Each gallery image in shard `shard_of(path, N)`; every shard searches its own images exactly and "
             f"reranks its own global top-{RERANK_TOP_K} with the product's geometric reranker (GVConfig() "
             f"defaults: min_inliers {results['gv_config']['min_inliers']}, fusion_weight "
             f"{results['gv_config']['fusion_weight']}, fusion_scale {results['gv_config']['fusion_scale']}; "
             f"{results['features']['kind']} {results['features']['max_keypoints']} keypoints); the lists are merged "
             "by score as `ShardedWaldo.search` merges them. Untrained default model, test queries. "
             "\"differ\": queries whose top-1 / top-10 (in order) is not the single index's (N = 1).", "",
             "| protocol | shards | global top-100 = single | reranked R@1 | R@10 | mAP | top-1 differ (fixed / broken) "
             "| top-10 differ | candidates verified / query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["protocols"]:
        for n, cell in row["shards"].items():
            r = cell["reranked"]
            equal = "yes" if cell["global_top100_equal"] else f"**no** ({cell['global_top100_queries_differing']} queries)"
            lines.append(f"| {row['protocol']} ({row['n_queries']} q, {row['n_gallery']} gallery) | {n} | {equal} | "
                         f"{r['recall@1']:.4f} | {r['recall@10']:.4f} | {r['map']:.4f} | "
                         f"{cell['top1_differs_from_single']} ({cell['top1_fixed_vs_single']} / "
                         f"{cell['top1_broken_vs_single']}) | {cell['top10_differs_from_single']} | "
                         f"{cell['candidates_verified_per_query']:g} |")
    globals_ = "; ".join(f"{row['protocol']} R@1 {row['global']['recall@1']:.4f}, mAP {row['global']['map']:.4f}"
                         for row in results["protocols"])
    relative = results["gv_config"]["fusion_scale"] != "absolute"
    lines += ["", f"Global search alone: {globals_}. With N shards each query verifies up to N x {RERANK_TOP_K} "
              "candidates, and the merged list holds every shard's reranked head before any shard's tail "
              "(ShardedWaldo.search's order), so candidates ranked past the single index's top-100 can be reranked into the list"
              + (f"; the fusion bonus is in units of the {results['gv_config']['fusion_scale']} of each shard's own "
                 "candidates' global similarities, so the same pair can score differently in different layouts"
                 if relative else "") + ". "
              f"Produced by `{results['command']}` (results/shard_rerank.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--max-queries", type=int, default=None, help="evenly spaced subset of the test queries")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated protocol names")
    parser.add_argument("--shards", default=",".join(map(str, SHARDS)), help="comma-separated shard counts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (and --doc reads it)")
    args = parser.parse_args()
    if not args.doc:
        shard_counts = sorted({int(n) for n in args.shards.split(",")})
        if 1 not in shard_counts:
            parser.error("--shards must include 1: the single index every layout is compared with")
        if args.max_queries is not None and args.max_queries < 1:
            parser.error("--max-queries must be at least 1")
        command = " ".join([".venv/bin/python", "experiments/shard_rerank.py",
                            *(shlex.quote(a) for a in sys.argv[1:])])
        results = {"command": command, "gv_config": json_safe(GVConfig().model_dump()),
                   "features": FEATURES.model_dump(), "rerank_top_k": RERANK_TOP_K, "shard_counts": shard_counts,
                   "protocols": [study_protocol(name, shard_counts, args.max_queries)
                                 for name in args.protocols.split(",")]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.out}")
        return 0
    write_block(DOC, markdown(json.loads(args.out.read_text())), START, END, heading=HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
