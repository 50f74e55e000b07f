"""Per-group figures: the grouping rules, and groups that add up to the overall figures."""

from __future__ import annotations

import numpy as np
import pytest

from waldo.data.datasets import ImageRecord, read_products10k
from waldo.data.protocols import Protocol
from waldo.eval.metrics import retrieval_metrics
from waldo.paths import PROJECT_ROOT
from waldo_experiments.groups import group_metrics, query_groups, record_group, weighted_overall


def test_record_group_rules():
    assert record_group(ImageRecord("/d/x.jpg", "1", {"group": "shoes"})) == "shoes"
    assert record_group(ImageRecord("/d/x.jpg", "1", {"super_class_id": "3"})) == "3"
    assert record_group(ImageRecord("/r/dataset/test/Fruit/Apple/a.jpg", "1")) == "Fruit"
    assert record_group(ImageRecord("/r/images/obj1.png", "1")) == "all"
    assert record_group(ImageRecord("/r/x.png", "1", {"kind": "a"}), column="kind") == "a"


def test_group_figures_add_up():
    rng = np.random.default_rng(0)
    matches = rng.random((50, 30)) < 0.1
    n_positives = np.maximum(matches.sum(axis=1), 1)
    groups = np.array(["a", "b", "c", "a", "b"] * 10, dtype=object)
    per_group = group_metrics(matches, n_positives, groups, ks=(1, 10))
    overall = retrieval_metrics(matches, n_positives, (1, 10))
    for key in ("recall@1", "recall@10", "map"):
        assert weighted_overall(per_group, key) == pytest.approx(overall[key], abs=1e-12)


def test_products10k_test_queries_take_their_class_group_from_train():
    root = PROJECT_ROOT / "tests" / "fixtures" / "products10k"  # label files only, no images
    test = read_products10k(root, "test", check_files=False)
    protocol = Protocol("p10k", read_products10k(root, "train", check_files=False), test, test, True, "fixture")
    groups = query_groups(protocol, np.arange(len(protocol.queries)))
    train_group = {r.identity: r.attrs["group"] for r in protocol.train}
    expected = [train_group.get(r.identity, "all") for r in protocol.queries]
    assert groups.tolist() == expected and len(set(expected)) >= 1
