"""The shipped reranker: small enough for git, loads offline, and reproduces its card's figure."""

import json

import pytest

from waldo.models.checkpoint import load_model
from waldo.models.shipped import SHIPPED_DIR, resolve_model_dir, shipped_models
from waldo.rerank.rrt_checkpoint import load_rrt

NAME = "lite0-rrt"


@pytest.fixture(scope="module")
def card():
    assert NAME in shipped_models()
    return json.loads((SHIPPED_DIR / NAME / "card.json").read_text())


def test_shipped_model_is_small_and_documented(card):
    folder = resolve_model_dir(NAME)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 5 * 2**20
    for key in ("trained_on", "train_config", "chosen_on_validation", "reproduce", "check", "validation_sets"):
        assert card.get(key), key
    assert card["chosen_on_validation"]["default_reranker"] in ("none", "rrt", "rrt-fusion")
    # never trained on a reported protocol's test identities: only training splits and other folders
    assert all(source["name"].endswith(":train") or source["name"] == "abo_sample" for source in card["trained_on"])


def test_shipped_model_loads_and_matches_its_card(card):
    model, config = load_model(resolve_model_dir(NAME))
    rrt, info = load_rrt(resolve_model_dir(NAME))
    assert config.extra["backbone_weights"]["weights_source"] == model.backbone.weights_source
    assert rrt.config.model_dump() == {**rrt.config.model_dump(), **card["train_config"]["rrt"]}
    assert info["training"]["default_reranker"] == card["chosen_on_validation"]["default_reranker"]


def test_shipped_weights_reproduce_the_card_validation_figure(card, data_root):
    from waldo.train.rrt_online import validate_reranker
    from waldo.train.sources import parse_source

    check = card["check"]
    # folders are quoted relative to the project root as ../shared/data/...: read them from WALDO_DATA
    specs = [str(data_root / spec.split("shared/data/", 1)[1]) if "shared/data/" in spec else spec
             for spec in check["sources"]]
    result = validate_reranker(resolve_model_dir(NAME), [parse_source(spec) for spec in specs],
                               val_fraction=check["val_fraction"], seed=check["seed"],
                               max_queries=check["max_queries"], only=[check["set"]])
    for reranker, metrics in check["metrics"].items():
        for metric, value in metrics.items():
            assert result["macro"][reranker][metric] == pytest.approx(value, abs=0.01), (reranker, metric)
