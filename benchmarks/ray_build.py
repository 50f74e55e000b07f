"""``waldo index build`` with the local and the Ray engine, timed, for the README's Ray section.

Each engine builds two indexes through the real command line (a fresh process each, as a user
runs it): the grocery validation photos (296) and the validation photos of one product (6).
Both pay the same start-up, so the difference gives each engine's rate past start-up, and the
small build what start-up costs. Random projection: no fitting pass, extraction only
(descriptors, SIFT keypoints, index writes).

    .venv/bin/python benchmarks/ray_build.py --json results/ray_build.json --doc   # about 2 minutes idle

``--doc`` rewrites the ``ray-build`` block of README.md from the JSON; ``--doc-only`` does that
from the JSON already written, measuring nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from waldo.paths import data_root  # noqa: E402

ENGINES = ("local", "ray")
# All validation photos, and those of one product (Banana: 6 photos).
SELECTIONS = {"all": ["split=val"], "one_product": ["split=val", "instance_id=6"]}


def build_command(data: Path, out: Path, engine: str, where: list[str]) -> list[str]:
    """The README's command (``--where`` per filter)."""
    filters = [arg for condition in where for arg in ("--where", condition)]
    return ["waldo", "index", "build", "--data", str(data), *filters, "--out", str(out), "--projection", "random",
            "--engine", engine, "--quiet"]


def timed_build(workdir: Path, engine: str, selection: str) -> dict:
    """Run one build in a fresh process; its wall seconds and how many images it indexed."""
    out = workdir / f"{engine}-{selection}"
    command = build_command(data_root() / "grocery_store", out, engine, SELECTIONS[selection])
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("waldo")), *command[1:]], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    info = subprocess.run([str(Path(sys.executable).with_name("waldo")), "index", "info", "--index", str(out), "--json"],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    return {"images": json.loads(info.stdout)["count"], "seconds": round(seconds, 1)}


def summarise(runs: dict) -> dict:
    """Per engine: images/s of the big build, and the start-up and rate the two builds imply."""
    out = {}
    for engine, builds in runs.items():
        big, small = builds["all"], builds["one_product"]
        rate = (big["images"] - small["images"]) / (big["seconds"] - small["seconds"])
        out[engine] = {"images_per_s": round(big["images"] / big["seconds"], 1),
                       "images_per_s_past_startup": round(rate, 1),
                       "startup_s": round(small["seconds"] - small["images"] / rate, 1)}
    return out


def markdown(report: dict) -> str:
    """The README block: the command, the timings and what they say."""
    local, ray = report["runs"]["local"]["all"], report["runs"]["ray"]["all"]
    s_local, s_ray = report["summary"]["local"], report["summary"]["ray"]
    return (
        f"Measured on the {report['cpu_count']}-core development machine (load average "
        f"{report['load_average'][0]} at the start: other jobs shared the cores, so an idle machine is faster), "
        f"{local['images']} grocery photos (descriptors, keypoints and index writes included):\n"
        f"`{' '.join(build_command(Path('../shared/data/grocery_store'), Path('OUT'), 'local|ray', SELECTIONS['all']))}`\n"
        f"takes {local['seconds']} s ({s_local['images_per_s']} images/s) with `local` and {ray['seconds']} s "
        f"({s_ray['images_per_s']} images/s) with `ray`. A build of the {report['runs']['ray']['one_product']['images']} "
        f"photos of one product gives what start-up costs: {s_local['startup_s']} s for `local`, {s_ray['startup_s']} s "
        f"for `ray` (starting Ray, then the actors importing PyTorch and loading the model). Past start-up, "
        f"`ray` describes {s_ray['images_per_s_past_startup']} images/s and `local` "
        f"{s_local['images_per_s_past_startup']}. So on one machine Ray only costs start-up time; it pays off when a "
        f"cluster has more cores than one machine. Produced by `.venv/bin/{report['command']}` (JSON: "
        f"`results/ray_build.json`)."
    )


def measure(argv: list[str]) -> dict:
    """Both engines, both builds; the report written as JSON."""
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="waldo-ray-build-") as workdir:
        runs = {engine: {selection: timed_build(Path(workdir), engine, selection) for selection in SELECTIONS}
                for engine in ENGINES}
    return {"command": "python benchmarks/ray_build.py " + shlex.join(argv), "cpu_count": os.cpu_count(),
            "load_average": load, "runs": runs, "summary": summarise(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(ROOT / "results" / "ray_build.json"))
    parser.add_argument("--doc", action="store_true", help="rewrite the ray-build block of README.md")
    parser.add_argument("--doc-only", action="store_true", help="--doc from the existing --json, measuring nothing")
    args = parser.parse_args(argv)
    if args.doc_only:
        report = json.loads(Path(args.json).read_text())
    else:
        report = measure(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    if args.doc or args.doc_only:
        from waldo_experiments.doc_blocks import markers, write_block

        start, end = markers("ray-build")
        write_block(ROOT / "README.md", f"{start}\n{markdown(report)}\n{end}", start, end)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
