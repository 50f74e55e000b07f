"""The inference scorer gives the training module's logits (fp32) or close to them (bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from waldo.models.compiled import can_compile
from waldo.rerank.base import RerankCandidates, RerankQuery
from waldo.rerank.rrt_rerankers import RRTReranker, resolve_precision
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_fast import FastRRTScorer

SMALL = {"d_model": 32, "n_layers": 3, "n_heads": 4, "ff_dim": 64}


def _model(seed: int = 0, **overrides) -> RerankingTransformer:
    torch.manual_seed(seed)
    return RerankingTransformer(RRTConfig(**{**SMALL, **overrides})).eval()


def _inputs(n: int, dim: int, seed: int = 1, grid=(7, 7)):
    g = torch.Generator().manual_seed(seed)
    cells = grid[0] * grid[1]
    return (torch.randn(cells, dim, generator=g), torch.randn(n, cells, dim, generator=g),
            torch.randn(dim, generator=g), torch.randn(n, dim, generator=g))


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}, {"use_global_tokens": True},
                                       {"activation": "gelu", "norm_first": True, "use_global_tokens": True}])
def test_fp32_scorer_equals_the_training_module(overrides):
    model = _model(**overrides)
    query, cands, query_global, cand_globals = _inputs(13, 32)
    globals_ = {"query_global": query_global, "cand_globals": cand_globals} if overrides.get("use_global_tokens") else {}
    expected = model.score_candidates(query, cands, **globals_)
    scorer = FastRRTScorer(model)
    embedded = scorer.embed_candidates(cands, globals_.get("cand_globals"))
    got = scorer.score(query, embedded, query_global=globals_.get("query_global"), batch_size=5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fp32_scorer_honours_padding_masks_like_the_training_module():
    model = _model()
    query, cands, _, _ = _inputs(6, 32)
    q_mask = torch.zeros(49, dtype=torch.bool)
    q_mask[40:] = True
    c_mask = torch.zeros(6, 49, dtype=torch.bool)
    c_mask[:, 30:] = True
    expected = model.score_candidates(query, cands, query_mask=q_mask, cand_masks=c_mask)
    scorer = FastRRTScorer(model)
    got = scorer.score(query, scorer.embed_candidates(cands, cand_masks=c_mask), query_mask=q_mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    unmasked = scorer.score(query, scorer.embed_candidates(cands))
    assert not torch.allclose(unmasked, got, atol=1e-3)  # the mask really took effect


def test_bf16_scorer_stays_close_and_keeps_most_of_the_order():
    model = _model(d_model=128, n_layers=2, ff_dim=256)
    query, cands, _, _ = _inputs(100, 128)
    expected = model.score_candidates(query, cands)
    scorer = FastRRTScorer(model, dtype=torch.bfloat16)
    got = scorer.score(query, scorer.embed_candidates(cands.half()))
    assert got.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([got, expected]))[0, 1]
    assert correlation > 0.99, correlation
    assert not torch.equal(got, expected)  # it is a different computation, not a relabelled fp32 one


def test_reranker_precisions_and_validation():
    model = _model(d_model=128, n_layers=2, ff_dim=256)
    query, cands, _, _ = _inputs(20, 128)
    q = RerankQuery(query.half().numpy())
    c = RerankCandidates(cands.half().numpy(), np.linspace(1, 0, 20, dtype=np.float32))
    reference = RRTReranker(model, precision="reference").logits(q, c)
    fast = RRTReranker(model, precision="fp32").logits(q, c)
    np.testing.assert_allclose(fast, reference, atol=1e-4)
    assert RRTReranker(model, precision="bf16").logits(q, c).shape == (20,)
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        RRTReranker(model, precision="fp8")
    with pytest.raises(ValueError, match="dtype must be"):
        FastRRTScorer(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="locals must be"):
        FastRRTScorer(model).embed_candidates(torch.zeros(2, 10, 128))


@pytest.mark.skipif(not can_compile(), reason="torch.compile needs a C++ compiler")
def test_compiled_scorer_gives_the_eager_logits_for_full_short_and_masked_batches():
    model = _model()
    query, cands, _, _ = _inputs(7, 32)
    eager = FastRRTScorer(model)
    compiled = FastRRTScorer(model, compile=True)
    embedded = eager.embed_candidates(cands)
    # batch_size 4: a full batch, then a short one padded to the compiled shape (3 of 4 rows real)
    got = compiled.score(query, embedded, batch_size=4)
    assert compiled.compiled and got.shape == (7,)
    torch.testing.assert_close(got, eager.score(query, embedded, batch_size=4), atol=1e-4, rtol=1e-4)
    c_mask = torch.zeros(7, 49, dtype=torch.bool)
    c_mask[:, 30:] = True
    masked = eager.embed_candidates(cands, cand_masks=c_mask)
    torch.testing.assert_close(compiled.score(query, masked, batch_size=4), eager.score(query, masked, batch_size=4),
                               atol=1e-4, rtol=1e-4)


def test_a_failing_compile_scores_in_eager_mode_with_a_warning(monkeypatch):
    model = _model()
    query, cands, _, _ = _inputs(3, 32)
    scorer = FastRRTScorer(model, compile=True)

    def broken(*_args):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(scorer, "_compiled", broken)
    embedded = scorer.embed_candidates(cands)
    with pytest.warns(RuntimeWarning, match="scoring in eager mode"):
        got = scorer.score(query, embedded, batch_size=4)
    assert not scorer.compiled
    torch.testing.assert_close(got, FastRRTScorer(model).score(query, embedded), atol=1e-5, rtol=1e-5)
