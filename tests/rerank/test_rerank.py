"""Rerankers: checkpoint round trip, ordering, fusion, reranking an evaluation, the API and CLI."""

import json

import numpy as np
import pytest
import torch

from waldo.data.datasets import ImageRecord, ImageSet
from waldo.data.protocols import Protocol
from waldo.eval.evaluate import evaluate_descriptors
from waldo.eval.metrics import recall_at_k
from waldo.eval.rerank_eval import rerank_run, reranked_metrics, score_top_k
from waldo.models.extract import Extracted
from waldo.rerank import (
    RERANKERS,
    FusionReranker,
    RerankCandidates,
    Reranker,
    RerankerSetup,
    RerankQuery,
    RerankResult,
    RRTReranker,
    fuse_scores,
)
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_checkpoint import has_rrt, load_rrt, save_rrt, update_rrt_training

SMALL = RRTConfig(d_model=32, n_layers=2, n_heads=4, ff_dim=64)


@pytest.fixture
def one_thread():
    """Tiny ops are dominated by thread hand-off on a busy 2-core machine; one thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rrt(seed: int = 0) -> RerankingTransformer:
    torch.manual_seed(seed)
    return RerankingTransformer(SMALL).eval()


def _inputs(n: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    query = RerankQuery(rng.standard_normal((49, 32)).astype(np.float16))
    scores = np.sort(rng.uniform(0, 1, n).astype(np.float32))[::-1].copy()
    return query, RerankCandidates(rng.standard_normal((n, 49, 32)).astype(np.float16), scores)


def test_saved_and_reloaded_reranker_scores_identically(tmp_path, one_thread):
    rrt = _rrt()
    save_rrt(tmp_path, rrt, training={"mode": "frozen"})
    assert has_rrt(tmp_path) and not has_rrt(tmp_path / "nothing")
    query, candidates = _inputs()
    before = RRTReranker(rrt).logits(query, candidates)
    reloaded = RERANKERS.create("rrt", RerankerSetup(tmp_path))
    after = reloaded.logits(query, candidates)
    np.testing.assert_array_equal(before, after)
    info = json.loads((tmp_path / "rrt.json").read_text())
    assert info["rrt"] == SMALL.model_dump() and info["grid"] == [7, 7]
    with pytest.raises(ValueError, match="fusion_weight"):
        RERANKERS.create("rrt-fusion", RerankerSetup(tmp_path))
    update_rrt_training(tmp_path, fusion_weight=0.25)
    fusion = RERANKERS.create("rrt-fusion", RerankerSetup(tmp_path))
    assert isinstance(fusion, FusionReranker) and fusion.weight == 0.25 and isinstance(fusion, Reranker)
    assert load_rrt(tmp_path)[1]["training"] == {"mode": "frozen", "fusion_weight": 0.25}
    assert {"rrt", "rrt-fusion"} <= set(RERANKERS.names())


def test_rrt_order_is_by_logit_and_scores_are_its_probability_of_one_pass(one_thread):
    reranker = RRTReranker(_rrt())
    query, candidates = _inputs(n=100)
    calls = []
    hook = reranker.rrt.classifier.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    result = reranker.rerank(query, candidates)
    hook.remove()
    assert calls == [100]  # the whole top-100 in one forward pass
    logits = reranker.logits(query, candidates)
    np.testing.assert_array_equal(result.order, np.argsort(-logits, kind="stable"))
    # Shown as the logit's probability (same order; a unit a person reads), and said so.
    np.testing.assert_allclose(result.scores, 1 / (1 + np.exp(-logits[result.order].astype(np.float64))), rtol=1e-6)
    np.testing.assert_array_equal(result.rrt_scores, result.scores)
    assert result.score_kind == "RRT probability" and np.all((result.scores >= 0) & (result.scores <= 1))


def test_rrt_fusion_reports_the_fused_score_and_the_rrts_probability(one_thread):
    reranker = FusionReranker(RRTReranker(_rrt()), 0.4)
    query, candidates = _inputs(n=20)
    result = reranker.rerank(query, candidates)
    logits = reranker.rrt.logits(query, candidates)
    fused = fuse_scores(candidates.global_scores, logits, 0.4)
    np.testing.assert_array_equal(result.scores, fused[result.order])
    np.testing.assert_allclose(result.rrt_scores, 1 / (1 + np.exp(-logits[result.order].astype(np.float64))), rtol=1e-6)
    assert result.score_kind == "similarity + RRT probability"


def test_global_tokens_need_and_use_global_descriptors(one_thread):
    torch.manual_seed(0)
    reranker = RRTReranker(RerankingTransformer(RRTConfig(**{**SMALL.model_dump(), "use_global_tokens": True})).eval())
    query, candidates = _inputs(n=5)
    with pytest.raises(ValueError, match="global_desc"):
        reranker.logits(query, candidates)
    rng = np.random.default_rng(3)
    query.global_desc = rng.standard_normal(32).astype(np.float32)
    candidates.global_desc = rng.standard_normal((5, 32)).astype(np.float32)
    first = reranker.logits(query, candidates)
    candidates.global_desc = -candidates.global_desc
    assert first.shape == (5,) and not np.allclose(first, reranker.logits(query, candidates))


def test_fusion_formula_and_extremes(one_thread):
    global_scores = np.array([0.9, 0.5, 0.1], np.float32)
    logits = np.array([-2.0, 0.0, 3.0], np.float32)
    expected = 0.3 * global_scores + 0.7 / (1 + np.exp(-logits))
    np.testing.assert_allclose(fuse_scores(global_scores, logits, 0.3), expected, rtol=1e-6)
    rrt = RRTReranker(_rrt())
    query, candidates = _inputs()
    assert FusionReranker(rrt, 1.0).rerank(query, candidates).order.tolist() == list(range(7))  # global only
    np.testing.assert_array_equal(FusionReranker(rrt, 0.0).rerank(query, candidates).order,
                                  rrt.rerank(query, candidates).order)  # sigmoid keeps the logit order
    with pytest.raises(ValueError):
        fuse_scores(global_scores, logits, 1.5)


class _Oracle:
    """Puts true matches first (knows the labels): what a perfect reranker would do."""

    name = "oracle"

    def __init__(self, labels_of_local: dict, query_label_of_local: dict) -> None:
        self.labels, self.query_labels = labels_of_local, query_label_of_local

    def scores(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        key = float(query.local_desc[0, 0])
        return np.array([self.labels[float(c[0, 0])] == self.query_labels[key] for c in candidates.local_desc],
                        np.float32)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        hits = self.scores(query, candidates)
        order = np.argsort(-hits, kind="stable")
        return RerankResult(order, hits[order])


def _toy_run(n_per_id: int = 6, n_ids: int = 5, dim: int = 8):
    """A leave-one-out EvalRun over noisy random descriptors; locals carry a unique tag in [0, 0]."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_ids), n_per_id)
    centres = rng.standard_normal((n_ids, dim))
    global_desc = centres[labels] + 1.5 * rng.standard_normal((len(labels), dim))
    global_desc = (global_desc / np.linalg.norm(global_desc, axis=1, keepdims=True)).astype(np.float32)
    local_desc = np.zeros((len(labels), 4, dim), np.float32)
    local_desc[:, 0, 0] = np.arange(len(labels))  # the tag
    records = [ImageRecord(f"/img/{i}.jpg", str(label)) for i, label in enumerate(labels)]
    images = ImageSet(records, root=None, name="toy")
    protocol = Protocol("toy", ImageSet([], None, "empty"), images, images, True, "toy")
    extracted = Extracted(global_desc, local_desc, np.ones(len(labels), bool))
    return evaluate_descriptors(protocol, extracted, extracted), labels


