"""One evaluation end to end: pick the protocol's data, build or load the model, evaluate.

Shared by ``waldo eval`` and the scripts under ``benchmarks/`` and ``experiments/``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from waldo.data.protocols import Protocol, get_protocol, protocol_names
from waldo.data.transforms import get_transform
from waldo.eval.evaluate import EvalRun, evaluate_protocol
from waldo.eval.gv_eval import run_keypoints
from waldo.eval.multiscale import scale_sizes, scale_transforms
from waldo.eval.rerank_eval import rerank_run
from waldo.models.checkpoint import ModelConfig, load_model
from waldo.models.descriptor import DescriptorModel
from waldo.models.untrained import untrained_model
from waldo.paths import data_root
from waldo.rerank import NO_RERANK, RERANKERS, Need, RerankerSetup

# Which shared dataset each named protocol reads when --data is not given.
PROTOCOL_DATASETS = {"grocery": "grocery_store", "coil100": "coil100"}


def default_data_dir(protocol: str) -> Path:
    if protocol not in protocol_names():  # a typo is an unknown name, not a missing dataset
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(protocol_names())}")
    for prefix, folder in PROTOCOL_DATASETS.items():
        if protocol.startswith(prefix):
            return data_root() / folder
    raise ValueError(f"protocol {protocol!r} has no default dataset; pass --data DIR")


class StageLog:
    """``waldo eval``'s progress: one line per stage, "[2/4] extract 1443 images, search 300
    queries ... 12.3 s", on ``stream`` (stderr). On a terminal the line is written when the stage
    starts and completed in place when it ends (the stage's progress bars, which clear
    themselves, run over it meanwhile); elsewhere (a log file) it is written once, at the end."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.stream = stream if stream is not None else sys.stderr

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.done += 1
        label = f"[{self.done}/{self.total}] {what} ..."
        live = self.enabled and self.stream.isatty()
        if live:
            self.stream.write(label)
            self.stream.flush()
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if live:  # the error message starts on a line of its own
                self.stream.write("\n")
            raise
        if self.enabled:  # \r and erase-line: rewrite whatever a progress bar left on the line
            self.stream.write(("\r\x1b[K" if live else "") + f"{label} {time.perf_counter() - start:.1f} s\n")
            self.stream.flush()


def prepare_model(protocol: Protocol, *, backbone: str = "efficientnet_lite0", model_dir: str | Path | None = None,
                  projection: str = "views-whiten", dim: int = 128, transform: str = "resize256-crop224",
                  progress: bool = True, seed: int = 0, pooling: str | None = None,
                  global_dim: int | None = None, global_scales: Sequence[float] = (),
                  local_stage: int | None = None, fit_runtime: str = "eager",
                  backbone_from: str | Path | None = None,
                  colour_weight: float | None = None) -> tuple[DescriptorModel, ModelConfig]:
    """A trained checkpoint, or an untrained model whose projection is fitted on the protocol's
    training images (never its queries or gallery). ``fit_runtime``: how the fit runs the backbone
    (waldo.models.untrained.untrained_model; eager by default, as every documented figure);
    ``backbone_from``: that model on a trained checkpoint's backbone (untrained_model);
    ``colour_weight``: the colour term's weight instead of the model's (Waldo.create's option)."""
    from waldo.rerank.rrt_rerankers import set_colour_weight

    model, config = _prepare_model(protocol, backbone=backbone, model_dir=model_dir, projection=projection, dim=dim,
                                   transform=transform, progress=progress, seed=seed, pooling=pooling,
                                   global_dim=global_dim, global_scales=global_scales, local_stage=local_stage,
                                   fit_runtime=fit_runtime, backbone_from=backbone_from)
    set_colour_weight(model, config, colour_weight, model_dir)
    return model, config


def _prepare_model(protocol: Protocol, *, backbone: str, model_dir: str | Path | None, projection: str, dim: int,
                   transform: str, progress: bool, seed: int, pooling: str | None, global_dim: int | None,
                   global_scales: Sequence[float], local_stage: int | None, fit_runtime: str,
                   backbone_from: str | Path | None) -> tuple[DescriptorModel, ModelConfig]:
    fit_paths = protocol.train.paths
    if model_dir is not None:
        model, config = load_model(model_dir)
        if local_stage is None:
            return model, config
        from waldo.models.untrained import with_match_cells

        return with_match_cells(model, config, local_stage, dim=dim, fit_paths=fit_paths,
                                fit_source=f"{protocol.name}:train", seed=seed, progress=progress,
                                fit_runtime=fit_runtime)
    if projection.startswith("pca") and not fit_paths:
        raise ValueError(f"protocol {protocol.name!r} has no training images to fit a PCA projection "
                         f"on; use --projection random")
    return untrained_model(backbone, dim=dim, projection=projection, fit_paths=fit_paths,
                           fit_source=f"{protocol.name}:train", transform=transform,
                           progress=progress, seed=seed, pooling=pooling, global_dim=global_dim,
                           global_scales=global_scales, local_stage=local_stage, fit_runtime=fit_runtime,
                           backbone_from=backbone_from)


