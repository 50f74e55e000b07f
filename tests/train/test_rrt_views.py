"""Reranker training from augmented views: views, sources, the pair source, validation, a real run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from waldo.data.datasets import ImageRecord, ImageSet, read_labels_csv
from waldo.data.protocols import COIL_GALLERY_VIEWS, COIL_QUERY_VIEWS
from waldo.models.checkpoint import save_model
from waldo.models.untrained import untrained_model
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_checkpoint import load_rrt, read_rrt_info
from waldo.train.config import RRTTrainConfig
from waldo.train.pairs import PairSampler, split_rows, top_k_neighbours, validation_sets
from waldo.train.rrt_online import train_rrt_on_views
from waldo.train.sources import TrainingSource, check_no_test_images, parse_source, pool_sources
from waldo.data.views import ViewAugment, strong_view, swap_centre


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))


def test_strong_view_is_a_pure_function_of_its_seed():
    image = _photo()
    a = strong_view(image, 64, np.random.default_rng([1, 2]))
    b = strong_view(image, 64, np.random.default_rng([1, 2]))
    c = strong_view(image, 64, np.random.default_rng([1, 3]))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_strong_view_without_any_change_is_the_resized_photo():
    """With every augmentation switched off the view is the photo resized: the augmentations
    are what makes it differ (not a bug in the plumbing)."""
    none = ViewAugment(min_crop=1.0, p_rotation=0, p_perspective=0, jitter=0, hue=0, p_blur=0, p_jpeg=0, p_occlusion=0)
    image = _photo().resize((64, 64))
    view = strong_view(image, 64, np.random.default_rng(0), none)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(view, expected, atol=1 / 255)


def test_a_swapped_view_is_one_photos_middle_in_the_others_surroundings():
    surroundings = Image.new("RGB", (100, 80), (255, 0, 0))
    middle = Image.new("RGB", (50, 40), (0, 0, 255))
    out = np.array(swap_centre(surroundings, middle, np.random.default_rng(0)))
    blue = (out == [0, 0, 255]).all(-1)
    red = (out == [255, 0, 0]).all(-1)
    assert blue.all(-1).sum() == 0 and red.all(-1).any()  # the border stays the surroundings
    assert blue[40, 50] and red[0, 0] and red[-1, -1]  # the middle is the other photo's
    assert 0.25 * 0.9 <= blue.mean() <= 0.65 ** 2 * 1.1 and (blue | red).all()
    # the view of a swap keeps the pasted middle in view (crops of at least half the photo)
    none = ViewAugment(p_rotation=0, p_perspective=0, jitter=0, hue=0, p_blur=0, p_jpeg=0, p_occlusion=0)
    for seed in range(20):
        view = strong_view(surroundings, 32, np.random.default_rng(seed), none, middle=middle)
        assert float((view[2] > 0.9).float().mean()) > 0.1


def _pool(labelled_ids, unlabelled: int):
    labelled = ImageSet([ImageRecord(f"/x/l{i}.jpg", str(identity)) for i, identity in enumerate(labelled_ids)],
                        "/x", "lab")
    plain = ImageSet([ImageRecord(f"/x/u{i}.jpg", "") for i in range(unlabelled)], "/x", "plain")
    return pool_sources([TrainingSource("lab", labelled, True), TrainingSource("plain", plain, False, weight=2.0)])


def test_pooled_identities_keep_sources_apart_and_unlabelled_photos_alone():
    pool = _pool([1, 1, 2, 2], unlabelled=3)
    assert pool.identity[0] == pool.identity[1] != pool.identity[2]
    assert len(set(pool.identity[4:].tolist())) == 3  # every unlabelled photo its own identity
    assert not set(pool.identity[:4].tolist()) & set(pool.identity[4:].tolist())


def test_pair_source_positives_are_the_same_photo_or_identity_and_negatives_never_are():
    pool = _pool([i // 4 for i in range(40)], unlabelled=30)
    held_out = split_rows(pool, 0.2, seed=0)
    # identities are held out whole: no identity is on both sides
    assert not set(pool.identity[held_out].tolist()) & set(pool.identity[~held_out].tolist())
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(len(pool), 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    neighbours = top_k_neighbours(desc, np.flatnonzero(~held_out), 10)
    sampler = PairSampler(pool, ~held_out, neighbours, seed=0, real_positive_prob=0.5, hard_negative_prob=0.7)
    seen_real = seen_self = 0
    for epoch in range(3):
        for batch in sampler.epoch(epoch, 8):
            anchors = batch.anchors[batch.pair_anchor]
            candidates = batch.candidates[batch.pair_candidate]
            assert not held_out[batch.anchors].any() and not held_out[batch.candidates].any()
            same_identity = pool.identity[anchors] == pool.identity[candidates]
            assert (same_identity == (batch.targets == 1)).all()  # positive <=> same identity
            positives = batch.targets == 1
            seen_self += int((anchors[positives] == candidates[positives]).sum())
            seen_real += int((anchors[positives] != candidates[positives]).sum())
            unlabelled = ~pool.labelled[anchors[positives]]
            assert (anchors[positives][unlabelled] == candidates[positives][unlabelled]).all()
    assert seen_self > 0 and seen_real > 0
    # weights: the unlabelled source (weight 2) gives about twice its share of anchors
    assert sampler.counts[1] == round(2.0 * np.sum(~held_out & (pool.source == 1)))


def test_swapped_pairs_differ_only_in_the_middle_and_are_labelled_by_it():
    """A swapped positive shows the anchor's (or its real positive's) middle in the negative's
    surroundings; a swapped negative shows the negative's middle in the anchor's own surroundings;
    targets follow what the middle shows, and swaps off leaves the draws as before."""
    pool = _pool([i // 4 for i in range(40)], unlabelled=30)
    held_out = split_rows(pool, 0.2, seed=0)
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(len(pool), 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    neighbours = top_k_neighbours(desc, np.flatnonzero(~held_out), 10)
    plain = PairSampler(pool, ~held_out, neighbours, seed=0)
    off = PairSampler(pool, ~held_out, neighbours, seed=0, swap_prob=0.0)
    for a, b in zip(plain.epoch(0, 8), off.epoch(0, 8)):
        assert np.array_equal(a.candidates, b.candidates) and b.middles is None
    swapping = PairSampler(pool, ~held_out, neighbours, seed=0, swap_prob=0.5)
    swapped = plain_pairs = 0
    for batch in swapping.epoch(0, 8):
        b = len(batch.anchors)
        middles = np.full(len(batch.candidates), -1) if batch.middles is None else batch.middles
        shown = np.where(middles >= 0, middles, batch.candidates)
        anchors = batch.anchors[batch.pair_anchor]
        same = pool.identity[anchors] == pool.identity[shown[batch.pair_candidate]]
        assert (same == (batch.targets == 1)).all()
        for i in range(b):
            positive, negative = batch.candidates[i], batch.candidates[b + i]
            if middles[i] >= 0:
                assert middles[b + i] >= 0  # both of an anchor's pairs are swapped together
                assert negative == batch.anchors[i]  # the anchor's own surroundings ...
                assert middles[b + i] == positive  # ... around the middle of the photo whose surroundings the positive has
                assert pool.identity[middles[i]] == pool.identity[batch.anchors[i]]
                assert pool.identity[middles[b + i]] != pool.identity[batch.anchors[i]]
                swapped += 1
            else:
                assert middles[b + i] < 0
                plain_pairs += 1
        assert batch.counters["swapped_pairs"] == int((middles[:b] >= 0).sum())
    assert swapped > 5 and plain_pairs > 5
    with pytest.raises(ValueError, match="swap_prob"):
        PairSampler(pool, ~held_out, neighbours, swap_prob=1.5)
    with pytest.raises(ValueError, match="online_views"):
        RRTTrainConfig(mode="rrt-only", online_views=False, swap_prob=0.5)


def test_neighbours_exclude_the_row_itself_and_follow_similarity():
    desc = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]
    desc[1] = np.array([0.9, 0.1, 0, 0]) / np.linalg.norm([0.9, 0.1])
    top = top_k_neighbours(desc, np.arange(5), 2)
    assert top[0, 0] == 1 and top[1, 0] == 0
    assert all(row not in top[row] for row in range(5))


def test_sources_from_the_command_line(data_root, tmp_path):
    source = parse_source("coil100-open,weight=0.5")
    assert source.labelled and source.weight == 0.5 and source.validation_split is not None
    assert {int(r.identity) for r in source.images.records} == set(range(1, 51))  # training objects only
    folder = parse_source(f"{data_root / 'abo_sample'},labels=no")
    assert not folder.labelled and len(folder.images) == 12
    assert parse_source(str(data_root / "abo_sample")).labelled
    with pytest.raises(ValueError, match="unknown option"):
        parse_source("coil100-open,wieght=2")
    with pytest.raises(ValueError, match="neither a protocol"):
        parse_source(str(tmp_path / "nothing-here"))
    # The whole grocery folder holds test images of the reported protocols: refused.
    whole = TrainingSource("grocery", read_labels_csv(data_root / "grocery_store"), True)
    with pytest.raises(ValueError, match="test images of protocol"):
        check_no_test_images([whole])
    check_no_test_images([source, folder])  # training splits and other folders are fine


def test_validation_mirrors_the_protocol(data_root):
    source = parse_source("coil100-open")
    pool = pool_sources([source])
    held_out = split_rows(pool, 0.2, seed=0)
    [vset] = validation_sets(pool, held_out)
    views = lambda rows: {int(pool.records[r].attrs["view_deg"]) for r in rows}  # noqa: E731
    assert vset.kind == "protocol twin"
    assert views(vset.queries) <= COIL_QUERY_VIEWS and views(vset.gallery) <= COIL_GALLERY_VIEWS
    assert held_out[vset.queries].all()
    # distractors from every identity, held out or not
    assert len({pool.identity[r] for r in vset.gallery}) == 50


DIM, SIZE = 32, 96  # a small model (3 x 3 grid) keeps the run to seconds


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    model, config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                    progress=False)
    return save_model(model, config, tmp_path_factory.mktemp("init") / "model")


def test_short_run_on_real_photos_learns_to_find_a_photos_own_view(data_root, small_model, tmp_path, monkeypatch):
    """Unlabelled grocery photos, a transformer without the global path (so all it knows is
    learned): the loss falls, and the held-out photos' augmented views find their own photo
    first more often than before training. Every training step runs the module in training
    mode (dropout on), though each validation leaves it in eval mode (the loop sets it back)."""
    modes = []
    forward = RerankingTransformer.forward

    def recording_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            modes.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RerankingTransformer, "forward", recording_forward)
    images = read_labels_csv(data_root / "grocery_store")
    images = images.subset(range(0, 2400, 30), "grocery sample")  # 80 photos of many products
    source = TrainingSource("grocery sample", ImageSet([ImageRecord(r.path, "") for r in images], images.root,
                                                       "grocery sample"), labelled=False)
    config = RRTTrainConfig.model_validate({
        "mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64},
        "anchors_per_epoch": 192, "batch_triplets": 16, "epochs": 4, "lr": 2e-3, "milestones": [1.0],
        "val_fraction": 0.25, "val_top_k": 20, "negatives_top_k": 20, "threads": 2, "seed": 0})
    best = train_rrt_on_views(config, [source], small_model, tmp_path / "run", cache_root=tmp_path / "cache",
                              progress=False, allow_test_images=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if entry["epoch"] > 0]
    assert losses[-1] < losses[0]
    before = log[0]["val"]["macro"]["rrt"]["recall@1"]
    after = max(entry["val"]["macro"]["rrt"]["recall@1"] for entry in log if entry["epoch"] > 0)
    assert after > before
    rrt, info = load_rrt(best)
    assert info["training"]["default_reranker"] in ("none", "rrt", "rrt-fusion")
    assert "consensus" not in info["training"]  # augmented views cannot judge it (one true match each)
    assert 0.0 <= info["training"]["fusion_weight"] <= 1.0
    assert info["training"]["trained_on"][0]["labelled"] is False
    assert len(modes) >= 4  # a step per batch of each of the 4 epochs
    assert all(modes), f"{modes.count(False)} of {len(modes)} training steps ran in eval mode"


def test_a_run_with_swapped_pairs_trains_on_them(data_root, small_model, tmp_path):
    """swap_prob reaches the pair source and the view maker: the epoch's counters say how many
    pairs were swapped, and the run trains and saves as any other."""
    images = read_labels_csv(data_root / "grocery_store").subset(range(0, 2400, 60), "grocery sample")
    source = TrainingSource("grocery sample", ImageSet([ImageRecord(r.path, "") for r in images], images.root,
                                                       "grocery sample"), labelled=False)
    config = RRTTrainConfig.model_validate({
        "mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64},
        "anchors_per_epoch": 32, "batch_triplets": 16, "epochs": 1, "lr": 1e-3, "swap_prob": 1.0,
        "val_fraction": 0.25, "val_top_k": 10, "negatives_top_k": 10, "threads": 2, "seed": 0})
    best = train_rrt_on_views(config, [source], small_model, tmp_path / "run", cache_root=tmp_path / "cache",
                              progress=False, allow_test_images=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    trained = [entry for entry in log if entry["epoch"] > 0]
    assert trained and trained[0]["swapped_pairs"] == 32
    assert load_rrt(best)[0] is not None


def test_a_second_seed_holds_out_the_first_runs_identities(data_root, small_model, tmp_path):
    """split_seed keeps the held-out identities and validation queries of the run it names while
    everything trained is drawn anew: a second seed of a recipe is chosen on the same validation
    and never trains on the first run's held-out photos."""
    images = read_labels_csv(data_root / "grocery_store").subset(range(0, 2400, 40), "grocery sample")
    source = TrainingSource("grocery sample", images, labelled=True)
    pool = pool_sources([source])
    assert not np.array_equal(split_rows(pool, 0.25, 0), split_rows(pool, 0.25, 1))  # the seed alone moves them
    base = {"mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64},
            "anchors_per_epoch": 32, "batch_triplets": 16, "epochs": 1, "lr": 2e-3, "milestones": [1.0],
            "val_fraction": 0.25, "val_top_k": 10, "negatives_top_k": 10, "threads": 2}
    runs = {}
    for name, seeds in (("first", {"seed": 0}), ("second", {"seed": 1, "split_seed": 0}), ("other", {"seed": 1})):
        config = RRTTrainConfig.model_validate({**base, **seeds})
        train_rrt_on_views(config, [source], small_model, tmp_path / name, cache_root=tmp_path / "cache",
                           progress=False, allow_test_images=True)
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        runs[name] = (log[0]["val"], log[-1]["val"])
    first, second, other = runs["first"], runs["second"], runs["other"]
    assert second[0]["macro"]["none"] == first[0]["macro"]["none"]  # the same queries, the same global ranking
    assert other[0]["macro"]["none"] != first[0]["macro"]["none"]  # without split_seed: another validation
    assert second[1]["macro"]["rrt"] != first[1]["macro"]["rrt"]  # trained from another draw
    with pytest.raises(ValueError, match="split_seed"):
        RRTTrainConfig.model_validate({"mode": "frozen", "split_seed": 0})


