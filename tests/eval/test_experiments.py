"""waldo experiment: multi-scale descriptors, per-group figures, the transform study and the
transfer study end to end on small subsets (a tiny model at 64 px keeps them to seconds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from waldo.data.datasets import ImageRecord
from waldo.data.protocols import get_protocol
from waldo.data.transforms import get_transform
from waldo.eval.evaluate import evaluate_protocol
from waldo.eval.groups import group_metrics, record_group, weighted_overall
from waldo.eval.metrics import recall_at_k
from waldo.eval.multiscale import (
    average_global,
    extract_multiscale,
    scale_sizes,
    scale_transforms,
)
from waldo.eval.transform_study import (
    BASELINE,
    MULTISCALE,
    recall_curve,
    subset_protocol,
    summarise,
)
from waldo.models.extract import extract_descriptors
from waldo.paths import PROJECT_ROOT

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches are dominated by thread hand-off on a busy 2-core machine; one thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A reranker folder: untrained lite0 at 64 px (2 x 2 locals), random projection, tiny RRT."""
    from waldo.models.untrained import untrained_model
    from waldo.rerank.rrt import RerankingTransformer, RRTConfig
    from waldo.rerank.rrt_checkpoint import save_reranker

    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=SIZE,
                                    progress=False)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32))
    return save_reranker(tmp_path_factory.mktemp("tiny") / "best", model, config, rrt, grid=(2, 2),
                         training={"fusion_weight": 0.5})


@pytest.fixture(scope="module")
def small_cross(grocery_dir):
    """grocery-open-cross cut to 3 identities, 3 queries and 3 gallery images each."""
    return subset_protocol(get_protocol("grocery-open-cross", grocery_dir), identities=3, per_identity=3)


def test_average_global_is_the_normalised_mean():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    out = average_global([a, b])
    np.testing.assert_allclose(out[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 1.0])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert scale_sizes(224, (0.75, 1, 1.25)) == [224, 168, 280]
    with pytest.raises(ValueError):
        average_global([a, b[:1]])


def test_multiscale_is_opt_in_and_reuses_the_base_scale(tiny_model_dir, small_cross):
    from waldo.models.checkpoint import load_model

    model, _ = load_model(tiny_model_dir)
    transform = get_transform(BASELINE, SIZE)
    paths = small_cross.gallery.paths[:4]
    base = extract_descriptors(model, paths, transform, num_workers=0, progress=False)
    extra = scale_transforms(BASELINE, SIZE, (0.75, 1.0, 1.25))
    fresh = extract_multiscale(model, paths, transform, extra, num_workers=0, progress=False)
    reused = extract_multiscale(model, paths, transform, extra, base=base, num_workers=0, progress=False)
    np.testing.assert_allclose(fresh.global_desc, reused.global_desc, atol=1e-6)
    np.testing.assert_array_equal(reused.local_desc, base.local_desc)  # locals: the base scale only
    assert not np.allclose(reused.global_desc, base.global_desc)
    # The default evaluation path is single-scale: the base extraction's descriptors, unchanged.
    tiny = subset_protocol(small_cross, identities=2, per_identity=2)
    run = evaluate_protocol(model, tiny, transform, num_workers=0, progress=False)
    single = extract_descriptors(model, tiny.gallery.paths, transform, num_workers=0, progress=False)
    np.testing.assert_array_equal(run.gallery.global_desc, single.global_desc)


def test_record_group_rules(tmp_path):
    assert record_group(ImageRecord("/d/x.jpg", "1", {"group": "shoes"})) == "shoes"
    assert record_group(ImageRecord("/d/x.jpg", "1", {"super_class_id": "3"})) == "3"
    assert record_group(ImageRecord("/r/dataset/test/Fruit/Apple/a.jpg", "1")) == "Fruit"
    assert record_group(ImageRecord("/r/images/obj1.png", "1")) == "all"
    assert record_group(ImageRecord("/r/x.png", "1", {"kind": "a"}), column="kind") == "a"


def test_recall_curve_and_group_figures_add_up():
    rng = np.random.default_rng(0)
    matches = rng.random((50, 30)) < 0.1
    n_positives = np.maximum(matches.sum(axis=1), 1)
    curve = recall_curve(matches, 30)
    assert [round(curve[k - 1], 12) for k in (1, 5, 30)] == [round(recall_at_k(matches, k), 12) for k in (1, 5, 30)]
    groups = np.array(["a", "b", "c", "a", "b"] * 10, dtype=object)
    per_group = group_metrics(matches, n_positives, groups, ks=(1, 10))
    from waldo.eval.metrics import retrieval_metrics

    overall = retrieval_metrics(matches, n_positives, (1, 10))
    for key in ("recall@1", "recall@10", "map"):
        assert weighted_overall(per_group, key) == pytest.approx(overall[key], abs=1e-12)


