"""Per-group figures: Recall@k and mAP for each coarse group of queries (which kinds are hard).

A query's group comes from its record: a ``group`` column (Products-10K), ``super_class_id``
(Stanford Online Products), or, for folder-organised datasets like Grocery Store
(``dataset/<split>/<Fruit|Packages|Vegetables>/...``), the folder right under the split folder.
Datasets with none of these put every query in one group (``"all"``), so the breakdown is never
missing, only trivial.

Every query is in exactly one group, so each overall figure is the query-weighted mean of the
groups' (``weighted_overall`` recomputes it; the tests check that it adds up).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

import numpy as np

from waldo.data.datasets import ImageRecord
from waldo.data.protocols import Protocol
from waldo.eval.metrics import retrieval_metrics

__all__ = ["GROUP_COLUMNS", "ONE_GROUP", "SPLIT_FOLDERS", "group_metrics", "query_groups", "record_group",
           "weighted_overall"]

GROUP_COLUMNS = ("group", "super_class_id")
SPLIT_FOLDERS = ("train", "val", "test")
ONE_GROUP = "all"


def _folder_group(record: ImageRecord, root: PurePath | None) -> str | None:
    """The folder right below a split folder (train/val/test) in the record's path, if any."""
    path = PurePath(record.path)
    if root is not None:
        try:
            path = path.relative_to(root)
        except ValueError:
            pass
    parts = path.parts[:-1]  # folders only
    for i, part in enumerate(parts[:-1]):
        if part in SPLIT_FOLDERS:
            return parts[i + 1]
    return None


def record_group(record: ImageRecord, root: PurePath | None = None, column: str | None = None) -> str:
    """The coarse group of one image (see the module docstring for the rules)."""
    if column is not None:
        return str(record.attrs.get(column, "")) or ONE_GROUP
    for name in GROUP_COLUMNS:
        if record.attrs.get(name):
            return str(record.attrs[name])
    return _folder_group(record, root) or ONE_GROUP


def _groups_by_identity(protocol: Protocol, column: str | None) -> dict[str, str]:
    """identity -> group from the training split's group column (Products-10K labels ``group``
    in train.csv only; its test classes are training classes, so they inherit it)."""
    names = (column,) if column else GROUP_COLUMNS
    out: dict[str, str] = {}
    for record in protocol.train:
        value = next((record.attrs[n] for n in names if record.attrs.get(n)), None)
        if value is not None:
            out.setdefault(record.identity, str(value))
    return out


def query_groups(protocol: Protocol, query_rows: np.ndarray, column: str | None = None) -> np.ndarray:
    """(Q,) group names of the evaluated queries (``EvalRun.query_rows``); a query without a
    group of its own takes its identity's group in the training split, if it has one."""
    root = PurePath(protocol.queries.root) if protocol.queries.root is not None else None
    by_identity: dict[str, str] | None = None
    groups = []
    for row in query_rows:
        record = protocol.queries.records[int(row)]
        group = record_group(record, root, column)
        if group == ONE_GROUP:
            if by_identity is None:
                by_identity = _groups_by_identity(protocol, column)
            group = by_identity.get(record.identity, ONE_GROUP)
        groups.append(group)
    return np.array(groups, dtype=object)


def group_metrics(matches: np.ndarray, n_positives: np.ndarray, groups: np.ndarray,
                  ks: Sequence[int] = (1, 10, 100)) -> dict[str, dict[str, float]]:
    """``{group: retrieval_metrics of its queries}``, groups sorted by name."""
    if not len(matches) == len(n_positives) == len(groups):
        raise ValueError(f"{len(matches)} rankings, {len(n_positives)} positive counts, {len(groups)} groups")
    return {str(name): retrieval_metrics(matches[groups == name], n_positives[groups == name], ks)
            for name in sorted(set(groups.tolist()))}


def weighted_overall(per_group: dict[str, dict[str, float]], key: str) -> float:
    """The overall figure ``key`` rebuilt from the groups: their mean weighted by query count."""
    total = sum(m["n_queries"] for m in per_group.values())
    return sum(m[key] * m["n_queries"] for m in per_group.values()) / total if total else float("nan")
