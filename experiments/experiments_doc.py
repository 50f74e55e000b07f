"""Issue 6 end to end: the test-time transform study and the cross-dataset transfer, then
docs/experiments.md written from their numbers.

    .venv/bin/python experiments/experiments_doc.py              # both studies (under an hour on 2 cores) + doc
    .venv/bin/python experiments/experiments_doc.py --doc-only   # rewrite the doc from results/experiments/

The two studies are the commands a user would type:

    waldo experiment transforms --protocol grocery-open-cross --model MODEL --out results/experiments/transforms
    waldo experiment transfer --runs runs/transfer --out results/experiments/transfer

MODEL is the best trained reranker of experiments/seed_table.py (runs/seed/rrt-finetune-lite0/best,
else the frozen one). Every figure in the doc is read from the studies' JSON, or measured here
(the input statistics behind the normalize-extra explanation); the verdicts are computed from
those numbers, never written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from waldo_experiments.study_report import (
    fmt,
    fmt_delta,
    group_table,
    paired_changes,
    summary_table,
)
from waldo_experiments.transfer import UNTRAINED, transfer_markdown
from waldo_experiments.transform_study import BASELINE, MULTISCALE, NORMALIZE_EXTRA, study_transform

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "experiments"
DOC = ROOT / "docs" / "experiments.md"
PROTOCOL = "grocery-open-cross"
MODELS = (ROOT / "runs" / "seed" / "rrt-finetune-lite0" / "best", ROOT / "runs" / "seed" / "rrt-frozen-lite0" / "best")
SIGNIFICANT = 0.05  # sign-test level for calling a change real
STATS_IMAGES = 64  # query images whose model input is measured for the normalize-extra explanation


def pick_model(given: str | None) -> Path:
    if given:
        return Path(given)
    for candidate in MODELS:
        if (candidate / "rrt.json").is_file():
            return candidate
    raise SystemExit(f"no trained reranker in {[str(m) for m in MODELS]}; run experiments/seed_table.py first")


def run_command(arguments: list[str]) -> float:
    """Run ``waldo ARGUMENTS`` from the project root; returns its wall time in seconds."""
    waldo = Path(sys.executable).parent / "waldo"
    print("==", "waldo", " ".join(arguments), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run([str(waldo), *arguments], check=True, cwd=ROOT)
    return time.perf_counter() - start


def input_statistics(model_dir: Path, n_images: int = STATS_IMAGES) -> dict:
    """What the backbone's first layer sees (after its own input normalisation) for the baseline
    and the normalize-extra presets, over the first ``n_images`` query images."""
    import torch

    from waldo.data.images import load_image
    from waldo.data.protocols import get_protocol
    from waldo.models.checkpoint import load_model

    model, config = load_model(model_dir)
    paths = get_protocol(PROTOCOL).queries.paths[:n_images]
    out = {"n_images": len(paths), "backbone": config.backbone,
           "backbone_norm": {"mean": list(model.backbone.norm.mean), "std": list(model.backbone.norm.std)}}
    for name in (BASELINE, NORMALIZE_EXTRA):
        transform = study_transform(name, config.image_size)
        batch = torch.stack([transform(load_image(p), i) for i, p in enumerate(paths)])
        seen = model.backbone.normalize(batch)
        out[name] = {"mean": float(seen.mean()), "std": float(seen.std()), "min": float(seen.min()),
                     "max": float(seen.max())}
    return out


# ----------------------------------------------------------------------------- verdicts from numbers
def _entry(summary: list[dict], transform: str, method: str) -> dict | None:
    return next((e for e in summary if e["transform"] == transform and e["method"] == method), None)


def _queries(n: int) -> str:
    return f"{n} {'query' if n == 1 else 'queries'}"


def _change_sentence(study: dict, transform: str, method: str) -> str:
    """'R@1 a -> b (+d; fixed f, broke g, sign test p)' for one transform and method."""
    base, entry = _entry(study["summary"], BASELINE, method), _entry(study["summary"], transform, method)
    if base is None or entry is None:
        return f"{method}: not run"
    changes = paired_changes(study["rows"]).get((transform, method), [])
    paired = ""
    if len(changes) == 1:
        c = changes[0]
        paired = (f"; top-1 fixed for {_queries(c['fixed'])}, broken for {_queries(c['broken'])}, "
                  f"sign test p = {c['p_value']:.2g}")
    return (f"{method}: R@1 {fmt(base['recall@1'])} -> {fmt(entry['recall@1'])} "
            f"({fmt_delta(entry['recall@1_delta'])}), mAP {fmt(base['map'])} -> {fmt(entry['map'])} "
            f"({fmt_delta(entry['map_delta'])}){paired}")


def _verdict(study: dict, transform: str, method: str) -> str:
    """helps / hurts / no significant change, by the sign test on the top-1 flips and mAP's sign."""
    changes = paired_changes(study["rows"]).get((transform, method), [])
    if len(changes) != 1:
        return "unknown"
    c = changes[0]
    if c["p_value"] < SIGNIFICANT:
        return "helps" if c["fixed"] > c["broken"] else "hurts"
    return "makes no significant difference to Recall@1"