def test_global_skip_starts_as_global_search():
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=64, use_global_tokens=True,
                                         global_skip=True))
    rng = torch.Generator().manual_seed(0)
    q_local, c_local = torch.randn(1, 4, 32, generator=rng), torch.randn(10, 4, 32, generator=rng)
    q_global = torch.nn.functional.normalize(torch.randn(32, generator=rng), dim=0)
    c_global = torch.nn.functional.normalize(torch.randn(10, 32, generator=rng), dim=1)
    logits = rrt.score_candidates(q_local[0], c_local, query_global=q_global, cand_globals=c_global, grid=(2, 2))
    cosine = c_global @ q_global
    assert torch.equal(torch.argsort(logits, descending=True), torch.argsort(cosine, descending=True))
    with pytest.raises(ValueError, match="global_skip needs use_global_tokens"):
        RRTConfig(global_skip=True)
    # the descriptor skip is for a fixed descriptor model: frozen / finetune train the global head
    rrt = {"use_global_tokens": True, "global_skip": True, "global_skip_from": "descriptor"}
    assert RRTTrainConfig(mode="rrt-only", rrt=rrt).rrt_config().global_skip_from == "descriptor"
    with pytest.raises(ValueError, match='needs mode "rrt-only"'):
        RRTTrainConfig(mode="frozen", rrt=rrt)


