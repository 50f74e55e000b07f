"""Learned whitening (waldo.train.whitening): what it learns on data with a known structure, the
guards that keep it close to the untrained default, validation that never fits on what it
searches, and the trained model on real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from waldo.models.checkpoint import load_model
from waldo.train.sources import parse_source
from waldo.train.whitening import (
    WhiteningSetting,
    _describe,
    learned_projection,
    train_whitening,
    untrained_metric_projection,
    within_scatter,
)


def _nuisance_data(seed: int, identities: int = 40, per_identity: int = 6, channels: int = 24):
    """Identities differ along channels 0-3 (small spread); every photo also varies strongly
    along channels 4-7 (the nuisance: light, viewpoint); the rest is weak noise."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((identities, channels))
    centres[:, :4] = rng.normal(size=(identities, 4))
    ids = np.repeat(np.arange(identities), per_identity)
    x = centres[ids] + 0.05 * rng.normal(size=(len(ids), channels))
    x[:, 4:8] += 3.0 * rng.normal(size=(len(ids), 4))
    return x, ids


def _nearest_neighbour_accuracy(described: np.ndarray, ids: np.ndarray) -> float:
    similarity = described @ described.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(ids[similarity.argmax(1)] == ids))


def test_within_scatter_is_the_variation_inside_identities():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 5.0], [10.0, 7.0], [3.0, 3.0]])
    ids = np.array([0, 0, 1, 1, 2])  # identity 2 has one photo: nothing to learn from it
    assert np.allclose(within_scatter(x, ids), np.array([[2.0, 0.0], [0.0, 2.0]]) / 4)
    with pytest.raises(ValueError, match="at least two photos"):
        within_scatter(x[:1], ids[:1])


def test_learned_whitening_ignores_the_nuisance_on_unseen_identities():
    train, train_ids = _nuisance_data(0)
    test, test_ids = _nuisance_data(1)  # other identities, the same kind of nuisance
    mean, projection = learned_projection(train, train_ids, train, WhiteningSetting(dim=4, shrink=0.1, mix=0.0))
    learned = _nearest_neighbour_accuracy(_describe(test, mean, projection), test_ids)
    raw = test - test.mean(0)
    plain = _nearest_neighbour_accuracy(raw / np.linalg.norm(raw, axis=1, keepdims=True), test_ids)
    assert plain < 0.5 and learned > 0.9, (plain, learned)
    # The untrained projection (no labels) cannot tell nuisance from identity.
    untrained = untrained_metric_projection(train, 4)
    assert _nearest_neighbour_accuracy(_describe(test, train.mean(0), untrained), test_ids) < 0.5


def test_mix_one_is_the_untrained_default_and_mix_moves_between():
    train, train_ids = _nuisance_data(0)
    test, test_ids = _nuisance_data(1)
    untrained = _describe(test, train.mean(0), untrained_metric_projection(train, 8))
    mean, mixed_all = learned_projection(train, train_ids, train, WhiteningSetting(dim=8, shrink=0.1, mix=1.0))
    # Same similarities as the untrained projection (the basis may rotate).
    assert np.allclose(_describe(test, mean, mixed_all) @ _describe(test, mean, mixed_all).T,
                       untrained @ untrained.T, atol=1e-6)
    accuracies = [_nearest_neighbour_accuracy(_describe(test, *learned_projection(
        train, train_ids, train, WhiteningSetting(8, 0.1, mix))), test_ids) for mix in (0.0, 0.5, 1.0)]
    assert accuracies[0] >= accuracies[1] >= accuracies[2], accuracies


def test_a_trained_model_on_real_photos(tmp_path, grocery_dir):
    """A quick fit (a sample of grocery-open-cross's training split, coil100-open's training split
    only checked): validation names each held-out fold and the check collection, the chosen
    setting is the best validated one, and the saved model reloads with that global width and
    describes photos as the fit said (its projection in the weights)."""
    sources = [parse_source("grocery-open-cross")]
    checks = [parse_source("coil100-open")]
    settings = [WhiteningSetting(512, 0.3, 0.0), WhiteningSetting(512, 0.3, 1.0)]
    out = tmp_path / "lw"
    report = train_whitening(sources, out, check_sources=checks, settings=settings, max_images=260,
                             image_size=160, progress=False)
    names = set(report["validation"][0]["validation_map"])
    assert names == {"grocery-open-cross:train:fold0", "grocery-open-cross:train:fold1", "check:coil100-open:train"}
    means = [row["mean_map"] for row in report["validation"]]
    assert means == sorted(means, reverse=True) and report["setting"] == report["validation"][0]["setting"]
    # every search's query count is recorded; the folds split the sampled grocery photos' queries
    counts = report["validation"][0]["n_queries"]
    assert set(counts) == names and all(n > 0 for n in counts.values())
    assert counts["check:coil100-open:train"] + counts["grocery-open-cross:train:fold0"] + \
        counts["grocery-open-cross:train:fold1"] <= 260
    model, config = load_model(out)
    assert config.global_width == 512 and config.projection.startswith("learned-whitening(dim=512")
    assert config.image_size == 160  # the size the model was fitted at travels with it
    assert json.loads((out / "whitening.json").read_text())["setting"] == report["setting"]
    with torch.inference_mode():
        out_desc = model(torch.rand(2, 3, 224, 224))
    assert out_desc.global_desc.shape == (2, 512) and out_desc.local_desc.shape == (2, 49, 128)


def test_test_images_and_unlabelled_only_runs_are_refused(tmp_path, grocery_dir):
    with pytest.raises(ValueError, match="test images of protocol"):
        train_whitening([parse_source(str(grocery_dir))], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="at least one labelled"):
        train_whitening([parse_source("grocery-open-cross,labels=no")], tmp_path / "y", progress=False)