def crop_section(study: dict) -> list[str]:
    methods = study["settings"]["methods"]
    verdicts = {m: _verdict(study, "resize224", m) for m in methods}
    lines = ["## Does removing the centre crop help?", "",
             ("The founding report found that dropping the centre crop (resizing straight to 224) *raised* "
             "SOP Recall@1 from 84.5 to 86.3 with ResNet-50 (quoted from that report, not measured here). Here (`resize224` against the baseline "
             f"`{BASELINE}`, {PROTOCOL}):"), ""]
    lines += [f"- {_change_sentence(study, 'resize224', m)}: removing the crop **{verdicts[m]}**." for m in methods]
    helps = [m for m, v in verdicts.items() if v == "helps"]
    hurts = [m for m, v in verdicts.items() if v == "hurts"]
    answer = ("**yes**" if helps and not hurts else "**no, it hurts**" if hurts and not helps else
              "**mixed**" if helps and hurts else "**no**: no significant change")
    lines += ["", f"So on grocery the answer is {answer} (significant gains for: {', '.join(helps) or 'none'}; "
              f"significant losses for: {', '.join(hurts) or 'none'}; verdicts use the sign test on top-1 flips at "
              f"p < {SIGNIFICANT}). "
              "What differs: the crop keeps the central 224/256 = 87.5% of each side, slightly enlarged; without "
              "it the model sees the whole frame, borders included. "
              + ("Grocery photos are hand-held close-ups whose product often reaches the frame's edge, so the "
                 "crop removes some of the object itself." if helps and not hurts else
                 "The model was trained and validated with the crop, so the cropped view is the one it knows; "
                 "the borders it adds back are mostly shelf and hand, not product." if hurts and not helps else
                 "Neither effect dominates on this dataset."), ""]
    return lines


def normalize_section(study: dict, stats: dict) -> list[str]:
    methods = study["settings"]["methods"]
    base = _entry(study["summary"], BASELINE, "global")
    extra = _entry(study["summary"], NORMALIZE_EXTRA, "global")
    ratio = extra["recall@1"] / base["recall@1"] if base and extra and base["recall@1"] else float("nan")
    collapsed = ratio < 0.5
    b, e = stats[BASELINE], stats[NORMALIZE_EXTRA]
    lines = ["## Does extra normalisation collapse retrieval?", "",
             ("The founding report's `normalize-extra` (ImageNet mean/std applied in the data pipeline *and* "
             "again inside the model) collapsed SOP Recall@1 from 84.5 to 12.8 (quoted, not measured here). Here:"), ""]
    lines += [f"- {_change_sentence(study, NORMALIZE_EXTRA, m)}." for m in methods]
    lines += ["", f"Global Recall@1 keeps {ratio:.0%} of the baseline's: it "
              + ("**collapses**, as in the founding report." if collapsed else
                 "**does not collapse** here; " + ("it degrades." if _verdict(study, NORMALIZE_EXTRA, "global") == "hurts"
                                                    else "the change is within noise.")), "",
              f"Why: the backbone ({stats['backbone']}) normalises its [0, 1] input itself with mean "
              f"{stats['backbone_norm']['mean'][0]:.3f} and std {stats['backbone_norm']['std'][0]:.3f} per channel, "
              f"the statistics its ImageNet weights were trained with. Measured over {stats['n_images']} query "
              f"images, what the first convolution sees has mean {b['mean']:.2f}, std {b['std']:.2f} "
              f"(range {b['min']:.2f}..{b['max']:.2f}) with the baseline, but mean {e['mean']:.2f}, std "
              f"{e['std']:.2f} (range {e['min']:.2f}..{e['max']:.2f}) after the extra normalisation: the image is "
              f"shifted and its contrast stretched about {e['std'] / b['std']:.1f}x, with a per-channel colour "
              "cast. The frozen BatchNorm statistics no longer match the activations, so every layer works "
              "outside the range it was trained on. "
              + ("That is enough to destroy the descriptor." if collapsed else
                 "The ranking survives better than the founding report's because retrieval only needs the "
                 "*relative* order of descriptors: a distortion applied identically to queries and gallery "
                 "moves them together, and EfficientNet-Lite's ReLU6 activations clip the inflated "
                 "activations at 6 instead of letting them grow through the network (ResNet-50's plain ReLU "
                 "does not bound them); this last point is our explanation, not something measured here."), ""]
    return lines


