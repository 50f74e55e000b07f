"""``waldo`` command line: a thin layer over the Python API.

    waldo index build --data DIR --backbone NAME --out INDEX
    waldo index add|remove|info|check ...
    waldo search IMAGE --index DIR -k 10
    waldo eval --data DIR --protocol NAME --backbone NAME [--transform NAME] [--json OUT]
    waldo eval --protocol NAME --model RERANKER_DIR --rerank rrt|rrt-fusion
    waldo eval --protocol NAME --rerank gv            (geometric verification; rrt+gv with --model)
    waldo explain QUERY CANDIDATE -o match.png        (inlier lines of a verification)
    waldo train rrt --protocol NAME --config FILE --init MODEL_DIR --mode frozen|finetune --out DIR
    waldo serve --index DIR [--host 127.0.0.1 --port 8000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"waldo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


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


def _print_errors(errors: list[tuple[str, str]], limit: int = 10) -> None:
    for path, message in errors[:limit]:
        print(f"  skipped {path}: {message}", file=sys.stderr)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more unreadable images", file=sys.stderr)


# ----------------------------------------------------------------------------- index
def cmd_index_build(args: argparse.Namespace) -> int:
    from waldo.api import Waldo

    image_set = _load_records(args.data, args.where)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        return _fail(f"{out} already exists and is not empty; use `waldo index add` to grow it")
    start = time.perf_counter()
    from waldo.models.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model) if args.model else None
    engine = Waldo.create(out, backbone=args.backbone, dim=args.dim, projection=args.projection,
                          pooling=args.pooling, global_dim=args.global_dim,
                          fit_paths=image_set.paths, fit_source=str(args.data), model_dir=model_dir,
                          transform=args.transform, progress=not args.quiet, local_dtype=args.local_dtype,
                          global_index=args.global_index, gv_features=args.local_features,
                          global_search_params=_parse_search_params(args.global_search_params))
    report = engine.add(image_set.paths, image_set.identities, [dict(r.attrs) for r in image_set.records],
                        batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet,
                        engine=args.engine, actors=args.actors, runtime=args.runtime)
    seconds = time.perf_counter() - start
    _print_errors(report.errors)
    print(f"indexed {len(report.added)} images into {out} in {seconds:.1f} s "
          f"({len(report.errors)} unreadable, {len(report.already_indexed)} duplicates skipped)")
    return 0


def cmd_index_adapt(args: argparse.Namespace) -> int:
    from waldo.train.adapt import adapt_index

    config = None
    if args.config:
        from waldo.train.config import RRTTrainConfig, load_config

        config = load_config(args.config, RRTTrainConfig)
    start = time.perf_counter()
    result = adapt_index(args.index, config=config, epochs=args.epochs, progress=not args.quiet,
                         stop_after=args.stop_after)
    seconds = time.perf_counter() - start
    if not result["installed"]:
        print(f"training paused after {seconds:.0f} s ({result['run']}); rerun the command to resume")
        return 0
    macro = result.get("validation") or {}
    figures = ", ".join(f"{name} R@1 {m['recall@1']:.3f}" for name, m in macro.items())
    print(f"adapted the reranker of {args.index} in {seconds:.0f} s; validation (augmented views of held-out "
          f"photos): {figures}; default reranker: {result.get('default_reranker')}")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from waldo.api import Waldo
    from waldo.data.datasets import load_dataset
    from waldo.data.images import IMAGE_EXTENSIONS

    engine = Waldo.open(args.index)
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
    report = engine.add(paths, identities, attrs, batch_size=args.batch_size,
                        num_workers=args.workers, progress=not args.quiet, engine=args.engine, actors=args.actors,
                        runtime=args.runtime)
    _print_errors(report.errors)
    print(f"added {len(report.added)} images ({len(report.already_indexed)} already indexed, "
          f"{len(report.errors)} unreadable); the index holds {len(engine)}")
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from waldo.api import Waldo

    if not args.id and not args.path:
        return _fail("give --id and/or --path")
    engine = Waldo.open(args.index)
    removed = engine.remove(ids=args.id or [], paths=args.path or [])
    print(f"removed {removed} images; the index holds {len(engine)}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from waldo.api import Waldo

    info = Waldo.open(args.index).info()
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_index_check(args: argparse.Namespace) -> int:
    from waldo.api import Waldo

    problems = Waldo.open(args.index).store.check()
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


# ----------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from waldo.api import Waldo
    from waldo.results import hits_json

    engine = Waldo.open(args.index, model_dir=args.model)
    outcome = engine.search(args.image, k=args.k, rerank=args.rerank)  # None: the index's default
    if args.json:  # the very list `POST /search` answers under "results"; which reranker ran on stderr
        print(json.dumps(hits_json(outcome.hits), indent=2))
        print(f"rerank: {outcome.rerank}" + (f" ({outcome.note})" if outcome.note else ""), file=sys.stderr)
        return 0
    stages = ", ".join(f"{stage} {ms:.0f}" for stage, ms in outcome.timings_ms.items())
    print(f"top {len(outcome.hits)} of {len(engine)} images for {args.image}, rerank {outcome.rerank} "
          f"(ms: {stages})")
    if outcome.note:
        print(f"note: {outcome.note}")
    verifying = any(hit.inliers is not None for hit in outcome.hits)
    print(f"{'rank':>4}  {'score':>6}  " + ("inliers  " if verifying else "") + f"{'identity':<10}  {'label':<24}  path")
    for hit in outcome.hits:
        evidence = ""
        if verifying:
            evidence = f"{hit.inliers:>7}{'*' if hit.verified else ' '} " if hit.inliers is not None else f"{'':>8} "
        print(f"{hit.rank:>4}  {hit.score:6.3f}  {evidence}{hit.identity:<10}  {hit.label:<24}  {hit.path}")
    if verifying:
        print("* verified by geometry")
    return 0


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from waldo.eval.runner import run_eval
    from waldo.models.shipped import resolve_model_dir

    model_dir = resolve_model_dir(args.model) if args.model else None
    metrics = run_eval(protocol=args.protocol, data=args.data, backbone=args.backbone,
                       model_dir=model_dir, transform=args.transform, projection=args.projection,
                       dim=args.dim, pooling=args.pooling, global_dim=args.global_dim,
                       batch_size=args.batch_size, num_workers=args.workers,
                       progress=not args.quiet, rerank=args.rerank)
    print(f"{'protocol':<20} {'queries':>7} {'R@1':>7} {'R@10':>7} {'R@100':>7} {'mAP':>7}")
    if "global" in metrics:  # reranked: the global ranking first, for comparison
        baseline = metrics["global"]
        print(f"{'  global':<20} {baseline['n_queries']:>7} {baseline['recall@1']:7.4f} "
              f"{baseline['recall@10']:7.4f} {baseline['recall@100']:7.4f} {baseline['map']:7.4f}")
    print(f"{args.protocol:<20} {metrics['n_queries']:>7} {metrics['recall@1']:7.4f} "
          f"{metrics['recall@10']:7.4f} {metrics['recall@100']:7.4f} {metrics['map']:7.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from waldo.rerank.explain import explain_pair, save_png
    from waldo.rerank.gv import GVConfig

    explanation = explain_pair(args.query, args.candidate, height=args.height, show_outliers=args.outliers)
    out = save_png(explanation.picture, args.out)
    v = explanation.verification
    verdict = "verified" if GVConfig().verifies(v) else "not verified"
    print(f"{v.inliers} inliers / {v.n_matches} matches ({v.inlier_ratio:.0%}), model {v.model}: {verdict}; "
          f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- serve
def _megabytes(text: str) -> int:
    return int(float(text) * 1024 * 1024)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from waldo.serve import ServeSettings, create_app

    if not (Path(args.index) / "manifest.json").is_file():
        return _fail(f"{args.index} is not a Waldo index (no manifest.json); build one with `waldo index build`")
    # Only the flags given reach ServeSettings, which fills the rest from $WALDO_* (keeping the
    # API key out of `ps` listings), then from its defaults.
    flags = {name: getattr(args, name) for name in ServeSettings.model_fields if hasattr(args, name)}
    try:
        settings = ServeSettings(**flags)
    except ValidationError as error:  # the message names the setting, never its value (a key)
        return _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    # Printed before the model loads so a person sees where to go; uvicorn reports readiness.
    print(f"waldo: serving {args.index} at http://{shown_host}:{args.port}/ (loading the model first; "
          f"Ctrl+C stops)", flush=True)
    if settings.api_key is not None:
        print("waldo: adding and removing images needs the API key in the X-API-Key header", flush=True)
    uvicorn.run(create_app(args.index, settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log)
    return 0


# ----------------------------------------------------------------------------- parser
def _add_extraction_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--runtime", default="auto", choices=("auto", "eager", "onnx", "compile"),
                        help="eager PyTorch; onnx: ONNX Runtime (about 4x faster, 10-15 s to export); "
                             "compile: torch.compile (about 2x, 30-60 s to compile). All give the same "
                             "descriptors to float rounding. auto: onnx from 2000 images on, else eager")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Where `index build` / `index add` extract: this process, or Ray actors (a cluster)."""
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="local: this process and its --workers; ray: a Ray Data pipeline of model "
                             "actors, on the cluster at $RAY_ADDRESS or a local Ray (needs waldo[ray])")
    parser.add_argument("--actors", type=int, default=None,
                        help="--engine ray: model actors (default: one per CPU of the Ray cluster)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    from waldo.models.untrained import DEFAULT_GLOBAL_DIM, DEFAULT_POOLING, PROJECTIONS

    POOLING_HELP = ("avg", "max", "gem (learnable p)", "gem:P (fixed p)")

    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--model", default=None,
                        help="a trained checkpoint folder or a shipped model's name, e.g. lite0-rrt "
                             "(overrides --backbone)")
    parser.add_argument("--dim", type=int, default=128, help="local descriptor size (the RRT's tokens)")
    parser.add_argument("--projection", default="views-whiten", choices=PROJECTIONS,
                        help="label-free projection of an untrained model (default views-whiten: 128-d "
                             "PCA-whitened locals; a 1024-d global descriptor whitened against how each "
                             "photo varies under strong augmentation, no labels; pca-shrink: the same "
                             "width by a gently whitened PCA, faster to fit)")
    parser.add_argument("--pooling", default=None, metavar="SPEC",
                        help=f"global pooling of an untrained model: {', '.join(POOLING_HELP)} "
                             f"(default {DEFAULT_POOLING})")
    parser.add_argument("--global-dim", type=int, default=None, metavar="N",
                        help=f"global descriptor size of an untrained model (default {DEFAULT_GLOBAL_DIM} with "
                             f"views-whiten or pca-shrink, else --dim)")


