"""Geometric verification against real ground truth, the reranking rule, and the match picture."""

from __future__ import annotations

import csv
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from waldo.rerank import RERANKERS, RerankCandidates, Reranker, RerankQuery
from waldo.rerank.explain import explain_pair, save_png
from waldo.rerank.gv import (
    GeometricReranker,
    GVConfig,
    _plausible,
    centre_offset,
    corner_errors,
    estimate_transform,
    fused_scores,
    fusion_unit,
    inlier_spread,
    subject_figures,
    verified_first_order,
    verify_pair,
)
from waldo.models.keypoints import LEGACY_SIFT, SiftConfig, extract_sift_file

# Oxford images are 800-1000 px: keep them at native size (no downscale) for accuracy.
OXFORD_SIFT = SiftConfig(max_keypoints=1000, max_side=1024)


@pytest.fixture(scope="module")
def oxford(data_file):
    root = data_file("oxford_affine")
    rows = [r for r in csv.DictReader(open(root / "pairs.csv")) if r["img_b"].rsplit("img", 1)[1] in ("2.png", "3.png", "4.png")]
    names = sorted({r["img_a"] for r in rows} | {r["img_b"] for r in rows})
    with ThreadPoolExecutor(2) as pool:  # OpenCV releases the GIL: use both cores
        cache = dict(zip(names, pool.map(lambda rel: extract_sift_file(root / rel, OXFORD_SIFT), names)))
    return root, rows, cache.__getitem__


def test_oxford_affine_homographies_match_the_ground_truth(oxford):
    root, rows, features = oxford
    assert len(rows) == 12
    table = ["| pair | change | matches | inliers | model | mean corner err px | max corner err px |",
             "|---|---|---|---|---|---|---|"]
    worst = []
    for row in rows:
        v = verify_pair(features(row["img_a"]), features(row["img_b"]), GVConfig())
        assert v.model == "homography", row
        width, height = Image.open(root / row["img_a"]).size
        err = corner_errors(np.loadtxt(root / row["homography_a_to_b"]), v.transform, width, height)
        table.append(f"| {row['img_a']} -> {row['img_b']} | {row['change']} | {v.n_matches} | {v.inliers} | "
                     f"{v.model} | {err.mean():.2f} | {err.max():.2f} |")
        worst.append(err.max())
    print("\n" + "\n".join(table))
    # A few pixels at the image corners (extrapolated beyond most keypoints) on 800-1000 px images.
    assert max(worst) < 10.0, worst
    assert float(np.median(worst)) < 3.0, worst


@pytest.fixture(scope="module")
def samples(data_file):
    root = data_file("opencv_samples")
    names = ["box.png", "box_in_scene.png", "aero1.jpg", "aloeL.jpg", "leuvenA.jpg", "graf1.png"]
    with ThreadPoolExecutor(2) as pool:
        return root, dict(zip(names, pool.map(lambda n: extract_sift_file(root / n), names)))


@pytest.mark.parametrize("kind", ["default", "sift"])
def test_box_is_found_in_the_scene_and_unrelated_pairs_are_not(samples, kind):
    root, feats = samples
    if kind == "sift":  # what indexes built before TEBLID hold
        feats = {name: extract_sift_file(root / name, LEGACY_SIFT) for name in feats}
    config = GVConfig()
    found = verify_pair(feats["box.png"], feats["box_in_scene.png"], config)
    assert found.model == "homography" and found.inliers >= {"default": 20, "sift": 50}[kind]
    assert found.inlier_ratio > {"default": 0.4, "sift": 0.8}[kind] and config.verifies(found)
    for a, b in [("box.png", "aero1.jpg"), ("box.png", "aloeL.jpg"), ("box.png", "leuvenA.jpg"),
                 ("graf1.png", "box_in_scene.png"), ("aero1.jpg", "box_in_scene.png")]:
        v = verify_pair(feats[a], feats[b], config)
        assert v.inliers < 8, (a, b, v.inliers)  # below any evidence bar validation ever chose