def multiscale_section(study: dict) -> list[str]:
    sizes = study["settings"].get("scale_sizes", [])
    lines = ["## Multi-scale global descriptors (our addition)", "",
             (f"`{MULTISCALE}` averages the L2-normalised global descriptors of the baseline preset at "
             f"{', '.join(str(s) for s in sizes)} px and renormalises (the rerankers keep the base-scale locals). "
             "It is an option of the evaluation path (`evaluate_protocol(..., extra_transforms=...)`, "
             "`run_eval_full(..., scales=...)`), off by default."), ""]
    lines += [f"- {_change_sentence(study, MULTISCALE, m)}: it **{_verdict(study, MULTISCALE, m)}**."
              for m in study["settings"]["methods"]]
    return lines + [""]


def groups_section(study: dict) -> list[str]:
    rows = [r for r in study["rows"] if r["transform"] == BASELINE and r["method"] == "global"]
    lines = ["## Per group", "", f"Recall@1 and mAP per coarse group of the queries ({BASELINE}):", "",
             *group_table(study["rows"]), ""]
    if rows and len(rows[0]["groups"]) > 1:
        groups = rows[0]["groups"]
        hardest = min(groups, key=lambda g: groups[g]["map"])
        easiest = max(groups, key=lambda g: groups[g]["map"])
        lines += [(f"By global mAP the hardest group is **{hardest}** ({fmt(groups[hardest]['map'])}) and the "
                  f"easiest **{easiest}** ({fmt(groups[easiest]['map'])}). The per-group figures for every "
                  "transform are in `transforms_groups.csv`."), ""]
    return lines


def transfer_section(transfer: dict, figures: str) -> list[str]:
    from waldo_experiments.transfer import TransferStudy

    study = TransferStudy(transfer["rows"], transfer["models"], transfer["seconds"])
    body = transfer_markdown(study).split("\n", 2)[2]  # drop its title
    reference = {r["eval_protocol"]: r for r in transfer["rows"] if r["model_name"] == UNTRAINED}
    lines = ["## Cross-dataset transfer", "", f"Produced by `{transfer.get('command', '')}`.", "", body.strip(), ""]
    lines += [f"![Recall@1 per model and dataset]({figures}/transfer_recall1.png)", ""]
    for row in transfer["rows"]:
        if row["in_domain"] is False:
            base = reference[row["eval_protocol"]]
            verb = "beats" if row["map"] > base["map"] else "falls below"
            lines.append(f"- {row['model_name']} -> {row['eval_protocol']}: mAP {fmt(row['map'])} {verb} the untrained "
                         f"reference ({fmt(base['map'])}, {fmt_delta(row['map'] - base['map'])}); R@1 "
                         f"{fmt(row['recall@1'])} vs {fmt(base['recall@1'])}.")
    return lines + [""]


