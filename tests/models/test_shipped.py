"""The shipped models: small enough for git (all together), load offline, and reproduce their cards' figures."""

import json

import pytest

from waldo.models.checkpoint import load_model, model_hash
from waldo.models.shipped import SHIPPED_DIR, resolve_model_dir, shipped_models
from waldo.rerank.rrt_checkpoint import load_rrt

#: the first reranker; it with a trained global head; the RRT that starts as local matching (make demo's)
NAMES = ("lite0-rrt", "lite0-lw-rrt", "lite0-match-rrt")
DEMO_MODEL = "lite0-match-rrt"
TRAINED_BACKBONE = "lite0-global"  # the default trained global model's backbone (experiments/global_seed_grid.py)


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    assert request.param in shipped_models()
    return request.param, json.loads((SHIPPED_DIR / request.param / "card.json").read_text())


def test_shipped_models_are_small_together():
    assert {*NAMES, TRAINED_BACKBONE} == set(shipped_models())
    total = sum(p.stat().st_size for name in shipped_models() for p in resolve_model_dir(name).iterdir())
    assert total <= 5_000_000  # the "5 MB all together"


def test_demo_serves_a_shipped_model():
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"DEMO_MODEL ?= {DEMO_MODEL}" in makefile


def test_shipped_model_is_small_and_documented(shipped):
    name, card = shipped
    for key in ("trained_on", "train_config", "chosen_on_validation", "reproduce", "check", "validation_sets"):
        assert card.get(key), key
    from waldo.rerank import RERANKERS, Need

    chosen = card["chosen_on_validation"]
    chain = [chosen["default_reranker"], *chosen.get("default_fallbacks", [])]
    assert all(name == "none" or name in RERANKERS.names() for name in chain)
    # every chain ends on a choice an index without keypoints can offer
    assert chain[-1] == "none" or Need.KEYPOINTS not in RERANKERS.spec(chain[-1]).needs
    # never trained on a reported protocol's test identities: only training splits and other folders
    assert all(source["name"].endswith(":train") or source["name"] == "abo_sample" for source in card["trained_on"])


def test_shipped_model_loads_and_matches_its_card(shipped):
    name, card = shipped
    model, config = load_model(resolve_model_dir(name))
    rrt, info = load_rrt(resolve_model_dir(name))
    assert config.extra["backbone_weights"]["weights_source"] == model.backbone.weights_source
    assert rrt.config.model_dump() == {**rrt.config.model_dump(), **card["train_config"]["rrt"]}
    assert info["training"]["default_reranker"] == card["chosen_on_validation"]["default_reranker"]


def test_shipped_weights_reproduce_the_card_validation_figure(shipped, data_root):
    from waldo.train.rrt_online import validate_reranker
    from waldo.train.sources import parse_source, quoted_source

    name, card = shipped
    check = card["check"]
    # folders are quoted relative to the project root as ../shared/data/...: read them from WALDO_DATA
    sources = [parse_source(quoted_source(spec)) for spec in check["sources"]]
    result = validate_reranker(resolve_model_dir(name), sources,
                               val_fraction=check["val_fraction"], seed=check["seed"],
                               max_queries=check["max_queries"], only=[check["set"]])
    for reranker, metrics in check["metrics"].items():
        for metric, value in metrics.items():
            assert result["macro"][reranker][metric] == pytest.approx(value, abs=0.01), (reranker, metric)


