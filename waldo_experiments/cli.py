"""The studies of issue 6, each one command that writes a full report; ``waldo experiment ...``
and ``python -m waldo_experiments ...`` are the same commands.

    waldo experiment transforms --protocol grocery-open-cross --model runs/seed/rrt-finetune-lite0/best \\
                                --out results/experiments/transforms
    waldo experiment transfer --train grocery-open,coil100-open --eval grocery-open-cross,coil100-open \\
                              --runs runs/transfer --out results/experiments/transfer

Both write JSON and CSV with every number, a Markdown report and PNG figures into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["build_parser", "main", "register_experiment"]


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _subset(args: argparse.Namespace) -> dict:
    subset = {"identities": args.identities, "per_identity": args.per_identity, "max_train": args.max_train}
    return {k: v for k, v in subset.items() if v is not None}


def _command_line(args: argparse.Namespace, study: str) -> str:
    """The command that reproduces this run, for the report: the options that differ from their
    defaults (rebuilt from the parsed arguments, so it reads the same however it was called)."""
    parser: argparse.ArgumentParser = args.parser
    words = ["waldo", "experiment", study]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "quiet"):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def cmd_transforms(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.eval.runner import default_data_dir
    from waldo_experiments.study_report import write_study
    from waldo_experiments.transform_study import (
        StudySettings,
        available_methods,
        default_transforms,
        run_transform_study,
        subset_protocol,
    )

    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"{args.model} is not a model folder (no config.json)")
    wanted = None if args.rerank in (None, "all") else ["global"] + [m for m in _csv(args.rerank) if m != "none"]
    methods = available_methods(args.model, wanted, gv=args.gv)
    transforms = _csv(args.transforms) or default_transforms()
    unknown = [t for t in transforms if t not in default_transforms()]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; choose from {', '.join(default_transforms())}")
    protocol = get_protocol(args.protocol, Path(args.data) if args.data else default_data_dir(args.protocol))
    protocol = subset_protocol(protocol, **_subset(args))
    settings = StudySettings(transforms=transforms, seeds=tuple(range(args.seeds)),
                             scales=tuple(float(s) for s in _csv(args.scales)), methods=methods,
                             n_examples=args.examples, group_column=args.group_column,
                             batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    study = run_transform_study(protocol, args.model, settings, log=lambda line: print(line, flush=True))
    written = write_study(study, args.out, command=_command_line(args, "transforms"))
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from waldo_experiments.transfer import run_transfer, write_transfer

    configs = {}
    for item in args.config or []:
        protocol, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--config takes PROTOCOL=FILE, got {item!r}")
        configs[protocol] = path
    study = run_transfer(_csv(args.train), _csv(args.eval), args.runs, configs=configs, subset=_subset(args),
                         progress=not args.quiet, log=lambda line: print(line, flush=True))
    written = write_transfer(study, args.out, command=_command_line(args, "transfer"))
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


# Registering `waldo experiment` imports nothing from waldo (tests/experiments/test_cli.py): the
# protocol names are checked when an argument is parsed, not listed in the help.
def _protocol(text: str) -> str:
    """``type=`` of ``--protocol``: a registered protocol (checked before any work)."""
    from waldo.cli_args import protocol_name

    return protocol_name(text)


def _protocol_list(text: str) -> str:
    """``type=`` of a comma list of protocols: each must be registered."""
    for name in _csv(text) or []:
        _protocol(name)
    return text


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report, CSV/JSON and figures")
    parser.add_argument("--identities", type=int, default=None, metavar="N",
                        help="quick run: evaluate only this many identities (seeded choice; default: all)")
    parser.add_argument("--per-identity", type=int, default=None, metavar="N",
                        help="quick run: at most this many queries and gallery images per identity (default: all)")
    parser.add_argument("--max-train", type=int, default=None, metavar="N",
                        help="quick run: fit untrained projections on at most this many training images "
                             "(default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_studies(parser: argparse.ArgumentParser) -> None:
    """The ``transforms`` and ``transfer`` sub-commands, each with its ``handler``."""
    studies = parser.add_subparsers(dest="experiment_command", required=True, metavar="STUDY")

    transforms = studies.add_parser("transforms", help="every test-time transform, global and reranked")
    transforms.add_argument("--protocol", required=True, type=_protocol, metavar="NAME",
                            help="named protocol (`waldo eval --help` lists them)")
    transforms.add_argument("--data", default=None, metavar="DIR",
                            help="dataset folder (default: the protocol's shared dataset)")
    transforms.add_argument("--model", required=True, metavar="DIR",
                            help="a trained model folder (with rrt.json to rerank)")
    transforms.add_argument("--rerank", default="all",
                            help="comma list of rrt, rrt-fusion, or 'all' (default: every reranker the model "
                                 "has) or 'none'")
    transforms.add_argument("--gv", action="store_true", help="also geometric verification (slow: SIFT + RANSAC)")
    transforms.add_argument("--transforms", default=None,
                            help="comma list (default: every preset, normalize-extra and multiscale)")
    transforms.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per random transform")
    transforms.add_argument("--scales", default="0.75,1,1.25", metavar="F,F,...",
                            help="multiscale: factors of the model's image size whose global descriptors are averaged")
    transforms.add_argument("--examples", type=int, default=4, metavar="N", help="example queries in the picture grid")
    transforms.add_argument("--group-column", default=None, metavar="COLUMN",
                            help="labels column naming each query's group (default: group, super_class_id, "
                                 "or the folder under train/val/test)")
    transforms.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model forward pass")
    transforms.add_argument("--workers", type=int, default=None, metavar="N",
                            help="DataLoader worker processes (default: one per CPU but one, at most 4)")
    _add_common(transforms)
    transforms.set_defaults(handler=cmd_transforms)

    transfer = studies.add_parser("transfer", help="train on one dataset, evaluate on others")
    transfer.add_argument("--train", default="grocery-open,coil100-open", type=_protocol_list, metavar="P,P,...",
                          help="comma list of training protocols (`waldo eval --help` lists them)")
    transfer.add_argument("--eval", default="grocery-open-cross,coil100-open", type=_protocol_list,
                          metavar="P,P,...", help="comma list of evaluation protocols")
    transfer.add_argument("--runs", default="runs/transfer", metavar="DIR",
                          help="where the trained models go (resumable)")
    transfer.add_argument("--config", action="append", metavar="PROTOCOL=FILE",
                          help="training config for a protocol (default: configs/global-cpu.json for grocery-open, "
                               "configs/global-cpu-coil.json for coil100-open)")
    _add_common(transfer)
    transfer.set_defaults(handler=cmd_transfer)

    for study in (transforms, transfer):  # each report records the command that reproduces it
        study.set_defaults(parser=study)


def register_experiment(commands: argparse._SubParsersAction) -> None:
    """Add ``waldo experiment transforms|transfer`` to the ``waldo`` command's sub-parsers."""
    _add_studies(commands.add_parser("experiment", help="studies with a full report (transforms, transfer)",
                                     description="Studies that each write a full report (Markdown, CSV/JSON, "
                                                 "PNG figures) into --out."))


def build_parser() -> argparse.ArgumentParser:
    # Raw: the description is this module's docstring, laid out by hand. The studies' own
    # parsers are Parsers too (argparse makes sub-parsers of the parent's class): defaults shown.
    from waldo.cli_args import Parser

    parser = Parser(prog="python -m waldo_experiments", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_studies(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"waldo experiment: error: {error}", file=sys.stderr)
        return 2