@pytest.mark.parametrize("precision", ["fp32", "reference"])
def test_validation_scores_candidates_as_the_training_module_does(precision, monkeypatch):
    """The validator scores with the serving fp32 scorer (4x quicker) or the module itself; its
    logits must be the training module's forward, global tokens and both residuals included, for
    every query row; weights it has scored before are not scored again."""
    from waldo.models.descriptor import rrt_global_inputs
    from waldo.rerank.rrt_rerankers import RRTReranker
    from waldo.train.rrt_online import ViewValidator

    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=2, n_heads=4, ff_dim=64, use_global_tokens=True,
                                         global_skip=True, global_skip_from="descriptor", match_skip=True)).eval()
    rng = np.random.default_rng(0)
    grid, n_images, n_queries, top_k = (3, 4), 30, 5, 8
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    local_desc = unit(rng.standard_normal((n_images, 12, 32))).astype(np.float16)  # stored float16, as cached
    global_desc = unit(local_desc.astype(np.float32).mean(1))
    candidates = np.stack([rng.choice(n_images, top_k, replace=False) for _ in range(n_queries)])
    # each query a noisy copy of its first candidate, so that cells match and the match residual counts
    q_local = unit(local_desc[candidates[:, 0]].astype(np.float32) + 0.05 * rng.standard_normal((n_queries, 12, 32)))
    q_global = unit(q_local.mean(1))
    validator = ViewValidator.__new__(ViewValidator)  # the prepared sets alone; no pool or views needed
    validator.grid, validator.local_desc, validator.global_desc = grid, local_desc, global_desc
    validator.precision, validator._scored = precision, {}
    validator.prepared = [{"q_global": q_global, "q_local": q_local, "candidates": candidates,
                           "scores": np.einsum("qd,qkd->qk", q_global, global_desc[candidates])}]
    (logits,) = validator.logits(rrt)
    with torch.inference_mode():
        for row in range(n_queries):
            c_local = torch.from_numpy(local_desc[candidates[row]].astype(np.float32))
            c_token, c_skip = rrt_global_inputs(rrt, torch.from_numpy(global_desc[candidates[row]]), c_local)
            q_token, q_skip = rrt_global_inputs(rrt, torch.from_numpy(q_global[row:row + 1]).expand(top_k, -1),
                                                torch.from_numpy(q_local[row:row + 1]).expand(top_k, -1, -1))
            expected = rrt(torch.from_numpy(q_local[row:row + 1]).expand(top_k, -1, -1), c_local, grid=grid,
                           query_global=q_token, cand_global=c_token, query_skip=q_skip, cand_skip=c_skip)
            np.testing.assert_allclose(logits[row], expected.numpy(), atol=1e-4)
    assert np.ptp(logits) > 0.1  # the rows differ: a constant would pass nothing above by accident
    # The same weights again (best/ rescored at the end of a run): the logits of before, not scored again.
    calls = []
    monkeypatch.setattr(RRTReranker, "logits", lambda self, *a: calls.append(1) or np.zeros(top_k, np.float32))
    np.testing.assert_array_equal(validator.logits(rrt)[0], logits)
    assert not calls
    with torch.no_grad():  # other weights: scored anew
        rrt.classifier.bias += 1.0
    validator.logits(rrt)
    assert len(calls) == n_queries