def test_the_trained_global_head_keeps_the_locals_and_its_reranker_reads_it(data_root):
    """lite0-lw-rrt is lite0-rrt's locals (the RRT's tokens) with a trained global descriptor (the
    kNN's), as wide as its card says, and a Reranking Transformer retrained on that model whose
    residual reads the wide global descriptor (global_skip_from: descriptor). Since its global
    head was swapped for the one fitted at 288 px (experiments/rrt_views.py with-global), the RRT
    was trained with the 224 px head: what it reads, the backbone and the locals, is checked
    against the hash recorded from the model it was trained on."""
    import torch

    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform

    (old, old_config), (new, new_config) = (load_model(resolve_model_dir(n)) for n in NAMES[:2])
    card = json.loads((SHIPPED_DIR / NAMES[1] / "card.json").read_text())
    assert new_config.global_width == card["global_head"]["setting"]["dim"] != old_config.global_width
    (old_rrt, _), (new_rrt, new_info) = (load_rrt(resolve_model_dir(n)) for n in NAMES[:2])
    assert new_rrt.skips_on_descriptor and not old_rrt.skips_on_descriptor
    training = new_info["training"]
    if "locals_from" in training:  # the RRT reads exactly the backbone and locals it was trained on
        assert training["locals_from"]["locals_hash"] == model_hash(new, exclude=("global_proj.",))
        assert training["init_model_hash"] != model_hash(new)  # another global head than in training
    else:  # trained on exactly the descriptor model it ships with
        assert training["init_model_hash"] == model_hash(new)
    # the RRT's position grid is the feature map the model makes at its input size (stride 32)
    assert new_config.image_size == card["global_head"]["image_size"]
    assert list(new_info["grid"]) == [new_config.image_size // new.backbone.stride] * 2
    paths = sorted((data_root / "grocery_store").rglob("*.jpg"))[:4]
    transform = get_transform(new_config.transform, new_config.image_size)
    batch = torch.stack([transform(load_image(p), 0) for p in paths])
    with torch.inference_mode():
        before, after = old.eval()(batch), new.eval()(batch)
    assert torch.allclose(before.local_desc, after.local_desc)
    assert after.global_desc.shape == (4, new_config.global_width)


def test_lite0_lw_rrt_with_match_cells_defaults_to_local_match(data_root, tmp_path):
    """lite0-lw-rrt indexed with stage-4 match cells (make demo's before lite0-match-rrt): its config
    records the local-match setting its fair validation chose (against global search and its RRT,
    experiments/local_matching.py --store-choice), which is then the index's default; without the
    cells the RRT's choice stands."""
    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv
    from waldo.rerank.local_match import LocalMatchSetting

    _, config = load_model(resolve_model_dir("lite0-lw-rrt"))
    choice = config.extra["local_match"]
    assert choice["default"] and choice["validation"]["local-match"]["map@100"] > max(
        choice["validation"][name]["map@100"] for name in ("none", "rrt", "rrt-fusion")) + choice["margin"]
    abo = read_labels_csv(data_root / "abo_sample")
    with_cells = Waldo.create(tmp_path / "cells", model_dir=resolve_model_dir("lite0-lw-rrt"), local_stage=4, dim=64,
                              fit_paths=abo.paths, gv_features=False, progress=False)
    plain = Waldo.create(tmp_path / "plain", model_dir=resolve_model_dir("lite0-lw-rrt"), gv_features=False,
                         progress=False)
    assert with_cells.default_reranker == "local-match" and {"rrt", "rrt-fusion"} <= set(with_cells.available_rerankers())
    assert plain.default_reranker == "none" and "local-match" not in plain.available_rerankers()
    assert LocalMatchSetting.for_model(tmp_path / "cells" / "model") == LocalMatchSetting(choice["threshold"],
                                                                                          choice["weight"])


def test_make_demos_model_starts_as_local_matching_and_defaults_to_its_rrt_with_consensus(data_root, tmp_path):
    """make demo's lite0-match-rrt: the RRT reads stage-4 cells (its locals, which local-match reads
    too) with the mutual-match residual; its default, chosen on the fair validation (the global head
    refitted without the held-out identities), beat global search by the margin on the mean and on
    every set; an index built from it offers every reranker and searches with that default. Its
    global head is lite0-lw-rrt's, stored once (read from it, checked by digest)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"DEMO_MODEL ?= {DEMO_MODEL}" in makefile and "$(DEMO_LOCAL)" in makefile
    folder = resolve_model_dir(DEMO_MODEL)
    model, config = load_model(folder)
    rrt, info = load_rrt(folder)
    assert config.local_stage == 4 and rrt.config.match_skip and rrt.config.global_skip
    assert list(info["grid"]) == list(model.local_grid(config.image_size))
    training = info["training"]
    assert training["choice_validation"]["kind"] == "refit-global"
    assert training["choice_validation"]["refit_check_min_cosine"] > 0.999  # the refit is the head's recipe
    card = json.loads((folder / "card.json").read_text())
    chosen = card["chosen_on_validation"]
    # rrt-consensus+gv first (experiments/consensus_gv.py --store), rrt-consensus where no keypoints
    assert chosen["default_reranker"] == training["default_reranker"] == "rrt-consensus+gv"
    assert chosen["default_fallbacks"] == training["default_fallbacks"] == ["rrt-consensus"]
    assert chosen["validation"]["rrt"]["map@100"] > chosen["validation"]["none"]["map@100"] + 0.005
    # the neighbourhood consensus after it was adopted on the same validation by the same margin
    consensus = training["consensus"]
    assert consensus == chosen["consensus"] and (consensus["k"], consensus["weight"]) == (3, 1.0)
    adopted = consensus["validation"]["rrt+consensus k=3 t=1"]["map@100"]
    assert adopted > consensus["validation"]["rrt"]["map@100"] + consensus["margin"]
    # the same global head as lite0-lw-rrt's, not stored twice
    assert "global_proj.weight" not in load_file(str(folder / "model.safetensors"))
    donor, _ = load_model(resolve_model_dir("lite0-lw-rrt"))
    assert torch.equal(model.global_proj.weight, donor.global_proj.weight)
    abo = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "demo", model_dir=folder, gv_features=False, progress=False)
    engine.add(abo.paths, None, num_workers=0, progress=False)
    assert engine.default_reranker == engine.stored_default_reranker == "rrt-consensus"  # the chain's next
    assert {"rrt", "rrt-fusion", "rrt-consensus", "local-match"} <= set(engine.available_rerankers())
    assert "rrt-consensus+gv" not in engine.available_rerankers()  # an index without keypoints
    outcome = engine.search(abo.paths[0], k=3)
    assert outcome.rerank == "rrt-consensus" and outcome.hits[0].path == abo.paths[0]
    engine = Waldo.create(tmp_path / "demo-keypoints", model_dir=folder, progress=False)  # as make demo builds it
    engine.add(abo.paths, None, num_workers=0, progress=False)
    assert engine.default_reranker == "rrt-consensus+gv"
    outcome = engine.search(abo.paths[0], k=3)
    assert outcome.rerank == "rrt-consensus+gv" and outcome.hits[0].path == abo.paths[0]


def test_the_trained_backbone_ships_as_its_differences_and_says_how_it_was_chosen():
    """lite0-global: the last stage of the global model experiments/global_seed_grid.py chose on
    validation, stored as int8 differences from the packaged ImageNet weights; a model folder
    it is not (--backbone-from, not --model)."""
    import torch

    from waldo.models.backbones import create_backbone
    from waldo.models.shipped import is_trained_backbone, load_trained_backbone

    folder = resolve_model_dir(TRAINED_BACKBONE)
    card = json.loads((folder / "card.json").read_text())
    info = json.loads((folder / "backbone.json").read_text())
    assert is_trained_backbone(folder)
    for key in ("trained_on", "train_config", "chosen_on_validation", "reproduce", "use"):
        assert card.get(key), key
    assert all(":train-split" in source for source in card["trained_on"])  # never a test identity
    choice = card["chosen_on_validation"]
    assert choice["validation_mean"] > choice["untrained_default_validation_mean"]
    state, label = load_trained_backbone(folder, "efficientnet_lite0")
    imagenet = create_backbone("efficientnet_lite0", pretrained=True).state_dict()
    changed = {name for name in imagenet if not torch.equal(imagenet[name], state[name])}
    assert changed == set(info["trained_tensors"]) and all(
        name.startswith(("body.blocks.6.", "body.conv_head.", "body.bn2.")) for name in changed)
    with pytest.raises(FileNotFoundError, match="--backbone-from lite0-global"):
        load_model(folder)


def test_the_trained_backbone_reproduces_its_card_validation_figure():
    """One set of the card's validation (the card's "check"), held-out training identities searched
    leave-one-out under a projection fitted on their photos; the int8 differences keep it to the
    card's figure within 0.005."""
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.models.untrained import untrained_model
    from waldo.train.common import LooEvaluator, split_identities

    folder = resolve_model_dir(TRAINED_BACKBONE)
    card = json.loads((folder / "card.json").read_text())
    choice = card["chosen_on_validation"]
    spec = choice["check"]
    _, check = split_identities(get_protocol(spec["protocol"]).train, spec["held_out_fraction"], spec["seed"])
    model, _ = untrained_model("efficientnet_lite0", fit_paths=check.paths, fit_source=check.name, progress=False,
                               backbone_from=folder)
    value = LooEvaluator(check, get_transform("resize256-crop224", 224))(model)["map"]
    assert value == pytest.approx(choice["validation_map"][spec["validation_key"]], abs=0.005)
