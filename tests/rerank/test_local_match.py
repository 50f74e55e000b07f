"""The local-match reranker: mutual cell matches, fused with the global similarity, offered only
where the locals are fine enough (an index built with a local stage)."""

import json

import numpy as np
import pytest

from waldo.rerank import RERANKERS, Need, RerankCandidates, RerankQuery
from waldo.rerank.base import SCORE_LOCAL_MATCH_FUSED
from waldo.rerank.local_match import LocalMatchReranker, LocalMatchSetting, mutual_match_share


def _cells(rng, n=20, dim=16):
    return rng.normal(size=(n, dim)).astype(np.float32)


def test_a_photo_matches_all_its_cells_in_any_order_and_nothing_of_an_unrelated_one():
    rng = np.random.default_rng(0)
    query = _cells(rng)
    same = query[rng.permutation(len(query))] * 3.0  # cell order and scale do not matter
    other = _cells(rng)
    half = np.concatenate([query[:10], _cells(rng, 10)])
    share = mutual_match_share(query, np.stack([same, other, half]), threshold=0.7)
    assert share[0] == pytest.approx(1.0)
    assert share[1] == pytest.approx(0.0)  # random 16-d cells never reach cosine 0.7
    assert share[2] == pytest.approx(0.5)
    noisy = query + 0.3 * _cells(rng)  # cosine about 0.95 per cell: matched at 0.7, not above 0.999
    assert mutual_match_share(query, noisy[None], threshold=0.7)[0] == pytest.approx(1.0)
    assert mutual_match_share(query, noisy[None], threshold=0.999)[0] == pytest.approx(0.0)


def test_only_mutual_nearest_cells_count():
    query = np.array([[1.0, 0.0], [0.96, 0.28]], np.float32)  # two query cells near one candidate cell
    candidate = np.array([[[1.0, 0.0], [-1.0, 0.0]]], np.float32)
    # both query cells' nearest candidate cell is the first; it is mutual with the first alone
    assert mutual_match_share(query, candidate, threshold=0.5)[0] == pytest.approx(0.5)


def test_shapes_are_checked_and_empty_inputs_score_zero():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"\(L, D\) query"):
        mutual_match_share(_cells(rng), _cells(rng)[None, :, :8], 0.7)
    assert mutual_match_share(_cells(rng), np.zeros((0, 20, 16), np.float32), 0.7).shape == (0,)


def test_matched_cells_lift_a_candidate_over_a_slightly_more_similar_look_alike():
    rng = np.random.default_rng(2)
    query = _cells(rng)
    candidates = np.stack([_cells(rng), query + 0.05 * _cells(rng), _cells(rng)])
    result = LocalMatchReranker(LocalMatchSetting(threshold=0.7, weight=1.0)).rerank(
        RerankQuery(query), RerankCandidates(candidates, np.array([0.80, 0.75, 0.10], np.float32)))
    assert list(result.order) == [1, 0, 2]
    assert result.scores[0] == pytest.approx(1.75, abs=1e-5) and result.scores[1] == pytest.approx(0.80)
    assert result.score_kind == SCORE_LOCAL_MATCH_FUSED
    unweighted = LocalMatchReranker(LocalMatchSetting(weight=0.0)).rerank(
        RerankQuery(query), RerankCandidates(candidates, np.array([0.80, 0.75, 0.10], np.float32)))
    assert list(unweighted.order) == [0, 1, 2]  # weight 0 is the global ranking


def test_a_model_folder_may_carry_its_own_setting(tmp_path):
    assert LocalMatchSetting.for_model(None) == LocalMatchSetting()
    assert LocalMatchSetting.for_model(tmp_path) == LocalMatchSetting()
    (tmp_path / "config.json").write_text(json.dumps({"extra": {"local_match": {"threshold": 0.6, "weight": 0.5}}}))
    assert LocalMatchSetting.for_model(tmp_path) == LocalMatchSetting(0.6, 0.5)
    (tmp_path / "config.json").write_text(json.dumps({"extra": {"local_match": {"threshold": 3}}}))
    with pytest.raises(ValueError, match="cosine"):
        LocalMatchSetting.for_model(tmp_path)


def test_it_is_offered_only_with_fine_locals():
    assert "local-match" not in RERANKERS.supported({Need.LOCAL_DESCRIPTORS, Need.KEYPOINTS, Need.TRAINED_RRT})
    assert "local-match" in RERANKERS.supported({Need.LOCAL_DESCRIPTORS, Need.FINE_LOCALS})
