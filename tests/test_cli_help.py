"""The ``waldo`` command's help and argument checks: fast (no torch to build the parser), complete
(every argument says what it is), listed from the registries, and refusing bad names before any
work. None of these tests loads a model."""

from __future__ import annotations

import argparse
import subprocess
import sys
import typing

import pytest

from waldo import cli, cli_args
from waldo.data.protocols import protocol_names
from waldo.rerank import RERANKERS
from waldo.results import SearchHit, SearchOutcome

HEAVY_MODULES = ("torch", "torchvision", "cv2", "faiss", "onnxruntime")


def _heavy_modules_loaded_by(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = (f"import sys\n{code}\n"
             f"print('loaded:' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.rsplit("loaded:", 1)[1].strip()  # after whatever help the code printed
    return [m for m in loaded.split(",") if m]


@pytest.mark.parametrize("argv", [[], ["--help"], ["search", "--help"], ["eval", "--help"],
                                  ["index", "build", "--help"], ["train", "rrt", "--help"]])
def test_help_imports_neither_torch_nor_opencv_nor_faiss(argv):
    # An import check, not a stopwatch: a time bound would be flaky on a loaded machine, and
    # importing torch is what made `waldo --help` take seconds.
    code = "import waldo.cli as c\n" + (f"try:\n    c.main({argv!r})\nexcept SystemExit:\n    pass"
                                         if argv else "c.build_parser()")
    assert _heavy_modules_loaded_by(code) == []


def test_the_reranker_registry_lists_without_torch_and_still_exports_everything():
    assert _heavy_modules_loaded_by("from waldo.rerank import RERANKERS\nprint(RERANKERS.names())") == []
    # The names loaded on first use are still there for existing code.
    import waldo.rerank as rerank

    for name in rerank.__all__:
        assert getattr(rerank, name) is not None
    assert rerank.rrt_checkpoint.has_rrt is rerank.has_rrt


def _all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("waldo",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_argument_of_every_command_has_help():
    missing = [f"{' '.join(path)} {action.option_strings or action.dest}"
               for path, parser in _all_parsers(cli.build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, f"arguments without help: {missing}"


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps where it likes


def test_search_help_explains_each_argument_with_its_default(capsys):
    text = _help(capsys, "search")
    assert "IMAGE the query photo" in text and "--index INDEX the index folder to search" in text
    assert "-k K how many results to show (default: 10)" in text
    assert "same object POST /search answers" in text
    for name in ["none", *RERANKERS.names()]:  # from the registry, with what each needs
        assert f" {name} " in text
    assert "Needs a trained RRT" in text


def test_eval_help_lists_the_protocols_and_rerankers_from_their_registries(capsys):
    text = _help(capsys, "eval")
    assert f"one of: {', '.join(protocol_names())}" in text
    for name in RERANKERS.names():
        assert f" {name} " in text
    assert "--projection NAME" in text and ", ".join(cli_args.PROJECTIONS) in text


def test_index_build_help_shows_defaults_and_choices(capsys):
    text = _help(capsys, "index", "build")
    assert ", ".join(cli_args.LOCAL_FEATURE_KINDS) in text and "(default: efficientnet_lite0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_the_copied_names_match_their_registries():
    """cli_args repeats names whose registries import torch or OpenCV; they must agree."""
    from waldo.api import ENGINES
    from waldo.data.transforms import TRANSFORMS
    from waldo.index.manifest import LocalDtype
    from waldo.models import untrained
    from waldo.models.backbones import BACKBONES
    from waldo.models.compiled import RUNTIMES
    from waldo.models.keypoints import LOCAL_FEATURE_KINDS
    from waldo.models.pooling import POOLINGS
    from waldo.train.config import RRTTrainConfig

    assert set(cli_args.BACKBONE_NAMES) == set(BACKBONES.names())
    assert set(cli_args.TRANSFORM_NAMES) == set(TRANSFORMS.names())
    assert set(cli_args.POOLING_NAMES) == set(POOLINGS.names())
    assert cli_args.PROJECTIONS == untrained.PROJECTIONS
    assert (cli_args.DEFAULT_POOLING, cli_args.DEFAULT_GLOBAL_DIM) == (untrained.DEFAULT_POOLING,
                                                                        untrained.DEFAULT_GLOBAL_DIM)
    assert cli_args.LOCAL_FEATURE_KINDS == LOCAL_FEATURE_KINDS
    assert set(cli_args.LOCAL_DTYPES) == set(typing.get_args(LocalDtype))
    assert set(cli_args.RUNTIMES) == set(RUNTIMES)
    assert cli_args.ENGINES == ENGINES
    assert set(cli_args.TRAIN_MODES) == set(typing.get_args(RRTTrainConfig.model_fields["mode"].annotation))


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_unknown_names_fail_before_any_work_listing_the_known_ones(capsys):
    err = _usage_error(capsys, "eval", "--protocol", "nope")
    assert f"unknown protocol 'nope'; known: {', '.join(protocol_names())}" in err
    err = _usage_error(capsys, "train", "global", "--protocol", "nope", "--config", "c.json", "--out", "x")
    assert "unknown protocol 'nope'" in err
    err = _usage_error(capsys, "search", "q.jpg", "--index", "nowhere", "--rerank", "bogus")
    assert "unknown reranker 'bogus'" in err and "rrt-fusion" in err
    err = _usage_error(capsys, "experiment", "transfer", "--train", "grocery-open,nope", "--out", "x")
    assert "unknown protocol 'nope'" in err


def _hit(rank: int, score: float, **evidence) -> SearchHit:
    return SearchHit(id=rank, rank=rank, path=f"/photos/{rank}.jpg", identity=str(rank), label=f"item {rank}",
                     score=score, global_score=0.5, rank_before_rerank=rank, **evidence)


def test_search_text_shows_each_score_in_its_own_unit():
    inliers = SearchOutcome([_hit(1, 60.0, inliers=60, verified=True, rrt_score=0.9), _hit(2, 0.0, inliers=3,
                                                                                            verified=False)],
                            [], {"decode": 1.0}, rerank="rrt+gv", note="", score_kind="inliers")
    lines = cli._search_table(inliers, 12, "q.jpg", 5.0)
    header = next(line for line in lines if line.lstrip().startswith("rank"))
    assert "inliers" in header.split("global")[0] and "RRT p" in header
    first = next(line for line in lines if line.lstrip().startswith("1 "))
    assert " 60 " in first and "60.000" not in first and "60*" in first and "0.900" in first
    assert "* verified by geometry" in lines

    probability = SearchOutcome([_hit(1, 0.87654, rrt_score=0.87654)], [], {}, rerank="rrt", note="why not",
                                score_kind="RRT probability")
    lines = cli._search_table(probability, 12, "q.jpg", 5.0)
    header = next(line for line in lines if line.lstrip().startswith("rank"))
    assert "note: why not" in lines and header.count("RRT p") == 1  # the score is the probability: no twin column
    first = next(line for line in lines if line.lstrip().startswith("1 "))
    assert "0.877" in first


def test_index_summary_says_where_the_default_reranker_comes_from():
    info = {"path": "/idx", "generation": 3, "count": 4, "identities": 2, "segments": [{}, {}], "dead_rows": 1,
            "bytes": {"global": 2048, "local": 4 * 12544, "sqlite": 8192, "orphans": 0},
            "bytes_per_image": {"global": 512.0, "local": 12544.0, "total": 13056.0},
            "manifest": {"global_dim": 128, "local_shape": [49, 128], "local_dtype": "float16", "pooling": "avg",
                         "image_size": 224, "transform": "resize256-crop224", "gv_features": None},
            "model": {"backbone": "efficientnet_lite0", "projection": "pca"}}
    lines = cli._index_summary(info, ["none", "rrt", "rrt-fusion"], "rrt-fusion", ("rrt-fusion",))
    text = "\n".join(lines)
    assert "4 (2 identities) in 2 segments (1 removed rows not yet compacted)" in text
    assert "keypoints   none" in text and "orphan" not in text  # empty parts are not listed
    assert "  global descriptors" in text and "2.0 KiB" in text and "512 B per image" in text
    assert "12.2 KiB per image" in text and "RRT + global: scores are similarity + RRT probability" in text
    assert lines[-1] == "default     rrt-fusion (chosen on validation when its reranker was trained)"
    lines = cli._index_summary(info, ["none"], "none", ("rrt+gv",))
    assert lines[-1] == "default     none (the choice made on validation, rrt+gv, not available in this index)"
    lines = cli._index_summary(info, ["none", "rrt", "rrt-fusion"], "rrt", ("rrt+gv", "rrt"))
    assert lines[-1] == "default     rrt (chosen on validation for an index that cannot offer rrt+gv)"
    lines = cli._index_summary(info, ["none"], "none", ("rrt+gv", "rrt"))
    assert lines[-1] == "default     none (the choices made on validation, rrt+gv, rrt, not available in this index)"