def _tiny_index(data_root, small_model, root, n=40):
    from waldo.api import Waldo

    images = read_labels_csv(data_root / "grocery_store").subset(range(0, 40 * n, 40), "sample")
    engine = Waldo.create(root, model_dir=small_model, progress=False, gv_features=False)
    engine.add(images.paths, ["" for _ in images.paths], progress=False)
    return images


def test_index_adapt_trains_on_the_index_photos_and_installs_only_when_done(data_root, small_model, tmp_path,
                                                                            monkeypatch):
    import waldo.train.adapt as adapt
    from waldo.api import Waldo
    from waldo.rerank.rrt_checkpoint import has_rrt, read_rrt_info

    images = _tiny_index(data_root, small_model, tmp_path / "index")
    monkeypatch.setattr(adapt, "ADAPT_DEFAULTS", {
        "mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64,
                                    "use_global_tokens": True, "global_skip": True},
        "anchors_per_epoch": 32, "batch_triplets": 16, "epochs": 2, "val_fraction": 0.25, "val_top_k": 10,
        "negatives_top_k": 10, "threads": 2})
    paused = adapt.adapt_index(tmp_path / "index", progress=False, stop_after=1, lr=3e-4)
    assert not paused["installed"] and not has_rrt(tmp_path / "index" / "model")  # the index is untouched
    with pytest.raises(ValueError, match="another config"):  # a resumed run keeps its settings
        adapt.adapt_index(tmp_path / "index", progress=False, lr=1e-3)
    done = adapt.adapt_index(tmp_path / "index", progress=False)  # resumes as started, finishes, installs
    assert done["installed"]
    assert json.loads((tmp_path / "index" / "adapt" / "run" / "train_config.json").read_text())["lr"] == 3e-4
    info = read_rrt_info(tmp_path / "index" / "model")["training"]
    assert info["default_reranker"] in ("none", "rrt", "rrt-fusion") and info["trained_on"][0]["labelled"] is False
    assert info["default_fallbacks"] == []  # written, so a chain stored for the starting weights never outlives them
    engine = Waldo.open(tmp_path / "index")
    assert {"rrt", "rrt-fusion"} <= set(engine.available_rerankers())
    outcome = engine.search(images.paths[0], k=5, rerank="rrt")
    assert outcome.hits[0].path == images.paths[0]  # the photo itself: its global score dominates at init


