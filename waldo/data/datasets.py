"""Datasets as plain lists of (absolute path, identity) records.

Retrieval only needs to know which images show the same instance, so a dataset is an ordered
list of :class:`ImageRecord` rather than a torch ``Dataset``; the order is stable (file order
of the label file, or sorted paths) so that descriptor rows can be matched back to images.
Loaders fail early with a clear ``ValueError`` on malformed label files and missing images,
because a typo found after an hour of descriptor extraction is an hour lost.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, overload

import numpy as np

from waldo.data.images import list_images

__all__ = [
    "ImageRecord",
    "ImageSet",
    "identity_vocabulary",
    "load_dataset",
    "read_image_folder",
    "read_labels_csv",
    "read_products10k",
    "read_sop",
]

_MAX_LISTED = 5  # how many offending paths an error message lists


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, which instance it shows, and any extra label columns."""

    path: str  # absolute path
    identity: str  # instance id ('' when unknown)
    attrs: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


def _identity_sort_key(identities: Iterable[str]) -> list[str]:
    """Sort identities numerically when all are integers (so '10' follows '9'), else as text."""
    unique = {i for i in identities if i != ""}
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def identity_vocabulary(*sets: "ImageSet") -> dict[str, int]:
    """A shared identity -> code map over several sets (e.g. queries and gallery).

    Pass the result to :meth:`ImageSet.identity_codes` of each set so that equal identities get
    equal codes across sets: ``vocab = identity_vocabulary(queries, gallery)``,
    ``q = queries.identity_codes(vocab)``, ``g = gallery.identity_codes(vocab)``.
    Codes are 0..n-1 in sorted identity order (numeric when every identity is an integer),
    so they do not depend on record order. The unknown identity ``''`` is not in the map.
    """
    ordered = _identity_sort_key(i for s in sets for i in s.identities)
    return {identity: code for code, identity in enumerate(ordered)}


@dataclass
class ImageSet:
    """An ordered collection of :class:`ImageRecord` from one dataset folder ``root``."""

    records: list[ImageRecord]
    root: Path
    name: str

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, index: slice) -> "ImageSet": ...

    def __getitem__(self, index: int | slice) -> ImageRecord | "ImageSet":
        if isinstance(index, slice):
            return ImageSet(self.records[index], self.root, self.name)
        return self.records[index]

    def __iter__(self):
        return iter(self.records)

    @property
    def paths(self) -> list[str]:
        """Absolute image paths, in record order."""
        return [r.path for r in self.records]

    @property
    def identities(self) -> list[str]:
        """Instance ids, in record order ('' for unknown)."""
        return [r.identity for r in self.records]

    def filter(self, predicate: Callable[[ImageRecord], bool], name: str | None = None) -> "ImageSet":
        """The records for which ``predicate(record)`` is true, order kept."""
        return ImageSet([r for r in self.records if predicate(r)], self.root, name or self.name)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "ImageSet":
        """The records at ``indices`` (any integer sequence), in that order."""
        return ImageSet([self.records[int(i)] for i in indices], self.root, name or self.name)

    def identity_codes(self, vocabulary: Mapping[str, int] | None = None) -> np.ndarray:
        """Integer identity labels, ``int64`` of shape ``(len(self),)``.

        Without ``vocabulary`` the codes come from this set alone (see
        :func:`identity_vocabulary`); to compare two sets, build one vocabulary over both.
        The unknown identity ``''`` always maps to ``-1`` (it matches nothing).

        Raises:
            ValueError: an identity of this set is missing from ``vocabulary``.
        """
        vocab = identity_vocabulary(self) if vocabulary is None else vocabulary
        missing = sorted({i for i in self.identities if i != "" and i not in vocab})
        if missing:
            raise ValueError(
                f"{len(missing)} identities of {self.name!r} are not in the vocabulary, "
                f"e.g. {missing[:_MAX_LISTED]}; build it with identity_vocabulary(*all_sets)"
            )
        return np.array([vocab[i] if i != "" else -1 for i in self.identities], dtype=np.int64)


