"""Issue 15: make demo's RRT fine-tuned on the coloured model it serves (rule declared first).

make demo's model gained a colour term after its RRT was trained (experiments/colour_weight.py,
weight 0.75): its global descriptor, which the RRT's global residual reads, became
(g + 0.75 c) / 1.75, and on grocery-open-cross's test the RRT alone fell below the coloured global
ranking it reranks. The RRT never saw that descriptor: it was trained at 224 px on the base
model's 64-d global descriptor and given make demo's 512-d head afterwards
(experiments/rrt_views.py with-global). ``configs/rrt-views-s4-match-colour-ft-cpu.json``
fine-tunes it on the model as served (``--init lite0-match-rrt --init-rrt lite0-match-rrt``: the
coloured 512-d residual, 18x18 cells at 288 px), with colour-preserving views and the shipped
run's held-out identities (seed 0):

    waldo train rrt --config configs/rrt-views-s4-match-colour-ft-cpu.json --init lite0-match-rrt \\
        --init-rrt lite0-match-rrt --out runs/rrt-colour-ft --data grocery-open-cross \\
        --data coil100-open --data ../shared/data/abo_sample                 # ~20 min on 2 cores
    .venv/bin/python experiments/rrt_colour_ft.py                            # validation, ~5 min
    .venv/bin/python experiments/rrt_colour_ft.py --doc                      # docs/results.md block

Rule, fixed before the fine-tune's validation figures were read (this file is committed while it
trains): on the fair validation make demo's defaults were chosen on (experiments/local_matching.py's
``validation_setup``: held-out training identities, the global head refitted without them), with
make demo's colour term appended as experiments/colour_weight.py appends it, both RRTs score the
same top-100 (the fine-tuned one: its run's best epoch on its own validation; both with make
demo's stored consensus setting and GVConfig()). The fine-tuned RRT replaces make demo's iff all
of: (a) its rrt-consensus+gv (make demo's default) ``earns_default`` over make demo's (mean
map@100 higher by more than 0.005, no set lower); (b) its rrt-consensus+gv mean R@1 is not below
make demo's; (c) its RRT alone is not below make demo's RRT alone on mean map@100; (d) its
rrt-consensus (the default without keypoints) is not below make demo's on mean map@100. Test
protocols are run only once a choice is stored, and are reported only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from colour_weight import METRIC, MODEL, RANKINGS, score, validation_signatures  # noqa: E402

from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "rrt_colour_ft.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- rrt-colour-ft:start -->", "<!-- rrt-colour-ft:end -->"
HEADING = "### make demo's RRT fine-tuned on the coloured model it serves (issue 15)"
RUN = ROOT / "runs" / "rrt-colour-ft"
CONFIG = ROOT / "configs" / "rrt-views-s4-match-colour-ft-cpu.json"
SHIPPED, TUNED = "make demo's RRT", "fine-tuned on the coloured model"
LAST = "its last epoch (reported only)"


def judge(rows: dict, tuned: str = TUNED) -> dict:
    """The rule of the module doc: ``tuned``'s rows against make demo's RRT's."""
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    per_set = lambda label, name: [e[METRIC] for e in rows[label][name]["sets"].values()]  # noqa: E731
    mean = lambda label, name, metric=METRIC: rows[label][name]["macro"][metric]  # noqa: E731
    rule = {"a_earns_default": earns_default(per_set(tuned, "rrt-consensus+gv"), per_set(SHIPPED, "rrt-consensus+gv"),
                                             DEFAULT_MARGIN),
            "b_recall1_not_lower": mean(tuned, "rrt-consensus+gv", "recall@1")
            >= mean(SHIPPED, "rrt-consensus+gv", "recall@1") - 1e-9,
            "c_rrt_not_lower": mean(tuned, "rrt") >= mean(SHIPPED, "rrt") - 1e-9,
            "d_consensus_not_lower": mean(tuned, "rrt-consensus") >= mean(SHIPPED, "rrt-consensus") - 1e-9}
    return {"rule": rule, "adopted": all(rule.values()), "margin": DEFAULT_MARGIN}


def check_trained_with(run: Path, config: Path) -> None:
    """Refuse ``run`` unless it was trained with ``config``'s views, schedule, seed and swaps
    (both read through RRTTrainConfig, so a key a file leaves out counts as its default)."""
    from waldo.train.config import RRTTrainConfig

    def settings(path: Path) -> RRTTrainConfig:
        return RRTTrainConfig.model_validate({k: v for k, v in json.loads(path.read_text()).items()
                                              if not k.startswith("_")})

    trained, expected = settings(run / "train_config.json"), settings(config)
    for key in ("augment", "epochs", "lr", "seed", "swap_prob"):
        if getattr(trained, key) != getattr(expected, key):
            raise SystemExit(f"{run} was trained with {key} {getattr(trained, key)!r}, not {config.name}'s")


