"""Global-model training on a few real grocery photos: one step lowers the loss, resuming
replays an uninterrupted run exactly, and a saved model scores as it did in memory."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from waldo.data.datasets import read_labels_csv
from waldo.data.images import load_image
from waldo.data.transforms import get_transform
from waldo.models.backbones import backbone_names, create_backbone
from waldo.models.checkpoint import ModelConfig, build_model, load_model, model_hash
from waldo.train.common import (
    LooEvaluator,
    load_optimizer_state,
    save_optimizer_state,
    split_backbone,
    split_identities,
)
from waldo.train.config import GlobalTrainConfig, RRTTrainConfig, load_config
from waldo.train.global_model import set_trainable, split_forward, train_global, train_step
from waldo.train.losses import LOSSES, SoftmaxContrastiveLoss

SIZE = 64  # small images keep every test here to seconds on 2 cores


def _tiny_grocery(grocery_dir: Path, folder: Path, per_identity: int = 6) -> Path:
    """A labels.csv over real grocery photos (absolute paths): even ids train, odd ids test."""
    with open(grocery_dir / "labels.csv", newline="") as source:
        rows = list(csv.DictReader(source))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for identity in ("0", "2", "4", "6", "1", "3"):
            picked = [r for r in rows if r["instance_id"] == identity and r["kind"] == "natural"][:per_identity]
            for row in picked:
                writer.writerow({**row, "path": str(grocery_dir / row["path"])})
    return folder


def _tiny_config(**overrides) -> GlobalTrainConfig:
    settings = {"dim": 32, "image_size": SIZE, "eval_image_size": SIZE, "p": 2, "k": 3, "epochs": 2,
                "lr": 0.01, "val_fraction": 0.5, "trainable_blocks": 1, "num_workers": 0,
                "projection_init": "random", "max_fit_images": 20}
    return GlobalTrainConfig.model_validate({**settings, **overrides})


def test_config_json_round_trip_and_strictness(tmp_path: Path) -> None:
    config = _tiny_config(milestones=[0.5, 0.75])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_comment": "comments are skipped", **config.model_dump(mode="json")}))
    assert load_config(path, GlobalTrainConfig) == config
    assert GlobalTrainConfig.model_validate_json(config.to_json()) == config
    assert config.milestones == (0.5, 0.75) and config.milestone_epochs() == [1, 2]
    assert [config.lr_at(e) for e in range(3)] == pytest.approx([0.01, 0.001, 0.0001])
    with pytest.raises(ValueError, match="learning_rate\n.*Extra inputs are not permitted"):
        GlobalTrainConfig.model_validate({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="epochs\n.*valid integer"):
        GlobalTrainConfig.model_validate({"epochs": "10"})
    with pytest.raises(ValueError, match="k\n.*greater than or equal to 2"):
        GlobalTrainConfig.model_validate({"k": 1})
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        GlobalTrainConfig.model_validate({"momentum": 0.0})
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        GlobalTrainConfig.model_validate({"loss": "triplet"})
    assert GlobalTrainConfig.model_validate({"pooling": "gem:3.0"}).pooling == "gem:3"
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        GlobalTrainConfig.model_validate({"pooling": "mean"})
    with pytest.raises(ValueError, match="anchor_weight\n.*greater than or equal to 0"):
        GlobalTrainConfig.model_validate({"anchor_weight": -1.0})
    bad = tmp_path / "bad.json"
    bad.write_text('{"milestones": [0.8, 0.6]}')
    with pytest.raises(ValueError, match="(?s)bad.json.*milestones must be increasing"):
        load_config(bad, GlobalTrainConfig)


def test_every_shipped_config_loads() -> None:
    configs = Path(__file__).parents[2] / "configs"
    for path in sorted(configs.glob("*.json")):
        cls = RRTTrainConfig if path.name.startswith("rrt-") else GlobalTrainConfig
        assert load_config(path, cls).to_json() == cls.model_validate_json(path.read_text()).to_json()


def test_split_identities_is_deterministic_and_disjoint(grocery_dir: Path, tmp_path: Path) -> None:
    data = read_labels_csv(_tiny_grocery(grocery_dir, tmp_path / "data"))
    train, val = split_identities(data, 0.5, seed=3)
    again_train, again_val = split_identities(data, 0.5, seed=3)
    assert train.paths == again_train.paths and val.paths == again_val.paths
    assert not set(train.identities) & set(val.identities)
    assert len(train) + len(val) == len(data) and len(set(val.identities)) == 3


def test_one_step_lowers_the_loss_on_real_photos(grocery_dir: Path, tmp_path: Path) -> None:
    data = read_labels_csv(_tiny_grocery(grocery_dir, tmp_path / "data", per_identity=4))  # 24 photos
    transform = get_transform("resize256-crop224", 96)  # fixed input, so before/after compare
    images = torch.stack([transform(load_image(p)) for p in data.paths]).contiguous(memory_format=torch.channels_last)
    labels = torch.as_tensor(data.identity_codes())
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32)).to(memory_format=torch.channels_last)
    frozen, tail = split_backbone(model.backbone, 2)
    named = set_trainable(model, tail)
    assert named[-1][0] == "global_proj.bias" and not model.local_proj.weight.requires_grad
    model.eval()  # BatchNorm in eval mode, as in training
    forward = split_forward(model, frozen, tail)
    with torch.no_grad():
        assert torch.allclose(forward(images).global_desc, model(images).global_desc, atol=1e-6)
    loss_fn = LOSSES.get("softmax-contrastive").from_config(GlobalTrainConfig())
    assert isinstance(loss_fn, SoftmaxContrastiveLoss) and loss_fn.temperature == 0.05
    optimizer = torch.optim.SGD([p for _, p in named], lr=1e-3, momentum=0.9, nesterov=True, weight_decay=4e-4)
    before = train_step(forward, loss_fn, optimizer, images, labels)
    with torch.no_grad():
        after = float(loss_fn(forward(images).global_desc, labels))
    assert after < before - 1e-3, (before, after)
    # The optimizer's momentum buffers survive a save/load keyed by parameter name.
    save_optimizer_state(optimizer, model, tmp_path)
    fresh = torch.optim.SGD([p for _, p in named], lr=1e-3, momentum=0.9, nesterov=True, weight_decay=4e-4)
    load_optimizer_state(fresh, model, tmp_path)
    for p, _ in zip(optimizer.param_groups[0]["params"], range(5)):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], fresh.state[p]["momentum_buffer"])


def test_resume_replays_the_uninterrupted_run_and_reload_scores_identically(grocery_dir: Path, tmp_path: Path) -> None:
    data_dir = _tiny_grocery(grocery_dir, tmp_path / "data")
    config = _tiny_config()
    straight = tmp_path / "straight"
    best = train_global(config, data_dir, "grocery-open", straight, progress=False)
    assert best == straight / "best"
    interrupted = tmp_path / "interrupted"
    train_global(config, data_dir, "grocery-open", interrupted, progress=False, stop_after=1)
    assert json.loads((interrupted / "state" / "train_state.json").read_text())["epoch"] == 1
    train_global(config, data_dir, "grocery-open", interrupted, progress=False)  # resumes at epoch 2

    def log(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in log(interrupted)] == [0, 1, 2]
    assert [r.get("loss") for r in log(interrupted)] == [r.get("loss") for r in log(straight)]
    last_a, _ = load_model(straight / "last")
    last_b, _ = load_model(interrupted / "last")
    assert model_hash(last_a) == model_hash(last_b)

    # best/ is a normal model folder; reloaded, it scores what training measured.
    model, model_config = load_model(best)
    assert model_config.image_size == SIZE and (best / "train_config.json").is_file()
    metrics = json.loads((best / "metrics.json").read_text())
    _, val = split_identities(read_labels_csv(data_dir).filter(lambda r: int(r.identity) % 2 == 0),
                              config.val_fraction, config.seed)
    rescored = LooEvaluator(val, get_transform(config.transform, SIZE), num_workers=0)(model)
    assert rescored["map"] == pytest.approx(metrics["val"]["map"], abs=1e-9)

    with pytest.raises(ValueError, match="another config"):
        train_global(_tiny_config(lr=0.5), data_dir, "grocery-open", interrupted, progress=False)


def test_learnable_gem_and_the_weight_anchor_train_resume_and_hold_the_backbone_back(
        grocery_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data_dir = _tiny_grocery(grocery_dir, tmp_path / "data")
    anchored = _tiny_config(pooling="gem", anchor_weight=10.0, lr=0.05)
    straight, interrupted, free = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "free"
    train_global(anchored, data_dir, "grocery-open", straight, progress=False)
    train_global(anchored, data_dir, "grocery-open", interrupted, progress=False, stop_after=1)
    broken = tmp_path / "broken"
    shutil.copytree(interrupted, broken)
    (broken / "anchor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="anchor.safetensors is missing"):
        train_global(anchored, data_dir, "grocery-open", broken, progress=False)
    train_global(anchored, data_dir, "grocery-open", interrupted, progress=False)  # reads anchor.safetensors

    def log(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    assert [r.get("loss") for r in log(interrupted)] == [r.get("loss") for r in log(straight)]
    # (the logged distance is a float32 sum whose order follows memory layout: equal to rounding)
    distances = [[r["anchor_distance"] for r in log(run) if "anchor_distance" in r] for run in (interrupted, straight)]
    assert len(distances[0]) == 2 and distances[0] == pytest.approx(distances[1], rel=1e-5)
    assert log(straight)[-1]["anchor_distance"] > 0
    model, config = load_model(straight / "last")
    assert model_hash(model) == model_hash(load_model(interrupted / "last")[0])
    assert config.pooling == "gem" and model.pool.p.item() != pytest.approx(3.0, abs=1e-6)  # p learned

    # The anchor is the backbone's trainable weights at the start (ImageNet), and it holds them:
    # the same run without it moves the backbone further from there.
    start = load_file(str(straight / "anchor.safetensors"))
    assert start and all(name.startswith("backbone.") for name in start)
    train_global(_tiny_config(pooling="gem", lr=0.05), data_dir, "grocery-open", free, progress=False)
    assert not (free / "anchor.safetensors").exists()

    def moved(run: Path) -> float:
        weights = dict(load_model(run / "last")[0].named_parameters())
        return sum(float(((weights[name].detach() - tensor) ** 2).sum()) for name, tensor in start.items())

    assert moved(straight) < 0.9 * moved(free), (moved(straight), moved(free))


def test_training_can_start_from_the_untrained_default(grocery_dir: Path, tmp_path: Path) -> None:
    """projection_init views-whiten: the run starts from the untrained default's wide global
    descriptor (1024-d, learned whitening without labels) and trains it."""
    data_dir = _tiny_grocery(grocery_dir, tmp_path / "data")
    run = tmp_path / "run"
    train_global(_tiny_config(projection_init="views-whiten", epochs=1), data_dir, "grocery-open", run,
                 progress=False)
    model, config = load_model(run / "last")
    assert config.global_width == 1024 and config.projection.startswith("trained:")
    with torch.inference_mode():
        assert model(torch.rand(1, 3, SIZE, SIZE)).global_desc.shape == (1, 1024)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 0 and log[-1]["epoch"] == 1 and log[-1]["loss"] > 0


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_declares_its_stages_and_stride(name: str) -> None:
    with warnings.catch_warnings():  # "random init": these weights are never used to retrieve
        warnings.simplefilter("ignore")
        backbone = create_backbone(name, pretrained=False).eval()
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    stem, stages, head = backbone.stages()
    with torch.no_grad():
        x = backbone.normalize(images)
        for module in stem + stages + head:
            x = module(x)
        assert torch.equal(x, backbone.forward_features(images))
    assert x.shape[-2:] == (96 // backbone.stride,) * 2
    frozen, tail = split_backbone(backbone, 1)
    assert frozen == stem + stages[:-1] and tail == stages[-1:] + head
    assert split_backbone(backbone, -1) == ([], stem + stages + head)
    with pytest.raises(ValueError, match="stages"):
        split_backbone(backbone, len(stages) + 1)


def test_one_run_trains_on_several_protocols_with_identities_kept_apart(grocery_dir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """train_global on two protocols: their training splits pooled with ``protocol:identity``
    labels (the same ids in both stay two identities), each one holding out the identities a
    one-protocol run holds out, and validation the mean of the two held-out searches."""
    from types import SimpleNamespace

    import waldo.train.global_model as global_model
    from waldo.train.cli_train import register_train_global
    from waldo.train.global_model import training_split

    data = read_labels_csv(_tiny_grocery(grocery_dir, tmp_path / "data"))
    other = data.filter(lambda r: r.identity in ("0", "2", "4", "6"), "other")  # shares identity names
    protocols = {"grocery-open": SimpleNamespace(train=data), "coil100-open": SimpleNamespace(train=other)}
    monkeypatch.setattr(global_model, "get_protocol", lambda name, data_dir=None: protocols[name])
    config = _tiny_config(epochs=1)
    train, evaluator, val = training_split(["grocery-open", "coil100-open"], None, config)
    for name, protocol in protocols.items():
        alone_train, alone_val = split_identities(protocol.train, config.val_fraction, config.seed)
        assert [r.path for r in train if r.identity.startswith(name + ":")] == alone_train.paths
        assert {f"{name}:{i}" for i in alone_val.identities} <= set(val.identities)
    assert len(set(train.identities)) == len(set(split_identities(data, 0.5, 0)[0].identities)) + len(
        set(split_identities(other, 0.5, 0)[0].identities))
    with pytest.raises(ValueError, match="one protocol"):
        training_split(["grocery-open", "coil100-open"], tmp_path, config)
    with pytest.raises(ValueError, match="named twice"):
        training_split(["grocery-open", "grocery-open"], None, config)

    run = tmp_path / "run"
    best = train_global(config, None, ["grocery-open", "coil100-open"], run, progress=False)
    record = json.loads((best / "metrics.json").read_text())["val"]
    assert set(record["per_set_map"]) == {"grocery-open", "coil100-open"}
    assert record["map"] == pytest.approx(sum(record["per_set_map"].values()) / 2)
    model, model_config = load_model(best)
    assert model_config.projection == "trained:grocery-open+coil100-open:train-split"
    # each held-out set searched alone, as the evaluator's parts do
    alone = LooEvaluator(split_identities(other, 0.5, 0)[1], get_transform(config.transform, SIZE), num_workers=0)
    assert alone(model)["map"] == pytest.approx(record["per_set_map"]["coil100-open"], abs=1e-9)

    import argparse

    parser = argparse.ArgumentParser()
    register_train_global(parser.add_subparsers())
    args = parser.parse_args(["global", "--protocol", "grocery-open", "--protocol", "coil100-open", "--config", "c",
                              "--out", "o"])
    assert args.protocol == ["grocery-open", "coil100-open"]
