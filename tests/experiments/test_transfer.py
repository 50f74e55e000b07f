"""The transfer study end to end on a small subset: train, evaluate, report."""

from __future__ import annotations

import json

from waldo.paths import PROJECT_ROOT
from waldo_experiments.transfer import UNTRAINED, run_transfer, write_transfer

SIZE = 64


def test_transfer_study_trains_evaluates_and_reports(tmp_path, data_root):
    config = json.loads((PROJECT_ROOT / "configs" / "global-cpu-coil.json").read_text())
    config.update({"dim": 32, "image_size": SIZE, "eval_image_size": SIZE, "max_fit_images": 20, "epochs": 1,
                   "p": 4, "k": 2, "sampler_passes": 1, "eval_every": 1, "num_workers": 0, "val_fraction": 0.04})
    path = tmp_path / "tiny-coil.json"
    path.write_text(json.dumps(config))
    study = run_transfer(["coil100-open"], ["coil100-open"], tmp_path / "runs", configs={"coil100-open": str(path)},
                         subset={"identities": 3, "per_identity": 2, "max_train": 20}, progress=False,
                         log=lambda line: None)
    assert [r["model_name"] for r in study.rows] == [UNTRAINED, "trained on coil100-open"]
    trained = study.rows[1]
    assert trained["in_domain"] is True and trained["n_queries"] == 6
    assert sum(g["n_queries"] for g in trained["groups"].values()) == trained["n_queries"]
    written = write_transfer(study, tmp_path / "out", command="waldo experiment transfer ...")
    report = written["markdown"].read_text()
    assert UNTRAINED in report and "trained on coil100-open" in report
    assert json.loads(written["json"].read_text())["rows"][0]["model_name"] == UNTRAINED
    assert written["bars"].stat().st_size < 1_000_000
