"""What the issue-7 benchmarks share: the machine they ran on and how their JSON is emitted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def machine_info() -> dict:
    """CPU count, torch threads and ISA level, torch version, and the load while measuring."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def emit_json(result: dict, out: Path | None) -> dict:
    """Print ``result`` as JSON and also write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result
