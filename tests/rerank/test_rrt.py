"""The Reranking Transformer: shapes, size, masking, positions, segments, training signal."""

import copy

import pytest
import torch
import torch.nn.functional as F

from waldo.rerank.rrt import (
    SEGMENT_CANDIDATE,
    SEGMENT_QUERY,
    RerankingTransformer,
    RRTConfig,
    flops_per_pair,
    sine_position_embedding,
)

# A small model for the behavioural tests; the default (reference) size is tested where it matters.
SMALL = RRTConfig(d_model=32, n_layers=2, n_heads=4, ff_dim=64)


@pytest.fixture
def one_thread():
    """Tiny ops are dominated by thread hand-off on a busy 2-core machine; one thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small_model(seed: int = 0, **overrides) -> RerankingTransformer:
    torch.manual_seed(seed)
    config = RRTConfig(**{**SMALL.model_dump(), **overrides})
    return RerankingTransformer(config).eval()


def _locals(batch: int, n_locals: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, n_locals, dim, generator=torch.Generator().manual_seed(seed))


def test_default_config_size_flops_and_shapes():
    torch.manual_seed(0)
    model = RerankingTransformer().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 1.98e6) / 1.98e6 < 0.05, n_params
    assert model.segment_embedding.weight.shape == (4, 128)
    assert abs(flops_per_pair(RRTConfig()) - 0.42e9) / 0.42e9 < 0.02
    with torch.inference_mode():
        logits = model(_locals(3, 49, 128, 1), _locals(3, 49, 128, 2))
        tokens, padding = model.embed(_locals(3, 49, 128, 1), _locals(3, 49, 128, 2))
    assert logits.shape == (3,) and logits.dtype == torch.float32
    assert tokens.shape == (3, 100, 128) and padding is None


def test_config_json_round_trip_and_validation():
    config = RRTConfig(d_model=64, n_layers=3, use_global_tokens=True, pos_scale=6.28)
    assert RRTConfig.model_validate_json(config.model_dump_json()) == config
    # rrt.json holds what the dataclass wrote before the config became a pydantic model, plus the
    # global-skip option; a file written before that option reads as the same (skip-less) model.
    before = {"d_model": 128, "n_layers": 6, "n_heads": 4, "ff_dim": 1024, "dropout": 0.0, "activation": "relu",
              "norm_first": False, "use_global_tokens": False, "pos_scale": 2.0, "pos_temperature": 10000.0}
    assert RRTConfig().model_dump() == {**before, "global_skip": False, "global_skip_init": 10.0,
                                        "global_skip_from": "token", "match_skip": False,
                                        "match_skip_threshold": 0.7, "match_skip_init": 5.0}
    assert RRTConfig.model_validate(before) == RRTConfig()
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RRTConfig.model_validate({"d_model": 64, "depth": 3})
    with pytest.raises(ValueError, match="n_heads"):
        RRTConfig(d_model=36, n_heads=8)
    with pytest.raises(ValueError, match="frozen"):
        config.d_model = 32


def test_score_candidates_matches_forward_in_batches(one_thread):
    model = _small_model()
    query = _locals(1, 9, 32, 1)[0]
    cands = _locals(7, 9, 32, 2)
    scores = model.score_candidates(query, cands, grid=(3, 3), batch_size=3)
    with torch.inference_mode():
        expected = model(query[None].expand(7, -1, -1), cands, grid=(3, 3))
    assert scores.shape == (7,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert model.score_candidates(query, cands[:0], grid=(3, 3)).shape == (0,)


def test_padding_tokens_do_not_change_the_logit(one_thread):
    model = _small_model()
    query, cand = _locals(2, 9, 32, 1), _locals(2, 9, 32, 2)
    junk_query = torch.cat([query, 100 * _locals(2, 4, 32, 3)], dim=1)  # 4 junk tokens each
    junk_cand = torch.cat([cand, 100 * _locals(2, 3, 32, 4)], dim=1)
    query_mask = torch.zeros(2, 13, dtype=torch.bool)
    query_mask[:, 9:] = True
    cand_mask = torch.zeros(2, 12, dtype=torch.bool)
    cand_mask[:, 9:] = True
    with torch.inference_mode():
        clean = model(query, cand, grid=(3, 3))
        padded = model(junk_query, junk_cand, query_mask=query_mask, cand_mask=cand_mask, grid=(3, 3))
    torch.testing.assert_close(padded, clean, atol=1e-5, rtol=1e-5)
    # Training runs the unfused path (grad enabled): the mask must hold there too.
    padded_with_grad = model(junk_query, junk_cand, query_mask=query_mask, cand_mask=cand_mask, grid=(3, 3))
    torch.testing.assert_close(padded_with_grad.detach(), clean, atol=1e-5, rtol=1e-5)
    # Masking a real cell (not padding) must matter, or the test above proves nothing.
    with torch.inference_mode():
        query_mask[:, 0] = True
        changed = model(junk_query, junk_cand, query_mask=query_mask, cand_mask=cand_mask, grid=(3, 3))
    assert not torch.allclose(changed, clean, atol=1e-4)
    with pytest.raises(ValueError, match="padding"):  # tokens past the grid must be masked
        model(junk_query, cand, grid=(3, 3))


def test_position_embedding_is_distinct_per_cell_and_shared_by_query_and_candidate():
    position = sine_position_embedding((7, 7), 128, scale=2.0, temperature=10000.0)
    assert position.shape == (49, 128)
    distances = torch.cdist(position, position) + torch.eye(49)
    assert distances.min() > 1e-3  # every cell differs from every other
    # DETR layout: first half is the row, second half the column; (sin, cos) pairs.
    # Cell (0, 0): normalised row = (0 + 1) / 7 * 2; the first frequency is 1 (temperature**0).
    first_row = torch.tensor(2 / 7)
    torch.testing.assert_close(position[0, :2], torch.stack([first_row.sin(), first_row.cos()]))
    # Channels 2j and 2j+1 share the frequency temperature**(2j / 64), j = 1 here.
    torch.testing.assert_close(position[0, 2:4], torch.stack([(first_row / 10000 ** (2 / 64)).sin(),
                                                              (first_row / 10000 ** (2 / 64)).cos()]))
    assert torch.equal(position[0, :64], position[6, :64])  # same row, same row half
    assert torch.equal(position[0, 64:], position[42, 64:])  # same column, same column half

    model = _small_model()
    query, cand = _locals(2, 9, 32, 1), _locals(2, 9, 32, 2)
    with torch.no_grad():
        tokens, _ = model.embed(query, cand, grid=(3, 3))
        segments = model.segment_embedding.weight
        query_pos = tokens[:, 1:10] - query - segments[SEGMENT_QUERY]
        cand_pos = tokens[:, 11:20] - cand - segments[SEGMENT_CANDIDATE]
    expected = sine_position_embedding((3, 3), 32).expand(2, -1, -1)
    torch.testing.assert_close(query_pos, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cand_pos, expected, atol=1e-5, rtol=0)


def test_segments_matter(one_thread):
    model = _small_model()
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        weight = swapped.segment_embedding.weight
        weight[[SEGMENT_QUERY, SEGMENT_CANDIDATE]] = weight[[SEGMENT_CANDIDATE, SEGMENT_QUERY]].clone()
    query, cand = _locals(4, 9, 32, 1), _locals(4, 9, 32, 2)
    with torch.inference_mode():
        assert not torch.allclose(model(query, cand, grid=(3, 3)), swapped(query, cand, grid=(3, 3)), atol=1e-4)


def test_global_tokens_option(one_thread):
    model = _small_model(use_global_tokens=True)
    assert model.segment_embedding.weight.shape == (6, 32)
    query, cand = _locals(2, 9, 32, 1), _locals(2, 9, 32, 2)
    query_global = F.normalize(torch.randn(2, 32), dim=1)
    cand_global = F.normalize(torch.randn(2, 32), dim=1)
    with torch.inference_mode():
        tokens, _ = model.embed(query, cand, query_global=query_global, cand_global=cand_global, grid=(3, 3))
        logits = model(query, cand, query_global=query_global, cand_global=cand_global, grid=(3, 3))
        other = model(query, cand, query_global=query_global, cand_global=-cand_global, grid=(3, 3))
    assert tokens.shape == (2, 22, 32) and logits.shape == (2,)
    assert not torch.allclose(logits, other, atol=1e-4)
    with pytest.raises(ValueError, match="required"):
        model(query, cand, grid=(3, 3))
    with pytest.raises(ValueError, match="use_global_tokens is off"):
        _small_model()(query, cand, query_global=query_global, cand_global=cand_global, grid=(3, 3))


def test_eval_is_deterministic_and_shapes_are_checked(one_thread):
    model = _small_model()
    query, cand = _locals(3, 9, 32, 1), _locals(3, 9, 32, 2)
    with torch.inference_mode():
        assert torch.equal(model(query, cand, grid=(3, 3)), model(query, cand, grid=(3, 3)))
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        model(_locals(3, 9, 16, 1), cand, grid=(3, 3))
    with pytest.raises(ValueError, match="cells"):
        model(query, cand, grid=(4, 4))
    with pytest.raises(ValueError, match="batch"):
        model(query, cand[:2], grid=(3, 3))


def test_gradient_reaches_every_parameter(one_thread):
    model = _small_model().train()
    logits = model(_locals(4, 9, 32, 1), _locals(4, 9, 32, 2), grid=(3, 3))
    F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_overfits_a_tiny_pair_set(one_thread):
    """Positives are a noisy copy of the query; negatives are unrelated. 64 pairs, 150 steps."""
    model = _small_model(seed=0).train()
    generator = torch.Generator().manual_seed(0)
    n_pairs, n_locals, dim = 64, 9, 32
    labels = (torch.arange(n_pairs) % 2).float()
    query = torch.randn(n_pairs, n_locals, dim, generator=generator)
    noisy_copy = query + 0.1 * torch.randn(n_pairs, n_locals, dim, generator=generator)
    unrelated = torch.randn(n_pairs, n_locals, dim, generator=generator)
    cand = torch.where(labels[:, None, None].bool(), noisy_copy, unrelated)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(150):
        loss = F.binary_cross_entropy_with_logits(model(query, cand, grid=(3, 3)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = ((model(query, cand, grid=(3, 3)) > 0).float() == labels).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_flops_formula_counts_tokens():
    config = RRTConfig()
    tokens = 100
    expected = 2 * (6 * (4 * tokens * 128**2 + 2 * tokens**2 * 128 + 2 * tokens * 128 * 1024) + 128)
    assert flops_per_pair(config) == expected
    with_globals = flops_per_pair(RRTConfig(use_global_tokens=True))
    assert with_globals > flops_per_pair(config)


def test_a_wider_global_descriptor_reaches_the_tokens_as_the_locals_mean(one_thread):
    """An index whose global descriptor is wider than the RRT's tokens (DescriptorModel.
    global_dim) hands the reranker the locals' normalised mean instead, which is the global
    descriptor of a shared-projection model."""
    import numpy as np

    from waldo.models.descriptor import token_global
    from waldo.rerank.base import RerankCandidates, RerankQuery
    from waldo.rerank.rrt_rerankers import RRTReranker

    reranker = RRTReranker(_small_model(use_global_tokens=True), grid=(3, 3))
    query_locals, cand_locals = _locals(1, 9, 32, 1)[0], _locals(5, 9, 32, 2)
    scores = np.linspace(0.9, 0.5, 5).astype(np.float32)

    def logits(query_global, cand_globals):
        return reranker.logits(RerankQuery(query_locals.numpy(), query_global),
                               RerankCandidates(cand_locals.numpy(), scores, cand_globals))

    wide = logits(F.normalize(torch.randn(48), dim=0).numpy(), F.normalize(torch.randn(5, 48), dim=1).numpy())
    expected = logits(token_global(query_locals[None])[0].numpy(), token_global(cand_locals).numpy())
    assert np.allclose(wide, expected, atol=1e-5)
    assert not np.allclose(expected, logits(-token_global(query_locals[None])[0].numpy(),
                                            token_global(cand_locals).numpy()), atol=1e-4)


@pytest.mark.parametrize("precision", ["reference", "fp32"])
def test_a_skip_on_the_descriptor_starts_as_the_serving_global_search(one_thread, precision):
    """With global_skip_from="descriptor" the residual reads the index's own (wider) global
    descriptor: an untrained RRT orders the candidates exactly as that descriptor's inner product
    (the serving global search), not as the locals' mean the tokens carry; in training, serving
    (reference and fast scorer) alike."""
    import numpy as np

    from waldo.models.descriptor import token_global
    from waldo.rerank.base import RerankCandidates, RerankQuery
    from waldo.rerank.rrt_rerankers import RRTReranker

    rrt = _small_model(use_global_tokens=True, global_skip=True, global_skip_from="descriptor")
    assert rrt.skips_on_descriptor and not _small_model(use_global_tokens=True, global_skip=True).skips_on_descriptor
    reranker = RRTReranker(rrt, grid=(3, 3), precision=precision)
    generator = torch.Generator().manual_seed(3)
    query_locals, cand_locals = _locals(1, 9, 32, 1)[0], _locals(12, 9, 32, 2)
    query_global = F.normalize(torch.randn(48, generator=generator), dim=0)
    cand_globals = F.normalize(torch.randn(12, 48, generator=generator), dim=1)
    serving = (cand_globals @ query_global).numpy()
    logits = reranker.logits(RerankQuery(query_locals.numpy(), query_global.numpy()),
                             RerankCandidates(cand_locals.numpy(), serving, cand_globals.numpy()))
    assert np.array_equal(np.argsort(-logits, kind="stable"), np.argsort(-serving, kind="stable"))
    offset = logits - 10.0 * serving  # the classifier's weight starts at zero: only its bias is left
    assert np.allclose(offset, offset[0], atol=1e-4)
    tokens = (token_global(cand_locals) @ token_global(query_locals[None])[0]).numpy()
    assert not np.array_equal(np.argsort(-tokens), np.argsort(-serving))  # the test can tell them apart
    # the pair forward needs the descriptors; a token-skip model ignores them
    with pytest.raises(ValueError, match="query_skip and cand_skip"):
        rrt(query_locals[None], cand_locals[:1], grid=(3, 3), query_global=token_global(query_locals[None]),
            cand_global=token_global(cand_locals[:1]))
    with pytest.raises(ValueError, match="global_skip_from needs global_skip"):
        RRTConfig(use_global_tokens=True, global_skip_from="descriptor")
    # an rrt.json written before the option reads as a token-skip model
    assert RRTConfig.model_validate({"use_global_tokens": True, "global_skip": True}).global_skip_from == "token"


def _shared_parts(n_cands: int, n_cells: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A query and candidates that share a different number of cells with it (0..n_cells), so
    the mutual-match share spreads over the candidates."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(n_cells, dim, generator=generator)
    cands = torch.randn(n_cands, n_cells, dim, generator=generator)
    for i in range(n_cands):
        shared = torch.randperm(n_cells, generator=generator)[: (i * n_cells) // n_cands]
        cands[i, shared] = query[shared] + 0.3 * torch.randn(len(shared), dim, generator=generator)
    return query, cands


def test_the_batched_mutual_match_share_is_local_matchs_count():
    """The RRT's residual counts the cells exactly as training-free local matching does (numpy),
    and padding leaves out the padded cells on both sides."""
    import numpy as np

    from waldo.rerank.local_match import mutual_match_share as reference_share
    from waldo.rerank.rrt import mutual_match_share

    query, cands = _shared_parts(10, 16, 24, seed=5)
    for threshold in (0.0, 0.7, 0.9):
        expected = reference_share(query.numpy(), cands.numpy(), threshold)
        got = mutual_match_share(query[None].expand(10, -1, -1), cands, threshold).numpy()
        assert np.array_equal(got, expected), threshold
    assert len(set(expected.tolist())) > 3  # the shares differ between candidates
    # 4 padded rows of noise after the 16 cells change nothing
    noise = torch.randn(10, 4, 24)
    padded_query = torch.cat([query[None].expand(10, -1, -1), noise], 1)
    padded_cands = torch.cat([cands, noise.flip(0)], 1)
    mask = torch.zeros(10, 20, dtype=torch.bool)
    mask[:, 16:] = True
    got = mutual_match_share(padded_query, padded_cands, 0.7, query_mask=mask, cand_mask=mask).numpy()
    assert np.array_equal(got, reference_share(query.numpy(), cands.numpy(), 0.7))
    with pytest.raises(ValueError, match="mutual_match_share needs"):
        mutual_match_share(query, cands, 0.7)


@pytest.mark.parametrize("precision", ["reference", "fp32"])
def test_a_match_skip_starts_as_the_training_free_rule(one_thread, precision):
    """With both residuals and the zero classifier, an untrained RRT's logit is
    10 x global + 5 x mutual-match share + a constant: it ranks exactly as global + 0.5 x share
    (local-match's rule) does, through the training forward and both serving scorers; the
    scale is a trained parameter and the option survives save and load."""
    import numpy as np

    from waldo.rerank.base import RerankCandidates, RerankQuery
    from waldo.rerank.local_match import mutual_match_share as reference_share
    from waldo.rerank.rrt_rerankers import RRTReranker

    rrt = _small_model(use_global_tokens=True, global_skip=True, global_skip_from="descriptor", match_skip=True,
                       match_skip_init=5.0, match_skip_threshold=0.7)
    query_locals, cand_locals = _shared_parts(12, 9, 32, seed=7)
    generator = torch.Generator().manual_seed(3)
    query_global = F.normalize(torch.randn(48, generator=generator), dim=0)
    cand_globals = F.normalize(torch.randn(12, 48, generator=generator), dim=1)
    serving = (cand_globals @ query_global).numpy()
    share = reference_share(query_locals.numpy(), cand_locals.numpy(), 0.7)
    rule = serving + 0.5 * share
    reranker = RRTReranker(rrt, grid=(3, 3), precision=precision)
    logits = reranker.logits(RerankQuery(query_locals.numpy(), query_global.numpy()),
                             RerankCandidates(cand_locals.numpy(), serving, cand_globals.numpy()))
    offset = logits - 10.0 * rule
    assert np.allclose(offset, offset[0], atol=1e-4)
    assert np.array_equal(np.argsort(-logits, kind="stable"), np.argsort(-rule, kind="stable"))
    assert not np.array_equal(np.argsort(-rule, kind="stable"), np.argsort(-serving, kind="stable"))
    assert "match_skip_scale" in dict(rrt.named_parameters())
    assert "match_skip_scale" not in dict(_small_model().named_parameters())  # the reference's keys stay


def test_a_match_skip_round_trips_through_the_checkpoint(tmp_path):
    from waldo.rerank.rrt_checkpoint import load_rrt, save_rrt

    rrt = _small_model(use_global_tokens=True, global_skip=True, global_skip_from="descriptor", match_skip=True,
                       match_skip_init=3.0)
    with torch.no_grad():
        rrt.match_skip_scale.fill_(2.5)
    save_rrt(tmp_path, rrt, grid=(3, 3), training={})
    loaded, _ = load_rrt(tmp_path)
    assert loaded.config == rrt.config and loaded.match_skip_scale.item() == 2.5
