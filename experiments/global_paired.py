"""Issue 16: are the trained backbones' transfer margins more than a query or two?

The shipped lite0-global (chosen by experiments/global_seed_grid.py) and the transfer grid's coil
choice (experiments/global_transfer_grid.py) beat the untrained default on the collection they
never trained on by a few queries. This compares each, query by query, with
the untrained default on the same queries (waldo.eval.compare: exact McNemar on the top-1
discordant queries, paired-bootstrap 95% intervals of the R@1 and mAP differences). Nothing is
chosen here; it says how much the figures of docs/results.md can be trusted.

    .venv/bin/python experiments/global_paired.py          # ~4 min; results/global/paired.json
    .venv/bin/python experiments/global_paired.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_refit import evaluate_refitted  # noqa: E402
from global_transfer_grid import trained_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "global" / "paired.json"
PROTOCOLS = ("grocery-open-cross", "coil100-open")


def backbones() -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (backbone folder, protocols it is compared on)."""
    from waldo.models.shipped import SHIPPED_DIR

    return {"lite0-global (shipped; grocery-trained)": (SHIPPED_DIR / "lite0-global", PROTOCOLS),
            "coil `sgd` (the grid's coil choice)": (trained_run("coil", "sgd"), ("grocery-open-cross",))}


def pvalue(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def table(result: dict) -> str:
    lines = ["| backbone | protocol | queries | R@1: untrained -> trained (95% interval of the difference) | "
             "top-1 only untrained / only trained (McNemar p) | mAP difference (95% interval) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        c, r1, ap = row["comparison"], row["comparison"]["recall@1"], row["comparison"]["map"]
        lines.append(f"| {row['backbone']} | {row['protocol']} | {c['queries']} | {r1['a']:.4f} -> {r1['b']:.4f} "
                     f"({r1['ci95'][0]:+.4f} to {r1['ci95'][1]:+.4f}) | {c['top1_only_a']} / {c['top1_only_b']} "
                     f"({pvalue(c['mcnemar_p'])}) | {ap['difference']:+.4f} ({ap['ci95'][0]:+.4f} to "
                     f"{ap['ci95'][1]:+.4f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from waldo.eval.compare import paired_comparison

    untrained = {p: evaluate_refitted(p, None) for p in PROTOCOLS}
    rows = []
    for name, (folder, protocols) in backbones().items():
        for protocol in protocols:
            comparison = paired_comparison(untrained[protocol], evaluate_refitted(protocol, folder))
            rows.append({"backbone": name, "folder": str(folder.relative_to(ROOT)), "protocol": protocol,
                         "comparison": comparison})
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "command": ".venv/bin/python experiments/global_paired.py"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
