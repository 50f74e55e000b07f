"""The Python API end to end on real photos: build, search, grow, shrink, reopen, refuse."""

from pathlib import Path

import numpy as np
import pytest

from waldo.api import Waldo
from waldo.data.datasets import read_labels_csv
from waldo.index import IndexMismatchError


@pytest.fixture(scope="module")
def abo(data_root):
    return read_labels_csv(data_root / "abo_sample")


@pytest.fixture(scope="module")
def built(abo, tmp_path_factory):
    root = tmp_path_factory.mktemp("idx") / "abo"
    engine = Waldo.create(root, backbone="efficientnet_lite0", projection="random", progress=False)
    report = engine.add(abo.paths, abo.identities, [dict(r.attrs) for r in abo.records], progress=False,
                        num_workers=0)
    assert len(report.added) == len(abo) and not report.errors
    return root, engine


def test_an_indexed_photo_finds_itself_then_its_siblings(abo, built):
    _, engine = built
    for record in abo.records[::4]:
        hits = engine.search(record.path, k=3).hits
        assert hits[0].path == record.path and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert [h.rank for h in hits] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # Catalogue shots of one product resemble each other more than other products: the second
    # hit shares the query's identity for most queries (not all: 3-5 shots of similar items).
    second_right = np.mean([engine.search(r.path, k=2).hits[1].identity == r.identity for r in abo.records])
    assert second_right >= 0.6


def test_reopen_gives_the_same_answers(abo, built):
    root, engine = built
    query = abo.records[5].path
    again = Waldo.open(root)
    assert len(again) == len(engine)
    assert [(h.id, round(h.score, 5)) for h in again.search(query, k=5).hits] == \
           [(h.id, round(h.score, 5)) for h in engine.search(query, k=5).hits]


def test_search_accepts_bytes_and_refuses_bad_k(abo, built):
    _, engine = built
    data = Path(abo.records[0].path).read_bytes()
    assert engine.search(data, k=1).hits[0].path == abo.records[0].path
    with pytest.raises(ValueError, match="k must be"):
        engine.search(data, k=0)


def test_add_remove_and_duplicates(abo, grocery_dir, tmp_path):
    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False)
    first = engine.add(abo.paths[:6], abo.identities[:6], progress=False, num_workers=0)
    assert len(first.added) == 6
    again = engine.add(abo.paths[:8] + abo.paths[7:8], abo.identities[:8] + abo.identities[7:8],
                       progress=False, num_workers=0)
    assert len(again.added) == 2 and len(again.already_indexed) == 7  # 6 indexed + 1 repeated
    assert len(engine) == 8
    assert engine.remove(paths=[abo.paths[0]]) == 1
    assert all(h.path != abo.paths[0] for h in engine.search(abo.paths[0], k=8).hits)
    assert len(Waldo.open(tmp_path / "idx")) == 7


def test_unreadable_images_are_reported_and_skipped(abo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(abo.paths[:3]):
        (folder / f"good{i}.jpg").symlink_to(path)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(Path(abo.paths[0]).read_bytes()[:2000])
    (folder / "notes.png").write_text("not an image")
    paths = sorted(str(p) for p in folder.iterdir())
    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False)
    report = engine.add(paths, progress=False, num_workers=0)
    assert len(report.added) == 3
    assert sorted(Path(p).name for p, _ in report.errors) == ["empty.jpg", "notes.png", "truncated.jpg"]
    assert all(message for _, message in report.errors)


def test_an_index_refuses_another_model(built, tmp_path):
    root, _ = built
    other = Waldo.create(tmp_path / "other", projection="random", seed=1, progress=False)
    with pytest.raises(IndexMismatchError, match="model_hash"):
        Waldo.open(root, model_dir=other.root / "model")
    resnet_like = Waldo.create(tmp_path / "lite2", backbone="efficientnet_lite2", projection="random",
                               progress=False)
    with pytest.raises(IndexMismatchError, match="backbone"):
        Waldo.open(root, model_dir=resnet_like.root / "model")


def test_create_refuses_an_existing_index(built):
    root, _ = built
    with pytest.raises((FileExistsError, ValueError)):
        Waldo.create(root, projection="random", progress=False)
    assert len(Waldo.open(root)) > 0  # and the old one is untouched


def test_open_a_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Waldo index"):
        Waldo.open(tmp_path)