def test_index_adapt_stops_early_once_validation_stops_improving(data_root, small_model, tmp_path, monkeypatch):
    """With --patience, a run whose held-out score does not improve (an lr too small to move it)
    stops after that many epochs and still installs its best checkpoint (here the starting one)."""
    import waldo.train.adapt as adapt
    from waldo.rerank.rrt_checkpoint import has_rrt

    _tiny_index(data_root, small_model, tmp_path / "index", n=24)
    monkeypatch.setattr(adapt, "ADAPT_DEFAULTS", {
        "mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64,
                                    "use_global_tokens": True, "global_skip": True},
        "anchors_per_epoch": 16, "batch_triplets": 16, "epochs": 5, "val_fraction": 0.25, "val_top_k": 10,
        "negatives_top_k": 10, "threads": 2})
    done = adapt.adapt_index(tmp_path / "index", progress=False, lr=1e-12, patience=1)
    assert done["installed"] and done["stopped_early"] and (done["epochs"], done["best_epoch"]) == (1, 0)
    assert has_rrt(tmp_path / "index" / "model")
    log = [json.loads(line) for line in (tmp_path / "index" / "adapt" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["stopped_early"]
    # rerunning the finished command trains nothing more
    assert adapt.adapt_index(tmp_path / "index", progress=False)["epochs"] == 1


def test_index_adapt_fine_tunes_the_index_reranker_at_the_lower_lr(data_root, small_model, tmp_path):
    """An index whose model has a reranker (as the shipped ones do): adapt starts from it, with its
    shape, at FINETUNE_LR rather than a fresh run's lr; an explicit lr still wins."""
    import shutil

    import waldo.train.adapt as adapt
    from waldo.models.checkpoint import load_model
    from waldo.rerank.rrt_checkpoint import save_rrt

    folder = Path(shutil.copytree(small_model, tmp_path / "with-rrt"))
    model, config = load_model(folder)
    trained = RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64, use_global_tokens=True, global_skip=True)
    save_rrt(folder, RerankingTransformer(trained), grid=model.local_grid(config.image_size))
    _tiny_index(data_root, folder, tmp_path / "index", n=24)
    adapt.adapt_index(tmp_path / "index", progress=False, stop_after=0)
    run = tmp_path / "index" / "adapt"
    saved = json.loads((run / "run" / "train_config.json").read_text())
    assert saved["lr"] == adapt.FINETUNE_LR < adapt.ADAPT_DEFAULTS["lr"]
    assert RRTConfig.model_validate(saved["rrt"]) == trained and (run / "init" / "rrt.safetensors").is_file()
    _tiny_index(data_root, folder, tmp_path / "other", n=24)
    adapt.adapt_index(tmp_path / "other", progress=False, stop_after=0, lr=1e-3)
    assert json.loads((tmp_path / "other" / "adapt" / "run" / "train_config.json").read_text())["lr"] == 1e-3


@pytest.mark.parametrize("skip_from, colour", [("token", 0.0), ("descriptor", 0.0), ("descriptor", 1.0)])
def test_index_adapt_on_a_model_with_a_wider_global_descriptor(data_root, tmp_path, monkeypatch, skip_from, colour):
    """A trained global head may be wider than the locals (lite0-lw-rrt: 512 vs 128): the kNN and
    the negatives' mining use it, the RRT's global tokens are the locals' normalised mean, in
    training as in serving, so adapting such an index trains and serves; with
    global_skip_from="descriptor" the residual reads the wide descriptor in training,
    validation and serving alike, a colour term appended to it (make demo's) included."""
    import waldo.train.adapt as adapt
    from waldo.api import Waldo
    from waldo.models.colour import SIGNATURE_DIM

    model, config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                    global_dim=2 * DIM, progress=False)
    model.colour_weight = config.colour_weight = colour
    wide = save_model(model, config, tmp_path / "wide")
    images = _tiny_index(data_root, wide, tmp_path / "index", n=24)
    monkeypatch.setattr(adapt, "ADAPT_DEFAULTS", {
        "mode": "rrt-only", "rrt": {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64,
                                    "use_global_tokens": True, "global_skip": True, "global_skip_from": skip_from},
        "anchors_per_epoch": 32, "batch_triplets": 16, "epochs": 1, "val_fraction": 0.25, "val_top_k": 10,
        "negatives_top_k": 10, "threads": 2})
    assert adapt.adapt_index(tmp_path / "index", progress=False)["installed"]
    engine = Waldo.open(tmp_path / "index")
    assert engine.config.global_width == 2 * DIM
    assert engine.config.descriptor_width == 2 * DIM + (SIGNATURE_DIM if colour else 0)
    assert read_rrt_info(tmp_path / "index" / "model")["rrt"]["global_skip_from"] == skip_from
    outcome = engine.search(images.paths[0], k=5, rerank="rrt")
    assert outcome.hits[0].path == images.paths[0]


