"""The ``waldo`` command line, run as a user would (in-process through ``main``)."""

import json

import numpy as np
import pytest

from waldo.cli import main
from waldo.index import IndexStore


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("cli") / "abo-index"
    code = main(["index", "build", "--data", str(data_root / "abo_sample"), "--out", str(out),
                 "--projection", "random", "--workers", "0", "--quiet"])
    assert code == 0
    return out


def _first_hit_row(out: str) -> str:
    return next(line for line in out.splitlines() if line.lstrip().startswith("1 "))


def test_build_search_info_check(capsys, index_dir, data_root):
    query = data_root / "abo_sample" / "B074M5HPBD" / "9ea6992d.jpg"
    code, out, _ = run(capsys, "search", query, "--index", index_dir, "-k", "3")
    assert code == 0 and "9ea6992d.jpg" in _first_hit_row(out) and "rank  similarity" in out
    code, out, _ = run(capsys, "search", query, "--index", index_dir, "-k", "3", "--rerank", "gv")
    # Scores in their own unit under a header naming it; inliers as whole numbers, * verified.
    assert code == 0 and "similarity + geometry bonus" in out and "inliers" in out
    assert "*" in _first_hit_row(out) and "* verified by geometry" in out
    code, out, err = run(capsys, "search", query, "--index", index_dir, "-k", "3", "--json")
    body = json.loads(out)  # the body POST /search answers, key for key
    from waldo.serve.schemas import SearchResponse

    assert set(body) == set(SearchResponse.model_fields) and body["k"] == 3 and body["rerank"] == "none"
    assert body["score_kind"] == "similarity" and body["note"] == "" and "rerank: none" in err
    assert {"decode", "extract", "search", "rerank", "total"} <= set(body["timings"])
    hits = body["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["identity"] == "0"
    code, out, _ = run(capsys, "index", "info", "--index", index_dir)
    assert code == 0
    summary = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert summary["images"].startswith("images      12 (3 identities) in 1 segment")
    assert "efficientnet_lite0" in summary["model"] and "orb-teblid" in summary["keypoints"]
    assert "per image" in summary["storage"] and "local descriptors" in out
    assert summary["rerankers"].split(None, 1)[1] == "none, gv"  # keypoints by default: gv; no RRT trained
    assert summary["default"] == "default     none (no reranker was chosen on validation)"
    code, out, _ = run(capsys, "index", "info", "--index", index_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["model"]["backbone"] == "efficientnet_lite0" and info["count"] == 12
    code, out, _ = run(capsys, "index", "check", "--index", index_dir)
    assert code == 0 and out.strip().endswith("ok")


def test_add_and_remove(capsys, tmp_path, data_root):
    out_dir = tmp_path / "idx"
    folder = data_root / "abo_sample" / "B0799CK52K"
    assert main(["index", "build", "--data", str(data_root / "abo_sample"), "--where", "instance_id=0",
                 "--out", str(out_dir), "--projection", "random", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "index", "add", "--index", out_dir, folder, "--workers", "0", "--quiet")
    assert code == 0 and "added" in out
    n_added = int(out.split()[1])
    assert n_added == len(list(folder.glob("*.jpg")))
    victim = sorted(folder.glob("*.jpg"))[0]
    code, out, _ = run(capsys, "index", "remove", "--index", out_dir, "--path", victim)
    assert code == 0 and out.startswith("removed 1")


def _leave_one_out_metrics(descriptors: np.ndarray, identities: list[str]) -> dict[str, float]:
    """Recall@k and mAP of leave-one-out search, by hand: each image queries all the others."""
    similarity = descriptors @ descriptors.T
    np.fill_diagonal(similarity, -np.inf)  # never the query itself
    labels = np.array(identities)
    recalls, precisions = {1: [], 10: [], 100: []}, []
    for query, row in enumerate(similarity):
        ranked = np.argsort(-row, kind="stable")[:-1]
        relevant = labels[ranked] == labels[query]
        for k in recalls:
            recalls[k].append(relevant[:k].any())
        hit_ranks = np.flatnonzero(relevant) + 1
        precisions.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
    return {**{f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()}, "map": float(np.mean(precisions))}


def test_eval_writes_json(capsys, tmp_path, index_dir, data_root):
    out_json = tmp_path / "m.json"
    code, out, err = run(capsys, "eval", "--protocol", "loo", "--data", data_root / "abo_sample",
                         "--projection", "random", "--json", out_json, "--workers", "0")
    assert code == 0 and "R@1" in out and out.splitlines()[-1].startswith("total ")
    # One line per stage, counted and timed (the progress bars in between clear themselves).
    stages = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("[")]
    assert [line[:5] for line in stages] == ["[1/2]", "[2/2]"] and all(line.endswith(" s") for line in stages)
    metrics = json.loads(out_json.read_text())
    assert metrics["n_queries"] == 12
    # The same untrained model (random projection, seed 0) built index_dir: its stored
    # descriptors give the figures eval must report.
    with IndexStore.open(index_dir) as store:
        records = store.records()
        expected = _leave_one_out_metrics(store.global_descriptors([r.id for r in records]),
                                          [r.identity for r in records])
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-6)


def test_clear_errors(capsys, tmp_path, index_dir, data_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "index", "build", "--data", empty, "--out", tmp_path / "x")
    assert code == 2 and "no images" in err
    code, _, err = run(capsys, "index", "build", "--data", data_root / "abo_sample", "--out", index_dir)
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "search", tmp_path / "missing.jpg", "--index", index_dir)
    assert code == 2 and "missing.jpg" in err
    code, _, err = run(capsys, "search", data_root / "abo_sample" / "labels.csv", "--index", index_dir)
    assert code == 2 and "labels.csv" in err
    code, _, err = run(capsys, "search", data_root / "abo_sample" / "labels.csv", "--index", tmp_path)
    assert code == 2 and "not a Waldo index" in err
    with pytest.raises(SystemExit) as exit_:  # refused while parsing: before any import or data read
        main(["eval", "--protocol", "no-such-protocol", "--data", str(tmp_path)])
    assert exit_.value.code == 2 and "unknown protocol 'no-such-protocol'; known: " in capsys.readouterr().err


