"""No code runs from files: models, indexes and caches load without pickle.

Each test plants a crafted pickle, whose unpickling would run code that creates a marker file,
where Waldo expects a file (an index array, the model weights, a reranker checkpoint, a mining
or feature cache), then loads it the way Waldo does. The load must be refused and the marker
must not exist. Each payload is first shown to be live: unpickled carelessly, it does run.
(tests/models/test_backbones.py covers a pickled ``.pth`` handed to ``create_backbone``.)
"""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from waldo.api import MODEL_FOLDER, Waldo
from waldo.index import IndexStore
from waldo.models.checkpoint import load_model, model_hash

WALDO = Path(__file__).resolve().parents[2] / "waldo"


class RunsCode:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def evil_npy(path: Path, marker: Path) -> None:
    np.save(path, np.array([RunsCode(marker), 1], dtype=object), allow_pickle=True)


def evil_torch(path: Path, marker: Path) -> None:
    torch.save({"weight": RunsCode(marker)}, path)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def test_the_payloads_are_live(tmp_path, marker):
    """Without this, a payload that never runs would make every test below pass for nothing."""
    evil_npy(tmp_path / "a.npy", marker)
    np.load(tmp_path / "a.npy", allow_pickle=True)
    assert marker.read_text() == "code ran"
    marker.unlink()
    evil_torch(tmp_path / "b.pt", marker)
    # torch.save writes a zip whose data.pkl is a plain pickle: unpickling that member by hand,
    # as a careless loader would, runs the payload (no torch.load without weights_only here).
    with zipfile.ZipFile(tmp_path / "b.pt") as archive:
        (member,) = [name for name in archive.namelist() if name.endswith("data.pkl")]
        pickle.loads(archive.read(member))
    assert marker.exists()


def _attempts(*actions) -> list[BaseException]:
    """Run every action; return what each raised (a refusal) or None."""
    errors = []
    for action in actions:
        try:
            action()
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - a refusal is what we want to see
            errors.append(error)
    return errors


@pytest.mark.parametrize("name", ["global.npy", "local.npy", "gv_keypoints.npy", "gv_descriptors.npy",
                                  "gv_offsets.npy"])
def test_index_array_holding_a_pickle_is_refused(index_copy, small_index, marker, name):
    root = index_copy()
    (segment,) = sorted((root / "segments").iterdir())
    assert (segment / name).is_file()
    evil_npy(segment / name, marker)

    engine = None

    def open_engine():
        nonlocal engine
        engine = Waldo.open(root)

    query = small_index.queries[0]
    errors = _attempts(open_engine,
                       lambda: engine.search(query, k=3),
                       lambda: engine.search(query, k=3, rerank="gv"),
                       lambda: engine.store.local_descriptors([r.id for r in engine.store.records()]))
    assert not marker.exists(), "unpickling ran code"
    assert any(e is not None for e in errors), "the damaged segment was used as if nothing were wrong"
    refusals = [str(e) for e in errors if e is not None]
    assert any("allow_pickle" in r or "unreadable" in r or name in r for r in refusals), refusals
    with IndexStore.open(root) as store:  # and `waldo index check` reports the damaged segment
        problems = store.check()
        assert problems and all(segment.name in problem for problem in problems), problems
    assert not marker.exists()


# What refuses each planted file: safetensors reads a length-prefixed JSON header, which a torch
# zip archive is not; config.json must be UTF-8 JSON, which the archive's bytes are not.
SAFETENSORS_REFUSAL = (SafetensorError, "Error while deserializing header")
REFUSALS = {"model.safetensors": SAFETENSORS_REFUSAL, "config.json": (ValueError, "utf-8|JSON")}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_model_folder_holding_a_pickle_is_refused(index_copy, marker, name):
    root = index_copy()
    evil_torch(root / MODEL_FOLDER / name, marker)
    error, message = REFUSALS[name]
    with pytest.raises(error, match=message):
        Waldo.open(root)
    assert not marker.exists(), "unpickling ran code"


def test_pickled_weights_beside_the_model_are_never_read(index_copy, small_index, marker):
    """A ``pytorch_model.bin`` or ``model.pt`` dropped into the folder is ignored: only
    ``model.safetensors`` is read."""
    root = index_copy()
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"):
        evil_torch(root / MODEL_FOLDER / name, marker)
    engine = Waldo.open(root)
    assert engine.search(small_index.queries[0], k=1).hits
    engine.store.close()
    assert not marker.exists()


def test_reranker_checkpoint_holding_a_pickle_is_refused(index_copy, small_index, marker):
    from waldo.rerank import RERANKERS, RerankerSetup
    from waldo.rerank.rrt import RerankingTransformer, RRTConfig
    from waldo.rerank.rrt_checkpoint import load_rrt, save_rrt

    root = index_copy()
    folder = root / MODEL_FOLDER
    save_rrt(folder, RerankingTransformer(RRTConfig(n_layers=1, ff_dim=64)))
    load_rrt(folder)  # the genuine checkpoint loads
    evil_torch(folder / "rrt.safetensors", marker)
    error, message = SAFETENSORS_REFUSAL
    with pytest.raises(error, match=message):
        load_rrt(folder)
    with pytest.raises(error, match=message):
        RERANKERS.create("rrt", RerankerSetup(folder)).rerank  # noqa: B018 - building it loads the weights
    engine = Waldo.open(root)
    assert "rrt" in engine.available_rerankers()
    with pytest.raises(error, match=message):
        engine.search(small_index.queries[0], k=3, rerank="rrt")
    engine.store.close()
    assert not marker.exists(), "unpickling ran code"


def test_neighbour_cache_holding_a_pickle_is_refused(small_index, tmp_path, marker):
    from waldo.train.mining import TopKMiner, neighbour_key

    model, config = load_model(small_index.root / MODEL_FOLDER)
    paths = [str(p) for p in small_index.photos]
    name, inputs = neighbour_key(model_hash(model), paths, None, config.transform, config.image_size, 2)
    folder = tmp_path / "cache" / "neighbours" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    for array in ("indices", "scores", "global", "ok"):
        evil_npy(folder / f"{array}.npy", marker)
    with pytest.raises(ValueError, match="allow_pickle"):
        TopKMiner(config.transform, config.image_size, 2, tmp_path / "cache", num_workers=0, progress=False)(model, paths)
    assert not marker.exists(), "unpickling ran code"


def test_feature_cache_holding_a_pickle_is_refused(tmp_path, marker):
    from waldo.train.rrt_features import CachedFeatures

    folder = tmp_path / "features" / "key"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    evil_npy(folder / "features.npy", marker)
    np.save(folder / "ok.npy", np.ones(2, bool))
    with pytest.raises(ValueError, match="allow_pickle|Python objects"):
        CachedFeatures(folder)
    assert not marker.exists(), "unpickling ran code"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            yield node, owner, node.func.attr


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_no_module_unpickles():
    """A guard against regressions: no pickle/marshal/shelve/dill loads anywhere in waldo/,
    torch.load only with weights_only=True, and np.load never with allow_pickle=True."""
    offenders = []
    for path in sorted(WALDO.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib"}
                       for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
        for node, owner, attr in _calls(tree):
            where = f"{path.relative_to(WALDO)}:{node.lineno}"
            if owner == "torch" and attr == "load" and _keyword(node, "weights_only") is not True:
                offenders.append(f"{where} torch.load without weights_only=True")
            if owner == "np" and attr == "load" and _keyword(node, "allow_pickle") not in (None, False):
                offenders.append(f"{where} np.load with allow_pickle")
    assert not offenders, offenders