def test_head_only_model_loads_with_the_packaged_backbone(small_model, tmp_path):
    from waldo.models.checkpoint import load_model, model_hash
    from waldo.rerank.rrt_checkpoint import export_head_only, save_rrt

    # a reranker folder on the packaged ImageNet backbone
    model, config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                    progress=False)
    folder = save_model(model, config, tmp_path / "reranker")
    save_rrt(folder, RerankingTransformer(RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64)), grid=(3, 3))
    shipped = export_head_only(folder, tmp_path / "shipped", {"name": "test"})
    assert (shipped / "model.safetensors").stat().st_size < 200_000  # two 1280 x 32 heads in float16, no backbone
    loaded, loaded_config = load_model(shipped)
    reference, _ = load_model(folder)
    backbone = {k: v for k, v in loaded.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in backbone.items())
    assert torch.allclose(loaded.local_proj.weight, reference.local_proj.weight, atol=1e-3)
    assert model_hash(loaded) != model_hash(reference)  # float16 heads: another model, and says so
    # weights for another backbone file are refused, not silently mixed
    bad = json.loads((shipped / "config.json").read_text())
    bad["extra"]["backbone_weights"]["weights_source"] = "imagenet:0000000000000000"
    (shipped / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="installed"):
        load_model(shipped)


def test_a_shipped_model_can_take_its_global_head_from_another(tmp_path, monkeypatch):
    """Two shipped models with one global head (make demo's learned whitening) store it once: the
    second reads it from the first, and refuses to load once that head has changed."""
    import waldo.models.shipped as shipped_module
    from safetensors.torch import load_file, save_file

    from waldo.models.checkpoint import load_model
    from waldo.rerank.rrt_checkpoint import export_head_only, save_rrt

    monkeypatch.setattr(shipped_module, "SHIPPED_DIR", tmp_path / "pretrained")
    model, config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                    progress=False)
    folder = save_model(model, config, tmp_path / "reranker")
    save_rrt(folder, RerankingTransformer(RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64)), grid=(3, 3))
    donor = export_head_only(folder, tmp_path / "pretrained" / "donor", {"name": "donor"})
    other, other_config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                          progress=False, seed=1)
    stranger = save_model(other, other_config, tmp_path / "stranger")
    save_rrt(stranger, RerankingTransformer(RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64)), grid=(3, 3))
    with pytest.raises(ValueError, match="nothing to share"):
        export_head_only(stranger, tmp_path / "pretrained" / "bad", {"name": "bad"}, share_global_from="donor")

    sharer = export_head_only(folder, tmp_path / "pretrained" / "sharer", {"name": "sharer"}, share_global_from="donor")
    assert not {"global_proj.weight", "global_proj.bias"} & set(load_file(str(sharer / "model.safetensors")))
    (a, _), (b, _) = load_model(donor), load_model(sharer)
    assert all(torch.equal(value, b.state_dict()[name]) for name, value in a.state_dict().items())
    state = load_file(str(donor / "model.safetensors"))
    state["global_proj.bias"] = state["global_proj.bias"] + 1
    save_file(state, str(donor / "model.safetensors"))
    with pytest.raises(ValueError, match="no longer"):
        load_model(sharer)


