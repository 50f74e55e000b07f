"""Dataset loaders: Waldo's labels.csv, ImageFolder trees, SOP and Products-10K label files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from waldo.data.datasets import (
    ImageRecord,
    ImageSet,
    identity_vocabulary,
    load_dataset,
    read_image_folder,
    read_labels_csv,
    read_products10k,
    read_sop,
)
from waldo.data.images import load_image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def grocery(data_file) -> Path:
    return data_file("grocery_store/labels.csv").parent


@pytest.fixture(scope="module")
def real_images(data_file) -> list[Path]:
    """A handful of real grocery photos to stand in for other datasets' images (symlinked)."""
    folder = data_file("grocery_store/dataset/train/Fruit/Apple/Golden-Delicious")
    return sorted(folder.glob("*.jpg"))[:8]


def _link_all(root: Path, relatives: list[str], images: list[Path]) -> None:
    for i, rel in enumerate(relatives):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(images[i % len(images)])


@pytest.fixture()
def sop_root(tmp_path: Path, real_images: list[Path]) -> Path:
    """A tiny SOP tree: the fixture Ebay_*.txt files plus symlinked real images."""
    for split in ("train", "test"):
        source = FIXTURES / "sop" / f"Ebay_{split}.txt"
        shutil.copy(source, tmp_path)
        lines = source.read_text().split("\n")[1:]
        _link_all(tmp_path, [line.split()[3] for line in lines if line.strip()], real_images)
    return tmp_path


@pytest.fixture()
def p10k_root(tmp_path: Path, real_images: list[Path]) -> Path:
    """A tiny Products-10K tree: fixture CSVs plus images in train/ and test/."""
    for split, name in (("train", "train.csv"), ("test", "test_kaggletest.csv")):
        shutil.copy(FIXTURES / "products10k" / name, tmp_path)
        with open(FIXTURES / "products10k" / name, newline="") as f:
            names = [row["name"] for row in csv.DictReader(f)]
        _link_all(tmp_path / split, names, real_images)
    return tmp_path


