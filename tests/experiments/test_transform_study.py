"""The transform study: its normalize-extra ablation, summaries, example picking, the methods a
model folder offers, and ``waldo experiment transforms`` end to end on a small subset."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from waldo.data.datasets import ImageRecord, ImageSet
from waldo.data.images import load_image
from waldo.data.protocols import Protocol
from waldo.data.transforms import get_transform, transform_names
from waldo.eval.evaluate import evaluate_descriptors
from waldo.models.extract import Extracted
from waldo_experiments.groups import weighted_overall
from waldo_experiments.study_report import paired_top1, sign_test
from waldo_experiments.transform_study import (
    BASELINE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MULTISCALE,
    NORMALIZE_EXTRA,
    MethodResult,
    available_methods,
    default_transforms,
    pick_examples,
    study_transform,
    summarise,
)


def test_normalize_extra_is_the_study_s_own_imagenet_normalisation_of_the_default(data_file):
    assert NORMALIZE_EXTRA not in transform_names()  # never a shipped preset
    assert default_transforms()[0] == BASELINE and default_transforms()[-2:] == [NORMALIZE_EXTRA, MULTISCALE]
    image = load_image(data_file("abo_sample/B074M5HPBD/9ea6992d.jpg"))
    base = get_transform(BASELINE)(image)
    extra = study_transform(NORMALIZE_EXTRA, 224)(image)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(extra, (base - mean) / std, atol=1e-6)
    assert float(extra.min()) < 0.0
    assert torch.equal(study_transform("flip", 224)(image), get_transform("flip")(image))


def test_summarise_means_spread_and_change():
    rows = [{"transform": BASELINE, "seed": None, "method": "global", "recall@1": 0.8, "map": 0.5},
            {"transform": "perspective", "seed": 0, "method": "global", "recall@1": 0.6, "map": 0.4},
            {"transform": "perspective", "seed": 1, "method": "global", "recall@1": 0.7, "map": 0.3}]
    summary = summarise(rows, keys=("recall@1", "map"))
    p = summary[1]
    assert p["n_seeds"] == 2 and p["recall@1"] == pytest.approx(0.65) and p["recall@1_std"] == pytest.approx(0.05)
    assert p["recall@1_min"] == 0.6 and p["recall@1_max"] == 0.7 and p["recall@1_delta"] == pytest.approx(-0.15)
    assert summary[0]["map_delta"] == 0.0


def test_paired_top1_and_sign_test():
    assert paired_top1("1100", "1011") == {"fixed": 2, "broken": 1, "p_value": 1.0}
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10)
    assert sign_test(3, 3) == 1.0
    with pytest.raises(ValueError):
        paired_top1("10", "1")


def test_pick_examples_prefers_fixed_then_broken_top1():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    records = [ImageRecord(f"/data/img/{i}.jpg", str(label), {"class_name": f"c{label}"}) for i, label in enumerate(labels)]
    images = ImageSet(records, root="/data", name="toy")
    protocol = Protocol("toy", ImageSet([], None, "empty"), images, images, True, "toy")
    desc = rng.standard_normal((20, 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    extracted = Extracted(desc, np.zeros((20, 1, 8), np.float16), np.ones(20, bool))
    run = evaluate_descriptors(protocol, extracted, extracted)
    before = MethodResult(run.metrics, run.knn_indices, run.matches)
    # "After": each query's first correct result moved to the top (an oracle reranker).
    order = np.argsort(~run.matches, axis=1, kind="stable")
    after = MethodResult({}, np.take_along_axis(run.knn_indices, order, 1), np.take_along_axis(run.matches, order, 1))
    examples = pick_examples(protocol, run, before, after, "oracle", n=3)
    n_fixed = int((~run.matches[:, 0]).sum())
    assert [e["kind"] for e in examples] == ["fixed"] * min(3, n_fixed) + ["other"] * (3 - min(3, n_fixed))
    assert all(e["after"][0]["correct"] for e in examples)
    assert examples[0]["query"].startswith("img/") and examples[0]["label"].startswith("c")


def test_available_methods_follow_the_model_folder(tiny_model_dir, tmp_path):
    from waldo.cli import main

    assert available_methods(tiny_model_dir) == ["global", "rrt", "rrt-fusion"]
    assert available_methods(tiny_model_dir, ["global", "rrt"], gv=True) == ["global", "rrt", "gv"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, plain / name)
    assert available_methods(plain) == ["global"]
    with pytest.raises(ValueError, match="rrt.json"):
        available_methods(plain, ["rrt"])
    assert main(["experiment", "transforms", "--protocol", "grocery-open-cross", "--model", str(plain),
                 "--rerank", "rrt", "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_transform_study_command_writes_report_csv_json_and_figures(tiny_model_dir, grocery_dir, tmp_path):
    from waldo_experiments.cli import main

    out = tmp_path / "study"
    code = main(["transforms", "--protocol", "grocery-open-cross", "--data", str(grocery_dir),
                 "--model", str(tiny_model_dir), "--transforms", f"perspective,{NORMALIZE_EXTRA},{MULTISCALE}",
                 "--seeds", "2", "--identities", "3", "--per-identity", "3", "--examples", "2",
                 "--workers", "0", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "transforms.json").read_text())
    rows = data["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"global", "rrt", "rrt-fusion"}
    # The baseline is always run; the random transform once per seed.
    assert [r["seed"] for r in rows if r["transform"] == "perspective" and r["method"] == "global"] == [0, 1]
    assert {r["transform"] for r in rows} == {BASELINE, "perspective", NORMALIZE_EXTRA, MULTISCALE}
    for row in rows:  # every query in one group: the groups add up to the overall figures
        assert sum(g["n_queries"] for g in row["groups"].values()) == row["n_queries"]
        for key in ("recall@1", "map"):
            assert weighted_overall(row["groups"], key) == pytest.approx(row[key], abs=1e-12)
        assert set(row["groups"]) <= {"Fruit", "Packages", "Vegetables"}
    # Reranking only reorders the top 100: Recall@100 is the global one.
    by_key = {(r["transform"], r["seed"], r["method"]): r for r in rows}
    for (transform, seed, method), row in by_key.items():
        assert row["recall@100"] == by_key[(transform, seed, "global")]["recall@100"]
    perspective = next(e for e in data["summary"] if e["transform"] == "perspective" and e["method"] == "global")
    assert perspective["n_seeds"] == 2 and perspective["recall@1_min"] <= perspective["recall@1"]
    assert set(data["curves"]) == methods and len(data["curves"]["global"]) == 100
    with open(out / "transforms.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    report = (out / "report.md").read_text()
    assert "(baseline)" in report and "![Recall@1 per transform](recall1_by_transform.png)" in report
    assert "waldo experiment transforms" in report
    for name in ("recall1_by_transform.png", "recall_at_k.png"):
        assert (out / name).stat().st_size < 1_000_000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if data["examples"]:
        assert (out / "examples.png").stat().st_size < 1_000_000