def _concat(sets: Sequence[ImageSet], root: Path, name: str) -> ImageSet:
    return ImageSet([r for s in sets for r in s.records], root, name)


def _finish(records: list[ImageRecord], root: Path, name: str, source: Path, check_files: bool) -> ImageSet:
    """Reject duplicate paths and (optionally) paths that do not exist, then build the set."""
    seen: set[str] = set()
    for record in records:
        if record.path in seen:
            raise ValueError(f"{source}: image listed twice: {record.path}")
        seen.add(record.path)
    if check_files:
        missing = [r.path for r in records if not os.path.isfile(r.path)]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} of {len(records)} listed images do not exist, "
                f"first: {missing[:_MAX_LISTED]}"
            )
    return ImageSet(records, root, name)


def _read_table(source: Path, required: Sequence[str], delimiter: str = ",") -> list[dict[str, str]]:
    """Read a delimited text file with a header; every row must have every column."""
    if not source.is_file():
        raise ValueError(f"label file does not exist: {source}")
    with open(source, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate an Excel BOM
        if delimiter == " ":
            # SOP's files separate columns by single or repeated spaces.
            lines = [line.split() for line in f if line.strip()]
            header, body = (lines[0], lines[1:]) if lines else ([], [])
            rows = [dict(zip(header, parts)) if len(parts) == len(header) else {None: parts} for parts in body]
        else:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header  # 'path, instance_id' (space after comma) is still valid
            rows = list(reader)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; header is {header}, expected {list(required)}")
    for line_no, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{source}, line {line_no}: expected {len(header)} columns {header}")
    return rows  # type: ignore[return-value]


def _absolute(root: Path, relative: str, source: Path, line_no: int) -> str:
    if not relative.strip():
        raise ValueError(f"{source}, line {line_no}: empty image path")
    return os.path.normpath(os.path.join(root, relative.strip()))


def read_labels_csv(
    folder: str | os.PathLike[str], csv_name: str = "labels.csv", *, check_files: bool = True
) -> ImageSet:
    """Waldo's own label format: ``path,instance_id[,extra...]`` with paths relative to ``folder``.

    Extra columns (class_name, split, kind, view_deg, ...) go to ``ImageRecord.attrs``.
    """
    root = Path(os.path.abspath(folder))
    source = root / csv_name
    rows = _read_table(source, ["path", "instance_id"])
    records = [
        ImageRecord(
            path=_absolute(root, row["path"], source, line_no),
            identity=row["instance_id"].strip(),
            attrs={k: v for k, v in row.items() if k not in ("path", "instance_id")},
        )
        for line_no, row in enumerate(rows, start=2)
    ]
    return _finish(records, root, root.name, source, check_files)


def read_image_folder(folder: str | os.PathLike[str]) -> ImageSet:
    """An ImageFolder tree: identity = the image's parent folder relative to ``folder``.

    Images directly in ``folder`` get the unknown identity ``''`` (a flat, unlabelled folder).
    Nested folders give identities like ``'Fruit/Apple'`` (POSIX separators on every OS).
    """
    root = Path(os.path.abspath(folder))
    records = []
    for path in list_images(root):
        parent = path.parent.relative_to(root).as_posix()
        records.append(ImageRecord(path=str(path), identity="" if parent == "." else parent))
    return ImageSet(records, root, root.name)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def read_sop(root: str | os.PathLike[str], split: str = "train", *, check_files: bool = True) -> ImageSet:
    """Stanford Online Products: ``Ebay_{split}.txt`` (``image_id class_id super_class_id path``).

    identity = ``class_id``; attrs hold ``image_id``, ``super_class_id`` and ``split``.
    """
    _check_split(split)
    base = Path(os.path.abspath(root))
    source = base / f"Ebay_{split}.txt"
    rows = _read_table(source, ["image_id", "class_id", "super_class_id", "path"], delimiter=" ")
    records = [
        ImageRecord(
            path=_absolute(base, row["path"], source, line_no),
            identity=row["class_id"],
            attrs={"image_id": row["image_id"], "super_class_id": row["super_class_id"], "split": split},
        )
        for line_no, row in enumerate(rows, start=2)
    ]
    return _finish(records, base, f"{base.name}-{split}", source, check_files)


_P10K_TEST_FILES = ("test_kaggletest.csv", "test.csv")


def read_products10k(
    root: str | os.PathLike[str], split: str = "train", *, check_files: bool = True
) -> ImageSet:
    """Products-10K: ``train.csv`` (``name,class,group``; images in ``root/train``) or
    ``test_kaggletest.csv`` (``name,class,Usage``; images in ``root/test``; ``test.csv`` accepted).

    identity = ``class``; attrs hold the remaining columns (group / Usage) and ``split``.
    """
    _check_split(split)
    base = Path(os.path.abspath(root))
    if split == "train":
        source = base / "train.csv"
    else:
        candidates = [base / n for n in _P10K_TEST_FILES if (base / n).is_file()]
        if not candidates:
            raise ValueError(f"Products-10K test labels not found in {base}: expected one of {_P10K_TEST_FILES}")
        source = candidates[0]
    rows = _read_table(source, ["name", "class"])
    records = [
        ImageRecord(
            path=_absolute(base / split, row["name"], source, line_no),
            identity=row["class"].strip(),
            attrs={**{k: v for k, v in row.items() if k not in ("name", "class")}, "split": split},
        )
        for line_no, row in enumerate(rows, start=2)
    ]
    return _finish(records, base, f"{base.name}-{split}", source, check_files)


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [c.strip() for c in next(csv.reader(f), [])]


def load_dataset(path: str | os.PathLike[str]) -> ImageSet:
    """Load any dataset layout Waldo knows, detected from the files present.

    * a folder with ``labels.csv``, or a ``.csv`` file with ``path,instance_id`` columns:
      :func:`read_labels_csv`;
    * a folder with ``Ebay_train.txt``/``Ebay_test.txt``: Stanford Online Products, the
      **whole collection** (train then test records; ``attrs['split']`` tells them apart);
      an ``Ebay_{split}.txt`` file loads that split only;
    * a folder with ``train.csv`` (``name,class`` columns): Products-10K, the whole collection
      (train then test); its ``train.csv``/``test_kaggletest.csv`` loads that split only;
    * otherwise an image folder (:func:`read_image_folder`: ImageFolder tree or flat folder).
    """
    target = Path(os.path.abspath(path))
    if not target.exists():
        raise ValueError(f"dataset path does not exist: {target}")
    if target.is_file():
        if target.name in ("Ebay_train.txt", "Ebay_test.txt"):
            return read_sop(target.parent, target.name[5:-4])
        if target.suffix.lower() != ".csv":
            raise ValueError(f"not a label file Waldo understands: {target} (expected .csv or Ebay_*.txt)")
        header = _csv_header(target)
        if "path" in header and "instance_id" in header:
            return read_labels_csv(target.parent, target.name)
        if "name" in header and "class" in header:
            return read_products10k(target.parent, "train" if target.name == "train.csv" else "test")
        raise ValueError(f"{target}: unknown label columns {header}; expected path,instance_id")
    if (target / "labels.csv").is_file():
        return read_labels_csv(target)
    sop_splits = [s for s in ("train", "test") if (target / f"Ebay_{s}.txt").is_file()]
    if sop_splits:
        return _concat([read_sop(target, s) for s in sop_splits], target, target.name)
    if (target / "train.csv").is_file() and {"name", "class"} <= set(_csv_header(target / "train.csv")):
        parts = [read_products10k(target, "train")]
        if any((target / n).is_file() for n in _P10K_TEST_FILES):
            parts.append(read_products10k(target, "test"))
        return _concat(parts, target, target.name)
    return read_image_folder(target)
