"""Named evaluation protocols: which images to train on, which are queries, which the gallery.

Results are only comparable when everyone uses the same split, so the splits of the shared
data README live here, in code, once. Each builder takes the dataset folder and returns a
:class:`Protocol`; :func:`get_protocol` looks one up by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from waldo.data.datasets import ImageRecord, ImageSet, load_dataset, read_labels_csv, read_products10k, read_sop
from waldo.paths import dataset_dir
from waldo.registry import Registry

__all__ = ["PROTOCOLS", "VALIDATION_SPLITS", "Protocol", "get_protocol", "protocol_names", "reported_protocols"]


@dataclass
class Protocol:
    """A retrieval benchmark split.

    ``leave_one_out=True`` means ``queries is gallery`` and every query searches all the other
    images, itself excluded (as in Stanford Online Products). Dropping queries that have no
    other image of their identity in the gallery is the evaluator's job;
    :meth:`valid_query_mask` computes which queries survive.
    """

    name: str
    train: ImageSet
    queries: ImageSet
    gallery: ImageSet
    leave_one_out: bool
    description: str

    def __post_init__(self) -> None:
        if self.leave_one_out and self.queries is not self.gallery:
            raise ValueError(f"protocol {self.name!r}: leave-one-out needs queries and gallery to be one ImageSet")

    def valid_query_mask(self) -> np.ndarray:
        """``bool`` array of shape ``(len(queries),)``: True where the query has a true match.

        Leave-one-out: the identity occurs at least twice in the set (the query plus another).
        Otherwise: the identity occurs in the gallery. Unknown identities (``''``) never match.
        """
        query_ids = self.queries.identities
        if self.leave_one_out:
            counts: dict[str, int] = {}
            for identity in query_ids:
                counts[identity] = counts.get(identity, 0) + 1
            keep = [i != "" and counts[i] >= 2 for i in query_ids]
        else:
            in_gallery = set(self.gallery.identities) - {""}
            keep = [i in in_gallery for i in query_ids]
        return np.array(keep, dtype=bool)


#: name -> builder ``(data_dir: Path) -> Protocol``.
PROTOCOLS: Registry[Protocol] = Registry("protocol")

# Folder under waldo.paths.data_root() used when get_protocol() is given no data_dir.
_DEFAULT_DIRS = {
    "grocery-open": "grocery_store",
    "grocery-open-cross": "grocery_store",
    "grocery-iconic": "grocery_store",
    "coil100-open": "coil100",
}


def _require_columns(data: ImageSet, columns: Iterable[str], protocol: str) -> None:
    """Fail clearly when a protocol is pointed at the wrong dataset folder."""
    have = set(data.records[0].attrs) if data.records else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(
            f"protocol {protocol!r} needs labels.csv columns {missing} in {data.root}; "
            f"is this the right dataset folder?"
        )


def _int_id(record: ImageRecord) -> int:
    try:
        return int(record.identity)
    except ValueError:
        raise ValueError(f"expected an integer instance_id, got {record.identity!r} for {record.path}") from None


def _subset(data: ImageSet, name: str, keep: Callable[[ImageRecord], bool]) -> ImageSet:
    return data.filter(keep, name=f"{data.name}:{name}")


def _grocery(data_dir: Path, protocol: str) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Grocery Store split by class parity: (train on even natural, odd natural, odd iconic)."""
    data = read_labels_csv(data_dir)
    _require_columns(data, ["kind", "split"], protocol)
    natural = [r for r in data if r.attrs["kind"] == "natural"]
    if not natural:
        raise ValueError(f"protocol {protocol!r}: no kind == 'natural' images in {data.root}")
    train = _subset(data, "train", lambda r: r.attrs["kind"] == "natural" and _int_id(r) % 2 == 0)
    odd_natural = _subset(data, "odd-natural", lambda r: r.attrs["kind"] == "natural" and _int_id(r) % 2 == 1)
    odd_iconic = _subset(data, "odd-iconic", lambda r: r.attrs["kind"] == "iconic" and _int_id(r) % 2 == 1)
    return train, odd_natural, odd_iconic


def _odd_split(split: str, *splits: str):
    """``odd -> the odd-id photos whose split column is one of (split, *splits)``."""
    wanted = (split, *splits)
    return lambda odd, iconic: odd.filter(lambda r: r.attrs["split"] in wanted, name=f"{odd.name}:{'+'.join(wanted)}")


def _register_grocery(name: str, queries, gallery, leave_one_out: bool, description: str) -> None:
    """One Grocery Store protocol: train on even-id natural photos; ``queries`` / ``gallery``
    pick from (odd-id natural, odd-id iconic)."""

    def build(data_dir: Path) -> Protocol:
        train, odd, iconic = _grocery(data_dir, name)
        return Protocol(name, train, queries(odd, iconic), gallery(odd, iconic), leave_one_out,
                        f"Grocery Store: {description}")

    PROTOCOLS.register(name)(build)