def test_rerank_run_keeps_recall_at_k_and_recomputes_matches():
    run, labels = _toy_run()
    tags = {float(i): int(label) for i, label in enumerate(labels)}
    top_k = 5
    reranked = rerank_run(run, _Oracle(tags, tags), top_k=top_k, progress=False)
    metrics = reranked.metrics
    assert metrics["recall@10"] == run.metrics["recall@10"] and metrics["recall@100"] == run.metrics["recall@100"]
    # Any top-5 hit moves to rank 1.
    assert metrics["recall@1"] == recall_at_k(run.matches, 5) > run.metrics["recall@1"]
    assert metrics["map@100"] >= run.metrics["map@100"] and metrics["global"] == run.metrics
    new = reranked.run
    # Matches follow the indices: recompute them from the labels of the reordered gallery.
    query_labels = labels[run.query_rows]
    expected = (new.knn_indices >= 0) & (labels[np.maximum(new.knn_indices, 0)] == query_labels[:, None])
    np.testing.assert_array_equal(new.matches, expected)
    np.testing.assert_array_equal(np.sort(new.knn_indices[:, :top_k]), np.sort(run.knn_indices[:, :top_k]))
    np.testing.assert_array_equal(new.knn_indices[:, top_k:], run.knn_indices[:, top_k:])
    # The same order through the score-based path (used for choosing the fusion weight).
    scores = score_top_k(run, _Oracle(tags, tags).scores, top_k)
    assert reranked_metrics(run, scores)[0]["recall@1"] == metrics["recall@1"]


