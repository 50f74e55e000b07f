"""``waldo train global``: the command-line face of :func:`waldo.train.global_model.train_global`.

    waldo train global --protocol grocery-open --config configs/global-cpu.json --out runs/global-lite0
    waldo train global --protocol grocery-open --protocol coil100-open --config ... --out ...   # pooled

Re-running the same command with the same ``--out`` resumes from the last completed epoch.
"""

from __future__ import annotations

import argparse
import time

from waldo.cli_args import BACKBONE_NAMES, POOLING_NAMES, protocol_name, protocol_names


def cmd_train_global(args: argparse.Namespace) -> int:
    from waldo.train.config import GlobalTrainConfig, load_config
    from waldo.train.global_model import train_global
    from waldo.train.loop import run_summary

    config = load_config(args.config, GlobalTrainConfig)
    start = time.perf_counter()
    protocols = args.protocol[0] if len(args.protocol) == 1 else args.protocol
    train_global(config, args.data, protocols, args.out, progress=not args.quiet, stop_after=args.stop_after)
    print(run_summary(args.out, config, "mAP", time.perf_counter() - start))
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, config_help: str, *, sources: bool = False,
                      several_protocols: bool = False) -> None:
    """The arguments of every resumable ``waldo train`` run. ``sources``: ``--data`` may be
    repeated and name protocols or folders (waldo.train.sources), ``--protocol`` is optional.
    ``several_protocols``: ``--protocol`` may be repeated (their training splits pooled)."""
    if several_protocols:
        parser.add_argument("--protocol", required=True, action="append", type=protocol_name, metavar="NAME",
                            help="named protocol whose training images are used; repeat it to train on several "
                                 "(identities kept apart, validation the mean over each one's held-out "
                                 f"identities), one of: {', '.join(protocol_names())}")
        parser.add_argument("--data", default=None, metavar="DIR",
                            help="dataset folder of a single --protocol (default: the protocol's shared dataset)")
    elif sources:
        parser.add_argument("--protocol", default=None, type=protocol_name, metavar="NAME",
                            help="named protocol whose training images are used (frozen/finetune modes; "
                                 f"default: none), one of: {', '.join(protocol_names())}")
        parser.add_argument("--data", action="append", default=None, metavar="SPEC",
                            help="frozen/finetune: the protocol's dataset folder. rrt-only: a training source, "
                                 "repeatable: a protocol name (its training split), a folder, with ,weight=W "
                                 "and/or ,labels=no (default: the protocol's shared dataset)")
    else:
        parser.add_argument("--protocol", required=True, type=protocol_name, metavar="NAME",
                            help="named protocol whose training images are used, one of: "
                                 f"{', '.join(protocol_names())}")
        parser.add_argument("--data", default=None, metavar="DIR",
                            help="dataset folder (default: the protocol's shared dataset)")
    parser.add_argument("--config", required=True, metavar="FILE", help=config_help)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder (created); rerun with the same folder to resume")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs in this call (resume later with the same command; default: "
                             "train to the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register_train_global(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``global`` sub-command to ``waldo train``'s sub-parsers."""
    parser = train_commands.add_parser("global", help="train the global descriptor (resumable)")
    add_run_arguments(parser, "a GlobalTrainConfig JSON file (see configs/)", several_protocols=True)
    parser.set_defaults(handler=cmd_train_global)
    return parser


def cmd_train_whiten(args: argparse.Namespace) -> int:
    from waldo.train.sources import parse_source
    from waldo.train.whitening import train_whitening

    sources = [parse_source(spec) for spec in args.data]
    checks = [parse_source(spec) for spec in args.check or []]
    report = train_whitening(sources, args.out, check_sources=checks, backbone=args.backbone, pooling=args.pooling,
                             max_images=args.max_images, image_size=args.image_size, progress=not args.quiet)
    best = report["validation"][0]
    print(f"learned whitening {report['setting']} chosen on validation (mean mAP {best['mean_map']:.4f}: "
          + ", ".join(f"{name} {value:.4f}" for name, value in best["validation_map"].items())
          + f"); model saved to {args.out} in {report['seconds']:.0f} s")
    return 0


def register_train_whiten(train_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``whiten`` sub-command: a trained global descriptor in closed form (waldo.train.whitening)."""
    parser = train_commands.add_parser(
        "whiten", help="train the global descriptor by learned whitening (closed form, minutes on a CPU)",
        description="Learn a whitening of the frozen ImageNet features from labelled photos (the "
                    "within-identity variation is what to ignore), its setting chosen on held-out "
                    "identities and on --check collections. Writes a model folder for "
                    "`waldo index build --model` and `waldo eval --model`.")
    parser.add_argument("--data", action="append", required=True, metavar="SPEC",
                        help="a training source, repeatable: a protocol name (its training split) or a folder, "
                             "with ,weight=W and/or ,labels=no (unlabelled sources add collection statistics only)")
    parser.add_argument("--check", action="append", default=None, metavar="SPEC",
                        help="a labelled source only searched during validation, never fitted on "
                             "(e.g. another collection's training split), repeatable")
    parser.add_argument("--out", required=True, metavar="DIR", help="model folder to write (created)")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONE_NAMES, metavar="NAME",
                        help="ImageNet backbone whose features are whitened, one of: %(choices)s")
    parser.add_argument("--pooling", default=None, metavar="SPEC",
                        help=f"global pooling: {', '.join(POOLING_NAMES)}; gem learns its p, gem:P fixes it "
                             f"(default avg)")
    parser.add_argument("--image-size", type=int, default=224, metavar="PX",
                        help="input side the model describes at (224: a 7x7 map; 288: 9x9, slower)")
    parser.add_argument("--max-images", type=int, default=0, metavar="N",
                        help="use a seeded sample of N images (quick runs); 0 = all")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=cmd_train_whiten)
    return parser
