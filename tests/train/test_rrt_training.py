"""Reranker training on real photos: a step lowers the loss, a run resumes, frozen keeps global."""

import json

import numpy as np
import pytest
import torch

from waldo.data.datasets import read_labels_csv
from waldo.data.transforms import get_transform
from waldo.models.checkpoint import load_model, save_model
from waldo.models.untrained import untrained_model
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_checkpoint import load_rrt
from waldo.train.config import RRTTrainConfig
from waldo.train.reranker import RerankerBundle, _trainable, train_reranker, train_step
from waldo.train.rrt_features import augment, cache_features
from waldo.train.triplets import TripletSampler

DIM = 32  # a small model keeps the tests fast; the RRT's d_model must equal it
SIZE = 64  # 64 px images: a 2 x 2 feature map, 4 locals per image
TINY_RRT = {"d_model": DIM, "n_layers": 1, "n_heads": 4, "ff_dim": 64}


@pytest.fixture(scope="module")
def abo(data_root):
    return read_labels_csv(data_root / "abo_sample")  # 12 photos, 3 products


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    model, config = untrained_model("efficientnet_lite0", dim=DIM, projection="random", image_size=SIZE,
                                    progress=False)
    return save_model(model, config, tmp_path_factory.mktemp("init") / "model")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """Shared by the tests, so the feature cache is computed once."""
    return tmp_path_factory.mktemp("cache")


def _config(**overrides) -> RRTTrainConfig:
    settings = {"rrt": TINY_RRT, "epochs": 2, "batch_triplets": 4, "views": 2, "val_fraction": 0.34,
                "val_top_k": 3, "fusion_top_k": 5, "fusion_grid": 4, "num_workers": 0, "lr": 1e-3}
    return RRTTrainConfig.model_validate({**settings, **overrides})


def test_config_validation_and_schedule():
    config = RRTTrainConfig.model_validate({"epochs": 10, "_comment": "ignored"})
    assert config.milestone_epochs() == [6, 8]
    assert config.lr_at(5) == pytest.approx(1e-4) and config.lr_at(8) == pytest.approx(1e-6)
    warm = RRTTrainConfig.model_validate({"epochs": 10, "warmup_steps": 4})
    assert [warm.lr_at(0, s) for s in range(5)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="mode"):
        RRTTrainConfig.model_validate({"mode": "thawed"})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RRTTrainConfig.model_validate({"rrt": {"depth": 3}})


def test_augment_is_seeded(abo):
    from waldo.data.images import load_image

    image = load_image(abo.paths[0])
    first = augment(image, 64, np.random.default_rng(1))
    assert first.shape == (3, 64, 64) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, augment(image, 64, np.random.default_rng(1)))
    assert not torch.equal(first, augment(image, 64, np.random.default_rng(2)))


def test_triplets_follow_the_rules():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    train = np.array([True] * 7 + [False])  # row 7 (identity 3) is validation
    neighbours = np.array([[1, 3, 7], [0, 2, 5], [0, 1, -1], [4, 0, 7], [3, 6, 1], [6, 2, 4], [5, 0, 3], [0, 1, 2]])
    sampler = TripletSampler(labels, train, neighbours, seed=0)
    seen, fallbacks = [], 0
    for anchors, positives, negatives, fell_back in sampler.epoch(0, batch_triplets=3):
        assert np.all(labels[positives] == labels[anchors]) and np.all(positives != anchors)
        assert np.all(labels[negatives] != labels[anchors]) and np.all(train[negatives])
        seen += anchors.tolist()
        fallbacks += fell_back
    assert sorted(seen) == list(range(7))  # each anchor once per epoch
    assert fallbacks == 1  # row 2's top-k holds only its own identity
    for anchor, negative in zip(*[np.concatenate(x) for x in zip(*[(a, n) for a, _, n, _ in sampler.epoch(0, 3)])]):
        if anchor == 0:
            assert negative == 3  # from its top-k, never the validation row 7
    again = [a.tolist() for a, *_ in sampler.epoch(0, 3)]
    assert again == [a.tolist() for a, *_ in TripletSampler(labels, train, neighbours, seed=0).epoch(0, 3)]


