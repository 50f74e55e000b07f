"""What the command-line modules share (``waldo.cli``, ``waldo.train.cli_train*``,
``waldo_experiments.cli``): the help format, protocol-name checking and the names of the
registries that cannot be imported cheaply.

Nothing here imports torch, torchvision, OpenCV or faiss, so building the whole ``waldo`` parser
(``waldo --help``, ``waldo search --help``) takes a fraction of a second.
"""

from __future__ import annotations

import argparse

__all__ = ["BACKBONE_NAMES", "DEFAULT_GLOBAL_DIM", "DEFAULT_POOLING", "ENGINES", "LOCAL_DTYPES",
           "LOCAL_FEATURE_KINDS", "POOLING_NAMES", "PROJECTIONS", "RUNTIMES", "TRAIN_MODES", "TRANSFORM_NAMES",
           "HelpFormatter", "Parser", "protocol_name", "protocol_names"]

# Names whose registries live in modules that import torch, torchvision or OpenCV when loaded:
# importing them would make every --help take seconds. They are repeated here for the parsers'
# choices and help; tests/test_cli_help.py fails as soon as one differs from its source.
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                  "resnet50")  # waldo.models.backbones.BACKBONES
TRANSFORM_NAMES = ("resize256-crop224", "resize224", "blur", "contrast", "flip", "grayscale",
                   "perspective")  # waldo.data.transforms.TRANSFORMS (the default first)
POOLING_NAMES = ("avg", "gem", "max")  # waldo.models.pooling.POOLINGS
PROJECTIONS = ("views-whiten", "pca-shrink", "pca", "pca-whiten", "random", "identity")  # models.untrained
DEFAULT_POOLING = "avg"  # waldo.models.untrained.DEFAULT_POOLING
DEFAULT_GLOBAL_DIM = 1024  # waldo.models.untrained.DEFAULT_GLOBAL_DIM
LOCAL_FEATURE_KINDS = ("orb-teblid", "teblid", "sift", "none")  # waldo.models.keypoints.LOCAL_FEATURE_KINDS
LOCAL_DTYPES = ("float16", "int8")  # waldo.index.manifest.LocalDtype
RUNTIMES = ("auto", "eager", "onnx", "compile")  # waldo.models.compiled.RUNTIMES
ENGINES = ("local", "ray")  # waldo.api.ENGINES
TRAIN_MODES = ("frozen", "finetune", "rrt-only")  # waldo.train.config.RRTTrainConfig.mode


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help, except where there is nothing to show (no
    default, a flag's False) or the help already says what happens by default.

    A description or epilog keeps its line breaks: each line is wrapped on its own, and a line
    that starts with two spaces is a list entry ("  name  what it is") whose continuation lines
    indent under its text, so a command can list the rerankers one per line."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # Names such as rrt-fusion or grocery-open-cross stay whole: a reader copies them.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import re
        import textwrap

        lines = []
        for line in text.splitlines():
            lead = line[:len(line) - len(line.lstrip())]
            entry = re.match(r"  +\S+ +", line)  # "  name   " of a list entry: its text starts after it
            hanging = " " * entry.end() if entry else ""
            lines.append(textwrap.fill(line.strip(), width, initial_indent=indent + lead,
                                       subsequent_indent=indent + hanging, break_on_hyphens=False))
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`. ``add_subparsers`` makes sub-command
    parsers of the parent's class, so every command below a :class:`Parser` shares the format."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def protocol_names() -> list[str]:
    """The named evaluation protocols, from their registry (cheap: no torch)."""
    from waldo.data.protocols import protocol_names as registered

    return registered()


def protocol_name(text: str) -> str:
    """``type=`` of a ``--protocol`` option: the name if registered, else the error argparse
    prints, listing the known ones."""
    known = protocol_names()
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown protocol {text!r}; known: {', '.join(known)}")
    return text
