"""rrt-consensus: neighbourhood consensus over the RRT's first candidates."""

import numpy as np
import pytest
import torch

from waldo.rerank import RERANKERS, RerankCandidates, RerankerSetup, RerankQuery, RRTReranker
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_checkpoint import save_rrt, update_rrt_training
from waldo.rerank.rrt_rerankers import (
    CONSENSUS_K,
    CONSENSUS_WEIGHT,
    ConsensusReranker,
    consensus_setting,
    neighbour_consensus,
    probabilities,
)

SKIP = RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=64, use_global_tokens=True, global_skip=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_consensus_is_the_mean_similarity_to_the_first_k_other_than_itself():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 30))
    desc = _unit(rng.normal(size=(4, 30, 8)))
    got = neighbour_consensus(scores, desc, 5)
    for q in range(4):
        first = list(np.argsort(-scores[q], kind="stable")[:5])
        for x in range(30):
            others = [n for n in first if n != x]
            assert got[q, x] == pytest.approx(np.mean([desc[q, n] @ desc[q, x] for n in others]), abs=1e-6)
        np.testing.assert_allclose(neighbour_consensus(scores[q], desc[q], 5), got[q], atol=1e-6)  # one query alike
    assert neighbour_consensus(np.zeros(1), desc[0, :1], 3).tolist() == [0.0]  # nobody else to agree with
    assert neighbour_consensus(np.zeros(0), np.zeros((0, 8)), 3).shape == (0,)
    with pytest.raises(ValueError, match="disagree"):
        neighbour_consensus(scores, desc[:, :10], 5)
    with pytest.raises(ValueError, match="k must be positive"):
        neighbour_consensus(scores, desc, 0)


def test_a_look_alike_first_answer_that_the_others_do_not_resemble_is_pushed_down():
    """Three photos of the product (alike) and one look-alike of the query ranked first: the
    look-alike agrees with none of the others, each true photo with two of them."""
    rng = np.random.default_rng(1)
    product = rng.normal(size=16)
    desc = _unit(np.stack([rng.normal(size=16), *(product + 0.3 * rng.normal(size=16) for _ in range(3))]))
    scores = np.array([5.0, 4.9, 4.8, 4.7])  # the look-alike (row 0) just ahead
    combined = scores + neighbour_consensus(scores, desc, 3)
    assert np.argmax(scores) == 0 and np.argmax(combined) != 0 and np.argmin(combined) == 0


def _folder(tmp_path, consensus=None):
    torch.manual_seed(0)
    rrt = RerankingTransformer(SKIP).eval()
    save_rrt(tmp_path, rrt, training={"mode": "frozen"})
    if consensus is not None:
        update_rrt_training(tmp_path, consensus=consensus)
    return rrt


def _inputs(n: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    query = RerankQuery(rng.standard_normal((49, 32)).astype(np.float32), _unit(rng.normal(size=32)))
    scores = np.sort(rng.uniform(0, 1, n).astype(np.float32))[::-1].copy()
    return query, RerankCandidates(rng.standard_normal((n, 49, 32)).astype(np.float32), scores,
                                   _unit(rng.normal(size=(n, 32))))


def test_the_reranker_orders_by_the_logit_plus_the_weighted_consensus(tmp_path):
    rrt = _folder(tmp_path, consensus={"k": 4, "weight": 2.0})
    reranker = RERANKERS.create("rrt-consensus", RerankerSetup(tmp_path))
    assert isinstance(reranker, ConsensusReranker) and (reranker.k, reranker.weight) == (4, 2.0)
    assert reranker.scale == pytest.approx(float(rrt.global_skip_scale.detach()))
    query, candidates = _inputs()
    logits = RRTReranker(rrt).logits(query, candidates)
    expected = logits + 2.0 * reranker.scale * neighbour_consensus(logits, candidates.global_desc, 4)
    result = reranker.rerank(query, candidates)
    np.testing.assert_array_equal(result.order, np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose(result.scores, probabilities(expected[result.order]), atol=1e-6)
    np.testing.assert_allclose(result.rrt_scores, probabilities(logits[result.order]), atol=1e-6)
    assert result.score_kind == RERANKERS.spec("rrt-consensus").score
    # weight 0 is the RRT's own order
    plain = ConsensusReranker(RRTReranker(rrt), k=4, weight=0.0).rerank(query, candidates)
    np.testing.assert_array_equal(plain.order, RRTReranker(rrt).rerank(query, candidates).order)
    with pytest.raises(ValueError, match="global_desc"):
        reranker.rerank(query, RerankCandidates(candidates.local_desc, candidates.global_scores))


def test_the_setting_defaults_and_an_rrt_without_a_global_residual_is_refused(tmp_path):
    assert consensus_setting({}) == consensus_setting({"consensus": "junk"}) == (CONSENSUS_K, CONSENSUS_WEIGHT)
    assert consensus_setting({"consensus": {"k": 7}}) == (7, CONSENSUS_WEIGHT)
    _folder(tmp_path)
    reranker = RERANKERS.create("rrt-consensus", RerankerSetup(tmp_path))
    assert (reranker.k, reranker.weight) == (CONSENSUS_K, CONSENSUS_WEIGHT)
    plain = RRTReranker(RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=64)))
    with pytest.raises(ValueError, match="global residual"):
        ConsensusReranker(plain)
    with pytest.raises(ValueError, match="k >= 1"):
        ConsensusReranker(RRTReranker(RerankingTransformer(SKIP)), k=0)