def _all_odd(odd, iconic):
    return odd


_register_grocery("grocery-open", _all_odd, _all_odd, True,
                  "train on natural photos of even-id classes (41); leave-one-out over the natural "
                  "photos of the 40 unseen odd-id classes.")
_register_grocery("grocery-open-cross", _odd_split("test"), _odd_split("train", "val"), False,
                  "train as grocery-open; odd-id classes, split=test photos search the split=train/val "
                  "photos of the same classes.")
_register_grocery("grocery-iconic", _odd_split("test"), lambda odd, iconic: iconic, False,
                  "train as grocery-open; odd-id classes, split=test photos search the 40 iconic "
                  "(catalogue) images of the odd-id classes.")


# COIL-100 views (degrees): query views and gallery views are >= 40 degrees apart, so a match
# needs real viewpoint invariance rather than near-duplicate lookup.
COIL_QUERY_VIEWS = frozenset({0, 90, 180, 270})
COIL_GALLERY_VIEWS = frozenset({40, 50, 130, 140, 220, 230, 310, 320})


@PROTOCOLS.register("coil100-open")
def coil100_open(data_dir: Path) -> Protocol:
    data = read_labels_csv(data_dir)
    _require_columns(data, ["view_deg"], "coil100-open")

    def view(r: ImageRecord) -> int:
        return int(r.attrs["view_deg"])

    train = _subset(data, "train", lambda r: 1 <= _int_id(r) <= 50)
    queries = _subset(data, "queries", lambda r: 51 <= _int_id(r) <= 100 and view(r) in COIL_QUERY_VIEWS)
    gallery = _subset(data, "gallery", lambda r: 51 <= _int_id(r) <= 100 and view(r) in COIL_GALLERY_VIEWS)
    return Protocol(
        "coil100-open", train, queries, gallery, False,
        "COIL-100: train on objects 1-50 (all views); objects 51-100 at 0/90/180/270 degrees "
        "search views 40/50/130/140/220/230/310/320 (every true match >= 40 degrees away).",
    )  # fmt: skip


@PROTOCOLS.register("loo")
def leave_one_out(data_dir: Path) -> Protocol:
    data = load_dataset(data_dir)
    return Protocol(
        "loo", ImageSet([], data.root, f"{data.name}:empty"), data, data, True,
        f"Leave-one-out over every image of {data.name} (no training split).",
    )  # fmt: skip


def _register_train_test(name: str, reader, description: str) -> None:
    """A protocol of a dataset with its own train/test lists: leave-one-out over the test split."""

    def build(data_dir: Path) -> Protocol:
        test = reader(data_dir, "test")
        return Protocol(name, reader(data_dir, "train"), test, test, True, description)

    PROTOCOLS.register(name)(build)


_register_train_test("sop", read_sop,
                     "Stanford Online Products: train on Ebay_train.txt; leave-one-out over Ebay_test.txt.")
_register_train_test("products10k", read_products10k,
                     "Products-10K: train on train.csv; leave-one-out over the test split.")


#: How a protocol splits its *test* identities into queries and gallery, applied to records of
#: held-out *training* identities: validation then searches a gallery built like the test's
#: (the views as far apart, the same kind of photos), so what is chosen on it predicts the
#: test. (is_query, is_gallery) per record; protocols missing here are leave-one-out.
VALIDATION_SPLITS: dict[str, tuple[Callable[[ImageRecord], bool], Callable[[ImageRecord], bool]]] = {
    "grocery-open-cross": (lambda r: r.attrs.get("split") == "test",
                           lambda r: r.attrs.get("split") in ("train", "val")),
    "coil100-open": (lambda r: int(r.attrs["view_deg"]) in COIL_QUERY_VIEWS,
                     lambda r: int(r.attrs["view_deg"]) in COIL_GALLERY_VIEWS),
}


def reported_protocols() -> list[str]:
    """The protocols results are quoted on (those of the shared data): training must never see
    an identity they query."""
    return sorted(_DEFAULT_DIRS)


def protocol_names() -> list[str]:
    """All registered protocol names, sorted."""
    return PROTOCOLS.names()


def get_protocol(name: str, data_dir: str | os.PathLike[str] | None = None) -> Protocol:
    """Build protocol ``name`` on the dataset in ``data_dir``.

    ``data_dir`` may be omitted for the protocols of the shared data (grocery-*, coil100-open):
    the folder under :func:`waldo.paths.data_root` is used. Unknown names raise ``ValueError``
    listing the known ones.
    """
    builder = PROTOCOLS.get(name)
    if data_dir is None:
        if name not in _DEFAULT_DIRS:
            raise ValueError(f"protocol {name!r} needs a data_dir (the dataset folder)")
        data_dir = dataset_dir(_DEFAULT_DIRS[name])
    path = Path(os.path.abspath(data_dir))
    if not path.exists():
        raise ValueError(f"protocol {name!r}: data folder does not exist: {path}")
    return builder(path)
