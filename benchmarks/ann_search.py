"""Approximate global search at a million images: exact Flat vs IVF and HNSW (issue 7).

Target: recall@100 >= 0.99 against exact search at <= 5 ms per query.

The gallery is built from *real* descriptors, not random vectors (ANN recall depends on how
the data clusters; uniform random vectors are the hardest and least realistic case):

* base: the 128-d global descriptors of the 2781 Grocery Store training photos
  (``grocery-open`` train split) from the project's untrained model (``runs/untrained-lite0``:
  efficientnet_lite0, PCA-whitened). They are read from the neighbour-mining cache
  (``cache/neighbours/<model>-.../global.npy``) when it exists, else extracted once and cached
  under ``cache/ann_search/``. ``--descriptors FILE.npy`` uses any (n, 128) array instead.
* held out: 10% of the base photos (seeded) never enter the gallery; queries are made from them.
* gallery: the other 90% tiled to ``--n`` rows, each copy plus seeded Gaussian noise of
  ``--sigma`` per dimension, then L2-normalised. Without noise a tiled copy would be an exact
  duplicate (hundreds of tied scores per photo, a degenerate top-100). sigma = 0.04 gives a
  noise vector of norm ~0.45 (0.04 x sqrt(128)), about 2/3 of the median distance between a
  real photo and its nearest other photo (0.67): the copies of one photo form a cloud as wide
  as the gaps between neighbouring photos, so clouds overlap as in a denser real collection,
  and each copy keeps cosine ~0.9 with its photo.
* queries: ``--queries`` rows, held-out photo ``j % n_held_out`` plus its own noise of the
  same sigma, normalised: realistic queries (photos the gallery has never seen) that are all
  distinct.

Ground truth is exact ``IndexFlatIP`` top-``k`` (k = 100). Every approximate index is built
with :func:`waldo.index.global_index.build_index`, the very code a snapshot runs (seeded training
sample of 64 rows per IVF list, chunked adds), so build times are what an index pays per
generation. Per config and search parameter: recall@100, batched latency (all queries in one
call, median of ``--repeats`` runs / Q) and single-query latency (median over ``--single``
one-query calls, repeated ``--repeats`` times after a warm-up pass), both through
:func:`waldo.index.knn.search_flat_index` as the store calls it. Memory: the index payload
computed from its structures (``index_bytes``) and the process RSS growth while building.

2 cores cannot build an HNSW graph of a million vectors within the benchmark's time budget
(``--budget-s``): the HNSW build is timed on 20k rows first, extrapolated (n log n), and the
graph is built on the largest gallery prefix that fits, with its own exact ground truth; the
output says so (``n`` and ``note`` of that config). Configs that no longer fit are skipped
and listed in ``notes``.

    .venv/bin/python benchmarks/ann_search.py                    # N = 1,000,000, about 9 minutes
    .venv/bin/python benchmarks/ann_search.py --n 100000 --out /tmp/ann.json
    .venv/bin/python benchmarks/ann_search.py --configs "IVF1024,Flat:nprobe=16,32;HNSW32:efSearch=128"
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from waldo.index.global_index import (
    FLAT,
    GlobalIndexConfig,
    build_index,
    kind,
    search_parameters,
)
from waldo.index.knn import search_flat_index

ROOT = Path(__file__).resolve().parents[1]
UNTRAINED_MODEL = ROOT / "runs" / "untrained-lite0"
DEFAULT_CONFIGS = "Flat;IVF1024,Flat:nprobe=8,16,32,64;IVF4096,Flat:nprobe=16,32,64,128;HNSW32:efSearch=64,128,256"
TARGET = {"recall@100": 0.99, "ms_per_query": 5.0}
HNSW_PROBE_ROWS = 20_000


# ----------------------------------------------------------------------------- data
def find_cached_descriptors() -> tuple[np.ndarray, str] | None:
    """The untrained model's global descriptors of the grocery-open training photos from the
    neighbour-mining cache (or this script's own cache), with where they came from."""
    from waldo.data.protocols import get_protocol
    from waldo.models.checkpoint import load_model, model_hash
    from waldo.paths import default_cache_root
    from waldo.train.mining import list_hash

    if not UNTRAINED_MODEL.is_dir():
        return None
    sha = model_hash(load_model(UNTRAINED_MODEL)[0])
    paths = get_protocol("grocery-open").train.paths
    want = list_hash(paths)
    root = default_cache_root()
    own = root / "ann_search" / f"{sha[:16]}-{want[:16]}-global.npy"
    if own.is_file():
        return np.load(own, allow_pickle=False), str(own)
    for manifest in sorted((root / "neighbours").glob(f"{sha[:12]}-*/manifest.json")):
        inputs = json.loads(manifest.read_text()).get("inputs", {})
        if inputs.get("model_hash") == sha and inputs.get("query_list_hash") == want:
            g = np.load(manifest.parent / "global.npy", allow_pickle=False)
            ok = np.load(manifest.parent / "ok.npy", allow_pickle=False)
            return g[ok], str(manifest.parent / "global.npy")
    return None


def extract_descriptors_once() -> tuple[np.ndarray, str]:
    """Extract the grocery-open training photos with the untrained model and cache them
    (minutes on 2 cores; only when no cache exists)."""
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.models.checkpoint import load_model, model_hash
    from waldo.models.extract import extract_descriptors
    from waldo.models.untrained import untrained_model
    from waldo.paths import default_cache_root
    from waldo.train.mining import list_hash

    protocol = get_protocol("grocery-open")
    if UNTRAINED_MODEL.is_dir():
        model, config = load_model(UNTRAINED_MODEL)
    else:
        # 128-d global descriptors, as this benchmark has always measured (and its results say)
        model, config = untrained_model("efficientnet_lite0", projection="pca-whiten", fit_paths=protocol.train.paths,
                                        fit_source="grocery-open:train")
    paths = protocol.train.paths
    out = extract_descriptors(model, paths, get_transform(config.transform, config.image_size))
    g = np.asarray(out.global_desc, dtype=np.float32)
    target = (default_cache_root() / "ann_search"
              / f"{model_hash(model)[:16]}-{list_hash(paths)[:16]}-global.npy")
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, g, allow_pickle=False)
    return g, str(target)


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def split_base(base: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery sources, query sources): a seeded ``held_out`` fraction of the base rows."""
    order = np.random.default_rng(seed).permutation(len(base))
    cut = max(1, round(len(base) * held_out))
    return base[np.sort(order[cut:])], base[np.sort(order[:cut])]


def make_gallery(sources: np.ndarray, n: int, sigma: float, seed: int) -> np.ndarray:
    """(n, d) float32: row i = normalise(sources[i % len(sources)] + N(0, sigma^2)).

    Row order cycles through all sources, so any prefix is a fair sample of the gallery (the
    HNSW fallback builds on a prefix)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, sources.shape[1]), dtype=np.float32)
    for s in range(0, n, 1 << 17):
        idx = np.arange(s, min(s + (1 << 17), n)) % len(sources)
        chunk = sources[idx] + rng.standard_normal((len(idx), sources.shape[1]), dtype=np.float32) * sigma
        out[s : s + len(idx)] = normalise(chunk)
    return out


