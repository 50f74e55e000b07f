"""``waldo train rrt`` and ``waldo train mine``: the command-line face of the reranker trainer.

    waldo train rrt --protocol grocery-open --config configs/rrt-frozen-cpu.json \\
        --init runs/global-lite0/best --mode frozen --out runs/rrt-frozen-lite0
    waldo train rrt --protocol grocery-open --config configs/rrt-finetune-cpu.json \\
        --init runs/rrt-frozen-lite0/best --mode finetune --out runs/rrt-finetune-lite0
    waldo train mine --protocol grocery-open --model runs/global-lite0/best
    waldo train rrt --config configs/rrt-views-cpu.json --init MODEL_DIR --out runs/rrt-views \
        --data grocery-open-cross --data coil100-open --data ../shared/data/abo_sample

Re-running ``train rrt`` with the same ``--out`` resumes after the last completed epoch.
"""

from __future__ import annotations

import argparse
import json
import time

from waldo.cli_args import TRAIN_MODES, protocol_name, protocol_names
from waldo.train.cli_train import add_run_arguments


def cmd_train_rrt(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.train.config import RRTTrainConfig, load_config
    from waldo.train.loop import run_summary
    from waldo.train.reranker import train_reranker

    config = load_config(args.config, RRTTrainConfig)
    if args.mode is not None and args.mode != config.mode:
        raise ValueError(f"--mode {args.mode} but {args.config} is a {config.mode!r} config")
    from waldo.models.shipped import resolve_model_dir

    args.init = resolve_model_dir(args.init)  # a folder, or a shipped model's name (lite0-rrt)
    start = time.perf_counter()
    if config.mode == "rrt-only":
        from waldo.train.rrt_online import train_rrt_on_views
        from waldo.train.sources import parse_source

        specs = ([args.protocol] if args.protocol else []) + list(args.data or [])
        if not specs:
            raise ValueError("rrt-only training needs at least one --data source (or --protocol)")
        sources = [parse_source(spec) for spec in specs]
        train_rrt_on_views(config, sources, args.init, args.out, cache_root=args.cache, progress=not args.quiet,
                           stop_after=args.stop_after,
                           init_rrt=resolve_model_dir(args.init_rrt) if args.init_rrt else None)
        print(run_summary(args.out, config, config.select_metric, time.perf_counter() - start))
        return 0
    if not args.protocol:
        raise ValueError(f"a {config.mode!r} run needs --protocol")
    if args.data and len(args.data) > 1:
        raise ValueError(f"a {config.mode!r} run takes one --data folder (the protocol's dataset)")
    protocol = get_protocol(args.protocol, args.data[0] if args.data else None)
    train_reranker(config, protocol.train, args.init, args.out, cache_root=args.cache, progress=not args.quiet,
                   stop_after=args.stop_after, source_name=f"{args.protocol}:train")
    print(run_summary(args.out, config, config.select_metric, time.perf_counter() - start))
    return 0


def cmd_train_mine(args: argparse.Namespace) -> int:
    from waldo.data.protocols import get_protocol
    from waldo.models.checkpoint import load_model, without_match_cells
    from waldo.train.mining import TopKMiner

    model, config = without_match_cells(*load_model(args.model))
    protocol = get_protocol(args.protocol, args.data)
    miner = TopKMiner(config.transform, config.image_size, args.k, args.cache, batch_size=args.batch_size,
                      num_workers=args.workers, progress=not args.quiet)
    gallery = None if protocol.leave_one_out else protocol.gallery.paths
    parts = {"train": miner(model, protocol.train.paths), "test": miner(model, protocol.queries.paths, gallery)}
    print(json.dumps({name: {"folder": str(result.folder), "shape": list(result.indices.shape),
                             "n_unreadable": int((~result.ok).sum())} for name, result in parts.items()}, indent=2))
    return 0


def register_train_rrt(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``rrt`` and ``mine`` sub-commands to ``waldo train``'s sub-parsers."""
    parser = train_commands.add_parser("rrt", help="train the Reranking Transformer (resumable)")
    add_run_arguments(parser, "an RRTTrainConfig JSON file (see configs/rrt-*.json)", sources=True)
    parser.add_argument("--init", required=True, metavar="MODEL_DIR",
                        help="model folder (or shipped model name) to start from (finetune: a frozen reranker "
                             "folder; rrt-only: the fixed model the RRT is trained for)")
    parser.add_argument("--init-rrt", default=None, metavar="RERANKER_DIR",
                        help="rrt-only: start from this reranker's RRT (same rrt settings; default: a new RRT)")
    parser.add_argument("--mode", choices=TRAIN_MODES, default=None, metavar="MODE",
                        help="one of: %(choices)s; must match the config's mode (a guard against the wrong "
                             "config; default: no check)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="neighbour/feature cache root (default: ./cache)")
    parser.set_defaults(handler=cmd_train_rrt)

    mine = train_commands.add_parser("mine", help="cache every training and test image's global top-k",
                                     description="Rank every training and test image of a protocol by a model's "
                                                 "global descriptors and cache each one's top-k (.npy) for "
                                                 "reranker training.")
    mine.add_argument("--protocol", required=True, type=protocol_name, metavar="NAME",
                      help=f"named protocol, one of: {', '.join(protocol_names())}")
    mine.add_argument("--data", default=None, metavar="DIR",
                      help="dataset folder (default: the protocol's shared dataset)")
    mine.add_argument("--model", required=True, metavar="DIR", help="the model folder whose global descriptors rank")
    mine.add_argument("-k", type=int, default=100, metavar="K", help="neighbours cached per image")
    mine.add_argument("--cache", default=None, metavar="DIR", help="cache root (default: ./cache)")
    mine.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model forward pass")
    mine.add_argument("--workers", type=int, default=None, metavar="N",
                      help="DataLoader worker processes (default: one per CPU but one, at most 4)")
    mine.add_argument("--quiet", action="store_true", help="no progress bars")
    mine.set_defaults(handler=cmd_train_mine)
    return parser