def _add_rerank_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--rerank``, listing every registered reranker with what it needs."""
    from waldo.rerank import NO_RERANK, RERANKERS

    listed = "; ".join(f"{spec.name}: {spec.description} [{', '.join(sorted(n.value for n in spec.needs))}]"
                       for spec in map(RERANKERS.spec, RERANKERS.names()))
    parser.add_argument("--rerank", default=NO_RERANK, metavar="NAME",
                        help=f"{what}: {NO_RERANK}, or 'a+b' (a reorders, then b reranks a's order) of: "
                             f"{listed}".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    from waldo import __version__

    parser = argparse.ArgumentParser(prog="waldo", description="Instance-level image retrieval.")
    parser.add_argument("--version", action="version", version=f"waldo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="build and maintain a persistent index")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="index a dataset folder")
    build.add_argument("--data", required=True, help="a labels.csv folder, SOP/Products-10K root or image folder")
    build.add_argument("--out", required=True, help="the new index folder")
    build.add_argument("--transform", default=None, help="test-time transform preset")
    build.add_argument("--where", action="append", metavar="COLUMN=V1,V2",
                       help="keep only images whose labels column has one of the values (repeatable)")
    build.add_argument("--local-features", default="orb-teblid", choices=("orb-teblid", "teblid", "sift", "none"),
                       help="keypoints stored for --rerank gv: TEBLID binary descriptors on ORB keypoints "
                            "(default, ~19 KB/image), on SIFT keypoints (slower to extract), SIFT (~100 KB/image, "
                            "as indexes before TEBLID), or none")
    build.add_argument("--local-dtype", default="float16", choices=("float16", "int8"),
                       help="how local descriptors are stored: int8 (+ a scale per descriptor) halves them")
    build.add_argument("--global-index", default="Flat", metavar="FAISS_SPEC",
                       help="global search: Flat (exact, default) or an approximate faiss index such as "
                            "IVF4096,Flat or HNSW32 (for galleries of about a million images)")
    build.add_argument("--global-search-params", default=None, metavar="NAME=V[,NAME=V]",
                       help="default search parameters of --global-index: nprobe=N (IVF), efSearch=N (HNSW)")
    _add_model_flags(build)
    _add_extraction_flags(build)
    _add_engine_flags(build)
    build.set_defaults(handler=cmd_index_build)

    add = index_commands.add_parser("add", help="add images (files, folders or labels.csv)")
    add.add_argument("--index", required=True)
    add.add_argument("inputs", nargs="+")
    add.add_argument("--identity", default=None, help="identity label for single image files")
    _add_extraction_flags(add)
    _add_engine_flags(add)
    add.set_defaults(handler=cmd_index_add)

    remove = index_commands.add_parser("remove", help="remove images by id or path")
    remove.add_argument("--index", required=True)
    remove.add_argument("--id", type=int, action="append")
    remove.add_argument("--path", action="append")
    remove.set_defaults(handler=cmd_index_remove)

    info = index_commands.add_parser("info", help="what an index holds")
    info.add_argument("--index", required=True)
    info.set_defaults(handler=cmd_index_info)

    adapt = index_commands.add_parser(
        "adapt", help="train the reranker on the index's own photos (no labels; resumable)",
        description="Train the index's reranker on its own photos: each photo's positives are strong augmented "
                    "views of it, its negatives other photos of its global top-k. The descriptor model is kept, "
                    "so the stored descriptors stay valid. Resumable (rerun the command); the index changes only "
                    "when training ends, when its rrt.json/rrt.safetensors are replaced (waldo serve offers the "
                    "new reranker from its next start).")
    adapt.add_argument("--index", required=True)
    adapt.add_argument("--config", default=None, help="an rrt-only RRTTrainConfig JSON (default: the built-in "
                                                      "CPU recipe, fine-tuning the index's RRT if it has one)")
    adapt.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    adapt.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after N epochs in this call (resume later with the same command)")
    adapt.add_argument("--quiet", action="store_true", help="no progress bars")
    adapt.set_defaults(handler=cmd_index_adapt)

    check = index_commands.add_parser("check", help="verify an index's integrity")
    check.add_argument("--index", required=True)
    check.set_defaults(handler=cmd_index_check)

    search = commands.add_parser("search", help="query an index with a photo")
    search.add_argument("image")
    search.add_argument("--index", required=True)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--model", default=None, help="must be the model that built the index")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    _add_rerank_flag(search, "re-sort the global top-100 (the index must hold what the reranker needs; "
                             "without --rerank, the index's default: the one its reranker's training "
                             "chose on validation, else none)")
    search.set_defaults(handler=cmd_search, rerank=None)  # None: Waldo.default_reranker

    evaluate = commands.add_parser("eval", help="evaluate retrieval on a named protocol")
    evaluate.add_argument("--protocol", required=True)
    evaluate.add_argument("--data", default=None, help="dataset folder (default: the protocol's shared dataset)")
    evaluate.add_argument("--transform", default="resize256-crop224")
    evaluate.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON")
    _add_rerank_flag(evaluate, "re-sort each query's global top-100 (an RRT is read from --model)")
    _add_model_flags(evaluate)
    _add_extraction_flags(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    explain = commands.add_parser("explain", help="draw the geometric match of two images (PNG)")
    explain.add_argument("query")
    explain.add_argument("candidate")
    explain.add_argument("-o", "--out", required=True, help="the PNG to write")
    explain.add_argument("--height", type=int, default=480, help="pixel height of each image in the picture")
    explain.add_argument("--outliers", action="store_true", help="also draw rejected matches (red)")
    explain.set_defaults(handler=cmd_explain)

    serve = commands.add_parser("serve", help="the search service and web page (FastAPI under uvicorn)")
    serve.add_argument("--index", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    # Unset flags stay out of the namespace, so that ServeSettings reads $WALDO_<SETTING> instead.
    from waldo.serve.settings import ServeSettings

    default = {name: field.default for name, field in ServeSettings.model_fields.items()}
    limits = serve.add_argument_group("service settings", "each also read from $WALDO_<SETTING> (e.g. "
                                      "WALDO_MAX_K, WALDO_MAX_UPLOAD_BYTES); a flag wins",
                                      argument_default=argparse.SUPPRESS)
    limits.add_argument("--max-upload-mb", dest="max_upload_bytes", type=_megabytes, metavar="MB",
                        help=f"largest upload accepted, in MB (default {default['max_upload_bytes'] / 2**20:g})")
    limits.add_argument("--max-pixels", type=int,
                        help=f"largest width*height of an upload (default {default['max_pixels']:,})")
    limits.add_argument("--max-k", type=int, help=f"largest k a search may ask for (default {default['max_k']})")
    limits.add_argument("--query-slots", type=int,
                        help=f"queries running the model at once (default {default['query_slots']})")
    limits.add_argument("--max-inflight-uploads", type=int,
                        help=f"requests with a body handled at once; more get 429 (bounds upload memory; "
                             f"default {default['max_inflight_uploads']})")
    limits.add_argument("--api-key", help="require this key (header X-API-Key) to add or remove images; default: "
                                          "$WALDO_API_KEY, else no key. Searches stay open")
    limits.add_argument("--no-compile-rrt", dest="compile_rrt", action="store_false",
                        help="score RRT reranking in eager mode (starts 10-20 s sooner, queries about 2x slower)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=cmd_serve)

    from waldo.train.cli_train import register_train_global, register_train_whiten

    train = commands.add_parser("train", help="train models (resumable)")
    train_commands = train.add_subparsers(dest="train_command", required=True)
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