def test_one_step_lowers_the_loss(abo, init_dir, cache_root):
    model, config = load_model(init_dir)
    cache = cache_features(model.backbone, None, abo.paths, get_transform(config.transform, config.image_size),
                           n_views=2, cache_root=cache_root, num_workers=0, progress=False)
    assert cache.features.shape == (12, 2, 1280, 2, 2)
    torch.manual_seed(0)
    bundle = RerankerBundle(model, RerankingTransformer(RRTConfig(**TINY_RRT)))
    optimizer = torch.optim.AdamW(_trainable(bundle, [], "frozen"), lr=1e-4, weight_decay=4e-4)
    anchors, positives, negatives = np.array([0, 3, 8]), np.array([1, 4, 9]), np.array([5, 10, 2])
    rows = np.concatenate([anchors, positives, negatives])
    features = cache.get(rows, np.zeros(len(rows), np.int64))
    labels = torch.from_numpy(abo.identity_codes()[rows])
    global_before = model.global_proj.weight.clone()
    losses = [train_step(bundle, [], optimizer, features, labels)["loss"] for _ in range(3)]
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    assert torch.equal(model.global_proj.weight, global_before)  # frozen: the global head never moves


def test_frozen_run_resumes_and_keeps_global_search(abo, init_dir, cache_root, tmp_path):
    config = _config()
    out = tmp_path / "run"
    train_reranker(config, abo, init_dir, out, cache_root=cache_root, progress=False, stop_after=1)
    state = json.loads((out / "state" / "train_state.json").read_text())
    assert state["epoch"] == 1 and not (out / "best" / "rrt.json").read_text().count("fusion_weight")
    best = train_reranker(config, abo, init_dir, out, cache_root=cache_root, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("val" in r for r in log)

    # An uninterrupted run ends with the same weights: resuming replays the same epochs.
    straight = train_reranker(config, abo, init_dir, tmp_path / "straight", cache_root=cache_root,
                              progress=False)
    rrt_resumed, info = load_rrt(out / "last")
    rrt_straight, _ = load_rrt(tmp_path / "straight" / "last")
    for (name, a), (_, b) in zip(rrt_resumed.state_dict().items(), rrt_straight.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)

    # best/ is a model folder whose global outputs are exactly the init model's (frozen mode).
    trained, _ = load_model(best)
    init, _ = load_model(init_dir)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = trained(images), init(images)
    assert torch.equal(a.global_desc, b.global_desc)
    assert not torch.equal(a.local_desc, b.local_desc)  # the local projection did train
    _, info = load_rrt(best)
    # The fusion weight is the grid's first best lambda (1 -> 0: ties keep the larger one).
    fusion = info["training"]["fusion_val"]
    assert fusion["grid"] == [1.0, 0.75, 0.5, 0.25, 0.0] and len(fusion["grid_scores"]) == 5
    first_best = fusion["grid"][int(np.argmax(fusion["grid_scores"]))]
    assert info["training"]["fusion_weight"] == first_best and info["training"]["mode"] == "frozen"
    assert fusion["fusion"][config.select_metric] == max(fusion["grid_scores"])
    assert (straight / "metrics.json").is_file()
    with pytest.raises(ValueError, match="another config"):
        train_reranker(_config(lr=5e-4), abo, init_dir, out, cache_root=cache_root, progress=False)

    # Fine-tuning starts from the frozen reranker (its RRT too) and moves the global head.
    tuned = train_reranker(_config(mode="finetune", trainable_blocks=1, epochs=1, views=1), abo, best,
                           tmp_path / "finetune", cache_root=cache_root, progress=False)
    log = [json.loads(line) for line in (tmp_path / "finetune" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["global"] > 0  # epoch 0 = the frozen start
    final, _ = load_model(tmp_path / "finetune" / "last")
    assert not torch.equal(final.global_proj.weight, trained.global_proj.weight)
    assert not torch.equal(final.backbone.body.conv_head.weight, trained.backbone.body.conv_head.weight)
    assert torch.equal(final.backbone.body.conv_stem.weight, trained.backbone.body.conv_stem.weight)
    assert load_rrt(tuned)[1]["training"]["mode"] == "finetune"