def test_verified_groups_join_views_of_one_photo_and_nothing_else(data_root, small_model, tmp_path, monkeypatch):
    """`index adapt --group-verified`: crops of one photo verify against it and form one group;
    photos of other products stay alone; the groups reach the training source as identities."""
    import waldo.train.adapt as adapt
    from waldo.api import Waldo

    images = read_labels_csv(data_root / "grocery_store").subset(range(0, 150 * 18, 150), "sample")  # 18 products
    photo = Image.open(images.paths[0]).convert("RGB")
    width, height = photo.size
    crops = []
    for i, box in enumerate([(0, 0, int(width * 0.85), int(height * 0.85)),
                             (int(width * 0.12), int(height * 0.1), width, height)]):
        crops.append(str(tmp_path / f"crop{i}.jpg"))
        photo.crop(box).save(crops[-1], quality=92)
    engine = Waldo.create(tmp_path / "index", model_dir=small_model, progress=False)  # keypoints stored
    engine.add(images.paths + crops, None, num_workers=0, progress=False)
    engine.store.close()
    groups, summary = adapt.verified_groups(tmp_path / "index", progress=False)
    stored = {str(Path(p).resolve()) for p in [images.paths[0], *crops]}
    crop_group = {groups[p] for p in stored}
    assert len(crop_group) == 1 and {p for p, g in groups.items() if g in crop_group} == stored
    assert summary["photos"] == 20 and summary["grouped_photos"] == len(groups) >= 3

    seen = {}

    def capture(config, sources, *args, **kwargs):
        seen["source"] = sources[0]
        raise KeyboardInterrupt  # stop before training: only what it was given matters here

    monkeypatch.setattr("waldo.train.rrt_online.train_rrt_on_views", capture)
    with pytest.raises(KeyboardInterrupt):
        adapt.adapt_index(tmp_path / "index", progress=False, group_verified=True)
    source = seen["source"]
    assert source.labelled
    identity = {record.path: record.identity for record in source.images.records}
    assert len({identity[p] for p in stored}) == 1
    assert all(identity[p] != identity[next(iter(stored))] for p in identity if p not in stored)
    assert len(set(identity.values())) == 20 - len(groups) + len(set(groups.values()))  # the rest: one each


def test_verified_groups_need_stored_keypoints(data_root, small_model, tmp_path):
    from waldo.train.adapt import verified_groups

    _tiny_index(data_root, small_model, tmp_path / "index", n=4)  # built with gv_features=False
    with pytest.raises(ValueError, match="stores no keypoints"):
        verified_groups(tmp_path / "index", progress=False)


@pytest.mark.parametrize("lr_scale", [1.0, 100.0])
def test_global_skip_lr_scale_moves_only_the_residuals_scale_faster(lr_scale):
    """global_skip_lr_scale gives the residual's one scalar a learning rate of its own (lr x the
    scale); every other parameter keeps the plain lr. Adam moves a parameter by about its lr per
    step, so after a few steps the scalar has left its start by more than the plain lr allows
    only when the option is on."""
    from types import SimpleNamespace

    from waldo.train.pairs import PairBatch
    from waldo.train.rrt_online import OnlineRRTTrainer

    rrt_options = {"d_model": 16, "n_layers": 1, "n_heads": 2, "ff_dim": 32, "use_global_tokens": True,
                   "global_skip": True, "global_skip_from": "descriptor"}
    config = RRTTrainConfig(mode="rrt-only", rrt=rrt_options, lr=1e-3, batch_triplets=4, global_skip_lr_scale=lr_scale)
    rrt = RerankingTransformer(config.rrt_config())
    rng = np.random.default_rng(0)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    global_desc, local_desc = unit((8, 32)), unit((8, 4, 16))
    trainer = OnlineRRTTrainer(config, rrt, SimpleNamespace(anchors_per_epoch=16), None, global_desc, local_desc,
                               None, (2, 2), None, {})
    trainer._candidates = lambda epoch, index, rows, middles=None: (torch.from_numpy(global_desc[rows]),
                                                                    torch.from_numpy(local_desc[rows]))
    batch = PairBatch(np.arange(4), np.arange(4, 8), np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4),
                      np.eye(4, dtype=np.float32).ravel(), {})
    start = float(rrt.global_skip_scale.detach())
    steps = 5
    for index in range(steps):
        trainer.step(0, index, batch)
    moved = abs(float(rrt.global_skip_scale.detach()) - start)
    plain_bound = 1.5 * config.lr * steps  # Adam's step is at most ~lr (bias-corrected)
    assert (moved > plain_bound) == (lr_scale > 1)
    assert [group.get("lr_scale", 1.0) for group in trainer.optimizer.param_groups] == (
        [1.0] if lr_scale == 1.0 else [1.0, lr_scale])
    with pytest.raises(ValueError, match="global_skip_lr_scale needs"):
        RRTTrainConfig(mode="rrt-only", rrt={**rrt_options, "global_skip": False, "global_skip_from": "token"},
                       global_skip_lr_scale=2.0)