def test_output_files_need_an_existing_folder(capsys, tmp_path, data_root):
    """explain -o and eval --json refuse a missing folder at once, creating nothing: a typo in a
    path must not leave a folder tree behind, nor fail after minutes of work."""
    missing = tmp_path / "missing" / "dir"
    image = data_root / "abo_sample" / "B074M5HPBD" / "9ea6992d.jpg"
    code, _, err = run(capsys, "explain", image, image, "-o", missing / "x.png")
    assert code == 2 and f"folder {missing} does not exist" in err
    code, _, err = run(capsys, "eval", "--protocol", "loo", "--data", data_root / "abo_sample",
                       "--json", missing / "m.json")
    assert code == 2 and f"folder {missing} does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_build_with_int8_locals_and_an_approximate_global_index(capsys, tmp_path, data_root):
    out_dir = tmp_path / "q"
    code = main(["index", "build", "--data", str(data_root / "abo_sample"), "--out", str(out_dir),
                 "--local-dtype", "int8", "--global-index", "IVF4,Flat", "--global-search-params", "nprobe=2",
                 "--projection", "random", "--workers", "0", "--quiet"])
    assert code == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "index", "info", "--index", out_dir)
    assert code == 0 and "locals 49 x 128 int8" in out and "int8 scales of the locals" in out
    assert "search      IVF4,Flat (approximate; nprobe=2); searching with Flat for now: " in out
    code, out, _ = run(capsys, "index", "info", "--index", out_dir, "--json")
    info = json.loads(out)
    assert info["local_dtype"] == "int8" and info["manifest"]["global_search_params"] == {"nprobe": 2}
    per_image = info["bytes_per_image"]
    assert 49 * 128 <= per_image["local"] < 49 * 128 + 128 and 49 * 2 <= per_image["local_scale"] < 49 * 2 + 128
    assert per_image["verification"] > 0 and per_image["total"] > per_image["local"]
    assert info["global_index"]["built"] == "Flat" and "fewer than the 156 needed" in info["global_index"]["reason"]
    query = data_root / "abo_sample" / "B074M5HPBD" / "9ea6992d.jpg"
    code, out, _ = run(capsys, "search", query, "--index", out_dir, "-k", "2", "--json")
    assert code == 0 and json.loads(out)["results"][0]["path"].endswith("9ea6992d.jpg")
    code, out, _ = run(capsys, "index", "check", "--index", out_dir)
    assert code == 0 and out.strip().endswith("ok")
    for flags, message in ((["--global-index", "Nonsense"], "not a faiss index factory string"),
                           (["--global-search-params", "nprobe=x"], "NAME=INTEGER"),
                           (["--global-index", "HNSW8", "--global-search-params", "nprobe=2"], "does not apply")):
        code, _, err = run(capsys, "index", "build", "--data", data_root / "abo_sample", "--out", tmp_path / "bad",
                           "--projection", "random", "--workers", "0", "--quiet", *flags)
        assert code == 2 and message in err and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- index compact; write failures
def _grocery_photos(data_root, n: int) -> list[str]:
    from waldo.data.datasets import read_labels_csv

    records = read_labels_csv(data_root / "grocery_store").records
    return [r.path for r in records if r.attrs.get("kind") == "natural"][:: 211][:n]