def test_reranker_puts_the_verified_candidate_first_in_parallel_and_serially(samples):
    _, feats = samples
    order = ["aero1.jpg", "leuvenA.jpg", "box_in_scene.png", "aloeL.jpg"]
    candidates = [feats[n] for n in order]
    verified_first = GVConfig(fusion_weight=None)
    serial = GeometricReranker(verified_first, workers=1).rerank_features(feats["box.png"], candidates)
    with GeometricReranker(verified_first, workers=2) as reranker:
        parallel = reranker.rerank_features(feats["box.png"], candidates)
        # The registered reranker speaks the shared Reranker protocol.
        query = RerankQuery(None, keypoints=feats["box.png"])
        cands = RerankCandidates(None, np.array([0.9, 0.8, 0.7, 0.6]), keypoints=candidates)
        result = reranker.rerank(query, cands)
    assert serial.order.tolist() == parallel.order.tolist() == result.order.tolist() == [2, 0, 1, 3]
    assert serial.inliers.tolist() == parallel.inliers.tolist()
    assert np.all(np.diff(result.scores) <= 0) and result.scores[0] == serial.inliers[2]
    assert "gv" in RERANKERS and "rrt+gv" in RERANKERS
    assert isinstance(RERANKERS.create("gv"), Reranker)


def test_parallel_verification_runs_one_blas_thread_per_worker(samples, monkeypatch):
    """The workers use every core already: inside them BLAS runs one thread (else OpenBLAS's
    threads oversubscribe the cores and spin into the next query's extraction), and outside
    the pool BLAS keeps the threads it had."""
    from threadpoolctl import threadpool_info

    import waldo.rerank.gv as gv

    _, feats = samples
    blas_threads, real = [], gv.verify_pair

    def ours() -> list[int]:  # numpy's and OpenCV's OpenBLAS: what verification's products run on
        return [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and ("numpy" in lib["filepath"] or "opencv" in lib["filepath"])]

    def recording(*args, **kwargs):
        blas_threads.extend(ours())
        return real(*args, **kwargs)

    before = ours()
    monkeypatch.setattr(gv, "verify_pair", recording)
    with GeometricReranker(GVConfig(), workers=2) as reranker:
        reranker.verify_many(feats["box.png"], [feats["box_in_scene.png"], feats["aero1.jpg"]])
    assert blas_threads and set(blas_threads) == {1}
    assert ours() == before


def test_fusion_adds_a_growing_bonus_to_verified_candidates_only(samples):
    inliers = np.array([0, 8, 30, 7])
    fused = fused_scores(inliers, np.array([0.9, 0.5, 0.4, 0.8]), 8, 0.4)
    np.testing.assert_allclose(fused, [0.9, 0.9, 0.4 + 0.4 * (1 + np.log(30 / 8)), 0.8], rtol=1e-6)
    # Through the reranker: the box scene (verified) rises above a stronger global match, and the
    # hits say what verification found; on another reranker's order (a composition) the rule is
    # DELG's verified-first instead.
    _, feats = samples
    candidates = [feats[n] for n in ["aero1.jpg", "leuvenA.jpg", "box_in_scene.png", "aloeL.jpg"]]
    with GeometricReranker(GVConfig(fusion_weight=0.4, fusion_scale="absolute", min_inliers=8)) as reranker:
        cands = RerankCandidates(None, np.array([0.9, 0.8, 0.7, 0.6], np.float32), keypoints=candidates)
        result = reranker.rerank(RerankQuery(None, keypoints=feats["box.png"]), cands)
        assert result.order.tolist() == [2, 0, 1, 3] and result.verified.tolist() == [True, False, False, False]
        assert result.scores[0] > 0.7 + 0.4 and result.scores[1:].tolist() == pytest.approx([0.9, 0.8, 0.6])
        composed = reranker.rerank(RerankQuery(None, keypoints=feats["box.png"]), cands.reordered(
            np.array([3, 2, 1, 0]), "rrt"))
        assert composed.order.tolist() == [1, 0, 2, 3] and composed.scores[0] == composed.inliers[0]


def test_a_spread_relative_bonus_orders_alike_whatever_the_models_similarity_scale():
    inliers = np.array([0, 30, 0, 9])
    wide = np.array([0.9, 0.5, 0.3, 0.2])  # similarities spread over 0.2-0.9
    narrow = 0.95 + (wide - wide.min()) / 14  # the same order squeezed into 0.95-1.0
    for scale in ("std", "range"):
        orders = [np.argsort(-fused_scores(inliers, g, 8, 0.5, scale), kind="stable").tolist() for g in (wide, narrow)]
        assert orders[0] == orders[1]
    # An absolute bonus does not: big on the narrow scale, small on the wide one.
    absolute = [np.argsort(-fused_scores(inliers, g, 8, 0.05), kind="stable").tolist() for g in (wide, narrow)]
    assert absolute[0] != absolute[1]
    unit = fusion_unit(wide, "range")
    np.testing.assert_allclose(fused_scores(inliers, wide, 8, 0.5, "range"),
                               wide + 0.5 * unit * np.array([0, 1 + np.log(30 / 8), 0, 1 + np.log(9 / 8)]), rtol=1e-6)
    assert unit == pytest.approx(0.7) and fusion_unit(wide, "std") == pytest.approx(float(wide.std()))
    assert fusion_unit(np.full(4, 0.5), "std") == 1.0 and fusion_unit(np.array([0.3]), "range") == 1.0
    with pytest.raises(ValueError, match="fusion scale"):
        fusion_unit(wide, "median")
    with pytest.raises(ValueError):
        GVConfig(fusion_scale="median")


