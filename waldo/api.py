"""The Python API: an index on disk plus the model that built it.

    from waldo import Waldo
    engine = Waldo.create("my-index", backbone="efficientnet_lite0", fit_paths=paths)
    engine.add(paths, identities)
    for hit in engine.search("query.jpg", k=10):
        print(hit.rank, hit.score, hit.identity, hit.path)

An index folder holds the store (manifest.json, SQLite metadata, descriptor segments) and the
model in ``model/`` (config.json + model.safetensors), so a query needs nothing but the folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch

from waldo import __version__
from waldo.data.images import load_image
from waldo.data.transforms import get_transform
from waldo.index import IndexMismatchError, IndexStore
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_descriptors
from waldo.models.untrained import untrained_model

MODEL_FOLDER = "model"


@dataclass
class SearchHit:
    """One result: the indexed image, its similarity to the query, and its 1-based rank."""

    rank: int
    id: int
    path: str
    identity: str
    score: float
    attrs: dict = field(default_factory=dict)


@dataclass
class AddReport:
    """What an ``add`` did: new ids, inputs already indexed, and inputs that could not be read."""

    added: list[int] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _manifest_for(model: DescriptorModel, config: ModelConfig) -> dict:
    return {
        "waldo_version": __version__,
        "backbone": config.backbone,
        "model_hash": model_hash(model),
        "weights_source": config.weights_source,
        "projection": config.projection,
        "transform": config.transform,
        "image_size": config.image_size,
        "descriptor_dim": config.dim,
    }


class Waldo:
    """An open index and its model. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, store: IndexStore, model: DescriptorModel, config: ModelConfig, root: Path) -> None:
        self.store = store
        self.model = model.eval()
        self.config = config
        self.root = root
        self.transform = get_transform(config.transform, config.image_size)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, index_dir: str | Path, *, backbone: str = "efficientnet_lite0", dim: int = 128,
               projection: str = "pca-whiten", fit_paths: Sequence[str] = (), fit_source: str = "",
               model_dir: str | Path | None = None, transform: str | None = None,
               progress: bool = True, seed: int = 0) -> "Waldo":
        """Make a new, empty index. The model is a trained checkpoint (``model_dir``) or an
        untrained ``backbone`` whose projection is fitted on ``fit_paths`` (typically the images
        about to be indexed)."""
        root = Path(index_dir)
        if model_dir is not None:
            model, config = load_model(model_dir)
            if transform:
                config.transform = transform
        else:
            model, config = untrained_model(backbone, dim=dim, projection=projection, fit_paths=fit_paths,
                                            fit_source=fit_source, transform=transform or "resize256-crop224",
                                            progress=progress, seed=seed)
        local_cells = (config.image_size // 32) ** 2
        store = IndexStore.create(root, manifest=_manifest_for(model, config), global_dim=config.dim,
                                  local_shape=(local_cells, config.dim))
        try:
            save_model(model, config, root / MODEL_FOLDER)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # never leave an index without its model
            raise
        return cls(store, model, config, root)

    @classmethod
    def open(cls, index_dir: str | Path, *, model_dir: str | Path | None = None) -> "Waldo":
        """Open an index. ``model_dir`` asks to query with another checkpoint: it must be the
        very model that built the index, or this raises IndexMismatchError."""
        root = Path(index_dir)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not a Waldo index (no manifest.json); build one with "
                                    f"`waldo index build`")
        model, config = load_model(model_dir if model_dir is not None else root / MODEL_FOLDER)
        store = IndexStore.open(root, expected={"backbone": config.backbone, "model_hash": model_hash(model)})
        return cls(store, model, config, root)

    # ------------------------------------------------------------------ writing
    def add(self, paths: Sequence[str], identities: Sequence[str] | None = None,
            attrs: Sequence[dict] | None = None, *, batch_size: int = 32,
            num_workers: int | None = None, progress: bool = True) -> AddReport:
        """Extract and add images. Paths already in the index, and duplicates within ``paths``,
        are skipped (reported, not re-added); unreadable images are reported and skipped."""
        paths = [str(Path(p).resolve()) for p in paths]
        identities = list(identities) if identities is not None else [""] * len(paths)
        attrs = list(attrs) if attrs is not None else [{} for _ in paths]
        if not (len(paths) == len(identities) == len(attrs)):
            raise ValueError("paths, identities and attrs must have the same length")
        report = AddReport()
        present = self.store.contains_paths(paths)
        seen: set[str] = set()
        keep = []
        for i, (path, indexed) in enumerate(zip(paths, present)):
            if indexed or path in seen:
                report.already_indexed.append(path)
            else:
                seen.add(path)
                keep.append(i)
        if not keep:
            return report
        todo = [paths[i] for i in keep]
        extracted = extract_descriptors(self.model, todo, self.transform, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress, description="index")
        report.errors = extracted.errors
        rows = [keep[j] for j in np.flatnonzero(extracted.ok)]
        if rows:
            report.added = self.store.add([paths[i] for i in rows], [identities[i] for i in rows],
                                          extracted.global_desc, extracted.local_desc,
                                          attrs=[attrs[i] for i in rows])
        return report

    def remove(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> int:
        """Remove images by id and/or path; returns how many were removed."""
        removed = self.store.remove(list(ids)) if ids else 0
        if paths:
            removed += self.store.remove_paths([str(Path(p).resolve()) for p in paths])
        return removed

    # ------------------------------------------------------------------ reading
    @torch.inference_mode()
    def describe(self, image: str | Path | bytes | IO[bytes]):
        """Descriptors of one query image (path, bytes or file object): (global (D,), local (L, D))."""
        tensor = self.transform(load_image(image), 0)[None]
        out = self.model(tensor.contiguous(memory_format=torch.channels_last))
        return out.global_desc[0].numpy(), out.local_desc[0].numpy()

    def search(self, image: str | Path | bytes | IO[bytes], k: int = 10) -> list[SearchHit]:
        """The ``k`` indexed images most similar to ``image``, best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        query_global, _ = self.describe(image)
        return self.search_descriptor(query_global, k)

    def search_descriptor(self, query_global: np.ndarray, k: int = 10) -> list[SearchHit]:
        result = self.store.search(np.asarray(query_global, np.float32)[None], k)
        ids = [int(i) for i in result.ids[0] if i >= 0]
        records = {r.id: r for r in self.store.records(ids, skip_missing=True)}  # removed meanwhile: skip
        return [SearchHit(rank + 1, i, records[i].path, records[i].identity, float(score), dict(records[i].attrs))
                for rank, (i, score) in enumerate(zip(ids, result.scores[0])) if i in records]

    def __len__(self) -> int:
        return len(self.store)

    def info(self) -> dict:
        return {**self.store.info(), "model": asdict(self.config)}


def hits_to_json(hits: Sequence[SearchHit]) -> str:
    return json.dumps([asdict(h) for h in hits], indent=2)


__all__ = ["AddReport", "IndexMismatchError", "SearchHit", "Waldo", "hits_to_json"]
