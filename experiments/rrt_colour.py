"""Issue 15: do colour-preserving views teach make demo's RRT the products that differ by colour?

The fair-validation queries make demo's RRT still gets wrong on grocery's held-out shelves are
products told apart mostly by colour: red apple varieties (Pink Lady against Royal Gala), an
orange against a grapefruit, milk cartons of one brand in different colours; each has its right
answer in the top 10. The RRT's self-supervised positives are views of one photo whose hue moves
up to 0.05 of the colour wheel either way and whose saturation, brightness and contrast move by up
to 40% (waldo.data.views.ViewAugment's defaults): a pair of two colours of one carton looks, to
training, like a photo and its view. ``configs/rrt-views-s4-match-colour-cpu.json`` is make
demo's recipe (``configs/rrt-views-s4-match-cpu.json``, seed 0, the same base model and held-out
identities) with views that keep the photo's hue (``augment.hue`` 0) and move brightness,
contrast and saturation by at most 20% (``augment.jitter`` 0.2); the RRT's architecture, the
serving format and the scorer are unchanged.

Rule, fixed before the run (this file is committed first), the one experiments/rrt_seeds.py and
rrt_dropout.py declared: on the fair validation make demo's default was chosen on
(experiments/local_matching.py's ``validation_setup``), the colour-preserving RRT's default ranking
is its RRT alone, or with the consensus cell ``pick_consensus`` adopts over it from
``CONSENSUS_GRID``. It replaces make demo's RRT iff **all** of: (a) that ranking ``earns_default``
over make demo's current default (rrt-consensus with its stored setting: mean map@100 higher by
more than 0.005, no set lower); (b) its mean R@1 is not below the current default's; (c) its RRT
alone is not below make demo's RRT alone on mean map@100. Test protocols are run only once a
choice is stored, reported only.

    waldo train rrt --config configs/rrt-views-s4-match-colour-cpu.json --init runs/base-lite0-s4 \
        --out runs/rrt-views-s4-match-colour --data grocery-open-cross --data coil100-open \
        --data ../shared/data/abo_sample                          # ~16 min on 2 cores
    .venv/bin/python experiments/rrt_colour.py                    # validation, ~2 min
    .venv/bin/python experiments/rrt_colour.py --doc              # docs/results.md block from the JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rrt_seeds import variant_main, variant_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "rrt_colour.json"
START, END = "<!-- rrt-colour:start -->", "<!-- rrt-colour:end -->"
HEADING = "### Colour-preserving views for make demo's RRT (issue 15)"
RUN = ROOT / "runs" / "rrt-views-s4-match-colour"
CONFIG = ROOT / "configs" / "rrt-views-s4-match-colour-cpu.json"
LABEL = "rrt colour-preserving views"


def markdown(results: dict) -> str:
    return "\n".join(variant_markdown(results, START, END, "rrt_colour.py", "The colour-preserving RRT",
                                      "make demo keeps its RRT"))


def check_augment(run: Path) -> None:
    trained_with = json.loads((run / "train_config.json").read_text()).get("augment")
    if trained_with != json.loads(CONFIG.read_text())["augment"]:
        raise SystemExit(f"{run} was trained with augment {trained_with}, not {CONFIG.name}'s")


def main() -> int:
    return variant_main(__doc__, "rrt_colour.py", RESULTS, (START, END, HEADING), markdown, RUN, LABEL,
                        check=check_augment)


if __name__ == "__main__":
    sys.exit(main())
