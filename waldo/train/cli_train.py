"""``waldo train global``: the command-line face of :func:`waldo.train.global_model.train_global`.

    waldo train global --protocol grocery-open --config configs/global-cpu.json --out runs/global-lite0

Re-running the same command with the same ``--out`` resumes from the last completed epoch.
"""

from __future__ import annotations

import argparse
import time


def cmd_train_global(args: argparse.Namespace) -> int:
    from waldo.train.config import GlobalTrainConfig, load_config
    from waldo.train.global_model import train_global
    from waldo.train.loop import run_summary

    config = load_config(args.config, GlobalTrainConfig)
    start = time.perf_counter()
    train_global(config, args.data, args.protocol, args.out, progress=not args.quiet, stop_after=args.stop_after)
    print(run_summary(args.out, config, "mAP", time.perf_counter() - start))
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, config_help: str, *, sources: bool = False) -> None:
    """The arguments of every resumable ``waldo train`` run. ``sources``: ``--data`` may be
    repeated and name protocols or folders (waldo.train.sources), ``--protocol`` is optional."""
    if sources:
        parser.add_argument("--protocol", default=None,
                            help="named protocol; only its training images are used (frozen/finetune modes)")
        parser.add_argument("--data", action="append", default=None, metavar="SPEC",
                            help="frozen/finetune: the protocol's dataset folder. rrt-only: a training source, "
                                 "repeatable: a protocol name (its training split), a folder, with ,weight=W "
                                 "and/or ,labels=no")
    else:
        parser.add_argument("--protocol", required=True, help="named protocol; only its training images are used")
        parser.add_argument("--data", default=None, help="dataset folder (default: the protocol's shared dataset)")
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--out", required=True, help="run folder; rerun with the same folder to resume")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs in this call (resume later with the same command)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register_train_global(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``global`` sub-command to ``waldo train``'s sub-parsers."""
    parser = train_commands.add_parser("global", help="train the global descriptor (resumable)")
    add_run_arguments(parser, "a GlobalTrainConfig JSON file (see configs/)")
    parser.set_defaults(handler=cmd_train_global)
    return parser