def test_summarise_means_spread_and_change():
    rows = [{"transform": BASELINE, "seed": None, "method": "global", "recall@1": 0.8, "map": 0.5},
            {"transform": "perspective", "seed": 0, "method": "global", "recall@1": 0.6, "map": 0.4},
            {"transform": "perspective", "seed": 1, "method": "global", "recall@1": 0.7, "map": 0.3}]
    summary = summarise(rows, keys=("recall@1", "map"))
    p = summary[1]
    assert p["n_seeds"] == 2 and p["recall@1"] == pytest.approx(0.65) and p["recall@1_std"] == pytest.approx(0.05)
    assert p["recall@1_min"] == 0.6 and p["recall@1_max"] == 0.7 and p["recall@1_delta"] == pytest.approx(-0.15)
    assert summary[0]["map_delta"] == 0.0


def test_transform_study_command_writes_report_csv_json_and_figures(tiny_model_dir, grocery_dir, tmp_path):
    from waldo.cli import main

    out = tmp_path / "study"
    code = main(["experiment", "transforms", "--protocol", "grocery-open-cross", "--data", str(grocery_dir),
                 "--model", str(tiny_model_dir), "--transforms", f"perspective,normalize-extra,{MULTISCALE}",
                 "--seeds", "2", "--identities", "3", "--per-identity", "3", "--examples", "2",
                 "--workers", "0", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "transforms.json").read_text())
    rows = data["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"global", "rrt", "rrt-fusion"}
    # The baseline is always run; the random transform once per seed.
    assert [r["seed"] for r in rows if r["transform"] == "perspective" and r["method"] == "global"] == [0, 1]
    assert {r["transform"] for r in rows} == {BASELINE, "perspective", "normalize-extra", MULTISCALE}
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


def test_transfer_study_trains_evaluates_and_reports(tmp_path, data_root):
    from waldo.eval.transfer import UNTRAINED, run_transfer, write_transfer

    config = json.loads((PROJECT_ROOT / "configs" / "global-cpu-coil.json").read_text())
    config.update({"dim": 32, "image_size": SIZE, "eval_image_size": SIZE, "max_fit_images": 20, "epochs": 1,
                   "p": 4, "k": 2, "sampler_passes": 1, "eval_every": 1, "num_workers": 0, "val_fraction": 0.04})
    path = tmp_path / "tiny-coil.json"
    path.write_text(json.dumps(config))
    study = run_transfer(["coil100-open"], ["coil100-open"], tmp_path / "runs", configs={"coil100-open": str(path)},
                         subset={"identities": 3, "per_identity": 2, "max_train": 20}, progress=False,
                         log=lambda line: None)
    assert [r["model_name"] for r in study.rows] == [UNTRAINED, "trained on coil100-open"]
    trained = study.rows[1]
    assert trained["in_domain"] is True and trained["n_queries"] == 6
    assert sum(g["n_queries"] for g in trained["groups"].values()) == trained["n_queries"]
    written = write_transfer(study, tmp_path / "out", command="waldo experiment transfer ...")
    report = written["markdown"].read_text()
    assert UNTRAINED in report and "trained on coil100-open" in report
    assert json.loads(written["json"].read_text())["rows"][0]["model_name"] == UNTRAINED
    assert written["bars"].stat().st_size < 1_000_000


def test_paired_top1_and_sign_test():
    from waldo.eval.study_report import paired_top1, sign_test

    assert paired_top1("1100", "1011") == {"fixed": 2, "broken": 1, "p_value": 1.0}
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10)
    assert sign_test(3, 3) == 1.0
    with pytest.raises(ValueError):
        paired_top1("10", "1")


def test_pick_examples_prefers_fixed_then_broken_top1():
    from waldo.data.datasets import ImageSet
    from waldo.data.protocols import Protocol
    from waldo.eval.evaluate import evaluate_descriptors
    from waldo.eval.transform_study import MethodResult, pick_examples
    from waldo.models.extract import Extracted

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


def test_products10k_test_queries_take_their_class_group_from_train():
    from waldo.data.datasets import read_products10k
    from waldo.data.protocols import Protocol
    from waldo.eval.groups import query_groups

    root = PROJECT_ROOT / "tests" / "fixtures" / "products10k"  # label files only, no images
    test = read_products10k(root, "test", check_files=False)
    protocol = Protocol("p10k", read_products10k(root, "train", check_files=False), test, test, True, "fixture")
    groups = query_groups(protocol, np.arange(len(protocol.queries)))
    train_group = {r.identity: r.attrs["group"] for r in protocol.train}
    expected = [train_group.get(r.identity, "all") for r in protocol.queries]
    assert groups.tolist() == expected and len(set(expected)) >= 1


def test_available_methods_follow_the_model_folder(tiny_model_dir, tmp_path):
    import shutil

    from waldo.cli import main
    from waldo.eval.transform_study import available_methods

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
