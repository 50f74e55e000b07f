"""``waldo`` command line: a thin layer over the Python API.

    waldo index build --data DIR --backbone NAME --out INDEX [--shards N]
    waldo index add|remove|info|check|compact|reshard ...
    waldo search IMAGE --index DIR -k 10
    waldo eval --data DIR --protocol NAME --backbone NAME [--transform NAME] [--json OUT]
    waldo eval --protocol NAME --model RERANKER_DIR --rerank rrt|rrt-fusion
    waldo eval --protocol NAME --rerank gv            (geometric verification; rrt+gv with --model)
    waldo explain QUERY CANDIDATE -o match.png        (inlier lines of a verification)
    waldo train rrt --protocol NAME --config FILE --init MODEL_DIR --mode frozen|finetune --out DIR
    waldo serve --index DIR [--host 127.0.0.1 --port 8000]

Building the parser imports nothing heavy (no torch, torchvision, OpenCV, faiss or ONNX Runtime):
each handler imports what it runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from waldo.cli_args import (BACKBONE_NAMES, DEFAULT_GLOBAL_DIM, DEFAULT_POOLING, ENGINES, LOCAL_DTYPES,
                            LOCAL_FEATURE_KINDS, POOLING_NAMES, PROJECTIONS, RUNTIMES, TRANSFORM_NAMES, Parser,
                            protocol_name, protocol_names)

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the command was right but the machine could not do it (a full disk, a busy index)


def _fail(message: str) -> int:
    print(f"waldo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _index_failure(error: OSError) -> int:
    """``waldo: error: <message>`` and EXIT_FAILURE when the machine could not do what an index
    command asked (a full disk, out of file descriptors, a busy lock): said plainly, without a
    traceback. Any other OSError is re-raised."""
    from waldo.index.errors import IndexBusyError, IndexResourceError, StorageFullError, storage_full_errno

    if isinstance(error, (StorageFullError, IndexResourceError, IndexBusyError)):
        message = str(error)
    elif storage_full_errno(error) is not None:  # e.g. while writing the new index's model folder
        message = f"{error.strerror or error} while writing {error.filename or 'the index'}: free space and retry"
    else:
        raise error
    print(f"waldo: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _say_waiting_for_lock() -> None:
    print("waiting for the index's write lock (another process is writing to it)...", file=sys.stderr, flush=True)


def _notice_lock_waits(engine) -> None:
    """Say so when a write of ``engine`` (a Waldo or a ShardedWaldo: each shard) waits for a lock."""
    for store in getattr(engine, "stores", None) or [engine.store]:
        store.on_lock_wait = _say_waiting_for_lock


def _parse_where(items: list[str] | None) -> dict[str, set[str]]:
    """``--where split=train,val`` -> {"split": {"train", "val"}}."""
    filters: dict[str, set[str]] = {}
    for item in items or []:
        column, sep, values = item.partition("=")
        if not sep or not column:
            raise ValueError(f"--where takes COLUMN=VALUE[,VALUE...], got {item!r}")
        filters.setdefault(column, set()).update(v for v in values.split(",") if v)
    return filters


def _parse_search_params(text: str | None) -> dict[str, int]:
    """``--global-search-params nprobe=128,efSearch=64`` -> {"nprobe": 128, "efSearch": 64}."""
    params: dict[str, int] = {}
    for item in (text or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not item.strip():
            continue
        if not sep or not key or not value.strip().isdigit():
            raise ValueError(f"--global-search-params takes NAME=INTEGER[,NAME=INTEGER], got {item!r}")
        params[key.strip()] = int(value)
    return params


def _load_records(data: str, where: list[str] | None):
    from waldo.data.datasets import load_dataset

    image_set = load_dataset(data)
    filters = _parse_where(where)
    if filters:
        def keep(record) -> bool:
            fields = {"identity": record.identity, "instance_id": record.identity, **record.attrs}
            return all(fields.get(column) in values for column, values in filters.items())

        image_set = image_set.filter(keep)
    if len(image_set) == 0:
        raise ValueError(f"no images selected from {data}")
    return image_set


def _missing_folder(path: str | Path) -> Path | None:
    """The folder an output file would go into, when it does not exist (None: it does). Output
    files never create folders: a typo in a path fails at once, before the work, rather than
    leaving a stray folder tree behind."""
    folder = Path(path).expanduser().absolute().parent
    return None if folder.is_dir() else folder


def _human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _print_errors(errors: list[tuple[str, str]], limit: int = 10) -> None:
    for path, message in errors[:limit]:
        print(f"  skipped {path}: {message}", file=sys.stderr)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more unreadable images", file=sys.stderr)


# ----------------------------------------------------------------------------- index
def cmd_index_build(args: argparse.Namespace) -> int:
    from waldo.api import Waldo

    if args.shards < 1:
        return _fail(f"--shards must be at least 1, got {args.shards}")
    image_set = _load_records(args.data, args.where)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        return _fail(f"{out} already exists and is not empty; use `waldo index add` to grow it")
    start = time.perf_counter()
    from waldo.models.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model) if args.model else None
    if args.backbone_from and model_dir is not None:
        return _fail(BACKBONE_FROM_WITH_MODEL)
    options = dict(backbone_from=resolve_model_dir(args.backbone_from) if args.backbone_from else None,
                   backbone=args.backbone, dim=args.dim, projection=args.projection, pooling=args.pooling,
                   global_dim=args.global_dim, global_scales=args.global_scales, fit_paths=image_set.paths,
                   local_stage=args.local_stage, fit_runtime="eager" if args.runtime == "compile" else args.runtime,
                   fit_source=str(args.data),
                   model_dir=model_dir, transform=args.transform, progress=not args.quiet,
                   local_dtype=args.local_dtype, global_index=args.global_index, gv_features=args.local_features,
                   global_search_params=_parse_search_params(args.global_search_params),
                   colour_weight=args.colour_weight)
    try:
        if args.shards > 1:
            from waldo.sharded import ShardedWaldo

            engine = ShardedWaldo.create(out, shards=args.shards, **options)
        else:
            engine = Waldo.create(out, **options)
        _notice_lock_waits(engine)
        report = engine.add(image_set.paths, image_set.identities, [dict(r.attrs) for r in image_set.records],
                            batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet,
                            engine=args.engine, actors=args.actors, runtime=args.runtime)
    except OSError as error:
        return _index_failure(error)
    seconds = time.perf_counter() - start
    _print_errors(report.errors)
    shards = f" ({args.shards} shards)" if args.shards > 1 else ""
    print(f"indexed {len(report.added)} images into {out}{shards} in {seconds:.1f} s "
          f"({len(report.errors)} unreadable, {len(report.already_indexed)} duplicates skipped)")
    return 0


def cmd_index_adapt(args: argparse.Namespace) -> int:
    from waldo.index.shards import is_sharded

    if is_sharded(args.index):  # every shard must keep the identical reranker
        return _fail(f"{args.index} is a sharded index; `waldo index adapt` trains single indexes only for now")
    from waldo.train.adapt import adapt_index

    config = None
    if args.config:
        from waldo.train.config import RRTTrainConfig, load_config

        config = load_config(args.config, RRTTrainConfig)
    start = time.perf_counter()
    result = adapt_index(args.index, config=config, epochs=args.epochs, lr=args.lr, patience=args.patience,
                         progress=not args.quiet,
                         stop_after=args.stop_after, group_verified=args.group_verified)
    seconds = time.perf_counter() - start
    if not result["installed"]:
        print(f"training paused after {seconds:.0f} s ({result['run']}); rerun the command to resume")
        return 0
    macro = result.get("validation") or {}
    figures = ", ".join(f"{name} R@1 {m['recall@1']:.3f}" for name, m in macro.items())
    stopped = " (stopped early: no better validation since)" if result.get("stopped_early") else ""
    print(f"adapted the reranker of {args.index} in {seconds:.0f} s; installed epoch {result.get('best_epoch')} "
          f"of {result.get('epochs')}{stopped}; validation (augmented views of held-out photos): {figures}; "
          f"default reranker: {result.get('default_reranker')}")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from waldo.data.datasets import load_dataset
    from waldo.data.images import IMAGE_EXTENSIONS
    from waldo.sharded import open_index

    try:
        engine = open_index(args.index)
    except OSError as error:  # e.g. out of file descriptors: never "corrupt"
        return _index_failure(error)
    paths, identities, attrs = [], [], []
    for item in args.inputs:
        item_path = Path(item)
        if item_path.is_dir() or item_path.suffix == ".csv":
            image_set = load_dataset(item)
            paths += image_set.paths
            identities += image_set.identities
            attrs += [dict(r.attrs) for r in image_set.records]
        elif item_path.is_file():
            if item_path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                return _fail(f"{item} does not look like an image (extension {item_path.suffix!r})")
            paths.append(str(item_path))
            identities.append(args.identity or "")
            attrs.append({})
        else:
            return _fail(f"{item} does not exist")
    _notice_lock_waits(engine)  # the CLI waits for the lock as long as it takes
    try:
        report = engine.add(paths, identities, attrs, batch_size=args.batch_size,
                            num_workers=args.workers, progress=not args.quiet, engine=args.engine,
                            actors=args.actors, runtime=args.runtime)
    except OSError as error:
        return _index_failure(error)
    _print_errors(report.errors)
    print(f"added {len(report.added)} images ({len(report.already_indexed)} already indexed, "
          f"{len(report.errors)} unreadable); the index holds {len(engine)}")
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from waldo.sharded import open_index

    if not args.id and not args.path:
        return _fail("give --id and/or --path")
    engine = open_index(args.index)
    removed = engine.remove(ids=args.id or [], paths=args.path or [])
    print(f"removed {removed} images; the index holds {len(engine)}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from waldo.sharded import open_index

    engine = open_index(args.index)
    info = engine.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for line in _index_summary(info, engine.available_rerankers(), engine.default_reranker, engine.default_chain):
        print(line)
    return 0


# Storage parts in the order a reader cares about, with what each holds.
_STORAGE_PARTS = {
    "global": "global descriptors",
    "global_trained": "trained approximate index",
    "local": "local descriptors",
    "local_scale": "int8 scales of the locals",
    "verification": "keypoints for geometric verification",
    "sqlite": "metadata (SQLite)",
    "manifest": "manifest",
    "orphans": "orphan segments (reclaimable)",
}


def _match_cells_text(model: dict) -> str:
    """How an index's local rows hold a model's match cells (waldo.models.descriptor.MatchCellsLayout)."""
    layout = (model.get("extra") or {}).get("match_cells")
    if model.get("match_stage") is None or not isinstance(layout, dict):
        return ""
    return (f": {layout.get('tokens')} locals, then {layout.get('cells')} match cells x {layout.get('cell_dim')} of "
            f"backbone stage {model['match_stage']} packed into the other rows")


def _index_summary(info: dict, rerankers: list[str], default: str, chain: Sequence[str]) -> list[str]:
    """The lines `waldo index info` prints: what a person asks of an index first. Everything
    else (segments by name, checksums, the faiss training header) is in ``--json``."""
    from waldo.rerank import NO_RERANK, RERANKERS

    manifest, model = info.get("manifest", {}), info.get("model", {})
    count = int(info.get("count", 0))
    segments = info.get("segments", [])
    if info.get("sharded"):
        where = (f"{info.get('shards')} shards by {info.get('hash')} of the image {info.get('key')}; ids are "
                 f"{info.get('id_encoding')}")
    else:
        where = f"generation {info.get('generation')}"
    lines = [f"index       {info.get('path')} ({where}, waldo {manifest.get('waldo_version', '?')})",
             f"images      {count} ({info.get('identities', 0)} identities) in {len(segments)} segment"
             f"{'' if len(segments) == 1 else 's'}"
             + (f" ({info['dead_rows']} removed rows not yet compacted)" if info.get("dead_rows") else "")]
    local_rows, local_dim = (manifest.get("local_shape") or [None, None])[:2]
    lines.append(f"model       {model.get('backbone', manifest.get('backbone'))} at "
                 f"{manifest.get('image_size', model.get('image_size'))} px ({manifest.get('transform')}); "
                 f"global {manifest.get('global_dim')}-d"
                 + (f" (a colour signature at weight {model['colour_weight']:g} among them)"
                    if model.get("colour_weight") else "") + f", {manifest.get('pooling')} pooling"
                 + (f" at scales 1, {', '.join(f'{f:g}' for f in manifest['global_scales'])}"
                    if manifest.get("global_scales") else "") + "; "
                 f"locals {local_rows} x {local_dim} {manifest.get('local_dtype', info.get('local_dtype'))}"
                 + (f" of backbone stage {manifest['local_stage']}" if manifest.get("local_stage") is not None else "")
                 + _match_cells_text(model))
    lines.append(f"            projection {model.get('projection')}; weights {model.get('weights_source')}")
    search = info.get("global_index") or {}
    if search:
        built = search.get("built")
        described = "exact" if search.get("spec") == "Flat" else "approximate"
        params = ", ".join(f"{k}={v}" for k, v in (search.get("search_params") or {}).items())
        line = f"search      {search.get('spec')} ({described}{'; ' + params if params else ''})"
        if built != search.get("spec"):
            line += f"; searching with {built} for now: {search.get('reason')}"
        lines.append(line)
    features = manifest.get("gv_features")
    per_image = info.get("bytes_per_image", {})
    if features:
        lines.append(f"keypoints   {features.get('kind')}, up to {features.get('max_keypoints')} per image, "
                     f"{_human_bytes(per_image.get('verification', 0))} per image")
    else:
        lines.append("keypoints   none (built with --local-features none: no geometric verification)")
    sizes = {part: n for part, n in info.get("bytes", {}).items() if n}
    total = sum(sizes.values())
    lines.append(f"storage     {_human_bytes(total)} in all, {_human_bytes(total / count) if count else '-'} per image")
    for part in [*_STORAGE_PARTS, *sorted(set(sizes) - set(_STORAGE_PARTS))]:
        if part in sizes:
            each = per_image.get(part)
            lines.append(f"  {_STORAGE_PARTS.get(part, part):<38} {_human_bytes(sizes[part]):>10}"
                         + (f"  {_human_bytes(each):>10} per image" if each is not None else ""))
    lines.append(f"rerankers   {', '.join(rerankers)}")
    for name in rerankers:
        if name != NO_RERANK:
            spec = RERANKERS.spec(name)
            lines.append(f"  {name:<12} {spec.title}: scores are {spec.score}")
    if not chain:
        why = "no reranker was chosen on validation"
    elif default == chain[0]:
        why = ("chosen on validation against global search and the RRT" if default == "local-match"
               else "chosen on validation when its reranker was trained")
    elif default in chain:
        why = f"chosen on validation for an index that cannot offer {', '.join(chain[:chain.index(default)])}"
    else:
        why = f"the choice{'s' if len(chain) > 1 else ''} made on validation, {', '.join(chain)}, not available in this index"
    lines.append(f"default     {default} ({why})")
    for row in info.get("per_shard", []):
        lines.append(f"{'shards' if row['shard'] == 0 else '':<11} {Path(row['path']).name}  {row['count']} images "
                     f"({row['identities']} identities) in {row['segments']} segment"
                     f"{'' if row['segments'] == 1 else 's'}, {_human_bytes(row['bytes'])}, generation "
                     f"{row['generation']}")
    return lines


def cmd_index_check(args: argparse.Namespace) -> int:
    from waldo.index.shards import is_sharded

    if is_sharded(args.index):  # the layout, every shard, identical models, each image in its own shard
        from waldo.sharded import check_sharded

        problems = check_sharded(args.index)
    else:
        from waldo.api import Waldo

        problems = Waldo.open(args.index).store.check()
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


def cmd_index_compact(args: argparse.Namespace) -> int:
    from waldo.index import IndexStore
    from waldo.index.shards import is_sharded, read_layout

    start = time.perf_counter()
    folders = read_layout(args.index).shard_dirs if is_sharded(args.index) else [Path(args.index)]
    stats = {"segments_before": 0, "segments_after": 0, "rows_reclaimed": 0}
    images = 0
    try:
        for folder in folders:  # each shard on its own; no model needed: faster than Waldo.open
            with IndexStore.open(folder) as store:
                store.on_lock_wait = _say_waiting_for_lock
                for key, value in store.compact().items():
                    stats[key] = stats.get(key, 0) + value
                images += len(store)
    except OSError as error:
        return _index_failure(error)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"path": str(Path(args.index).absolute()), **stats, "images": images,
                          "seconds": round(seconds, 3)}, indent=2))
        return 0
    before, after = stats["segments_before"], stats["segments_after"]
    if before == after and not stats["rows_reclaimed"]:
        print(f"{args.index} is already compact: {images} images in {after} segment{'' if after == 1 else 's'} "
              f"({seconds:.1f} s)")
    else:
        print(f"compacted {args.index}: segments {before} -> {after}, {stats['rows_reclaimed']} removed rows "
              f"reclaimed, {images} images, {seconds:.1f} s")
    return 0


def cmd_index_reshard(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        return _fail(f"{args.out} already exists; reshard writes a new index")
    from waldo.sharded import reshard

    try:
        result = reshard(args.index, args.out, args.shards, progress=not args.quiet)
    except OSError as error:
        return _index_failure(error)
    kind = "a single index" if args.shards == 1 else f"{args.shards} shards"
    print(f"copied {result['images']} images from {args.index} into {args.out} ({kind}: "
          f"{', '.join(map(str, result['per_shard']))} images) in {result['seconds']:.1f} s, describing none again")
    return 0


# ----------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from waldo.sharded import open_index

    engine = open_index(args.index, model_dir=args.model)
    start = time.perf_counter()
    outcome = engine.search(args.image, k=args.k, rerank=args.rerank)  # None: the index's default
    total_ms = round((time.perf_counter() - start) * 1000, 2)
    if args.json:
        from waldo.serve.schemas import SearchResponse

        # The very body `POST /search` answers. The engine timed decode (it read the file), so
        # timings are its stages plus the total, as the service reports them.
        response = SearchResponse.from_outcome(outcome, args.k, {**outcome.timings_ms, "total": total_ms})
        print(json.dumps(response.model_dump(mode="json"), indent=2))
        # For a person watching a pipe: which reranker ran, without parsing the JSON.
        print(f"rerank: {outcome.rerank}" + (f" ({outcome.note})" if outcome.note else ""), file=sys.stderr)
        return 0
    for line in _search_table(outcome, len(engine), args.image, total_ms):
        print(line)
    return 0


def _search_table(outcome, n_images: int, image: str, total_ms: float) -> list[str]:
    """The text of `waldo search`: each score in its own unit (inlier counts as integers,
    similarities and probabilities to 3 decimals) under a header naming what it is, the evidence
    of whichever reranker ran (inliers, * verified, RRT probability) and its note."""
    from waldo.rerank.base import SCORE_INLIERS, SCORE_KINDS, SCORE_RRT_PROBABILITY, SCORE_SIMILARITY

    kind = outcome.score_kind
    stages = ", ".join(f"{stage} {ms:.0f}" for stage, ms in {**outcome.timings_ms, "total": total_ms}.items())
    lines = [f"top {len(outcome.hits)} of {n_images} images for {image}, rerank {outcome.rerank} (ms: {stages})",
             f"score: {kind}: {SCORE_KINDS.get(kind, '')}"]
    if outcome.note:
        lines.append(f"note: {outcome.note}")
    hits = outcome.hits
    verifying = any(hit.inliers is not None for hit in hits)
    # The RRT probability gets its own column unless it already is the score.
    rrt_column = kind != SCORE_RRT_PROBABILITY and any(hit.rrt_score is not None for hit in hits)
    global_column = kind != SCORE_SIMILARITY  # reranked: the similarity it started from, for comparison
    width = max(len(kind), 6)

    def score_text(value: float) -> str:
        return f"{value:{width}.0f}" if kind == SCORE_INLIERS else f"{value:{width}.3f}"

    header = f"{'rank':>4}  {kind:>{width}}"
    header += f"  {'global':>6}" if global_column else ""
    header += f"  {'inliers':>8}" if verifying else ""
    header += f"  {'RRT p':>6}" if rrt_column else ""
    lines.append(header + f"  {'identity':<10}  {'label':<24}  path")
    for hit in hits:
        row = f"{hit.rank:>4}  {score_text(hit.score)}"
        row += f"  {hit.global_score:6.3f}" if global_column else ""
        if verifying:
            row += f"  {hit.inliers:>7}{'*' if hit.verified else ' '}" if hit.inliers is not None else f"  {'':>8}"
        if rrt_column:
            row += f"  {hit.rrt_score:6.3f}" if hit.rrt_score is not None else f"  {'':>6}"
        lines.append(row + f"  {hit.identity:<10}  {hit.label:<24}  {hit.path}")
    if verifying:
        lines.append("* verified by geometry")
    return lines


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.json and (folder := _missing_folder(args.json)):  # checked before minutes of extraction
        return _fail(f"folder {folder} does not exist (for --json {args.json})")
    from waldo.eval.runner import run_eval
    from waldo.models.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model) if args.model else None
    if args.backbone_from and model_dir is not None:
        return _fail(BACKBONE_FROM_WITH_MODEL)
    metrics = run_eval(protocol=args.protocol, data=args.data, backbone=args.backbone,
                       backbone_from=resolve_model_dir(args.backbone_from) if args.backbone_from else None,
                       model_dir=model_dir, transform=args.transform, projection=args.projection,
                       dim=args.dim, pooling=args.pooling, global_dim=args.global_dim,
                       global_scales=args.global_scales, local_stage=args.local_stage,
                       batch_size=args.batch_size, num_workers=args.workers,
                       progress=not args.quiet, log_stages=not args.quiet, rerank=args.rerank,
                       fit_runtime=args.fit_runtime, colour_weight=args.colour_weight)
    print(f"{'protocol':<20} {'queries':>7} {'R@1':>7} {'R@10':>7} {'R@100':>7} {'mAP':>7}")
    if "global" in metrics:  # reranked: the global ranking first, for comparison
        baseline = metrics["global"]
        print(f"{'  global':<20} {baseline['n_queries']:>7} {baseline['recall@1']:7.4f} "
              f"{baseline['recall@10']:7.4f} {baseline['recall@100']:7.4f} {baseline['map']:7.4f}")
    print(f"{args.protocol:<20} {metrics['n_queries']:>7} {metrics['recall@1']:7.4f} "
          f"{metrics['recall@10']:7.4f} {metrics['recall@100']:7.4f} {metrics['map']:7.4f}")
    total = time.perf_counter() - started  # the stages' time, plus loading PyTorch and the model code
    print(f"total {total:.1f} s ({total - metrics['seconds']:.1f} s of it loading libraries)")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    if folder := _missing_folder(args.out):  # before reading and matching the images
        return _fail(f"folder {folder} does not exist (for -o {args.out})")
    from waldo.rerank.explain import explain_pair, save_png
    from waldo.rerank.gv import GVConfig

    explanation = explain_pair(args.query, args.candidate, height=args.height, show_outliers=args.outliers)
    out = save_png(explanation.picture, args.out)
    v = explanation.verification
    verdict = "verified" if GVConfig().verifies(v) else "not verified"
    cover = (f", covering {v.spread:.0%} of the query's keypoints' extent and "
             f"{explanation.candidate_spread:.0%} of the candidate's"
             if v.inliers else "")
    print(f"{v.inliers} inliers / {v.n_matches} matches ({v.inlier_ratio:.0%}), model {v.model}{cover}: {verdict}; "
          f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- serve
def _megabytes(text: str) -> int:
    return int(float(text) * 1024 * 1024)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from waldo.serve import ServeSettings, create_app

    from waldo.index.shards import is_sharded

    if args.engine == "ray" and not is_sharded(args.index):
        return _fail(f"{args.index} is a single index; `waldo serve --engine ray` serves sharded indexes "
                     f"(make one with `waldo index reshard --index {args.index} --shards N --out DIR`)")
    if not is_sharded(args.index) and not (Path(args.index) / "manifest.json").is_file():
        return _fail(f"{args.index} is not a Waldo index (no manifest.json); build one with `waldo index build`")
    # Only the flags given reach ServeSettings, which fills the rest from $WALDO_* (keeping the
    # API key out of `ps` listings), then from its defaults.
    flags = {name: getattr(args, name) for name in ServeSettings.model_fields if hasattr(args, name)}
    try:
        settings = ServeSettings(**flags)
    except ValidationError as error:  # the message names the setting, never its value (a key)
        return _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))
    if settings.allowed_hosts is None:
        # Host/Origin checks on by default for a loopback binding (DNS rebinding, cross-site
        # writes); a network binding allows any host unless --allowed-host names them.
        from waldo.serve.origin import default_allowed_hosts

        settings = settings.model_copy(update={"allowed_hosts": default_allowed_hosts(args.host)})
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    # Printed before the model loads so a person sees where to go; uvicorn reports readiness.
    print(f"waldo: serving {args.index} at http://{shown_host}:{args.port}/ (loading the model first; "
          f"Ctrl+C stops)", flush=True)
    if settings.api_key is not None:
        print("waldo: adding and removing images needs the API key in the X-API-Key header", flush=True)
    open_engine = None
    if args.engine == "ray":
        from functools import partial

        from waldo.serve.cluster import start_cluster

        where = f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "a local Ray"
        print(f"waldo: deploying {args.index} on Ray Serve ({where}; {args.replicas_per_shard} replica(s) per "
              f"shard, {args.model_replicas} of the query model)", flush=True)
        open_engine = partial(start_cluster, args.index, replicas_per_shard=args.replicas_per_shard,
                              model_replicas=args.model_replicas, model_max_replicas=args.model_max_replicas,
                              shard_cpus=args.shard_cpus,
                              model_cpus=args.model_cpus, shards_per_node=args.shards_per_node,
                              shard_timeout_s=args.shard_timeout,
                              lock_timeout=settings.write_wait_s, rrt_compile=settings.compile_rrt)
    uvicorn.run(create_app(args.index, settings, open_engine=open_engine), host=args.host, port=args.port,
                log_level=args.log_level, access_log=args.access_log)
    return 0


# ----------------------------------------------------------------------------- parser
def _add_extraction_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model forward pass")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="DataLoader worker processes that decode images (default: one per CPU but one, "
                             "at most 4; 0 decodes in this process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES, metavar="NAME",
                        help="how the model runs, one of: %(choices)s. eager: PyTorch; onnx: ONNX Runtime "
                             "(about 4x faster, 10-15 s to export); "
                             "compile: torch.compile (about 2x, 30-60 s to compile). All give the same "
                             "descriptors to float rounding. auto (default): onnx from 2000 images on (or from 200 when this model's export is cached), else eager")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Where `index build` / `index add` extract: this process, or Ray actors (a cluster)."""
    parser.add_argument("--engine", default="local", choices=ENGINES, metavar="NAME",
                        help="where images are described, one of: %(choices)s. local: this process and its "
                             "--workers; ray: a Ray Data pipeline of model "
                             "actors, on the cluster at $RAY_ADDRESS or a local Ray (needs waldo[ray])")
    parser.add_argument("--actors", type=int, default=None, metavar="N",
                        help="--engine ray: model actors (default: one per CPU of the Ray cluster)")


