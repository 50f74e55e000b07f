"""``waldo train global``: the command-line face of :func:`waldo.train.global_model.train_global`.

    waldo train global --protocol grocery-open --config configs/global-cpu.json --out runs/global-lite0

Re-running the same command with the same ``--out`` resumes from the last completed epoch.
"""

from __future__ import annotations

import argparse
import time


def cmd_train_global(args: argparse.Namespace) -> int:
    from waldo.train.common import read_train_state
    from waldo.train.config import GlobalTrainConfig, load_config
    from waldo.train.global_model import train_global

    config = load_config(args.config, GlobalTrainConfig)
    start = time.perf_counter()
    best = train_global(config, args.data, args.protocol, args.out, progress=not args.quiet,
                        stop_after=args.stop_after)
    state = read_train_state(f"{args.out}/state")
    if state is not None:
        print(f"{state.epoch}/{config.epochs} epochs done ({time.perf_counter() - start:.0f} s in this call, "
              f"{state.images / max(state.seconds, 1e-9):.1f} training images/s); best validation mAP "
              f"{state.best_metric:.4f} at epoch {state.best_epoch}: {best}")
    return 0


def register_train_global(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``global`` sub-command to ``waldo train``'s sub-parsers."""
    parser = train_commands.add_parser("global", help="train the global descriptor (resumable)")
    parser.add_argument("--protocol", required=True, help="named protocol; only its training images are used")
    parser.add_argument("--data", default=None, help="dataset folder (default: the protocol's shared dataset)")
    parser.add_argument("--config", required=True, help="a GlobalTrainConfig JSON file (see configs/)")
    parser.add_argument("--out", required=True, help="run folder; rerun with the same folder to resume")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs in this call (resume later with the same command)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=cmd_train_global)
    return parser