def write_doc(doc: Path, figures_root: str, transforms: dict, transfer: dict | None, stats: dict,
              timings: dict) -> None:
    figures = f"{figures_root}/transforms"
    total = sum(timings.values()) if timings else None
    lines = ["# Experiments (issue 6)", "",
             ("Every number here comes from the commands below, run on this machine (2 shared CPU cores, no "
             "GPU); `experiments/experiments_doc.py` runs them and writes this page from their JSON. "
             "Full numbers: `results/experiments/transforms/` and `results/experiments/transfer/` "
             "(JSON, CSV, per-group CSV, a Markdown report each)."), "",
             f"- Transform study: `{transforms.get('command', '')}` ({transforms['seconds']:.0f} s)"]
    if transfer:
        lines.append(f"- Transfer study: `{transfer.get('command', '')}` ({transfer['seconds']:.0f} s)")
    if total:
        lines.append(f"- Wall time of the command{'s' if len(timings) > 1 else ''} in the last full run: "
                     f"{total / 60:.1f} min "
                     f"({'under' if total < 3600 else 'over'} the one-hour budget).")
    s = transforms["settings"]
    lines += ["", f"## Test-time transforms on `{transforms['protocol']}`", "",
              (f"Model: `{transforms['model']}` (trained by `experiments/seed_table.py`). Methods: "
              f"{', '.join(s['methods'])}; rerankers re-sort the global top {s['top_k']}, both RRT orders from one "
              f"set of logits. The random transform (perspective) runs with seeds {list(s['seeds'])}: mean ± "
              "population std (min-max); other presets are deterministic. Top-1 fixed / broken counts the queries "
              "whose first result changed against the baseline with the same method; p is the two-sided exact "
              "sign test on those counts."), "",
              *summary_table(transforms["summary"], s, rows=transforms["rows"]), "",
              f"![Recall@1 per transform]({figures}/recall1_by_transform.png)", "",
              f"![Recall@k per method]({figures}/recall_at_k.png)", ""]
    if transforms.get("examples"):
        lines += [(f"Examples: queries whose top-5 the {transforms['examples'][0]['method']} reranker changed "
                  "(upper row of each pair: global, lower: reranked; green border = same product, red = another)."),
                  "", f"![examples]({figures}/examples.png)", ""]
    lines += crop_section(transforms) + normalize_section(transforms, stats) + multiscale_section(transforms)
    lines += groups_section(transforms)
    if transfer:
        lines += transfer_section(transfer, f"{figures_root}/transfer")
    lines += ["## Notes", "",
              ("- The founding report's second dataset was Products-10K; it is not in the shared data of this "
              "machine, so the transfer study uses COIL-100 (turntable objects) against grocery. "
              "`waldo experiment transforms --protocol products10k --data DIR` runs the transform study there, "
              "with per-group figures from its `group` column."),
              ("- Geometric verification is left out of this run (`--gv` adds it; SIFT matching of every query"
              "'s top 100 is slow on 2 cores: its cost is in docs/results.md)."), ""]
    doc.write_text("\n".join(lines).rstrip() + "\n")


def _shown(path: Path) -> str:
    """A path as the commands show it: relative to the project root when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="reranker folder (default: the seed table's best)")
    parser.add_argument("--doc-only", action="store_true", help="do not run the studies; read their JSON")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="where the studies write")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown page to write")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "transfer", help="transfer models")
    parser.add_argument("--quick", action="store_true",
                        help="development: small subsets (4 identities x 5 images, 200 training images)")
    args = parser.parse_args()
    model = pick_model(args.model)
    quick = ["--identities", "4", "--per-identity", "5", "--max-train", "200"] if args.quick else []
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    if not args.doc_only:
        timings = {"transforms": run_command(["experiment", "transforms", "--protocol", PROTOCOL, "--model",
                                              _shown(model), "--out", _shown(args.out / "transforms"),
                                              "--quiet", *quick])}
        if not args.skip_transfer:
            timings["transfer"] = run_command(["experiment", "transfer", "--runs", _shown(args.runs),
                                               "--out", _shown(args.out / "transfer"), "--quiet", *quick])
        stats = input_statistics(model)
        args.out.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
        (args.out / "input_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")
    stats = json.loads((args.out / "input_statistics.json").read_text())
    transforms = json.loads((args.out / "transforms" / "transforms.json").read_text())
    transfer_path = args.out / "transfer" / "transfer.json"
    transfer = json.loads(transfer_path.read_text()) if transfer_path.is_file() else None
    figures = Path(os.path.relpath(args.out, args.doc.resolve().parent)).as_posix()
    write_doc(args.doc, figures, transforms, transfer, stats, timings)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
