"""benchmarks/ann_search.py, small: its core at 20k rows on synthetic clustered descriptors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import faiss
import numpy as np
import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ann_search.py"


def _load():
    spec = importlib.util.spec_from_file_location("waldo_ann_search", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_at_k():
    bench = _load()
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench.recall_at_k(truth, truth) == 1.0
    assert bench.recall_at_k(np.array([[4, 3, 9, 9], [-1, -1, -1, -1]]), truth) == 0.25  # order does not matter
    assert bench.recall_at_k(np.array([[1, 2, 3, 4]]), np.array([[1, 2, -1, -1]])) == 1.0  # padding ignored


def _ivf_recall(bench, gallery: np.ndarray, queries: np.ndarray, nprobe: int, k: int = 100) -> float:
    """Recall@k that IVF64 must reach, worked out without its search: the exact top k among the
    gallery rows assigned to the ``nprobe`` lists whose centroids are nearest each query."""
    index, _ = bench.build_index(bench.GlobalIndexConfig(spec="IVF64,Flat", seed=0), gallery.shape[1],
                                 len(gallery), lambda pos: gallery[pos])
    quantizer = faiss.extract_index_ivf(index).quantizer
    _, row_list = quantizer.search(gallery, 1)
    _, probed = quantizer.search(queries, nprobe)
    similarity = queries @ gallery.T
    truth = np.argsort(-similarity, axis=1)[:, :k]
    in_probed_lists = np.stack([np.isin(row_list[:, 0], lists) for lists in probed])  # (Q, N)
    reachable = np.where(in_probed_lists, similarity, -np.inf)
    found = np.argsort(-reachable, axis=1)[:, :k]
    return bench.recall_at_k(found, truth)


def test_core_at_20k_rows():
    bench = _load()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 128))
    base = centres[rng.integers(0, 30, 600)] + 0.5 * rng.standard_normal((600, 128))
    configs = bench.parse_configs("Flat;IVF64,Flat:nprobe=64,2;HNSW16:efSearch=32")
    report = bench.run(base, n=20_000, queries=100, k=100, configs=configs, single=10, repeats=1)
    flat, ivf, hnsw = report["configs"]
    assert flat["spec"] == "Flat" and flat["runs"][0]["recall@100"] == 1.0  # exact against exact
    assert [r["nprobe"] for r in ivf["runs"]] == [64, 2] and ivf["trained_rows"] == 64 * 64
    # The same gallery and queries the benchmark made (its data functions are seeded).
    sources, query_sources = bench.split_base(bench.normalise(base.astype(np.float32)), 0.1, 0)
    gallery, queries = bench.make_gallery(sources, 20_000, 0.04, 0), bench.make_queries(query_sources, 100, 0.04, 0)
    for run in ivf["runs"]:
        assert run["recall@100"] == pytest.approx(_ivf_recall(bench, gallery, queries, run["nprobe"]), abs=1e-4), run
    assert ivf["runs"][0]["recall@100"] == 1.0  # every list scanned: exact
    assert hnsw["n"] == 20_000 and 0.0 < hnsw["runs"][0]["recall@100"] <= 1.0
    assert flat["index_bytes"] == 20_000 * 128 * 4
    for config in report["configs"]:
        for row in config["runs"]:
            assert row["single_ms_median"] > 0 and row["batched_ms_per_query"] > 0
    data = report["data"]
    assert data["query_sources"] == 60 and data["gallery_sources"] == 540 and data["n"] == 20_000
    assert report["notes"] == [] and isinstance(report["meets_target"], list)