BACKBONE_FROM_WITH_MODEL = ("--backbone-from builds an untrained model on a trained backbone; --model uses a "
                            "checkpoint whole: give one or the other")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONE_NAMES, metavar="NAME",
                        help="ImageNet backbone of an untrained model, one of: %(choices)s")
    parser.add_argument("--model", default=None, metavar="DIR|NAME",
                        help="a trained checkpoint folder or a shipped model's name, e.g. lite0-rrt "
                             "(overrides --backbone and the untrained-model options; default: an untrained model)")
    parser.add_argument("--backbone-from", default=None, metavar="DIR|NAME",
                        help="an untrained model on a trained backbone: the shipped lite0-global or a "
                             "checkpoint folder (e.g. a `waldo train global` run's best/, whose heads are not "
                             "used); the projections are fitted without labels "
                             "as for --backbone (docs/results.md, \"A trained backbone under the untrained "
                             "default's projection\")")
    parser.add_argument("--dim", type=int, default=128, metavar="N",
                        help="local descriptor size of an untrained model (the RRT's tokens), or of the "
                             "--local-stage locals")
    parser.add_argument("--projection", default="views-whiten", choices=PROJECTIONS, metavar="NAME",
                        help="label-free projection of an untrained model, one of: %(choices)s. Default "
                             "views-whiten: 128-d PCA-whitened locals and a 1024-d global descriptor whitened "
                             "against how each photo varies under strong augmentation, no labels; pca-shrink: "
                             "the same width by a gently whitened PCA, faster to fit")
    parser.add_argument("--pooling", default=None, metavar="SPEC",
                        help=f"global pooling of an untrained model: {', '.join(POOLING_NAMES)}; gem learns "
                             f"its p, gem:P fixes it (default {DEFAULT_POOLING})")
    parser.add_argument("--global-scales", type=_scale_list, default=[], metavar="F,F",
                        help="a multi-scale global descriptor: extra input scales (factors of the image "
                             "size, e.g. 0.5,1.5) whose global descriptors are averaged with the input's; each "
                             "costs about F^2 of a single-scale extraction (default: single scale, for speed; "
                             "validation prefers 0.5,1.5 for the untrained default at 3.5x the cost: "
                             "docs/results.md)")
    parser.add_argument("--local-stage", type=int, default=None, metavar="N",
                        help="take the local descriptors from backbone stage N, a finer map than the last (4: "
                             "EfficientNet-Lite's 112 channels at stride 16, 14x14 cells at 224 px; use --dim 64 "
                             "or less), fitted without labels; offers the local-match reranker. With --model the "
                             "checkpoint keeps its descriptors and RRT, and the stage's cells are stored after "
                             "its locals as match cells")
    parser.add_argument("--colour-weight", type=float, default=None, metavar="W",
                        help="append each photo's colour signature (hue/saturation histogram) to its global "
                             "descriptor at weight W, so search, consensus and the RRT's global residual read "
                             "colour (default: the model's own, 0.75 for the shipped lite0-match-rrt, none for "
                             "an untrained model; 0 turns it off; docs/results.md \"The colour term's weight\")")
    parser.add_argument("--global-dim", type=int, default=None, metavar="N",
                        help=f"global descriptor size of an untrained model (default {DEFAULT_GLOBAL_DIM} with "
                             f"views-whiten or pca-shrink, else --dim)")