def test_verified_first_order_is_delg_s_rule():
    inliers = np.array([3, 40, 0, 15, 40, 11, 12])
    # verified (>= 12): 40@1, 40@4 (tie keeps prior order), 15@3, 12@6; then 0, 2, 5 in prior order
    assert verified_first_order(inliers, 12).tolist() == [1, 4, 3, 6, 0, 2, 5]
    assert verified_first_order(np.zeros(3, int), 12).tolist() == [0, 1, 2]


def test_degenerate_models_are_rejected():
    xy = np.array([[0, 0], [100, 0], [100, 80], [0, 80]], np.float32)
    assert _plausible(np.eye(3), xy, 8.0)
    assert not _plausible(np.diag([-1.0, 1.0, 1.0]), xy, 8.0)  # mirror image
    assert not _plausible(np.diag([0.05, 0.05, 1.0]), xy, 8.0)  # collapsed 20x
    assert _plausible(np.diag([2.0, 1.0, 1.0]), xy, 8.0, max_anisotropy=4.0)
    assert not _plausible(np.diag([4.0, 0.5, 1.0]), xy, 8.0, max_anisotropy=4.0)  # squeezed into a sliver
    assert inlier_spread(xy, xy[:2]) == 0.0 and inlier_spread(xy, xy) == pytest.approx(1.0)
    assert inlier_spread(xy, np.array([[0, 0], [50, 40]], np.float32)) == pytest.approx(0.25)
    # Random matches: no plausible model with many inliers.
    rng = np.random.default_rng(0)
    src, dst = rng.uniform(0, 300, (40, 2)), rng.uniform(0, 300, (40, 2))
    model, _, mask = estimate_transform(src, dst, GVConfig())
    assert mask.sum() < 8


def test_centre_offset_says_whether_the_inliers_cover_the_photos_centre():
    xy = np.array([[0, 0], [200, 0], [200, 100], [0, 100]], np.float32)  # centre (100, 50), half diagonal ~111.8
    assert centre_offset(xy, np.array([[80, 40], [120, 60]], np.float32)) == 0.0
    far = np.array([[150, 75], [200, 100]], np.float32)  # box starts 50 right and 25 below the centre
    assert centre_offset(xy, far) == pytest.approx(np.hypot(50, 25) / np.hypot(100, 50))
    assert centre_offset(xy, np.zeros((0, 2), np.float32)) == float("inf")