def test_rerank_run_with_a_real_rrt_top_100_keeps_recall_100(one_thread):
    run, _ = _toy_run(n_per_id=21, n_ids=5, dim=32)  # 105 images: every query has 100 candidates
    run.queries.local_desc = np.random.default_rng(1).standard_normal((105, 9, 32)).astype(np.float16)
    tiny = RRTReranker(RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32)).eval(),
                       grid=(3, 3))
    reranked = rerank_run(run, tiny, top_k=100, progress=False)
    assert reranked.metrics["recall@100"] == run.metrics["recall@100"]
    assert reranked.metrics["rerank_top_k"] == 100 and reranked.rerank_scores.shape == (105, 100)
    assert np.all(np.diff(reranked.rerank_scores, axis=1) <= 0)  # sorted by logit


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    """A reranker folder: a small untrained model (64 px, 2 x 2 locals) and a random tiny RRT."""
    from waldo.models.untrained import untrained_model
    from waldo.rerank.rrt_checkpoint import save_reranker

    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64,
                                    progress=False)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32))
    return save_reranker(tmp_path_factory.mktemp("reranker") / "best", model, config, rrt, grid=(2, 2),
                         training={"fusion_weight": 0.5})


def test_api_search_reranks_the_indexed_top_100(reranker_dir, data_root, tmp_path, one_thread):
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv

    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "index", model_dir=reranker_dir, progress=False, gv_features=False)
    engine.add(images.paths, images.identities, num_workers=0, progress=False)
    assert has_rrt(tmp_path / "index" / "model")  # the reranker travels with the index's model
    plain = engine.search(images.paths[0], k=5).hits
    opened = Waldo.open(tmp_path / "index")
    hits = opened.search(images.paths[0], k=5, rerank="rrt").hits
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(np.diff([h.score for h in hits]) <= 0)
    # The reranked hits are the RRT's order over the global top-100 (here: all 12 images).
    everything = engine.search(images.paths[0], k=12).hits
    _, query_local = engine.describe(images.paths[0])
    local = engine.store.local_descriptors([h.id for h in everything])
    rrt = RERANKERS.create("rrt", RerankerSetup(reranker_dir, precision=opened.rrt_precision))
    logits = rrt.logits(RerankQuery(query_local), RerankCandidates(
        local, np.array([h.score for h in everything], np.float32)))
    expected = [everything[i].id for i in np.argsort(-logits, kind="stable")[:5]]
    assert [h.id for h in hits] == expected and {h.id for h in plain} <= {h.id for h in everything}
    assert len(engine.search(images.paths[0], k=3, rerank="rrt-fusion").hits) == 3


