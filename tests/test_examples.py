"""The examples run as a user would run them (their ``main`` with command-line arguments),
over a small real index built in a temporary folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from PIL import Image

from waldo.api import Waldo
from waldo.data.datasets import read_labels_csv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    """Import ``examples/<name>.py`` (in-process: this test already paid for importing torch)."""
    spec = importlib.util.spec_from_file_location(f"waldo_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_search_photo_prints_results_and_saves_a_grid(data_root, tmp_path, capsys):
    photos = read_labels_csv(data_root / "abo_sample")
    index = tmp_path / "abo-index"
    # 12 photos: too few to fit a PCA; no keypoints: the example does not rerank.
    engine = Waldo.create(index, projection="random", gv_features=False, progress=False)
    engine.add(photos.paths, photos.identities, [dict(r.attrs) for r in photos.records], progress=False,
               num_workers=0)
    engine.store.close()
    query = photos.records[0]
    out = tmp_path / "grid" / "results.png"
    assert _example("search_photo").main([query.path, "--index", str(index), "-k", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"top 4 of {len(photos)} indexed images")
    first = lines[2].split()
    assert first[0] == "1" and float(first[1]) > 0.99 and first[-1] == query.path  # the photo finds itself
    assert lines[-1] == f"saved {out}"
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.width > 4 * 220 and grid.height > 220