def test_a_match_on_a_corner_of_the_candidate_is_evidence_only_without_the_subject_checks(samples):
    """A query that is a crop of a corner of the candidate: the inliers cover all of the query but
    a corner of the candidate, away from its centre (a shared background, not the candidate's subject)."""
    from waldo.models.keypoints import extract_local_features

    root, _ = samples
    scene = np.asarray(Image.open(root / "aero1.jpg").convert("L"))
    height, width = scene.shape
    corner = scene[: height * 2 // 5, width * 3 // 5:]
    query, candidate = extract_local_features(corner), extract_local_features(scene)
    plain = verify_pair(query, candidate, GVConfig())
    candidate_spread, offset = subject_figures(query, candidate, plain)
    assert plain.inliers >= 15 and plain.spread > 0.5
    assert candidate_spread < 0.25 and offset > 0.1
    assert verify_pair(query, candidate, GVConfig(min_candidate_spread=0.5)).inliers == 0
    assert verify_pair(query, candidate, GVConfig(max_centre_offset=0.1)).inliers == 0
    # The same photo against itself covers everything: no check rejects it.
    itself = verify_pair(candidate, candidate, GVConfig(min_candidate_spread=0.5, max_centre_offset=0.0))
    assert itself.inliers >= 15 and subject_figures(candidate, candidate, itself)[1] == 0.0


def test_match_picture_png(samples, tmp_path):
    root, _ = samples
    explanation = explain_pair(root / "box.png", root / "box_in_scene.png", height=240, show_outliers=True)
    out = save_png(explanation.picture, tmp_path / "sub" / "match.png")
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.height == 240 + 28
    assert explanation.verification.inliers >= 20
    pixels = np.asarray(picture)
    # Inlier lines are drawn in green somewhere between the two images.
    assert np.any((pixels[..., 1] > 200) & (pixels[..., 0] < 80) & (pixels[..., 2] < 100))


def test_explain_cli(samples, tmp_path, capsys):
    from waldo.cli import main

    root, _ = samples
    out = tmp_path / "e.png"
    assert main(["explain", str(root / "box.png"), str(root / "box_in_scene.png"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "inliers" in printed and "of the candidate's" in printed
    assert main(["explain", str(root / "box.png"), str(Path(tmp_path) / "missing.png"), "-o", str(out)]) == 2


def test_api_indexes_keypoints_and_searches_with_gv(samples, tmp_path):
    from waldo.api import Waldo
    from waldo.index import IndexStore

    root, _ = samples
    names = ["box_in_scene.png", "aero1.jpg", "leuvenA.jpg", "graf1.png"]
    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False)
    report = engine.add([str(root / n) for n in names], names, progress=False, num_workers=0)
    ragged = engine.store.verification_features(report.added)
    assert ragged is not None and len(ragged) == 4 and ragged.counts().min() > 100
    outcome = engine.search(root / "box.png", k=4, rerank="gv")
    hits = outcome.hits
    assert hits[0].identity == "box_in_scene.png" and hits[0].verified and hits[0].inliers >= 20
    assert [h.rank for h in hits] == [1, 2, 3, 4] and not any(h.verified for h in hits[1:])
    assert all(h.inliers is not None for h in hits) and outcome.note == ""
    assert engine.search(root / "box.png", k=4).hits[0].inliers is None  # no verification, no evidence
    # A query with nothing to match (a flat grey photo) is not verified at all, and says why.
    flat = engine.search(Image.new("RGB", (300, 200), (128, 128, 128)), k=4, rerank="gv")
    assert "keypoints" in flat.note and not any(h.verified for h in flat.hits)
    assert [h.id for h in flat.hits] == [h.id for h in flat.global_hits[:4]]
    with open(root / "box.png", "rb") as stream:  # a stream is read once, used twice
        assert engine.search(stream, k=1, rerank="gv").hits[0].identity == "box_in_scene.png"
    assert Waldo.open(tmp_path / "idx").gv_sift == engine.gv_sift == SiftConfig()
    # An index created without verification features refuses --rerank gv clearly.
    manifest = {**engine.store.manifest, "gv_features": None}
    for key in ("format", "format_version", "created_at", "global_dtype", "local_dtype"):
        manifest.pop(key)
    store = IndexStore.create(tmp_path / "plain", manifest=manifest, global_dim=engine.store.global_dim,
                              local_shape=engine.store.local_shape)
    plain = Waldo(store, engine.model, engine.config, tmp_path / "plain")
    plain.add([str(root / names[0])], ["x"], progress=False, num_workers=0)
    assert plain.gv_sift is None and store.verification_features(store.snapshot().ids) is None
    assert plain.available_rerankers() == ["none"]
    with pytest.raises(ValueError, match="lacks local-feature keypoints"):
        plain.search(root / "box.png", k=1, rerank="gv")


def test_an_index_with_sift_keypoints_from_before_teblid_still_verifies(samples, tmp_path):
    from waldo.api import Waldo
    from waldo.index import IndexStore

    root, _ = samples
    engine = Waldo.create(tmp_path / "new", projection="random", progress=False)
    manifest = {**engine.store.manifest, "gv_features": LEGACY_SIFT.model_dump()}  # as old manifests hold it
    for key in ("format", "format_version", "created_at", "global_dtype", "local_dtype"):
        manifest.pop(key)
    store = IndexStore.create(tmp_path / "old", manifest=manifest, global_dim=engine.store.global_dim,
                              local_shape=engine.store.local_shape)
    old = Waldo(store, engine.model, engine.config, tmp_path / "old")
    shutil.copytree(tmp_path / "new" / "model", tmp_path / "old" / "model")
    names = ["box_in_scene.png", "aero1.jpg", "leuvenA.jpg"]
    old.add([str(root / n) for n in names], names, progress=False, num_workers=0)
    assert Waldo.open(tmp_path / "old").gv_sift == LEGACY_SIFT
    assert store.verification_features(store.snapshot().ids).dim == 128  # raw SIFT bytes
    hits = Waldo.open(tmp_path / "old").search(root / "box.png", k=3, rerank="gv").hits
    assert hits[0].identity == "box_in_scene.png" and hits[0].verified and hits[0].inliers >= 50


def test_gv_reranks_an_eval_run_through_the_registry(samples):
    from waldo.data.datasets import ImageRecord, ImageSet
    from waldo.data.protocols import Protocol
    from waldo.eval.evaluate import EvalRun
    from waldo.eval.gv_eval import run_keypoints
    from waldo.eval.metrics import retrieval_metrics
    from waldo.eval.rerank_eval import rerank_run
    from waldo.models.extract import Extracted

    root, _ = samples
    record = lambda name, identity: ImageRecord(str(root / name), identity)  # noqa: E731
    queries = ImageSet([record("box.png", "box"), record("graf1.png", "graf")], root, "q")
    gallery = ImageSet([record("aero1.jpg", "aero"), record("leuvenA.jpg", "leuven"),
                        record("box_in_scene.png", "box"), record("aloeL.jpg", "aloe")], root, "g")
    protocol = Protocol("tiny", ImageSet([], root, "t"), queries, gallery, False, "")
    knn = np.array([[0, 1, 2, 3], [2, 0, 1, 3]])  # box's true match is ranked third
    matches = np.array([[False, False, True, False], [False] * 4])
    keep = np.array([0])  # graf has no positive in this gallery: the evaluator drops it
    def blank(n: int) -> Extracted:  # descriptors GV does not read
        return Extracted(np.zeros((n, 4), np.float32), np.zeros((n, 1, 4), np.float16), np.ones(n, bool))

    run = EvalRun(retrieval_metrics(matches[keep], np.array([1])), keep, np.arange(4), knn[keep],
                  np.zeros((1, 4), np.float32), matches[keep], np.array([1]), blank(2), blank(4))
    out = rerank_run(run, RERANKERS.create("gv"), keypoints=run_keypoints(protocol, cache_dir=None), progress=False)
    assert out.run.knn_indices.tolist() == [[2, 0, 1, 3]] and out.run.matches[0, 0]
    assert out.metrics["recall@1"] == 1.0 and out.metrics["global"]["recall@1"] == 0.0
    assert out.metrics["reranker"] == "gv"


def test_a_composition_with_gv_is_the_verified_first_rule_on_the_first_order(samples):
    """"rrt+gv" is DELG's rule applied to the first reranker's order: verified candidates lead
    by inliers, everything else keeps the first reranker's order (here a fixed reversal)."""
    from waldo.rerank import RerankResult, SequentialReranker
    from waldo.rerank.gv import gv_scores

    class Reverse:
        name = "reverse"

        def rerank(self, query, candidates):
            return RerankResult(np.arange(len(candidates))[::-1].copy(), np.zeros(len(candidates), np.float32))

    _, feats = samples
    names = ["box_in_scene.png", "aero1.jpg", "leuvenA.jpg", "aloeL.jpg", "graf1.png"]
    query = RerankQuery(None, keypoints=feats["box.png"])
    candidates = RerankCandidates(None, np.linspace(0.9, 0.5, 5), keypoints=[feats[n] for n in names])
    with GeometricReranker(workers=2) as gv:
        result = SequentialReranker("reverse+gv", [Reverse(), gv]).rerank(query, candidates)
        inliers = np.array([v.inliers for v in gv.verify_many(feats["box.png"], candidates.keypoints)])
    prior = np.arange(5)[::-1]
    expected = prior[verified_first_order(inliers[prior], GVConfig().min_inliers)]
    assert result.order.tolist() == expected.tolist() and expected[0] == 0 and expected[1:].tolist() == [4, 3, 2, 1]
    np.testing.assert_array_equal(result.scores, gv_scores(inliers[expected], GVConfig().min_inliers))
    # Scores are inlier counts, 0 without a match (never a made-up negative); said so.
    assert result.score_kind == "inliers" and result.scores[0] == inliers[0] and np.all(result.scores[1:] == 0)
    assert result.inliers.tolist() == inliers[expected].tolist()