def test_anchor_softmax_loss_is_cross_entropy_within_each_anchor():
    """The ranking loss equals a per-anchor cross-entropy computed the plain way, ignores a shift
    of one anchor's logits, and is refused outside rrt-only."""
    from waldo.train.rrt_online import anchor_softmax_loss

    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, 3.0, 0.0, -2.0])
    anchors = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    targets = torch.tensor([1.0, 0, 0, 0, 1, 0, 0])
    plain = (torch.nn.functional.cross_entropy(logits[:3][None], torch.tensor([0]))
             + torch.nn.functional.cross_entropy(logits[3:][None], torch.tensor([1]))) / 2
    assert torch.allclose(anchor_softmax_loss(logits, anchors, targets), plain)
    shifted = logits + torch.tensor([0, 0, 0, 5.0, 5.0, 5.0, 5.0])
    assert torch.allclose(anchor_softmax_loss(shifted, anchors, targets), plain)
    assert RRTTrainConfig(mode="rrt-only", pair_loss="softmax").pair_loss == "softmax"
    with pytest.raises(ValueError, match="pair_loss"):
        RRTTrainConfig(mode="frozen", pair_loss="softmax")


def test_a_default_must_gain_on_average_and_lose_on_no_validation_set():
    """The rule every stored default passes (rrt.json's default_reranker, a model's local-match
    default): a mean gain larger than the margin that hides a loss on one set does not qualify."""
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    none = [0.52, 0.96, 0.97]
    assert earns_default([0.54, 0.97, 0.97], none)  # gains, ties abo
    assert not earns_default([0.56, 0.97, 0.96], none)  # the biggest mean gain, but one set loses
    assert not earns_default([0.52 + DEFAULT_MARGIN, 0.96, 0.97], none)  # gains on no set past the margin's mean
    assert not earns_default([0.53, 0.96, 0.97], none, margin=0.01)
    with pytest.raises(ValueError):
        earns_default([0.5, 0.9], none)


def _stub_validator(augmented: bool = False):
    """A ViewValidator over hand-made top-6 lists (its own metrics code, no images): per query, a
    look-alike the RRT ranks first whose descriptor resembles nothing else, then three true
    matches alike, then two others."""
    from waldo.train.pairs import ValidationSet
    from waldo.train.rrt_online import ViewValidator

    rng = np.random.default_rng(0)
    n_queries, product = 3, rng.normal(size=(3, 16))
    rows = []
    for q in range(n_queries):
        rows += [rng.normal(size=16), *(product[q] + 0.2 * rng.normal(size=16) for _ in range(3)),
                 rng.normal(size=16), rng.normal(size=16)]
    global_desc = np.stack(rows).astype(np.float32)
    global_desc /= np.linalg.norm(global_desc, axis=1, keepdims=True)
    candidates = np.arange(6 * n_queries).reshape(n_queries, 6)
    matches = np.tile(np.array([False, True, True, True, False, False]), (n_queries, 1))
    validator = object.__new__(ViewValidator)
    validator.sets = [ValidationSet("stub", "protocol twin", np.arange(n_queries), candidates.ravel(), augmented,
                                    True)]
    validator.prepared = [{"candidates": candidates, "scores": np.tile(np.linspace(1, 0.5, 6), (n_queries, 1)),
                           "matches": matches, "n_positives": matches.sum(1)}]
    validator.global_desc, validator.top_k = global_desc, 6
    logits = [np.tile(np.array([5.0, 4.9, 4.8, 4.7, 1.0, 0.0], np.float32), (n_queries, 1))]
    return validator, logits


def test_consensus_is_chosen_on_labelled_validation_by_the_default_rule():
    """choose_consensus: the grid's best cell becomes the default only by earns_default against the
    choice made without it; it is not judged on augmented views (one true match per query) nor for
    an RRT without a global residual."""
    from waldo.train.rrt_online import CONSENSUS_GRID, choose_consensus

    rrt = RerankingTransformer(RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64, use_global_tokens=True,
                                         global_skip=True))
    validator, logits = _stub_validator()
    reference = [entry["rrt"]["map@100"] for entry in validator(rrt, logits)["sets"].values()]
    assert reference[0] < 1.0  # the look-alike first
    chosen = choose_consensus(validator, rrt, logits, "map@100", reference)
    assert chosen["adopted"] and (chosen["k"], chosen["weight"]) == CONSENSUS_GRID[0]  # every cell fixes it: the first
    assert chosen["validation"]["recall@1"] == 1.0 and len(chosen["grid_scores"]) == len(CONSENSUS_GRID)
    assert not choose_consensus(validator, rrt, logits, "map@100", [1.0])["adopted"]  # nothing to beat 1.0 by
    assert choose_consensus(_stub_validator(augmented=True)[0], rrt, logits, "map@100", reference) is None
    plain = RerankingTransformer(RRTConfig(d_model=DIM, n_layers=1, n_heads=4, ff_dim=64))
    assert choose_consensus(validator, plain, logits, "map@100", reference) is None
