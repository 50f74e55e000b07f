"""Where reranker training images come from: several sources in one run, labelled or not.

A source is named on the command line (``waldo train rrt --data SPEC [--data SPEC ...]``)::

    grocery-open-cross            a protocol's *training* split (labelled), validated like its test
    ../shared/data/abo_sample     a folder: labelled when it has labels.csv (or class sub-folders)
    ~/photos,labels=no            a folder whose labels are ignored: every photo its own identity
    coil100-open,weight=0.5       any of these with a sampling weight (default 1)

Every image of an unlabelled source is an identity of its own (its positives are augmented views
of itself, see waldo.data.views); labelled sources add real same-identity pairs. Identities are
kept apart across sources (``source:identity``), so two sources never share one by accident.

A source must not contain an image that a reported protocol (waldo.data.protocols.
reported_protocols) queries or searches: results would be quoted on what the model trained on.
:func:`check_no_test_images` refuses such a source unless the run says it adapts to a collection
(``waldo index adapt``, whose point is training on the collection it serves, labels unused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from waldo.data.datasets import ImageRecord, ImageSet, load_dataset, read_image_folder
from waldo.data.protocols import VALIDATION_SPLITS, get_protocol, protocol_names, reported_protocols

__all__ = ["PooledImages", "TrainingSource", "check_no_test_images", "parse_source", "pool_sources", "quoted_source"]


@dataclass
class TrainingSource:
    """One source of training images. ``validation_split``: (is_query, is_gallery) of the
    protocol whose training split this is, so validation mirrors its test (None: leave-one-out)."""

    name: str
    images: ImageSet
    labelled: bool
    weight: float = 1.0
    validation_split: tuple[Callable[[ImageRecord], bool], Callable[[ImageRecord], bool]] | None = field(
        default=None, repr=False)

    def describe(self) -> dict:
        return {"name": self.name, "images": len(self.images), "labelled": self.labelled, "weight": self.weight,
                "identities": len(set(self.images.identities)) if self.labelled else len(self.images),
                "validation": "protocol twin" if self.validation_split else
                ("leave-one-out" if self.labelled else "augmented views")}


def quoted_source(spec: str) -> str:
    """A source as cards and commands quote it, for this machine: a folder quoted under
    ``../shared/data/`` (relative to the project root) is read from the data root
    ($WALDO_DATA), wherever the caller runs; protocol names and other folders stay as they are."""
    from waldo.paths import data_root

    return str(data_root() / spec.split("shared/data/", 1)[1]) if "shared/data/" in spec else spec


def parse_source(spec: str) -> TrainingSource:
    """A source from its command-line spec (see module doc)."""
    target, *options = [part.strip() for part in spec.split(",")]
    settings = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("weight", "labels"):
            raise ValueError(f"--data {spec!r}: unknown option {option!r} (use weight=W or labels=no)")
        settings[key] = value
    try:
        weight = float(settings.get("weight", 1.0))
    except ValueError:
        raise ValueError(f"--data {spec!r}: weight must be a number") from None
    if not weight > 0:
        raise ValueError(f"--data {spec!r}: weight must be positive")
    use_labels = settings.get("labels", "yes").lower() not in ("no", "false", "0", "ignore")
    if target in protocol_names() and not Path(target).exists():
        images = get_protocol(target).train
        return TrainingSource(f"{target}:train", images, use_labels, weight,
                              VALIDATION_SPLITS.get(target) if use_labels else None)
    path = Path(target).expanduser()
    if not path.exists():
        raise ValueError(f"--data {spec!r}: neither a protocol ({', '.join(protocol_names())}) nor an existing "
                         f"folder")
    images = load_dataset(path) if use_labels else read_image_folder(path) if path.is_dir() else load_dataset(path)
    if len(images) == 0:
        raise ValueError(f"--data {spec!r}: no images found in {path}")
    labelled = use_labels and all(identity != "" for identity in images.identities)
    return TrainingSource(images.name or path.name, images, labelled, weight)


def check_no_test_images(sources: list[TrainingSource]) -> None:
    """Refuse a source holding an image a reported protocol queries or searches (module doc).
    Protocols whose data is not present are skipped: they cannot overlap."""
    paths = {str(Path(p).resolve()) for source in sources for p in source.images.paths}
    for name in reported_protocols():
        try:
            protocol = get_protocol(name)
        except (ValueError, FileNotFoundError, KeyError):
            continue
        test = {str(Path(p).resolve()) for p in protocol.queries.paths + protocol.gallery.paths}
        overlap = paths & test
        if overlap:
            raise ValueError(f"{len(overlap)} training images are test images of protocol {name!r} "
                             f"(e.g. {sorted(overlap)[0]}); train on its training split (--data {name}) instead")


@dataclass
class PooledImages:
    """All sources' images in one row space.

    identity: (N,) int64, equal only for two images of one identity of one labelled source
    (unlabelled rows each get a code of their own); source: (N,) int, the source of each row;
    labelled: (N,) bool.
    """

    sources: list[TrainingSource]
    paths: list[str]
    records: list[ImageRecord]
    identity: np.ndarray
    source: np.ndarray
    labelled: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def pool_sources(sources: list[TrainingSource]) -> PooledImages:
    if not sources:
        raise ValueError("no training sources: pass at least one --data")
    paths, records, keys, source_of, labelled = [], [], [], [], []
    for index, source in enumerate(sources):
        for row, record in enumerate(source.images.records):
            paths.append(record.path)
            records.append(record)
            keys.append(f"{index}:{record.identity}" if source.labelled else f"{index}:#{row}")
            source_of.append(index)
            labelled.append(source.labelled)
    codes: dict[str, int] = {}
    identity = np.array([codes.setdefault(key, len(codes)) for key in keys], np.int64)
    return PooledImages(sources, paths, records, identity, np.array(source_of, np.int64), np.array(labelled, bool))
