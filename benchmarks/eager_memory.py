"""Eager PyTorch on CPU with large buffers reused (waldo.models.cpu_memory) against glibc's default.

Each case runs twice in a fresh process, with the tuning (default) and with
``WALDO_MALLOC_TUNING=0``, and reports wall seconds, user and system CPU seconds, and a checksum
of what it computed (the allocator must not change a single result):

- ``extract-eager``: ``extract_descriptors`` (runtime eager, what ``waldo eval`` and small adds
  run) of 640 grocery training photos with make demo's model (lite0-lw-rrt, 288 px);
- ``match-fit``: make demo's match-cell fit (``with_match_cells``: 300 photos, stage-4 cells,
  eager when no ONNX export of that stage is cached, as on a fresh machine);
- ``extract-onnx``: the same 640 photos on ONNX Runtime (export cached), untouched against
  *forced* raised thresholds: why the ONNX path is left alone;
- ``onnx-after-eager``: the ONNX extraction after an eager pass of 64 photos (tuned: it left the
  thresholds at glibc's adaptive ceiling), as make demo's build runs its ONNX pass after its fit;
- ``train-global``: one epoch of ``waldo train global`` (configs/global-cpu.json on grocery-open;
  images/s of the epoch from the run's log, the command's wall time beside it).

    .venv/bin/python benchmarks/eager_memory.py      # ~4 min on 2 cores; results/eager_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "eager_memory.json"
MODEL = "lite0-lw-rrt"
CASES = ("extract-eager", "match-fit", "extract-onnx", "onnx-after-eager", "train-global")
N_PHOTOS = 640


def _photos(n: int) -> list[str]:
    from waldo.data.datasets import load_dataset
    from waldo.paths import data_root

    paths = sorted(load_dataset(str(data_root() / "grocery_store")).paths)
    train = [p for p in paths if "/train/" in p]
    return train[:n]


def _child(case: str, tuned: bool) -> dict:
    """One case in this process (``tuned``: with the tuning; for extract-onnx, forced on)."""
    import contextlib

    import numpy as np

    from waldo.data.transforms import get_transform
    from waldo.models.checkpoint import load_model
    from waldo.models.cpu_memory import reuse_large_buffers
    from waldo.models.extract import extract_descriptors
    from waldo.models.shipped import resolve_model_dir
    from waldo.models.untrained import with_match_cells

    model, config = load_model(resolve_model_dir(MODEL))
    transform = get_transform(config.transform, config.image_size)
    photos = _photos(N_PHOTOS)
    forced = contextlib.ExitStack()
    if case == "onnx-after-eager":
        extract_descriptors(model, photos[:64], transform, runtime="eager", progress=False)
    if case in ("extract-onnx", "onnx-after-eager"):
        if tuned and case == "extract-onnx":  # from before the session exists, as if a whole build ran inside
            forced.enter_context(reuse_large_buffers())
        extract_descriptors(model, photos[:64], transform, runtime="onnx", progress=False)  # export cached, warm
    start, before = time.perf_counter(), os.times()
    if case == "extract-eager":
        out = extract_descriptors(model, photos, transform, runtime="eager", progress=False)
        checksum = float(np.abs(out.global_desc).sum() + np.abs(out.local_desc.astype(np.float32)).sum())
    elif case in ("extract-onnx", "onnx-after-eager"):
        with forced:
            out = extract_descriptors(model, photos, transform, runtime="onnx", progress=False)
        checksum = float(np.abs(out.global_desc).sum() + np.abs(out.local_desc.astype(np.float32)).sum())
    elif case == "match-fit":
        with tempfile.TemporaryDirectory() as cache:  # no cached stage export: eager, as on a fresh machine
            os.environ["WALDO_CACHE"] = cache
            matched, _ = with_match_cells(model, config, 4, dim=64, fit_paths=_photos(10_000), progress=False,
                                          fit_runtime="auto")
        checksum = float(matched.match_proj.weight.abs().sum())
    else:
        raise ValueError(case)
    after = os.times()
    return {"seconds": round(time.perf_counter() - start, 2), "user": round(after.user - before.user, 1),
            "system": round(after.system - before.system, 1), "checksum": checksum}


def _train_global(tuned: bool) -> dict:
    env = {**os.environ, "WALDO_MALLOC_TUNING": "1" if tuned else "0"}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([str(ROOT / ".venv" / "bin" / "waldo"), "train", "global", "--protocol", "grocery-open",
                        "--config", str(ROOT / "configs" / "global-cpu.json"), "--out", out, "--stop-after", "1",
                        "--quiet"], check=True, env=env, capture_output=True)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r.get("epoch") == 1)
    return {"seconds": round(seconds, 1), "images_per_s": round(epoch["images_per_s"], 1), "checksum": epoch["loss"]}


def run_case(case: str, tuned: bool) -> dict:
    if case == "train-global":
        return _train_global(tuned)
    env = {**os.environ, "WALDO_MALLOC_TUNING": "1" if tuned or case == "extract-onnx" else "0"}
    done = subprocess.run([sys.executable, __file__, "--child", case, *(["--tuned"] if tuned else [])],
                          check=True, env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=[c for c in CASES if c != "train-global"], help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tuned)))
        return 0
    from waldo.models.cpu_memory import tuning_available

    if not tuning_available():
        raise SystemExit("the tuning needs glibc (Linux); nothing to compare here")
    rows = {}
    for case in args.cases.split(","):
        rows[case] = {"default": run_case(case, False), "tuned": run_case(case, True)}
        rows[case]["same result"] = rows[case]["default"]["checksum"] == rows[case]["tuned"]["checksum"]
        print(json.dumps({case: rows[case]}), flush=True)
    result = {"cases": rows, "model": MODEL, "photos": N_PHOTOS, "cpus": os.cpu_count(),
              "command": "benchmarks/eager_memory.py"}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
