"""SIFT/RootSIFT extraction, the ragged storage layout, and its home in the index segments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from waldo.data.images import load_image
from waldo.index import IndexStore
from waldo.index.keypoints import RaggedKeypoints
from waldo.rerank.gv import GVConfig, verify_pair
from waldo.models.keypoints import (
    LEGACY_SIFT,
    LocalFeatureConfig,
    LocalFeatures,
    SiftConfig,
    detection_scale,
    extract_sift,
    matching_vectors,
    pack_features,
    rootsift,
    unpack_features,
)
from waldo.rerank.matching import mutual_ratio_matches


@pytest.fixture(scope="module")
def box(data_file):
    return load_image(data_file("opencv_samples/box.png"))  # 324 x 223


def test_rootsift_is_the_square_root_of_the_l1_normalised_histogram():
    raw = np.array([[4, 0, 0, 12], [0, 0, 0, 0], [1, 1, 1, 1]], np.uint8)
    out = rootsift(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.5, 0, 0, np.sqrt(0.75)], rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)  # an empty histogram matches nothing
    np.testing.assert_allclose(np.linalg.norm(out[[0, 2]], axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sift", "teblid", "orb-teblid"])
def test_extract_respects_the_cap_and_returns_original_pixel_coordinates(box, kind):
    config = LocalFeatureConfig(kind=kind, max_keypoints=150)
    features = extract_sift(box, config)
    assert 100 <= len(features) <= 150
    assert features.keypoints.dtype == np.float32 and features.descriptors.dtype == np.uint8
    w, h = box.size
    assert features.keypoints[:, 0].max() < w and features.keypoints[:, 1].max() < h
    assert features.keypoints.min() > -1
    assert features.descriptors.shape[1] == config.descriptor_bytes == (128 if kind == "sift" else 32)
    assert features.nbytes == len(features) * (2 * 4 + config.descriptor_bytes)


def test_teblid_bits_match_by_hamming_distance():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (5, 32), dtype=np.uint8), rng.integers(0, 256, (7, 32), dtype=np.uint8)
    va, vb = matching_vectors(a), matching_vectors(b)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, rtol=1e-6)
    hamming = np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)
    squared = ((va[:, None, :] - vb[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(squared, hamming / 64.0, rtol=1e-5)
    # SIFT's 128 bytes still match as RootSIFT
    raw = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    np.testing.assert_array_equal(matching_vectors(raw), rootsift(raw))


# ORB's keypoints sit on a coarser pyramid grid than SIFT's sub-pixel extrema: a looser bound.
@pytest.mark.parametrize("kind, tolerance_px", [("teblid", 2.0), ("orb-teblid", 6.0)])
def test_resizing_before_detection_keeps_coordinates_in_the_original_frame(box, kind, tolerance_px):
    native = extract_sift(box, SiftConfig(kind=kind, max_keypoints=800, min_side=0))
    halved = extract_sift(box, SiftConfig(kind=kind, max_keypoints=800, min_side=0, max_side=162))  # half size
    doubled = extract_sift(box, SiftConfig(kind=kind, max_keypoints=800, min_side=446, max_side=1024))  # 2x
    assert detection_scale(223, 324, SiftConfig(min_side=0, max_side=162)) == pytest.approx(0.5)
    assert detection_scale(223, 324, SiftConfig(min_side=446)) == pytest.approx(2.0)
    assert detection_scale(223, 324, SiftConfig(min_side=0)) == 1.0
    for other in (halved, doubled):
        v = verify_pair(native, other, GVConfig())
        assert v.model == "homography" and v.inliers >= 40
        # Same image, so the fitted map must be the identity if coordinates were mapped back.
        corners = np.array([[0, 0, 1], [323, 0, 1], [323, 222, 1], [0, 222, 1]], float)
        mapped = corners @ v.transform.T
        error = np.linalg.norm(mapped[:, :2] / mapped[:, 2:] - corners[:, :2], axis=1)
        assert error.max() < tolerance_px, error


def test_tiny_and_flat_images_give_no_keypoints_not_errors():
    assert len(extract_sift(np.full((40, 40, 3), 128, np.uint8))) == 0
    assert len(extract_sift(np.zeros((1, 1), np.uint8))) == 0


def test_config_round_trip_and_validation():
    config = SiftConfig(max_keypoints=300, min_side=256)
    assert SiftConfig.model_validate_json(config.model_dump_json()) == config
    # The manifests of indexes built before TEBLID hold this under "gv_features": it still reads
    # as what it was, and is written byte for byte as it was.
    old = ('{"kind": "sift", "max_keypoints": 1000, "min_side": 256, "max_side": 1024, "contrast_threshold": 0.04, '
           '"edge_threshold": 10.0}')
    assert json.dumps(LEGACY_SIFT.model_dump()) == old
    assert LocalFeatureConfig.model_validate(json.loads(old)) == LEGACY_SIFT
    assert LocalFeatureConfig().kind == "orb-teblid" and LocalFeatureConfig().descriptor_bytes == 32
    for bad in ({"max_keypoints": 3, "bogus": 1}, {"kind": "orb"}, {"max_keypoints": 0},
                {"min_side": 900, "max_side": 800}):
        with pytest.raises(ValueError):
            SiftConfig.model_validate(bad)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        GVConfig.model_validate({"ratio": 0.7, "min_inlier": 5})


def test_pack_unpack_round_trip(box):
    items = [extract_sift(box, SiftConfig(max_keypoints=50)), LocalFeatures.empty(),
             extract_sift(box, SiftConfig(max_keypoints=20))]
    ragged = pack_features(items)
    assert ragged.dim == 32  # an image without keypoints takes the others' width
    with pytest.raises(ValueError, match="different local features"):
        pack_features([items[0], extract_sift(box, LocalFeatureConfig(kind="sift", max_keypoints=20))])
    assert pack_features([LocalFeatures.empty()], width=32).dim == 32
    assert len(ragged) == 3 and ragged.offsets.tolist() == [0, 50, 50, 70]
    for a, b in zip(items, unpack_features(ragged)):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        if len(a):  # an empty image has no descriptors, of whatever width
            np.testing.assert_array_equal(a.descriptors, b.descriptors)
    with pytest.raises(ValueError, match="offsets"):
        RaggedKeypoints(ragged.keypoints, ragged.descriptors, np.array([0, 60, 50, 70], np.int64))


def test_mutual_ratio_matches_on_a_hand_made_case():
    e = np.eye(4, dtype=np.float32)
    query = np.stack([e[0], e[1], (e[2] + e[3]) / np.sqrt(2), e[3]])
    cand = np.stack([e[1], e[0], e[2], e[3]])
    # q0<->c1 and q1<->c0 are unambiguous; q2 is equidistant to c2 and c3 (fails the ratio test);
    # q3's nearest is c3 and c3's nearest is q3.
    assert mutual_ratio_matches(query, cand, 0.8).tolist() == [[0, 1], [1, 0], [3, 3]]
    # Not mutual: two queries want c0, only the closer one keeps it.
    q = np.stack([e[0], (e[0] * 0.9 + e[1] * 0.1)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert mutual_ratio_matches(q, np.stack([e[0], e[2]]), 1.0).tolist() == [[0, 0]]
    assert mutual_ratio_matches(np.zeros((0, 4), np.float32), cand).shape == (0, 2)


# ------------------------------------------------------------------------ storage in the index
def _batch(n: int, rng: np.random.Generator):
    g = rng.normal(size=(n, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    loc = rng.normal(size=(n, 4, 8)).astype(np.float16)
    feats = [LocalFeatures(rng.uniform(0, 300, (k, 2)).astype(np.float32),
                           rng.integers(0, 256, (k, 128), dtype=np.uint8)) for k in rng.integers(0, 30, n)]
    return g, loc, feats


def test_index_stores_verification_features_through_compact_and_check(tmp_path, flip_last_byte):
    rng = np.random.default_rng(0)
    store = IndexStore.create(tmp_path / "idx", manifest={"m": 1}, global_dim=8, local_shape=(4, 8))
    g1, l1, f1 = _batch(5, rng)
    ids1 = store.add([f"a{i}" for i in range(5)], ["x"] * 5, g1, l1, verification=pack_features(f1))
    g2, l2, _ = _batch(3, rng)
    ids2 = store.add([f"b{i}" for i in range(3)], ["y"] * 3, g2, l2)  # a segment without features
    g3, l3, f3 = _batch(4, rng)
    ids3 = store.add([f"c{i}" for i in range(4)], ["z"] * 4, g3, l3, verification=pack_features(f3))

    def check_round_trip() -> None:
        wanted = [ids3[2], ids1[0], ids2[1], ids1[4]]
        got = store.verification_features(wanted)
        expected = [f3[2], f1[0], LocalFeatures.empty(), f1[4]]
        for (kp, desc), want in zip(got, expected):
            np.testing.assert_array_equal(kp, want.keypoints)
            np.testing.assert_array_equal(desc, want.descriptors)

    check_round_trip()
    assert store.info()["bytes"]["verification"] > sum(f.nbytes for f in f1 + f3)
    store.remove([ids1[1]])
    store.compact()
    check_round_trip()
    assert store.check() == []
    # Damage a verification file: check() names it.
    seg = next((store.path / "segments").iterdir())
    flip_last_byte(seg / "gv_descriptors.npy")
    problems = store.check()
    assert len(problems) == 1 and "gv_descriptors.npy sha256 differs" in problems[0]
    with pytest.raises(ValueError, match="cover 2 images"):
        store.add(["d0", "d1", "d2"], ["w"] * 3, g1[:3], l1[:3], verification=pack_features(f1[:2]))
    store.close()


def test_index_without_verification_features_says_so(tmp_path):
    rng = np.random.default_rng(1)
    with IndexStore.create(tmp_path / "idx", manifest={}, global_dim=8, local_shape=(4, 8)) as store:
        g, loc, _ = _batch(2, rng)
        ids = store.add(["p", "q"], ["i", "j"], g, loc)
        assert store.verification_features(ids) is None


def test_an_index_s_local_features_from_the_user_s_choice():
    from waldo.models.keypoints import local_features_for

    assert local_features_for(True) == LocalFeatureConfig() and local_features_for("sift") == LEGACY_SIFT
    assert local_features_for("teblid").kind == "teblid" and local_features_for("orb-teblid").kind == "orb-teblid"
    assert local_features_for(False) is None and local_features_for("none") is None
    custom = LocalFeatureConfig(kind="teblid", max_keypoints=200)
    assert local_features_for(custom) is custom
    with pytest.raises(ValueError, match="unknown local features"):
        local_features_for("surf")