def _scale_list(text: str) -> list[float]:
    """``type=`` of ``--global-scales``: "0.75,1.25" -> [0.75, 1.25], checked by ModelConfig's rule
    (imported only when the flag is given: building the parser stays free of torch)."""
    try:
        factors = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected factors like 0.75,1.25, got {text!r}") from None
    from waldo.models.checkpoint import check_global_scales

    try:
        return check_global_scales(factors)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _reranker_name(text: str) -> str:
    """``type=`` of ``--rerank``: "none", a registered reranker or a composition "a+b", else
    the registry's error (it lists the known names) before any model loads."""
    from waldo.rerank import NO_RERANK, RERANKERS

    if text != NO_RERANK:
        try:
            RERANKERS.spec(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_rerank_flag(parser: argparse.ArgumentParser, what: str, default: str | None) -> None:
    """``--rerank`` naming every registered reranker, and the command's epilog listing each one
    with what it does and needs, from the registry (a new reranker module shows up here)."""
    from waldo.rerank import NO_RERANK, RERANKERS
    from waldo.rerank.base import NO_RERANK_DESCRIPTION

    names = [NO_RERANK, *RERANKERS.names()]
    parser.add_argument("--rerank", default=default, type=_reranker_name, metavar="NAME",
                        help=f"{what}: one of {', '.join(names)} (listed below), or 'a+b': a reorders, then b "
                             f"reranks a's order".replace("%", "%%"))
    entries = [f"  {NO_RERANK:<11} {NO_RERANK_DESCRIPTION}"]
    for spec in map(RERANKERS.spec, RERANKERS.names()):
        needs = "; ".join(sorted(need.value for need in spec.needs))
        entries.append(f"  {spec.name:<11} {spec.title}: {spec.description}." + (f" Needs {needs}." if needs else ""))
    parser.epilog = "rerankers (--rerank):\n" + "\n".join(entries).replace("%", "%%")


def _protocol_help() -> str:
    return f"named evaluation protocol (see ../shared/data/README.md), one of: {', '.join(protocol_names())}"


def build_parser() -> argparse.ArgumentParser:
    from waldo import __version__
    from waldo.rerank import NO_RERANK

    parser = Parser(prog="waldo", description="Instance-level image retrieval: index photos, search them with a "
                                              "photo, evaluate and train. `waldo COMMAND --help` describes each "
                                              "command.")
    parser.add_argument("--version", action="version", version=f"waldo {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", help="build and maintain a persistent index",
                                description="Build, grow, shrink, inspect and check an index folder.")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    build = index_commands.add_parser("build", help="index a dataset folder",
                                      description="Index every image of a folder into a new index: describe "
                                                  "each with the model (trained with --model, else fitted "
                                                  "without labels on the folder itself) and store the "
                                                  "descriptors, keypoints and metadata.")
    build.add_argument("--data", required=True, metavar="DIR",
                       help="a labels.csv folder (path,instance_id[,...]), a Stanford Online Products or "
                            "Products-10K root, an ImageFolder tree (one folder per identity) or any image folder")
    build.add_argument("--out", required=True, metavar="INDEX", help="the new index folder (must be empty or absent)")
    build.add_argument("--transform", default=None, choices=TRANSFORM_NAMES, metavar="NAME",
                       help="test-time transform preset, one of: %(choices)s (default: the model's, "
                            "resize256-crop224 for an untrained one)")
    build.add_argument("--where", action="append", metavar="COLUMN=V1,V2",
                       help="keep only images whose labels column has one of the values (repeatable; "
                            "default: every image)")
    build.add_argument("--local-features", default="orb-teblid", choices=LOCAL_FEATURE_KINDS, metavar="KIND",
                       help="keypoints stored for --rerank gv, one of: %(choices)s. orb-teblid (default): TEBLID "
                            "binary descriptors on ORB keypoints, ~19 KB/image; teblid: on SIFT keypoints "
                            "(slower to extract); sift: ~100 KB/image, as indexes before TEBLID; none: no "
                            "geometric verification")
    build.add_argument("--local-dtype", default="float16", choices=LOCAL_DTYPES, metavar="DTYPE",
                       help="how local descriptors are stored, one of: %(choices)s; int8 (+ a scale per "
                            "descriptor) halves them")
    build.add_argument("--global-index", default="Flat", metavar="FAISS_SPEC",
                       help="global search: Flat (exact, default) or an approximate faiss index such as "
                            "IVF4096,Flat or HNSW32 (for galleries of about a million images)")
    build.add_argument("--global-search-params", default=None, metavar="NAME=V[,NAME=V]",
                       help="default search parameters of --global-index: nprobe=N (IVF), efSearch=N (HNSW) "
                            "(default: faiss's)")
    build.add_argument("--shards", type=int, default=1, metavar="N",
                       help="split the index into N shards, each an ordinary index with its own copy of the "
                            "model; images go to a shard by a stable hash of their path, and searches cover "
                            "every shard (1: one ordinary index)")
    _add_model_flags(build)
    _add_extraction_flags(build)
    _add_engine_flags(build)
    build.set_defaults(handler=cmd_index_build)

    add = index_commands.add_parser("add", help="add images (files, folders or labels.csv)",
                                    description="Describe and add images to an index with the model that "
                                                "built it; images already indexed (same bytes) are skipped.")
    add.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    add.add_argument("inputs", nargs="+", metavar="PATH",
                     help="image files, image folders or labels.csv folders (their labels are kept)")
    add.add_argument("--identity", default=None,
                     help="identity label for single image files (default: none)")
    _add_extraction_flags(add)
    _add_engine_flags(add)
    add.set_defaults(handler=cmd_index_add)

    remove = index_commands.add_parser("remove", help="remove images by id or path")
    remove.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    remove.add_argument("--id", type=int, action="append", metavar="N",
                        help="image id to remove, as searches show it (repeatable)")
    remove.add_argument("--path", action="append", metavar="PATH",
                        help="indexed file path to remove, as stored (repeatable)")
    remove.set_defaults(handler=cmd_index_remove)

    info = index_commands.add_parser("info", help="what an index holds: counts, model, bytes, rerankers",
                                     description="Summarise an index: images and identities, the model, "
                                                 "storage per part (in all and per image), its keypoints, "
                                                 "the rerankers it supports and its default one.")
    info.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    info.add_argument("--json", action="store_true",
                      help="print everything the index reports (segments, manifest, faiss state) as JSON instead")
    info.set_defaults(handler=cmd_index_info)

    adapt = index_commands.add_parser(
        "adapt", help="train the reranker on the index's own photos (no labels; resumable)",
        description="Train the index's reranker on its own photos: each photo's positives are strong augmented "
                    "views of it, its negatives other photos of its global top-k. The descriptor model is kept, "
                    "so the stored descriptors stay valid. Resumable (rerun the command); the index changes only "
                    "when training ends, when its rrt.json/rrt.safetensors are replaced (waldo serve offers the "
                    "new reranker from its next start).")
    adapt.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    adapt.add_argument("--config", default=None, metavar="FILE",
                       help="an rrt-only RRTTrainConfig JSON (default: the built-in CPU recipe, fine-tuning the "
                            "index's RRT if it has one)")
    adapt.add_argument("--epochs", type=int, default=None, metavar="N",
                       help="override the config's epochs (default: the config's)")
    adapt.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="override the config's learning rate (default: the config's; without --config, 2e-4 "
                            "when fine-tuning the index's own reranker, the recipe's 2e-3 for a fresh one)")
    adapt.add_argument("--patience", type=int, default=None, metavar="N",
                       help="stop once N epochs in a row bring no better validation score (the best epoch is "
                            "installed either way); 0 runs every epoch (default: the config's; without "
                            "--config, 2, chosen on a validation collection)")
    adapt.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after N epochs in this call (resume later with the same command; "
                            "default: train to the end)")
    adapt.add_argument("--group-verified", action="store_true",
                       help="also use other photos of the same object as positives: photos whose global "
                            "neighbours geometric verification confirms are grouped (no labels read); needs "
                            "stored keypoints. Rerun with the same choice to resume")
    adapt.add_argument("--quiet", action="store_true", help="no progress bars")
    adapt.set_defaults(handler=cmd_index_adapt)

    check = index_commands.add_parser("check", help="verify an index's integrity",
                                      description="Check that the manifest, the descriptor arrays, the SQLite "
                                                  "catalogue and the checksums agree; exit 1 on a problem.")
    check.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    check.set_defaults(handler=cmd_index_check)

    compact = index_commands.add_parser(
        "compact", help="rewrite the index into one segment (reclaims removed rows)",
        description="Rewrite every image of the index into one segment and delete the old ones: reclaims the "
                    "space of removed images and merges the small segments adds leave (adds already merge "
                    "small segments as they go). Crash-safe; ids and search results are unchanged. Needs free "
                    "space for a copy of the index's descriptors.")
    compact.add_argument("--index", required=True, metavar="INDEX", help="the index folder")
    compact.add_argument("--json", action="store_true",
                         help="print segments before/after, rows reclaimed, images and seconds as JSON")
    compact.set_defaults(handler=cmd_index_compact)

    reshard = index_commands.add_parser(
        "reshard", help="copy an index into a new one of N shards (describes no image again)",
        description="Copy every image of an index (single or sharded) into a new index of N shards: descriptors, "
                    "keypoints and labels are copied, never extracted again, with the same model. Images go to "
                    "the shard that owns their path; ids change. The new index is built in a hidden folder and "
                    "renamed into place when complete.")
    reshard.add_argument("--index", required=True, metavar="SRC", help="the index folder to copy")
    reshard.add_argument("--shards", required=True, type=int, metavar="N",
                         help="shards of the new index (1: an ordinary single index)")
    reshard.add_argument("--out", required=True, metavar="DST", help="the new index folder (must not exist)")
    reshard.add_argument("--quiet", action="store_true", help="no progress bar")
    reshard.set_defaults(handler=cmd_index_reshard)

    search = commands.add_parser("search", help="query an index with a photo",
                                 description="The k indexed images most like a photo, best first: the global "
                                             "descriptor's nearest neighbours, reranked (see --rerank).")
    search.add_argument("image", metavar="IMAGE", help="the query photo (a JPEG, PNG, WebP, ... file)")
    search.add_argument("--index", required=True, metavar="INDEX", help="the index folder to search")
    search.add_argument("-k", type=int, default=10, metavar="K", help="how many results to show")
    search.add_argument("--model", default=None, metavar="DIR",
                        help="query with this model folder instead of the index's own (it must be the model "
                             "that built the index; default: the index's)")
    search.add_argument("--json", action="store_true",
                        help="print the response as JSON: the same object POST /search answers (results, "
                             "timings, k, rerank, score_kind, note)")
    _add_rerank_flag(search, "re-sort the global top-100 (the index must hold what the reranker needs; default: "
                             "the index's default reranker, the one its reranker's training chose on validation, "
                             "else none; `waldo index info` names it)", default=None)  # None: Waldo.default_reranker
    search.set_defaults(handler=cmd_search)

    evaluate = commands.add_parser("eval", help="evaluate retrieval on a named protocol",
                                   description="Describe a protocol's gallery and queries, search, optionally "
                                               "rerank, and print recall@1/10/100 and mAP.")
    evaluate.add_argument("--protocol", required=True, type=protocol_name, metavar="NAME", help=_protocol_help())
    evaluate.add_argument("--data", default=None, metavar="DIR",
                          help="dataset folder (default: the protocol's shared dataset)")
    evaluate.add_argument("--transform", default="resize256-crop224", choices=TRANSFORM_NAMES, metavar="NAME",
                          help="test-time transform preset, one of: %(choices)s")
    evaluate.add_argument("--json", default=None, metavar="OUT",
                          help="also write the metrics, with what produced them, to this JSON file (its folder "
                               "must exist)")
    _add_rerank_flag(evaluate, "re-sort each query's global top-100 (an RRT is read from --model)",
                     default=NO_RERANK)
    evaluate.add_argument("--fit-runtime", default="eager", choices=("eager", "onnx", "auto"), metavar="NAME",
                          help="how an untrained model's (or match cells') fit runs the backbone, one of: "
                               "%(choices)s (default eager, what the documented figures were fitted with; "
                               "index builds use auto, docs/performance.md)")
    _add_model_flags(evaluate)
    _add_extraction_flags(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    explain = commands.add_parser("explain", help="draw the geometric match of two images (PNG)",
                                  description="Verify two photos geometrically (the default local features, MAGSAC++) and "
                                              "draw them side by side with the inlier matches.")
    explain.add_argument("query", metavar="QUERY", help="the first image (the query)")
    explain.add_argument("candidate", metavar="CANDIDATE", help="the second image (the candidate)")
    explain.add_argument("-o", "--out", required=True, metavar="PNG",
                         help="the picture to write (its folder must exist)")
    explain.add_argument("--height", type=int, default=480, metavar="PX",
                         help="pixel height of each image in the picture")
    explain.add_argument("--outliers", action="store_true", help="also draw rejected matches (red)")
    explain.set_defaults(handler=cmd_explain)

    serve = commands.add_parser("serve", help="the search service and web page (FastAPI under uvicorn)",
                                description="Serve an index: the search page at / and the HTTP API "
                                            "(POST /search, POST /images, DELETE /images/{id}, GET /stats).")
    serve.add_argument("--index", required=True, metavar="INDEX", help="the index folder to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    # Unset flags stay out of the namespace, so that ServeSettings reads $WALDO_<SETTING> instead.
    from waldo.serve.settings import ServeSettings

    default = {name: field.default for name, field in ServeSettings.model_fields.items()}
    limits = serve.add_argument_group("service settings", "each also read from $WALDO_<SETTING> (e.g. "
                                      "WALDO_MAX_K, WALDO_MAX_UPLOAD_BYTES); a flag wins",
                                      argument_default=argparse.SUPPRESS)
    limits.add_argument("--max-upload-mb", dest="max_upload_bytes", type=_megabytes, metavar="MB",
                        help=f"largest upload accepted, in MB (default {default['max_upload_bytes'] / 2**20:g})")
    limits.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"largest width*height of an upload (default {default['max_pixels']:,})")
    limits.add_argument("--max-k", type=int, metavar="K",
                        help=f"largest k a search may ask for (default {default['max_k']})")
    limits.add_argument("--query-slots", type=int, metavar="N",
                        help=f"queries running the model at once (default {default['query_slots']})")
    limits.add_argument("--max-inflight-uploads", type=int, metavar="N",
                        help=f"requests with a body handled at once; more get 429 (bounds upload memory; "
                             f"default {default['max_inflight_uploads']})")
    limits.add_argument("--allowed-host", dest="allowed_hosts", action="append", metavar="HOST",
                        help="a host name the Host header may carry (repeat for several; * for any). Default: "
                             "localhost, 127.0.0.1 and ::1 when --host is a loopback address, else any")
    limits.add_argument("--write-wait", dest="write_wait_s", type=float, metavar="S",
                        help=f"seconds a write waits for its turn and for the index's write lock before 503 "
                             f"(default {default['write_wait_s']:g})")
    limits.add_argument("--decode-memory-mb", dest="decode_memory_bytes", type=_megabytes, metavar="MB",
                        help=f"memory all image decodes may hold at once, in MB "
                             f"(default {default['decode_memory_bytes'] / 2**20:g})")
    limits.add_argument("--api-key", metavar="KEY",
                        help="require this key (header X-API-Key) to add or remove images; default: "
                             "$WALDO_API_KEY, else no key. Searches stay open")
    limits.add_argument("--no-compile-rrt", dest="compile_rrt", action="store_false",
                        help="score RRT reranking in eager mode (starts 10-20 s sooner, queries about 2x slower)")
    cluster = serve.add_argument_group("serving a sharded index on Ray Serve (--engine ray)",
                                       "RAY_ADDRESS names the cluster; without it a local Ray starts")
    cluster.add_argument("--engine", default="local", choices=["local", "ray"],
                         help="local: this process searches the index (single or sharded); ray: a sharded "
                              "index's shards and the query model run as Ray Serve deployments, this process "
                              "is the ingress (default: local)")
    cluster.add_argument("--replicas-per-shard", type=int, default=1, metavar="N",
                         help="replicas of each shard's deployment; 2 or more keep a shard answering when one "
                              "dies (default 1)")
    cluster.add_argument("--model-replicas", type=int, default=1, metavar="N",
                         help="replicas of the query model's deployment (default 1)")
    cluster.add_argument("--model-max-replicas", type=int, default=None, metavar="N",
                         help="let the query model autoscale from --model-replicas up to N replicas with the load")
    cluster.add_argument("--shard-cpus", type=float, default=1.0, metavar="CPUS",
                         help="CPUs each shard replica reserves: how many shards share a node (default 1)")
    cluster.add_argument("--shards-per-node", type=int, default=None, metavar="N",
                         help="at most N shard replicas per node: each reserves the smallest node's CPUs / N "
                              "(overrides --shard-cpus)")
    cluster.add_argument("--model-cpus", type=float, default=1.0, metavar="CPUS",
                         help="CPUs each query-model replica reserves (default 1)")
    cluster.add_argument("--shard-timeout", type=float, default=10.0, metavar="S",
                         help="seconds a search waits for the shards; those that have not answered are left out "
                              "and the answer says partial: true (default 10)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       metavar="LEVEL", help="uvicorn's log level, one of: %(choices)s")
    serve.set_defaults(handler=cmd_serve)

    from waldo.train.cli_train import register_train_global, register_train_whiten

    train = commands.add_parser("train", help="train models (resumable)",
                                description="Train the global descriptor or the reranker; rerunning a command "
                                            "with the same --out resumes it.")
    train_commands = train.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    register_train_global(train_commands)
    register_train_whiten(train_commands)

    from waldo.train.cli_train_rrt import register_train_rrt

    register_train_rrt(train_commands)
    from waldo_experiments.cli import register_experiment  # the door to the studies, kept out of waldo/

    register_experiment(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