def test_an_image_removed_while_a_query_runs_leaves_no_hole(abo, tmp_path, monkeypatch):
    """A query reads one snapshot; an image removed after it was taken has no record any more.
    The answer skips it and still has k hits ranked 1..k (the load test's probe once saw ranks
    [1, 3, 4, 5]: four hits and a gap)."""
    engine = Waldo.create(tmp_path / "idx", projection="random", progress=False)
    engine.add(abo.paths, abo.identities, progress=False, num_workers=0)
    query = abo.paths[3]
    before = [h.id for h in engine.search(query, k=5).hits]
    taken = engine.store.snapshot()  # the view a query in flight holds
    assert engine.remove(ids=[before[1]]) == 1
    monkeypatch.setattr(engine.store, "snapshot", lambda: taken)
    hits = engine.search(query, k=5).hits
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert before[1] not in [h.id for h in hits]
    assert [h.id for h in hits][:4] == [before[0]] + before[2:5]  # the rest in order, one more at the end
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_an_index_with_stage_locals_offers_local_match(abo, built, tmp_path):
    root = tmp_path / "staged"
    engine = Waldo.create(root, projection="random", dim=32, local_stage=4, gv_features=False, progress=False)
    engine.add(abo.paths, abo.identities, progress=False, num_workers=0)
    assert engine.store.local_shape == (196, 32)  # 14x14 cells of stage 4 at 224 px
    assert "local-match" in engine.available_rerankers()
    query = abo.records[0]
    outcome = engine.search(query.path, k=5, rerank="local-match")
    assert outcome.hits[0].path == query.path and outcome.score_kind == "similarity + matched cells"
    # the photo itself matches every cell: its score is its global similarity (1) + the weight
    assert outcome.hits[0].score == pytest.approx(1.0 + 1.0, abs=1e-3)
    reopened = Waldo.open(root)
    assert reopened.config.local_stage == 4 and "local-match" in reopened.available_rerankers()
    _, plain = built  # the last map's 7x7 locals: not offered, and refused by name
    assert "local-match" not in plain.available_rerankers()
    with pytest.raises(ValueError, match="finer backbone stage"):
        plain.search(query.path, k=5, rerank="local-match")
    # a checkpoint keeps its descriptors and gets match cells of the stage, fitted on the images given,
    # stored after its 49 locals: 196 cells x 32 values packed four to a 128-wide row
    restaged = Waldo.create(tmp_path / "restaged", model_dir=built[0] / "model", local_stage=4, dim=32,
                            fit_paths=abo.paths, gv_features=False, progress=False)
    restaged.add(abo.paths[:4], abo.identities[:4], progress=False, num_workers=0)
    assert restaged.store.local_shape == (49 + 49, 128) and "local-match" in restaged.available_rerankers()
    assert restaged.config.match_stage == 4 and restaged.config.extra["match_cells"]["cells"] == 196
    import torch

    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        mine, theirs = restaged.model(images), plain.model(images)
    assert torch.allclose(mine.global_desc, theirs.global_desc, atol=1e-5)
    assert torch.allclose(mine.local_desc[:, :49], theirs.local_desc, atol=1e-5)
    tokens, cells = restaged.model.match_layout(224).split(mine.local_desc)
    assert tokens.shape == (2, 49, 128) and cells.shape == (2, 196, 32)
    hit = restaged.search(abo.paths[0], k=1, rerank="local-match").hits[0]
    assert hit.path == abo.paths[0] and hit.score == pytest.approx(2.0, abs=1e-3)  # all its cells match
    reopened = Waldo.open(tmp_path / "restaged")
    assert reopened.search(abo.paths[0], k=1, rerank="local-match").hits[0].score == pytest.approx(hit.score)
    with pytest.raises(ValueError, match="fitted on images"):
        Waldo.create(tmp_path / "unfitted", model_dir=built[0] / "model", local_stage=4, dim=32)
    # two photos are enough: a small collection gives more of each photo's cells to the fit
    two = Waldo.create(tmp_path / "two", model_dir=built[0] / "model", local_stage=4, dim=64, fit_paths=abo.paths[:2],
                       gv_features=False, progress=False)
    assert two.config.match_dim == 64 and "local-match" in two.available_rerankers()


def test_stage_locals_fit_on_fewer_photos_than_the_global_width(abo, tmp_path):
    """A wide global descriptor is fitted by views-whiten; the 64-d stage locals by their own
    PCA on 8 cells per photo, so a dozen photos are enough for both."""
    engine = Waldo.create(tmp_path / "few", local_stage=4, dim=64, fit_paths=abo.paths, gv_features=False,
                          progress=False)
    assert len(abo.paths) < 64 and engine.config.projection.startswith("views-whiten")
    assert engine.config.local_stage == 4 and engine.store.local_shape == (196, 64)
    weights = engine.model.local_proj.weight.detach()[:, :, 0, 0]
    assert torch_allclose_identity(weights @ weights.T)  # a PCA basis: orthonormal rows


def torch_allclose_identity(gram) -> bool:
    import torch

    return bool(torch.allclose(gram, torch.eye(len(gram)), atol=1e-4))
