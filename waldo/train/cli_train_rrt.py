"""``waldo train rrt`` and ``waldo train mine``: the command-line face of the reranker trainer.

    waldo train rrt --protocol grocery-open --config configs/rrt-frozen-cpu.json \\
        --init runs/global-lite0/best --mode frozen --out runs/rrt-frozen-lite0
    waldo train rrt --protocol grocery-open --config configs/rrt-finetune-cpu.json \\
        --init runs/rrt-frozen-lite0/best --mode finetune --out runs/rrt-finetune-lite0
    waldo train mine --protocol grocery-open --model runs/global-lite0/best

Re-running ``train rrt`` with the same ``--out`` resumes after the last completed epoch.
"""

from __future__ import annotations

import argparse
import json
import time


def cmd_train_rrt(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.train.common import read_train_state
    from waldo.train.config import load_config
    from waldo.train.reranker import train_reranker
    from waldo.train.rrt_config import RRTTrainConfig

    config = load_config(args.config, RRTTrainConfig)
    if args.mode is not None and args.mode != config.mode:
        raise ValueError(f"--mode {args.mode} but {args.config} is a {config.mode!r} config")
    protocol = get_protocol(args.protocol, args.data)
    start = time.perf_counter()
    best = train_reranker(config, protocol.train, args.init, args.out, cache_root=args.cache,
                          progress=not args.quiet, stop_after=args.stop_after,
                          source_name=f"{args.protocol}:train")
    state = read_train_state(f"{args.out}/state")
    if state is not None and state.best_metric is not None:
        print(f"{state.epoch}/{config.epochs} epochs done ({time.perf_counter() - start:.0f} s in this call, "
              f"{state.images / max(state.seconds, 1e-9) * 2 / 3:.1f} training pairs/s); best validation "
              f"{config.select_metric} {state.best_metric:.4f} at epoch {state.best_epoch}: {best}")
    return 0


def cmd_train_mine(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.models.checkpoint import load_model
    from waldo.train.mining import mine_neighbours

    model, config = load_model(args.model)
    protocol = get_protocol(args.protocol, args.data)
    common = {"transform": config.transform, "image_size": config.image_size, "k": args.k, "cache_root": args.cache,
              "batch_size": args.batch_size, "num_workers": args.workers, "progress": not args.quiet}
    parts = {"train": mine_neighbours(model, protocol.train.paths, **common)}
    if protocol.leave_one_out:
        parts["test"] = mine_neighbours(model, protocol.queries.paths, **common)
    else:
        parts["test"] = mine_neighbours(model, protocol.queries.paths, gallery_paths=protocol.gallery.paths, **common)
    print(json.dumps({name: {"folder": str(result.folder), "shape": list(result.indices.shape),
                             "n_unreadable": int((~result.ok).sum())} for name, result in parts.items()}, indent=2))
    return 0


def register_train_rrt(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``rrt`` and ``mine`` sub-commands to ``waldo train``'s sub-parsers."""
    parser = train_commands.add_parser("rrt", help="train the Reranking Transformer (resumable)")
    parser.add_argument("--protocol", required=True, help="named protocol; only its training images are used")
    parser.add_argument("--data", default=None, help="dataset folder (default: the protocol's shared dataset)")
    parser.add_argument("--config", required=True, help="an RRTTrainConfig JSON file (see configs/rrt-*.json)")
    parser.add_argument("--init", required=True, metavar="MODEL_DIR",
                        help="model folder to start from (finetune: a frozen reranker folder)")
    parser.add_argument("--mode", choices=("frozen", "finetune"), default=None,
                        help="must match the config's mode (a guard against the wrong config)")
    parser.add_argument("--out", required=True, help="run folder; rerun with the same folder to resume")
    parser.add_argument("--cache", default=None, help="neighbour/feature cache root (default: ./cache)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs in this call (resume later with the same command)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=cmd_train_rrt)

    mine = train_commands.add_parser("mine", help="cache every training and test image's global top-k")
    mine.add_argument("--protocol", required=True)
    mine.add_argument("--data", default=None, help="dataset folder (default: the protocol's shared dataset)")
    mine.add_argument("--model", required=True, help="the model folder whose global descriptors rank")
    mine.add_argument("-k", type=int, default=100)
    mine.add_argument("--cache", default=None, help="cache root (default: ./cache)")
    mine.add_argument("--batch-size", type=int, default=32)
    mine.add_argument("--workers", type=int, default=None)
    mine.add_argument("--quiet", action="store_true")
    mine.set_defaults(handler=cmd_train_mine)
    return parser
