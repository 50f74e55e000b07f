"""The Ray engine (waldo.models.extract_ray) against the in-process path, on a local Ray
instance with 2 CPUs and real photos: same descriptors, same keypoints, same order, same
errors for unreadable files, across several committed chunks; the CLI flag works.

Ray is an optional extra (``pip install -e '.[ray]'``): without it these tests are skipped
on a developer machine and fail in CI (``CI=true``); ``make setup`` installs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from waldo.api import MODEL_FOLDER, Waldo
from waldo.cli import main
from waldo.data.datasets import read_labels_csv

# Ray Data warns about its own deprecated settings whenever it copies its context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_local(require_module):
    """A local Ray with 2 CPUs for this module (the engine reuses an initialised Ray)."""
    require_module("ray.data", "pip install -e '.[ray]'")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(grocery_dir, tmp_path_factory) -> list[str]:
    """Eight grocery photos of four products, plus three unreadable files in between."""
    records = read_labels_csv(grocery_dir).records
    picked = [r.path for r in records if r.attrs.get("split") == "test"][::40][:8]
    assert len(picked) == 8
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(Path(picked[0]).read_bytes()[:2000])
    (folder / "notes.png").write_text("not an image")
    bad = [str(folder / name) for name in ("empty.jpg", "truncated.jpg", "notes.png")]
    return picked[:3] + [bad[0]] + picked[3:6] + bad[1:] + picked[6:]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_ray_engine_matches_the_local_engine(ray_local, photos, tmp_path, monkeypatch):
    from waldo.models import extract_ray

    monkeypatch.setattr(extract_ray, "DEFAULT_CHUNK_SIZE", 4)  # 11 inputs: 3 chunks, 3 segments
    local = Waldo.create(tmp_path / "local", projection="random", progress=False)
    # The same model (from the first index's folder), so the descriptors must agree.
    remote = Waldo.create(tmp_path / "ray", model_dir=local.root / MODEL_FOLDER, progress=False)
    identities = [f"id{i}" for i in range(len(photos))]
    attrs = [{"n": i} for i in range(len(photos))]
    want = local.add(photos, identities, attrs, num_workers=0, progress=False)
    # batch_size=2 on 2 actors: several batches, finished out of order, must come back in order.
    got = remote.add(photos + photos[:1], identities + identities[:1], attrs + attrs[:1],
                     batch_size=2, engine="ray", actors=2, progress=False)

    assert len(want.added) == len(got.added) == 8
    assert got.errors == want.errors and len(got.errors) == 3  # same files, same messages, same order
    assert [Path(p).name for p, _ in got.errors] == ["empty.jpg", "truncated.jpg", "notes.png"]
    assert got.already_indexed == [str(Path(photos[0]).resolve())]  # the repeated input
    want_records, got_records = local.store.records(want.added), remote.store.records(got.added)
    assert [(r.path, r.identity, r.attrs) for r in got_records] == \
           [(r.path, r.identity, r.attrs) for r in want_records]
    want_global, got_global = local.store.global_descriptors(want.added), remote.store.global_descriptors(got.added)
    assert _cosines(got_global, want_global).min() > 0.9999
    np.testing.assert_allclose(got_global, want_global, atol=1e-4)
    want_local = local.store.local_descriptors(want.added).astype(np.float32)
    got_local = remote.store.local_descriptors(got.added).astype(np.float32)
    assert got_local.dtype == want_local.dtype and got_local.shape == want_local.shape
    cells = got_local.shape[-1]
    assert _cosines(got_local.reshape(-1, cells), want_local.reshape(-1, cells)).min() > 0.999
    # Keypoints for geometric verification are computed on the actors, identically.
    for (kw, dw), (kg, dg) in zip(local.store.verification_features(want.added),
                                  remote.store.verification_features(got.added)):
        np.testing.assert_array_equal(kg, kw)
        np.testing.assert_array_equal(dg, dw)
    query = photos[4]
    assert [h.path for h in remote.search(query, k=3).hits] == [h.path for h in local.search(query, k=3).hits]
    assert remote.store.check() == []
    assert len(list((remote.root / "segments").iterdir())) == 3  # one commit per chunk


def test_cli_build_with_the_ray_engine(ray_local, capsys, data_root, tmp_path):
    out = tmp_path / "idx"
    code = main(["index", "build", "--data", str(data_root / "abo_sample"), "--where", "instance_id=0",
                 "--out", str(out), "--projection", "random", "--engine", "ray", "--actors", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("indexed ")
    assert len(Waldo.open(out)) == int(printed.split()[1]) > 0


def test_a_wrong_model_is_refused_before_any_actor_starts(abo_paths, tmp_path):
    from waldo.models.extract_ray import iter_extract_ray

    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False, gv_features=False)
    with pytest.raises(ValueError, match="not the index's model"):
        list(iter_extract_ray(engine.root / MODEL_FOLDER, abo_paths[:2], expected_hash="0" * 64, actors=1,
                              progress=False))
    with pytest.raises(FileNotFoundError, match="not a Waldo model folder"):
        list(iter_extract_ray(tmp_path, abo_paths[:2], progress=False))


def test_unknown_engine_and_missing_ray_are_clear_errors(tmp_path, monkeypatch, abo_paths):
    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False, gv_features=False)
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        engine.add(abo_paths[:1], engine="spark", progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[ray\]'"):
        engine.add(abo_paths[:1], engine="ray", progress=False)
    assert len(engine) == 0


@pytest.fixture
def abo_paths(data_root) -> list[str]:
    return read_labels_csv(data_root / "abo_sample").paths


def test_actors_run_the_runtime_they_are_given(abo_paths, tmp_path, monkeypatch):
    """The actor class in this process (no Ray needed): a runtime is passed through, and the
    fast runtime's descriptors equal the eager actor's."""
    monkeypatch.setenv("WALDO_CACHE", str(tmp_path / "cache"))  # export afresh, not into the project cache
    from waldo.models.extract_ray import DescriptorActor, read_model_files
    from waldo.models.onnx_runtime import OnnxDescriptorModel

    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False, gv_features=False)
    files = read_model_files(engine.root / MODEL_FOLDER)
    batch = {"key": np.arange(3), "path": np.array(abo_paths[:3], dtype=object)}
    eager = DescriptorActor(files, runtime="auto", batch_size=4, images_per_actor=3)
    assert eager.run_model is eager.model  # 3 images: not worth an export
    expected = eager(batch)
    fast = DescriptorActor(files, runtime="onnx", batch_size=4, images_per_actor=3)
    assert isinstance(fast.run_model, OnnxDescriptorModel)
    got = fast(batch)
    assert _cosines(got["global_desc"], expected["global_desc"]).min() > 0.9999
    assert _cosines(got["local_desc"], expected["local_desc"]).min() > 0.999
