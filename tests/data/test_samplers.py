"""PKSampler: P identities x K images per batch, deterministic per (seed, epoch)."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from waldo.data.samplers import PKSampler


def _labels() -> np.ndarray:
    """23 identities: ids 0-9 with 5 images, 10-19 with 2, 20-21 with 1 (ineligible), 22 with 3;
    shuffled so images of one identity are not contiguous."""
    sizes = [5] * 10 + [2] * 10 + [1] * 2 + [3]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(7).permutation(labels)


def test_every_batch_has_p_identities_with_k_images_each():
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=3, seed=0)
    assert sampler.n_identities == 21 and sampler.n_skipped == 2
    assert len(sampler) == 21 // 4
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = []
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(i, int) for i in batch)
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        seen.extend(counts)
        for identity in counts:  # identities with >= K images get K distinct images
            indices = [i for i in batch if labels[i] == identity]
            if (labels == identity).sum() >= 3:
                assert len(set(indices)) == 3
            else:  # 2 images: both appear, plus one repeat
                assert set(indices) == set(np.flatnonzero(labels == identity).tolist())
    assert len(seen) == len(set(seen)) == 20  # each identity at most once; 1 left over
    assert not {20, 21} & set(seen)  # single-image identities are skipped


def test_drop_last_false_keeps_the_partial_batch():
    sampler = PKSampler(_labels(), p=4, k=2, drop_last=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert len(batches[-1]) == 2  # 21 = 5 * 4 + 1 identity
    identities = {int(label) for batch in batches for label in _labels()[batch]}
    assert len(identities) == 21  # every eligible identity, once


def test_same_seed_and_epoch_give_the_same_batches():
    labels = _labels()
    first = PKSampler(labels, p=4, k=2, seed=3)
    second = PKSampler(labels, p=4, k=2, seed=3)
    assert list(first) == list(second) == list(first)  # re-iterating without set_epoch repeats
    first.set_epoch(5)
    second.set_epoch(5)
    assert list(first) == list(second)
    assert list(PKSampler(labels, p=4, k=2, seed=4)) != list(PKSampler(labels, p=4, k=2, seed=3))


def test_set_epoch_changes_the_order():
    sampler = PKSampler(_labels(), p=4, k=2, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match=r"only 21 identities .* fewer than p=30; use p <= 21"):
        PKSampler(_labels(), p=30, k=2)
    with pytest.raises(ValueError, match="k"):
        PKSampler(_labels(), p=2, k=1)
    with pytest.raises(ValueError, match="integer"):
        PKSampler([0.0, 0.0, 1.0, 1.0], p=1, k=2)


def test_works_as_a_dataloader_batch_sampler():
    labels = _labels()
    dataset = TensorDataset(torch.from_numpy(labels))
    loader = DataLoader(dataset, batch_sampler=PKSampler(labels, p=3, k=2, seed=1))
    batches = [batch for (batch,) in loader]
    assert len(batches) == 7 and all(batch.shape == (6,) for batch in batches)
    assert all(len(set(batch.tolist())) == 3 for batch in batches)