def make_queries(sources: np.ndarray, q: int, sigma: float, seed: int) -> np.ndarray:
    """(q, d) float32 queries: held-out source ``j % len(sources)`` plus its own noise."""
    rng = np.random.default_rng(seed + 1)
    x = sources[np.arange(q) % len(sources)] + rng.standard_normal((q, sources.shape[1]), dtype=np.float32) * sigma
    return normalise(x.astype(np.float32))


def data_stats(base: np.ndarray, sigma: float) -> dict[str, float]:
    """Distances that justify sigma: nearest-other-photo distance of the base, noise norm."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    s, _ = index.search(np.ascontiguousarray(base, dtype=np.float32), 2)
    nn = np.sqrt(np.maximum(2 - 2 * s[:, 1], 0))
    return {"median_nn_distance_between_photos": round(float(np.median(nn)), 4),
            "expected_noise_norm": round(sigma * math.sqrt(base.shape[1]), 4),
            "expected_cosine_copy_vs_photo": round(1 / math.sqrt(1 + sigma**2 * base.shape[1]), 4)}


# ----------------------------------------------------------------------------- measuring
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; -1 padding ignored)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(int((t >= 0).sum()), 1)
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def index_bytes(index: faiss.Index) -> int:
    """Payload of a faiss index computed from its structures (vectors, ids, lists, graph)."""
    d, n = index.d, index.ntotal
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(n * (ivf.code_size + 8) + ivf.nlist * d * 4)
    core = faiss.downcast_index(index)
    if isinstance(core, faiss.IndexHNSW):
        h = core.hnsw
        storage = faiss.downcast_index(core.storage)
        return int(n * storage.code_size + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8)
    return int(n * d * 4)


def time_searches(index: faiss.Index, queries: np.ndarray, k: int, params: dict[str, int] | None,
                  single: int, repeats: int) -> tuple[np.ndarray, dict[str, float]]:
    """(batched result ids, latency figures in ms) for one index and search parameters."""
    p = search_parameters(index, params)
    search_flat_index(index, queries[: min(len(queries), 16)], k, params=p)  # warm-up
    batched = []
    ids = np.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = search_flat_index(index, queries, k, params=p)
        batched.append((time.perf_counter() - t0) * 1e3 / len(queries))
    one = queries[: min(single, len(queries))]
    for i in range(len(one)):  # warm-up pass: page in lists / graph nodes touched
        search_flat_index(index, one[i : i + 1], k, params=p)
    calls = []
    for _ in range(repeats):
        for i in range(len(one)):
            t0 = time.perf_counter()
            search_flat_index(index, one[i : i + 1], k, params=p)
            calls.append((time.perf_counter() - t0) * 1e3)
    return ids, {
        "single_ms_median": round(statistics.median(calls), 4),
        "single_ms_p90": round(float(np.percentile(calls, 90)), 4),
        "batched_ms_per_query": round(statistics.median(batched), 4),
    }


def parse_configs(text: str) -> list[tuple[str, str | None, list[int]]]:
    """``"Flat;IVF1024,Flat:nprobe=8,16;HNSW32:efSearch=64"`` -> [(spec, param, values)]."""
    out: list[tuple[str, str | None, list[int]]] = []
    for item in (t.strip() for t in text.split(";")):
        if not item:
            continue
        spec, sep, tail = item.rpartition(":")
        if not sep:
            out.append((item, None, []))
            continue
        name, eq, values = tail.partition("=")
        if not eq or not values:
            raise ValueError(f"config {item!r}: expected SPEC:PARAM=V1,V2")
        out.append((spec, name.strip(), [int(v) for v in values.split(",") if v.strip()]))
    return out


def run_config(spec: str, param: str | None, values: list[int], gallery: np.ndarray, queries: np.ndarray,
               truth: np.ndarray, *, k: int, single: int, repeats: int, seed: int) -> dict[str, Any]:
    """Build ``spec`` over ``gallery`` as a snapshot would and measure each search parameter."""
    gc.collect()
    rss0 = rss_bytes()
    index, status = build_index(GlobalIndexConfig(spec=spec, seed=seed), gallery.shape[1], len(gallery),
                                lambda pos: gallery[pos])
    result: dict[str, Any] = {
        "spec": spec, "n": len(gallery), "built": status.built, "build_s": status.build_seconds,
        "train_s": status.train_seconds, "trained_rows": status.trained_rows,
        "index_bytes": index_bytes(index), "bytes_per_vector": round(index_bytes(index) / len(gallery), 1),
        "rss_growth_mb": round((rss_bytes() - rss0) / 2**20, 1), "runs": [],
    }
    if status.reason:
        result["note"] = status.reason
    for value in values or [None]:
        params = {param: value} if param and value is not None else None
        if params and param not in {"ivf": ("nprobe",), "hnsw": ("efSearch",)}.get(kind(index), ()):
            raise ValueError(f"{param} does not apply to {spec}")
        ids, latency = time_searches(index, queries, k, params, single, repeats)
        row = {**(params or {}), "recall@100": round(recall_at_k(ids, truth), 5), **latency}
        print(f"  {spec} {params or ''}: {row}", file=sys.stderr, flush=True)
        result["runs"].append(row)
    del index
    gc.collect()
    return result


def hnsw_rows_that_fit(spec: str, gallery: np.ndarray, seconds: float, seed: int) -> tuple[int, float, float]:
    """(rows, estimated build s, probe build s): the largest gallery prefix whose HNSW build is
    estimated (n log n from a probe build of HNSW_PROBE_ROWS rows) to take <= ``seconds``."""
    n = len(gallery)
    probe = min(HNSW_PROBE_ROWS, n)
    t0 = time.perf_counter()
    build_index(GlobalIndexConfig(spec=spec, seed=seed), gallery.shape[1], probe, lambda pos: gallery[pos])
    t_probe = time.perf_counter() - t0

    def estimate(rows: int) -> float:
        return t_probe * rows / probe * math.log(max(rows, 2)) / math.log(max(probe, 2))

    rows = n
    while rows > probe and estimate(rows) > seconds:
        rows = max(probe, int(rows * 0.8) // 10_000 * 10_000)
    return rows, estimate(rows), t_probe


def run(base: np.ndarray, *, n: int, queries: int = 1000, k: int = 100, sigma: float = 0.04,
        held_out: float = 0.1, configs: list[tuple[str, str | None, list[int]]] | None = None,
        single: int = 200, repeats: int = 3, seed: int = 0, budget_s: float = 540.0) -> dict[str, Any]:
    """The benchmark's core on given base descriptors; returns the report (see the module doc)."""
    start = time.perf_counter()
    configs = configs if configs is not None else parse_configs(DEFAULT_CONFIGS)
    base = normalise(np.array(base, dtype=np.float32))
    sources, query_sources = split_base(base, held_out, seed)
    gallery = make_gallery(sources, n, sigma, seed)
    q = make_queries(query_sources, queries, sigma, seed)
    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(gallery.shape[1])
    exact.add(gallery)
    _, truth = search_flat_index(exact, q, k)
    truth_s = time.perf_counter() - t0
    del exact
    report: dict[str, Any] = {
        "data": {"n": n, "dim": int(base.shape[1]), "base_photos": len(base), "gallery_sources": len(sources),
                 "query_sources": len(query_sources), "queries": queries, "k": k, "sigma": sigma, "seed": seed,
                 **data_stats(base, sigma)},
        "ground_truth_s": round(truth_s, 2),
        "target": TARGET,
        "configs": [],
        "notes": [],
    }
    for i, (spec, param, values) in enumerate(configs):
        left = budget_s - (time.perf_counter() - start)
        rows, cfg_truth, note = n, truth, ""
        if left < 20:
            report["notes"].append(f"{spec}: skipped, the {budget_s:.0f} s budget is spent")
            continue
        if spec != FLAT and spec.upper().startswith("HNSW") and n > HNSW_PROBE_ROWS:
            # keep ~20% of what is left for the searches and the configs after this one
            share = left * 0.8 / (1 + 0.5 * (len(configs) - i - 1))
            rows, estimate, probe_s = hnsw_rows_that_fit(spec, gallery, share, seed)
            if rows < n:
                note = (f"built on the first {rows} of {n} rows: the full build is estimated at "
                        f"{estimate * (n / rows) * math.log(n) / math.log(rows):.0f} s on this machine "
                        f"({probe_s:.1f} s for {min(HNSW_PROBE_ROWS, n)} rows), beyond the budget; "
                        f"recall is against exact search over the same {rows} rows")
                exact = faiss.IndexFlatIP(gallery.shape[1])
                exact.add(gallery[:rows])
                _, cfg_truth = search_flat_index(exact, q, k)
                del exact
        sub = gallery[:rows]
        single_n = min(single, 50) if spec == FLAT else single  # exact single queries are slow
        print(f"== {spec} on {rows} rows", file=sys.stderr, flush=True)
        result = run_config(spec, param, values, sub, q, cfg_truth, k=k, single=single_n, repeats=repeats,
                            seed=seed)
        if note:
            result["note"] = note
            report["notes"].append(f"{spec}: {note}")
        report["configs"].append(result)
    report["meets_target"] = [
        {"spec": c["spec"], "n": c["n"], **{key: v for key, v in r.items() if key in ("nprobe", "efSearch")},
         "recall@100": r["recall@100"], "single_ms_median": r["single_ms_median"]}
        for c in report["configs"] for r in c["runs"]
        if r["recall@100"] >= TARGET["recall@100"] and r["single_ms_median"] <= TARGET["ms_per_query"]
    ]
    report["total_s"] = round(time.perf_counter() - start, 1)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The docs/results.md block: data, one table row per index and search parameter, notes."""
    d, env = report["data"], report.get("environment", {})
    intro = (
        f"{d['n']:,} gallery vectors: {d['gallery_sources']} real 128-d global descriptors of Grocery Store photos "
        f"(untrained lite0, PCA-whitened) tiled with Gaussian noise sigma={d['sigma']} per dimension (noise norm "
        f"{d['expected_noise_norm']}, median distance between neighbouring photos {d['median_nn_distance_between_photos']}), "
        f"L2-normalised; {d['queries']} queries from {d['query_sources']} held-out photos plus noise. Recall@{d['k']} "
        f"against exact `IndexFlatIP`; single-query latency is the median one-query call through "
        f"`search_flat_index`; faiss {env.get('faiss', '?')}, {env.get('faiss_omp_threads', '?')} OpenMP threads, "
        f"{env.get('cpu_count', '?')} cores. Target: recall@100 >= {report['target']['recall@100']} at <= "
        f"{report['target']['ms_per_query']} ms per query."
    )
    lines = [
        intro,
        "",
        "| index | rows | build s (of which training) | index MB | search param | recall@100 | ms/query, single | ms/query, batched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        for r in c["runs"]:
            param = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("nprobe", "efSearch")) or "-"
            lines.append(f"| `{c['spec']}` | {c['n']:,} | {c['build_s']:.1f} ({c['train_s']:.1f}) | "
                         f"{c['index_bytes'] / 2**20:.0f} | {param} | {r['recall@100']:.4f} | "
                         f"{r['single_ms_median']:.3f} | {r['batched_ms_per_query']:.3f} |")
    lines.append("")
    if report["notes"]:
        lines += [f"Note: {n}" for n in report["notes"]] + [""]
    lines.append(f"Whole run {report['total_s']:.0f} s. Produced by `.venv/bin/{report.get('command', 'python benchmarks/ann_search.py')}`"
                 f" (JSON: `results/ann_search.json`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.04, help="per-dimension noise of each tiled copy")
    ap.add_argument("--held-out", type=float, default=0.1, help="fraction of photos kept out for queries")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="SPEC[:PARAM=V1,V2];... (faiss factory strings)")
    ap.add_argument("--single", type=int, default=200, help="queries timed one call at a time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget; HNSW shrinks to fit")
    ap.add_argument("--descriptors", type=Path, default=None, help="(n, d) .npy of base descriptors")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "ann_search.json")
    ap.add_argument("--doc", action="store_true", help="also rewrite the block of docs/results.md")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.descriptors is not None:
        base, source = np.load(args.descriptors, allow_pickle=False), str(args.descriptors)
    else:
        found = find_cached_descriptors()
        base, source = found if found is not None else extract_descriptors_once()
    report = run(base, n=args.n, queries=args.queries, k=args.k, sigma=args.sigma, held_out=args.held_out,
                 configs=parse_configs(args.configs), single=args.single, repeats=args.repeats, seed=args.seed,
                 budget_s=args.budget_s - (time.perf_counter() - start))
    report["data"]["descriptors"] = source
    report["command"] = "python benchmarks/ann_search.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report["environment"] = {
        "python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None and str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.doc:
        from waldo_experiments.doc_blocks import markers, write_block

        start, end = markers("ann")
        write_block(ROOT / "docs" / "results.md", f"{start}\n\n{markdown(report)}\n\n{end}", start, end,
                    heading="## Approximate global search (issue 7)")
    return report


if __name__ == "__main__":
    main()
