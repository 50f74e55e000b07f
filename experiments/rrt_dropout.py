"""Issue 15: does dropout keep make demo's RRT from learning what only its training pairs reward?

In every RRT run so far the transformer's correction to the residuals grows with training and
validation stops following it: the training pairs' loss keeps falling while held-out identities
gain little (docs/results.md, "The RRT's residual on the serving global descriptor"; make demo's
run peaks at epoch 7 of 12). The reference and every run here train without dropout; 0.1 in the
transformer's attention, feed-forward and residual branches is the usual regulariser and the one
not yet measured. ``configs/rrt-views-s4-match-dropout-cpu.json`` is make demo's recipe
(``configs/rrt-views-s4-match-cpu.json``, seed 0, the same base model and held-out identities)
with ``rrt.dropout`` 0.1; at serving dropout is off, so the shipped format and scorer are unchanged.

Rule, fixed before the run (this file is committed first): on the fair validation make demo's
default was chosen on (experiments/local_matching.py's ``validation_setup``), the dropout RRT's
default ranking is its RRT alone, or with the consensus cell ``pick_consensus`` adopts over it
from ``CONSENSUS_GRID``. It replaces make demo's RRT iff **all** of: (a) that ranking
``earns_default`` over make demo's current default (rrt-consensus with its stored setting: mean
map@100 higher by more than 0.005, no set lower); (b) its mean R@1 is not below the current
default's; (c) the dropout RRT alone is not below make demo's RRT alone on mean map@100. The rule is
experiments/rrt_seeds.py's. Test protocols are run only once a choice is stored, reported only.

    waldo train rrt --config configs/rrt-views-s4-match-dropout-cpu.json --init runs/base-lite0-s4 \
        --out runs/rrt-views-s4-match-dropout --data grocery-open-cross --data coil100-open \
        --data ../shared/data/abo_sample                          # ~16 min on 2 cores
    .venv/bin/python experiments/rrt_dropout.py                   # validation, ~2 min
    .venv/bin/python experiments/rrt_dropout.py --doc             # docs/results.md block from the JSON
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rrt_seeds import variant_main, variant_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "rrt_dropout.json"
START, END = "<!-- rrt-dropout:start -->", "<!-- rrt-dropout:end -->"
HEADING = "### Dropout in make demo's RRT (issue 15)"
RUN = ROOT / "runs" / "rrt-views-s4-match-dropout"


def markdown(results: dict) -> str:
    return "\n".join(variant_markdown(results, START, END, "rrt_dropout.py", "The dropout RRT",
                                      "make demo keeps its RRT"))


def main() -> int:
    return variant_main(__doc__, "rrt_dropout.py", RESULTS, (START, END, HEADING), markdown, RUN, "rrt dropout 0.1",
                        {"dropout": 0.1})


if __name__ == "__main__":
    sys.exit(main())