def test_read_labels_csv_on_grocery(grocery: Path) -> None:
    with open(grocery / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = read_labels_csv(grocery)
    assert len(data) == len(rows) and data.name == "grocery_store"
    assert data.identities == [r["instance_id"] for r in rows]
    first = data[0]
    assert Path(first.path).is_absolute() and Path(first.path) == grocery / rows[0]["path"]
    assert first.attrs["kind"] == rows[0]["kind"] and first.attrs["class_name"] == rows[0]["class_name"]
    assert "path" not in first.attrs and "instance_id" not in first.attrs
    assert load_image(first.path).mode == "RGB"


def test_imageset_indexing_filter_and_codes(grocery: Path) -> None:
    data = read_labels_csv(grocery)
    part = data[10:20]
    assert isinstance(part, ImageSet) and len(part) == 10 and part.paths == data.paths[10:20]
    iconic = data.filter(lambda r: r.attrs["kind"] == "iconic")
    assert len(iconic) == 81
    codes = data.identity_codes()
    assert codes.dtype == np.int64 and codes.shape == (len(data),)
    # Integer ids sort numerically, so the codes are the ids themselves here.
    assert codes.tolist() == [int(i) for i in data.identities]
    # Two sets share one vocabulary: equal identities get equal codes.
    odd = data.filter(lambda r: int(r.identity) % 2 == 1)
    vocab = identity_vocabulary(iconic, odd)
    assert set(vocab.values()) == set(range(len(vocab)))
    a, b = iconic.identity_codes(vocab), odd.identity_codes(vocab)
    assert {int(c) for c in b} <= {int(c) for c in a}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        iconic.identity_codes(identity_vocabulary(odd))


def test_records_compare_without_attrs() -> None:
    assert ImageRecord("/a.jpg", "1", {"x": "1"}) == ImageRecord("/a.jpg", "1", {"x": "2"})
    assert len({ImageRecord("/a.jpg", "1", {"x": "1"}), ImageRecord("/a.jpg", "1")}) == 1
    codes = ImageSet([ImageRecord("/a", ""), ImageRecord("/b", "x")], Path("/"), "t").identity_codes()
    assert codes.tolist() == [-1, 0]  # the unknown identity never matches anything


def _write_labels(folder: Path, text: str) -> None:
    (folder / "labels.csv").write_text(text)


def test_labels_csv_errors(tmp_path: Path, real_images: list[Path]) -> None:
    _link_all(tmp_path, ["a.jpg", "b.jpg"], real_images)
    _write_labels(tmp_path, "path,instance_id\na.jpg,1\nb.jpg,2\n")
    assert read_labels_csv(tmp_path).identities == ["1", "2"]
    _write_labels(tmp_path, "path,instance_id\na.jpg,1\n./a.jpg,2\n")
    with pytest.raises(ValueError, match="listed twice: .*a.jpg"):
        read_labels_csv(tmp_path)
    _write_labels(tmp_path, "path,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['instance_id'\]"):
        read_labels_csv(tmp_path)
    _write_labels(tmp_path, "path,instance_id\na.jpg,1\ntypo.jpg,2\nb.jpg,3\n")
    with pytest.raises(ValueError, match="1 of 3 listed images do not exist.*typo.jpg"):
        read_labels_csv(tmp_path)
    _write_labels(tmp_path, "path,instance_id\na.jpg,1,extra\n")
    with pytest.raises(ValueError, match="line 2"):
        read_labels_csv(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_labels_csv(tmp_path / "nowhere")


def test_read_image_folder(tmp_path: Path, real_images: list[Path]) -> None:
    _link_all(tmp_path, ["loose.jpg", "apple/1.jpg", "apple/2.jpg", "veg/carrot/1.jpg"], real_images)
    data = read_image_folder(tmp_path)
    assert sorted(data.identities) == ["", "apple", "apple", "veg/carrot"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in data.paths)
    assert load_dataset(tmp_path).identities == data.identities
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in"):
        read_image_folder(tmp_path / "empty")


def test_read_sop(sop_root: Path) -> None:
    train, test = read_sop(sop_root, "train"), read_sop(sop_root, "test")
    assert len(train) == 7 and len(test) == 5
    assert train.identities == ["1", "1", "1", "2", "2", "3", "3"]
    assert test[0].identity == "11319" and test[4].attrs["super_class_id"] == "2"
    assert train[0].path == str(sop_root / "bicycle_final" / "111085122871_0.JPG")
    assert test[0].attrs["split"] == "test" and test[0].attrs["image_id"] == "1"
    assert load_image(test[0].path).mode == "RGB"
    everything = load_dataset(sop_root)
    assert len(everything) == 12 and everything.paths == train.paths + test.paths
    assert len(load_dataset(sop_root / "Ebay_test.txt")) == 5
    with pytest.raises(ValueError, match="split must be"):
        read_sop(sop_root, "val")


def test_read_sop_missing_image(sop_root: Path) -> None:
    (sop_root / "cabinet_final" / "110789413932_1.JPG").unlink()
    with pytest.raises(ValueError, match="do not exist.*110789413932_1.JPG"):
        read_sop(sop_root, "train")


def test_read_products10k(p10k_root: Path) -> None:
    train, test = read_products10k(p10k_root, "train"), read_products10k(p10k_root, "test")
    assert len(train) == 6 and len(test) == 4
    assert train.identities == ["0", "0", "1", "1", "2", "3"]
    assert train[4].attrs == {"group": "1", "split": "train"}
    assert test[1].attrs == {"Usage": "Private", "split": "test"}
    assert train[0].path == str(p10k_root / "train" / "0.jpg")
    assert test[0].path == str(p10k_root / "test" / "0.jpg")
    everything = load_dataset(p10k_root)
    assert len(everything) == 10 and everything.paths == train.paths + test.paths
    assert load_dataset(p10k_root / "test_kaggletest.csv").paths == test.paths
    # The older file name test.csv is accepted as well.
    (p10k_root / "test_kaggletest.csv").rename(p10k_root / "test.csv")
    assert read_products10k(p10k_root, "test").paths == test.paths


def test_read_products10k_bad_input(p10k_root: Path) -> None:
    (p10k_root / "test_kaggletest.csv").unlink()
    with pytest.raises(ValueError, match="test labels not found"):
        read_products10k(p10k_root, "test")
    assert len(load_dataset(p10k_root)) == 6  # train only, no test labels
    (p10k_root / "train.csv").write_text("image,class,group\n0.jpg,0,0\n")
    with pytest.raises(ValueError, match="missing column"):
        read_products10k(p10k_root, "train")


def test_load_dataset_detection(grocery: Path, data_file, tmp_path: Path) -> None:
    assert len(load_dataset(grocery)) == len(read_labels_csv(grocery))
    coil = data_file("coil100/labels.csv")
    assert load_dataset(coil).paths == read_labels_csv(coil.parent).paths
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a label file"):
        load_dataset(tmp_path / "notes.txt")