def run_eval_full(protocol: str, data: str | Path | None = None, *, backbone: str = "efficientnet_lite0",
                  model_dir: str | Path | None = None, transform: str = "resize256-crop224",
                  projection: str = "views-whiten", dim: int = 128, batch_size: int = 32,
                  num_workers: int | None = None, progress: bool = True,
                  seed: int = 0, rerank: str = NO_RERANK, rerank_top_k: int = 100,
                  scales: Sequence[float] = (), pooling: str | None = None,
                  global_dim: int | None = None, global_scales: Sequence[float] = (),
                  local_stage: int | None = None, log_stages: bool = False,
                  fit_runtime: str = "eager", backbone_from: str | Path | None = None,
                  colour_weight: float | None = None) -> tuple[EvalRun, dict]:
    """Evaluate and return the full run plus the metrics dict (with what produced them).

    ``rerank`` names a reranker of :data:`waldo.rerank.RERANKERS` (or a composition "a+b"); it
    re-sorts each query's global top ``rerank_top_k``, reading an RRT from ``model_dir`` when it
    needs one and the images' SIFT keypoints (computed once, cached) when it verifies geometry.
    The returned run is then the reranked one and ``metrics["global"]`` holds the global-only
    figures.

    ``scales`` (factors of the model's image size, e.g. ``(0.75, 1, 1.25)``) averages the global
    descriptors over those sizes (waldo.eval.multiscale); empty, the default, is single-scale.
    ``global_scales`` makes it part of an untrained model instead (ModelConfig.global_scales: the
    input tensor resized inside the model, as an index built with it describes).

    ``log_stages``: print a line per stage with its time to stderr (:class:`StageLog`)."""
    start = time.perf_counter()
    # Built first: a reranker that cannot be built fails before minutes of extraction.
    reranker = None if rerank == NO_RERANK else RERANKERS.create(
        rerank, RerankerSetup(Path(model_dir) if model_dir is not None else None))
    proto = get_protocol(protocol, Path(data) if data else default_data_dir(protocol))
    verifies = reranker is not None and Need.KEYPOINTS in RERANKERS.spec(rerank).needs
    stage = StageLog(2 + verifies + (reranker is not None), enabled=log_stages)
    n_images = len(proto.gallery) + (0 if proto.leave_one_out else len(proto.queries))
    with stage(f"load the model {model_dir}" if model_dir is not None else
               f"prepare the untrained {backbone} ({projection} projection, {len(proto.train)} training images)"):
        model, config = prepare_model(proto, backbone=backbone, model_dir=model_dir, projection=projection,
                                      dim=dim, transform=transform, progress=progress, seed=seed, pooling=pooling,
                                      global_dim=global_dim, global_scales=global_scales,
                                      local_stage=local_stage, fit_runtime=fit_runtime,
                                      backbone_from=backbone_from, colour_weight=colour_weight)
    layout = model.match_layout(config.image_size)
    if layout is not None and reranker is not None:  # rebuilt knowing where the match cells sit
        reranker = RERANKERS.create(rerank, RerankerSetup(Path(model_dir) if model_dir is not None else None,
                                                          match_cells=layout.to_json()))
    extra = scale_transforms(transform, config.image_size, scales, seed=seed) if scales else []
    with stage(f"extract {n_images} images{f' at {1 + len(extra)} sizes' if extra else ''}, "
               f"search {len(proto.queries)} queries"):
        run = evaluate_protocol(model, proto, get_transform(transform, config.image_size, seed=seed),
                                batch_size=batch_size, num_workers=num_workers, progress=progress,
                                extra_transforms=extra)
    if reranker is not None:
        keypoints = None
        if verifies:
            with stage(f"keypoints of {n_images} images (cached after the first run)"):
                keypoints = run_keypoints(proto, progress=progress)
        with stage(f"rerank the top {rerank_top_k} of {len(proto.queries)} queries with {rerank}"):
            run = rerank_run(run, reranker, rerank_top_k, keypoints=keypoints, progress=progress).run
    metrics = dict(run.metrics)
    metrics.update({"protocol": protocol, "backbone": config.backbone, "transform": transform,
                    "projection": config.projection, "dim": config.dim, "pooling": config.pooling,
                    "global_dim": config.global_width, "global_scales": config.global_scales,
                    **({"colour_weight": config.colour_weight} if config.colour_weight else {}),
                    "local_stage": config.local_stage, "model": str(model_dir) if model_dir else None,
                    "n_unreadable": len(run.skipped), "seconds": round(time.perf_counter() - start, 1)})
    if scales:
        metrics["scales"] = scale_sizes(config.image_size, scales)
    return run, metrics


def run_eval(protocol: str, data: str | Path | None = None, **kwargs) -> dict:
    """Evaluate; the metrics dict of :func:`run_eval_full`."""
    return run_eval_full(protocol, data, **kwargs)[1]
