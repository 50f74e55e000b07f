"""The studies' command line: its own entry point, and ``waldo experiment`` as a thin door."""

from __future__ import annotations

import json
import subprocess
import sys

from waldo.paths import PROJECT_ROOT


def _python(*args: str) -> str:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True,
                          cwd=PROJECT_ROOT).stdout


def test_python_m_waldo_experiments_lists_the_studies():
    out = _python("-m", "waldo_experiments", "--help")
    assert out.startswith("usage: python -m waldo_experiments") and "transforms" in out and "transfer" in out


def test_the_door_loads_no_study_plotting_or_torch_until_a_study_runs():
    loaded = json.loads(_python("-c", (
        "import argparse, json, sys\n"
        "from waldo_experiments.cli import register_experiment\n"
        "register_experiment(argparse.ArgumentParser().add_subparsers())\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('waldo', 'waldo_experiments', 'matplotlib', 'torch'))))")))
    assert loaded == ["waldo_experiments", "waldo_experiments.cli"]