def test_only_an_rrt_with_a_global_residual_offers_consensus(tmp_path):
    from waldo.rerank import Need
    from waldo.rerank.rrt_checkpoint import has_global_residual

    _folder(tmp_path / "skip")
    save_rrt(tmp_path / "plain", RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=64)))
    assert has_global_residual(tmp_path / "skip") and not has_global_residual(tmp_path / "plain")
    assert not has_global_residual(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "rrt.json").write_text("{not json")
    assert not has_global_residual(tmp_path / "broken")
    base = {Need.LOCAL_DESCRIPTORS, Need.TRAINED_RRT}
    assert "rrt" in RERANKERS.supported(base) and "rrt-consensus" not in RERANKERS.supported(base)
    assert "rrt-consensus" in RERANKERS.supported(base | {Need.RRT_GLOBAL_RESIDUAL})
    # its verified-first form is listed only where consensus and keypoints both are
    assert "rrt-consensus+gv" not in RERANKERS.supported(base | {Need.RRT_GLOBAL_RESIDUAL})
    assert "rrt-consensus+gv" in RERANKERS.supported(base | {Need.RRT_GLOBAL_RESIDUAL, Need.KEYPOINTS})


def test_consensus_then_gv_is_the_verified_first_rule_on_the_consensus_order(tmp_path, monkeypatch):
    """rrt-consensus+gv: candidates with a geometric match lead by inliers, the rest keep
    rrt-consensus's order (experiments/consensus_gv.py scores exactly this rule)."""
    from waldo.rerank.gv import GeometricReranker, GVConfig, Verification, verified_first_order

    _folder(tmp_path)
    query, candidates = _inputs()
    n = len(candidates.global_scores)
    inliers = np.zeros(n, np.int32)
    inliers[[n - 1, 2]] = [20, 40]  # the last and the third candidate of the global list verify
    # each candidate's "keypoints" say which candidate it is (its row count); verification is faked
    keypoints = [np.zeros((i + 1, 2), np.float32) for i in range(n)]
    monkeypatch.setattr(GeometricReranker, "verify_many", lambda self, q, cands: [
        Verification(int(inliers[len(c) - 1]), "homography") for c in cands])
    consensus = RERANKERS.create("rrt-consensus", RerankerSetup(tmp_path)).rerank(query, candidates)
    with_keypoints = RerankCandidates(candidates.local_desc, candidates.global_scores, candidates.global_desc,
                                      keypoints=keypoints)
    reranker = RERANKERS.create("rrt-consensus+gv", RerankerSetup(tmp_path))
    result = reranker.rerank(RerankQuery(query.local_desc, query.global_desc, keypoints=np.zeros((500, 2))),
                             with_keypoints)
    expected = consensus.order[verified_first_order(inliers[consensus.order], GVConfig().min_inliers)]
    assert result.order.tolist() == expected.tolist()
    assert result.order[:2].tolist() == [2, n - 1]  # by inliers, whatever consensus made of them
    assert result.score_kind == "inliers" and result.inliers[:2].tolist() == [40, 20]
