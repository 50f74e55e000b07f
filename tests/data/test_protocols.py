"""Named protocols on the real data; expected counts are recomputed here from labels.csv."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from waldo.data.datasets import ImageRecord, ImageSet
from waldo.data.protocols import PROTOCOLS, Protocol, get_protocol, protocol_names

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _paths(rows: list[dict[str, str]], folder: Path) -> list[str]:
    return [str(folder / r["path"]) for r in rows]


@pytest.fixture(scope="module")
def grocery(data_file) -> Path:
    return data_file("grocery_store/labels.csv").parent


@pytest.fixture(scope="module")
def coil(data_file) -> Path:
    return data_file("coil100/labels.csv").parent


def test_names_are_exactly_the_readme_protocols() -> None:
    expected = {"grocery-open", "grocery-open-cross", "grocery-iconic", "coil100-open", "loo", "sop", "products10k"}
    assert set(protocol_names()) == expected
    with pytest.raises(ValueError, match="known: coil100-open, grocery-iconic"):
        get_protocol("grocery", "/tmp")


def _assert_disjoint(protocol: Protocol) -> None:
    train_ids = set(protocol.train.identities)
    assert not train_ids & set(protocol.queries.identities)
    assert not train_ids & set(protocol.gallery.identities)


def test_grocery_open(grocery: Path) -> None:
    rows = [r for r in _rows(grocery) if r["kind"] == "natural"]
    even = [r for r in rows if int(r["instance_id"]) % 2 == 0]
    odd = [r for r in rows if int(r["instance_id"]) % 2 == 1]
    p = get_protocol("grocery-open", grocery)
    assert p.leave_one_out and p.queries is p.gallery
    assert p.train.paths == _paths(even, grocery) and p.queries.paths == _paths(odd, grocery)
    assert len(set(p.train.identities)) == 41 and len(set(p.queries.identities)) == 40
    _assert_disjoint(p)
    mask = p.valid_query_mask()
    assert mask.dtype == bool and mask.shape == (len(p.queries),)
    assert mask.all()  # every odd class has many photos


def test_grocery_open_cross(grocery: Path) -> None:
    odd = [r for r in _rows(grocery) if r["kind"] == "natural" and int(r["instance_id"]) % 2 == 1]
    p = get_protocol("grocery-open-cross", grocery)
    assert not p.leave_one_out
    assert p.queries.paths == _paths([r for r in odd if r["split"] == "test"], grocery)
    assert p.gallery.paths == _paths([r for r in odd if r["split"] in ("train", "val")], grocery)
    assert not set(p.queries.paths) & set(p.gallery.paths)
    assert len(set(p.queries.identities)) == 40
    assert len(p.train) == len(get_protocol("grocery-open", grocery).train)
    _assert_disjoint(p)


def test_grocery_iconic(grocery: Path) -> None:
    rows = _rows(grocery)
    p = get_protocol("grocery-iconic", grocery)
    iconic_odd = [r for r in rows if r["kind"] == "iconic" and int(r["instance_id"]) % 2 == 1]
    assert p.gallery.paths == _paths(iconic_odd, grocery) and len(p.gallery) == 40
    assert sorted(set(p.gallery.identities)) == sorted(set(p.queries.identities))
    test_odd = [r for r in rows if r["kind"] == "natural" and r["split"] == "test" and int(r["instance_id"]) % 2]
    assert p.queries.paths == _paths(test_odd, grocery)
    assert p.valid_query_mask().all()
    _assert_disjoint(p)


def test_coil100_open(coil: Path) -> None:
    rows = _rows(coil)
    p = get_protocol("coil100-open", coil)
    queries_expected = [r for r in rows if int(r["instance_id"]) > 50 and int(r["view_deg"]) in (0, 90, 180, 270)]
    assert p.train.paths == _paths([r for r in rows if int(r["instance_id"]) <= 50], coil)
    assert p.queries.paths == _paths(queries_expected, coil)
    assert len(set(p.train.identities)) == 50 and len(set(p.queries.identities)) == 50
    assert len(p.queries) == 4 * 50 and len(p.gallery) == 8 * 50
    _assert_disjoint(p)
    # Every true match is at least 40 degrees away (angles on a circle).
    for q in p.queries:
        for g in p.gallery:
            if g.identity == q.identity:
                diff = abs(int(q.attrs["view_deg"]) - int(g.attrs["view_deg"])) % 360
                assert min(diff, 360 - diff) >= 40
    assert p.valid_query_mask().all()


def test_default_data_dir_uses_shared_data(grocery: Path) -> None:
    assert get_protocol("grocery-open").queries.paths == get_protocol("grocery-open", grocery).queries.paths
    with pytest.raises(ValueError, match="needs a data_dir"):
        get_protocol("loo")


def test_wrong_folder_is_a_clear_error(coil: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs labels.csv columns \['kind', 'split'\]"):
        get_protocol("grocery-open", coil)
    with pytest.raises(ValueError, match="does not exist"):
        get_protocol("coil100-open", tmp_path / "missing")


def test_loo_on_any_dataset(data_file) -> None:
    abo = data_file("abo_sample/labels.csv").parent
    p = get_protocol("loo", abo)
    assert p.leave_one_out and p.queries is p.gallery and len(p.train) == 0
    assert len(p.queries) == len(_rows(abo))


def test_valid_query_mask_drops_queries_without_a_match() -> None:
    def make(ids: list[str]) -> ImageSet:
        return ImageSet([ImageRecord(f"/{i}_{n}.jpg", i) for n, i in enumerate(ids)], Path("/"), "t")

    loo_set = make(["a", "a", "b", "", ""])
    loo = Protocol("t", make([]), loo_set, loo_set, True, "")
    assert loo.valid_query_mask().tolist() == [True, True, False, False, False]
    cross = Protocol("t", make([]), make(["a", "b", ""]), make(["a", "c", ""]), False, "")
    assert cross.valid_query_mask().tolist() == [True, False, False]
    with pytest.raises(ValueError, match="one ImageSet"):
        Protocol("t", make([]), make(["a"]), make(["a"]), True, "")


def _fake_tree(root: Path, image: Path, names: list[str]) -> None:
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(image)


def test_sop_and_products10k_protocols(data_file, tmp_path: Path) -> None:
    image = data_file("grocery_store/dataset/train/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg")
    sop = tmp_path / "sop"
    shutil.copytree(FIXTURES / "sop", sop)
    for split in ("train", "test"):
        lines = (sop / f"Ebay_{split}.txt").read_text().split("\n")[1:]
        _fake_tree(sop, image, [line.split()[3] for line in lines if line.strip()])
    p = PROTOCOLS.create("sop", sop)
    assert p.leave_one_out and len(p.train) == 7 and len(p.queries) == 5
    assert p.valid_query_mask().tolist() == [True, True, True, True, False]

    p10k = tmp_path / "p10k"
    shutil.copytree(FIXTURES / "products10k", p10k)
    for split, name in (("train", "train.csv"), ("test", "test_kaggletest.csv")):
        with open(p10k / name, newline="") as f:
            _fake_tree(p10k / split, image, [r["name"] for r in csv.DictReader(f)])
    p = get_protocol("products10k", p10k)
    assert p.leave_one_out and len(p.train) == 6 and len(p.queries) == 4
    assert np.array_equal(p.valid_query_mask(), np.ones(4, bool))