def test_api_rrt_precision_and_compile_options(reranker_dir, data_root, tmp_path, one_thread):
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv

    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "index", model_dir=reranker_dir, progress=False, gv_features=False)
    engine.add(images.paths, images.identities, num_workers=0, progress=False)
    query = images.paths[3]
    exact = Waldo.open(tmp_path / "index", rrt_precision="reference").search(query, k=12, rerank="rrt").hits
    fast = Waldo.open(tmp_path / "index", rrt_precision="fp32").search(query, k=12, rerank="rrt").hits
    compiled_engine = Waldo.open(tmp_path / "index", rrt_precision="fp32", rrt_compile=True)
    compiled = compiled_engine.search(query, k=12, rerank="rrt").hits
    assert compiled_engine._rerankers["rrt"]._scorer.compiled  # it really ran compiled code
    for other in (fast, compiled):
        assert [h.id for h in other] == [h.id for h in exact]
        np.testing.assert_allclose([h.score for h in other], [h.score for h in exact], atol=1e-4)
    with pytest.raises(ValueError, match="precision must be one of"):
        Waldo.open(tmp_path / "index", rrt_precision="fp8")


def test_cli_eval_with_rerank(reranker_dir, data_root, tmp_path, capsys, one_thread):
    from waldo.cli import main

    out = tmp_path / "m.json"
    code = main(["eval", "--protocol", "loo", "--data", str(data_root / "abo_sample"), "--model", str(reranker_dir),
                 "--rerank", "rrt", "--json", str(out), "--workers", "0", "--quiet"])
    assert code == 0 and "global" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["reranker"] == "rrt" and metrics["recall@100"] == metrics["global"]["recall@100"]
    assert main(["eval", "--protocol", "loo", "--data", str(data_root / "abo_sample"), "--rerank", "rrt",
                 "--projection", "random", "--quiet"]) == 2  # reranking needs --model


def test_the_service_compiles_rrt_in_its_warm_up_unless_told_not_to(reranker_dir, data_root, tmp_path, one_thread):
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv
    from waldo.serve.service import SearchService
    from waldo.serve.settings import ServeSettings

    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "index", model_dir=reranker_dir, progress=False, gv_features=False)
    engine.add(images.paths[:6], images.identities[:6], num_workers=0, progress=False)
    service = SearchService.open(tmp_path / "index", ServeSettings())
    assert "rrt" in service.rerankers
    assert service.engine._rerankers["rrt"]._scorer.compiled  # compiled by the warm-up query
    plain = SearchService.open(tmp_path / "index", ServeSettings(compile_rrt=False))
    assert not plain.engine._rerankers["rrt"]._scorer.compiled


def test_an_rrt_reads_its_tokens_and_leaves_match_cells_stored_after_them(tmp_path, one_thread):
    rrt = _rrt()
    save_rrt(tmp_path, rrt, training={"mode": "frozen"})
    query, candidates = _inputs()
    rng = np.random.default_rng(5)
    cells_q = rng.standard_normal((20, 32)).astype(np.float16)  # "match cells" packed after the 49 tokens
    cells_c = rng.standard_normal((len(candidates), 20, 32)).astype(np.float16)
    packed_query = RerankQuery(np.concatenate([query.local_desc, cells_q]))
    packed = RerankCandidates(np.concatenate([candidates.local_desc, cells_c], 1), candidates.global_scores)
    layout = {"tokens": 49, "cells": 40, "cell_dim": 16, "width": 32, "grid": [5, 8]}
    reader = RERANKERS.create("rrt", RerankerSetup(tmp_path, match_cells=layout))
    np.testing.assert_array_equal(reader.logits(packed_query, packed), RRTReranker(rrt).logits(query, candidates))
    with pytest.raises(ValueError):  # without the layout the extra rows are not tokens of its grid
        RERANKERS.create("rrt", RerankerSetup(tmp_path)).logits(packed_query, packed)