def validation(progress: bool, run: Path = RUN, config: Path = CONFIG, tuned_label: str = TUNED) -> dict:
    """make demo's RRT, ``run``'s best and last checkpoints (trained with ``config``; the best
    labelled ``tuned_label``) on the coloured fair validation, and the rule's verdict."""
    from local_matching import validation_setup

    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.gv import GeometricReranker
    from waldo.rerank.rrt_checkpoint import load_rrt

    check_trained_with(run, config)
    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    tuned, _ = load_rrt(run / "best")
    last, _ = load_rrt(run / "last")
    if tuned.config != setup.rrt.config or last.config != setup.rrt.config:
        raise SystemExit(f"{run}: another RRT configuration than {MODEL}'s")
    weight = float(json.loads((resolve_model_dir(MODEL) / "config.json").read_text())["colour_weight"])
    signatures = validation_signatures(setup)
    rows = {}
    with GeometricReranker() as reranker:
        for label, rrt in ((SHIPPED, setup.rrt), (tuned_label, tuned), (LAST, last)):
            rows[label] = score(dataclasses.replace(setup, rrt=rrt), signatures, weight, reranker, progress)
            print(f"{label}: " + ", ".join(f"{name} {rows[label][name]['macro'][METRIC]:.4f}" for name in RANKINGS),
                  flush=True)
    epoch = json.loads((run / "best" / "metrics.json").read_text()).get("epoch")
    last_epoch = max(json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines() if line.strip())
    return {"rows": rows, **judge(rows, tuned_label), "metric": METRIC, "colour_weight": weight, "tuned_epoch": epoch, "last_epoch": last_epoch,
            "global_skip_scales": {SHIPPED: float(setup.rrt.global_skip_scale.detach()),
                                   tuned_label: float(tuned.global_skip_scale.detach()),
                                   LAST: float(last.global_skip_scale.detach())},
            "refit_check_min_cosine": setup.refit_check, "seconds": round(time.perf_counter() - started, 1)}


def markdown(results: dict, block: tuple[str, str] = (START, END), script: str = "rrt_colour_ft.py",
             run: Path = RUN, config: Path = CONFIG, tuned: str = TUNED, init: str = "--init lite0-match-rrt --init-rrt "
             "lite0-match-rrt", start_note: str = "epoch 0: the start, make demo's weights",
             what: str = "fine-tune", subject: str = "The fine-tuned RRT", results_name: str = "") -> str:
    """The docs block of an RRT judged by :func:`validation` (this study's fine-tune, or another
    study's run that passes its own block, script, run, config, training ``init`` flags, a note
    on its epoch 0, what the candidate is, how a sentence names its RRT, its results file's name)."""
    start, end = block
    v = results["validation"]
    names = list(v["rows"][SHIPPED]["global"]["sets"])
    lines = [start, "", "Fair validation (held-out training identities, make demo's global head refitted without them), "
             f"make demo's colour term (w {v['colour_weight']:g}) appended; both RRTs rerank the same top-100; rule fixed "
             f"before the {what}'s figures were read (experiments/{script}'s docstring). {subject}: "
             f"epoch {v['tuned_epoch']} of its run ({start_note}); its last epoch "
             f"({v['last_epoch']}) is reported beside it and chose nothing. Global-residual scales "
             f"{v['global_skip_scales'][SHIPPED]:.3f} (make demo's), {v['global_skip_scales'][tuned]:.3f} (best), "
             f"{v['global_skip_scales'][LAST]:.3f} (last).", "",
             f"| RRT | ranking | R@1 | R@10 | {METRIC} | {METRIC} per set ({' / '.join(names)}) |",
             "|---|---|---|---|---|---|"]
    for label, rankings in v["rows"].items():
        for name, entry in rankings.items():
            if label != SHIPPED and name == "global":
                continue
            per_set = " / ".join(f"{entry['sets'][n][METRIC]:.4f}" for n in names)
            lines.append(f"| {'-' if name == 'global' else label} | {name} | {entry['macro']['recall@1']:.4f} | "
                         f"{entry['macro']['recall@10']:.4f} | {entry['macro'][METRIC]:.4f} | {per_set} |")
    rule = v["rule"]
    lines += ["", f"Against make demo's RRT: (a) rrt-consensus+gv earns its place by the default rule: "
                  f"{rule['a_earns_default']}; (b) its R@1 not lower: {rule['b_recall1_not_lower']}; (c) RRT alone not "
                  f"lower: {rule['c_rrt_not_lower']}; (d) rrt-consensus not lower: {rule['d_consensus_not_lower']}. "
                  + ("**Adopted.**" if v["adopted"] else "**Not adopted: make demo keeps its RRT.**"),
              "", f"Produced by `waldo train rrt --config configs/{config.name} {init} "
                  f"--out runs/{run.name} --data grocery-open-cross --data coil100-open --data "
                  f"../shared/data/abo_sample` then {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
                  f"(results/{results_name or Path(script).stem + '.json'}).", "", end]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    judge_and_save(RESULTS, "rrt_colour_ft.py", RUN, CONFIG, TUNED, quiet=args.quiet)
    return 0


def judge_and_save(results_path: Path, script: str, run: Path, config: Path, label: str, *, quiet: bool,
                   extra: dict | None = None) -> dict:
    """:func:`validation` of ``run`` (labelled ``label``), saved with the command that ran it
    (``script`` and this process's arguments) and ``extra`` entries to ``results_path``."""
    command = " ".join([".venv/bin/python", f"experiments/{script}", *(shlex.quote(a) for a in sys.argv[1:])])
    results = {"commands": [command], **(extra or {}), "validation": validation(not quiet, run, config, label)}
    v = results["validation"]
    print(f"rule {v['rule']} -> adopted {v['adopted']}", flush=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