def test_index_compact_reclaims_removed_rows(capsys, tmp_path, index_dir):
    import shutil

    root = shutil.copytree(index_dir, tmp_path / "ix")
    with IndexStore.open(root) as store:
        store.remove([r.id for r in store.records()][:2])
    code, out, _ = run(capsys, "index", "compact", "--index", root)
    assert code == 0 and out.startswith(f"compacted {root}: segments 1 -> 1, 2 removed rows reclaimed, 10 images, ")
    code, out, _ = run(capsys, "index", "compact", "--index", root, "--json")
    body = json.loads(out)
    assert code == 0 and body["path"] == str(root) and body["images"] == 10 and body["seconds"] >= 0
    assert (body["segments_before"], body["segments_after"], body["rows_reclaimed"]) == (1, 1, 0)
    code, out, _ = run(capsys, "index", "compact", "--index", root)
    assert code == 0 and out.startswith(f"{root} is already compact: 10 images in 1 segment (")
    code, out, _ = run(capsys, "index", "check", "--index", root)
    assert code == 0 and out.strip().endswith("ok")
    code, _, err = run(capsys, "index", "compact", "--index", tmp_path / "nothing")
    assert code == 2 and "no index at" in err


def test_index_add_on_a_full_disk_says_so_and_exits_1(capsys, tmp_path, index_dir, data_root, missing_dependency):
    """No traceback, no signal: one line saying what happened and that nothing was added."""
    import errno
    import shutil
    import subprocess

    size = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file())
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 2**20 + 4}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        missing_dependency(f"cannot mount a tmpfs to fill ({done.stderr.strip()}): this test needs root")
    try:
        root = shutil.copytree(index_dir, mount / "ix")
        filler = mount / "filler"
        with open(filler, "wb") as f:  # fill the disk, then give back 64 KiB: less than 3 photos need
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
            f.truncate(f.tell() - 65536 if f.tell() >= 65536 else 0)
        code, out, err = run(capsys, "index", "add", "--index", root, *_grocery_photos(data_root, 3),
                             "--workers", "0", "--quiet")
        assert code == 1 and out == "" and "Traceback" not in err
        assert err == (f"waldo: error: no space left on device while writing the index at {root}: nothing was "
                       f"added; free space and retry\n")
        filler.unlink()
        with IndexStore.open(root) as store:
            assert len(store) == 12 and store.check() == [] and store.info()["orphan_segments"] == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_index_add_says_once_that_it_waits_for_the_write_lock(capsys, tmp_path, index_dir, data_root, monkeypatch):
    import shutil
    import threading

    import waldo.cli as cli
    from waldo.fsutil import file_lock

    root = shutil.copytree(index_dir, tmp_path / "ix")
    said, held = threading.Event(), threading.Event()
    say = cli._say_waiting_for_lock

    def say_and_release() -> None:
        say()
        said.set()

    monkeypatch.setattr(cli, "_say_waiting_for_lock", say_and_release)

    def hold() -> None:  # another writer, holding the lock until the waiting one has said so
        with file_lock(root / "write.lock"):
            held.set()
            said.wait(timeout=120)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    code, out, err = run(capsys, "index", "add", "--index", root, *_grocery_photos(data_root, 1),
                         "--workers", "0", "--quiet")
    holder.join()
    assert code == 0 and out.startswith("added 1 images") and said.is_set()
    assert err.count("waiting for the index's write lock") == 1


def test_build_with_stage_locals_and_search_with_local_match(capsys, tmp_path, data_root):
    out_dir = tmp_path / "staged"
    code = main(["index", "build", "--data", str(data_root / "abo_sample"), "--out", str(out_dir),
                 "--local-stage", "4", "--dim", "32", "--local-dtype", "int8", "--local-features", "none",
                 "--projection", "random", "--workers", "0", "--quiet"])
    assert code == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "index", "info", "--index", out_dir)
    assert code == 0 and "locals 196 x 32 int8 of backbone stage 4" in out
    query = data_root / "abo_sample" / "B074M5HPBD" / "9ea6992d.jpg"
    code, out, _ = run(capsys, "search", query, "--index", out_dir, "-k", "2", "--rerank", "local-match", "--json")
    answer = json.loads(out)
    assert code == 0 and answer["results"][0]["path"].endswith("9ea6992d.jpg")
    assert answer["score_kind"] == "similarity + matched cells"
    code, _, err = run(capsys, "index", "build", "--data", data_root / "abo_sample", "--out", tmp_path / "bad",
                       "--local-stage", "4", "--projection", "random", "--quiet")
    assert code != 0 and "stage 4's 112 channels" in err  # the default --dim 128 is wider than the stage
