"""Issue 7, extraction: the fast path against plain eager fp32, in the same run.

Model: EfficientNet-Lite0 (ImageNet weights) + the 128-d projections, 224 px, batch 32.
Variants, timed in interleaved rounds (A B C A B C ...) so that a noisy neighbour slows every
variant alike, median over rounds:

* ``eager-fp32`` (the baseline): PyTorch eager, contiguous NCHW, fp32, inference_mode;
* ``eager-fp32-channels-last``: the same in NHWC;
* ``eager-fp32-channels-last-reused``: NHWC with large buffers kept in the heap across the call
  (waldo.models.cpu_memory.reuse_large_buffers): what ``runtime="eager"`` runs;
* ``compile-fp32``: torch.compile with freezing (``runtime="compile"``, waldo.models.compiled);
* ``onnx-fp32``: ONNX Runtime, fp32 (``runtime="onnx"``, waldo.models.onnx_runtime);
* ``eager-bf16-autocast``: shown for the record (fast, but its descriptors drift past 0.999).

Each variant's descriptors of 32 real grocery photos are compared with the baseline's (smallest
cosine over globals and over locals). With ``--end-to-end N`` the whole build path is timed too
on N real photos: decoding alone (DataLoader workers, no model), then extract_descriptors with
each runtime (wall clock with and without the export or compilation, and how long the model
waited for decoded batches), to show whether decoding or the model is the limit; ONNX Runtime
twice, with an empty export cache and then with the one the first run filled. Exports go to
throw-away cache folders, so every export timed here is a cold one.

    .venv/bin/python benchmarks/extraction_speed.py --out results/extraction_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import emit_json, machine_info  # benchmarks/_report.py (run as scripts)

from waldo.data.datasets import read_labels_csv
from waldo.data.images import load_image
from waldo.data.transforms import get_transform
from waldo.models.backbones import create_backbone
from waldo.models.compiled import CompiledDescriptorModel
from waldo.models.cpu_memory import reuse_large_buffers
from waldo.models.descriptor import DescriptorModel
from waldo.models.onnx_runtime import OnnxDescriptorModel
from waldo.paths import dataset_dir

BASELINE = "eager-fp32"


def _photos(n: int, offset: int = 0) -> list[str]:
    paths = read_labels_csv(dataset_dir("grocery_store")).paths
    step = max(1, len(paths) // max(1, n))
    return paths[offset::step][:n]


@contextlib.contextmanager
def empty_export_cache():
    """Point $WALDO_CACHE at a throw-away folder (so ONNX exports are not found cached), then
    restore it."""
    before = os.environ.get("WALDO_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["WALDO_CACHE"] = cache
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("WALDO_CACHE", None)
            else:
                os.environ["WALDO_CACHE"] = before


def _batch(paths: list[str]) -> torch.Tensor:
    transform = get_transform("resize256-crop224")
    return torch.stack([transform(load_image(p), i) for i, p in enumerate(paths)])


def build_variants(model: DescriptorModel, batch: int) -> tuple[dict, dict[str, float]]:
    """name -> callable(images NCHW) -> Descriptors; plus the compile and export times in seconds."""
    eager = model.eval()
    channels_last = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    compiled = CompiledDescriptorModel(copy.deepcopy(model), batch)

    def cl(x):
        return channels_last(x.contiguous(memory_format=torch.channels_last))

    def cl_reused(x):
        with reuse_large_buffers():
            return cl(x)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = channels_last(x.contiguous(memory_format=torch.channels_last))
        return type(out)(out.global_desc.float(), out.local_desc.float(), out.grid)

    def comp(x):
        return compiled(x.contiguous(memory_format=torch.channels_last))

    onnx = OnnxDescriptorModel(copy.deepcopy(model), verify=False)  # agreement is measured below
    setup = {}
    with torch.inference_mode():
        start = time.perf_counter()
        comp(torch.rand(batch, 3, 224, 224))  # compiles here
        setup["compile_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        onnx(torch.rand(batch, 3, 224, 224))  # exports and creates the session here
        setup["onnx_export_seconds"] = round(time.perf_counter() - start, 1)
    variants = {BASELINE: eager, "eager-fp32-channels-last": cl, "eager-fp32-channels-last-reused": cl_reused,
                "compile-fp32": comp, "onnx-fp32": onnx,
                "eager-bf16-autocast": bf16}
    return variants, setup


def time_variants(variants: dict, batch: int, rounds: int) -> dict[str, list[float]]:
    x = torch.rand(batch, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn(x)
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return times


def agreement(variants: dict, images: torch.Tensor) -> dict[str, dict[str, float]]:
    with torch.inference_mode():
        outputs = {name: fn(images) for name, fn in variants.items()}
    ref = outputs[BASELINE]
    return {name: {"min_cosine_global": round(float(F.cosine_similarity(o.global_desc.float(), ref.global_desc, dim=-1).min()), 6),
                   "min_cosine_local": round(float(F.cosine_similarity(o.local_desc.float(), ref.local_desc, dim=-1).min()), 6)}
            for name, o in outputs.items()}


def end_to_end(model: DescriptorModel, n_images: int, batch: int) -> dict:
    from torch.utils.data import DataLoader

    from waldo.models.extract import _collate, _ImageFiles, default_workers

    paths = _photos(n_images, offset=1)
    transform = get_transform("resize256-crop224")
    workers = default_workers()
    start = time.perf_counter()
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=4 if workers else None)
    for _ in loader:
        pass
    decode = len(paths) / (time.perf_counter() - start)
    out = {"images": len(paths), "dataloader_workers": workers, "decode_only_images_per_s": round(decode, 1)}
    # onnx twice: first with an empty export cache (the export is paid), then with the cache the
    # first run filled (what a second build or add with the same model pays).
    runs = (("eager", "eager"), ("onnx", "onnx"), ("onnx-cached-export", "onnx"), ("compile", "compile"))
    with empty_export_cache():
        for name, runtime in runs:
            out[name] = _timed_build(model, paths, transform, batch, runtime)
    return out


def _timed_build(model: DescriptorModel, paths: list[str], transform, batch: int, runtime: str) -> dict:
    from waldo.models.extract import extract_descriptors

    t = extract_descriptors(copy.deepcopy(model), paths, transform, batch_size=batch, runtime=runtime,
                            progress=False).timings
    # setup = exporting (onnx, plus one eager batch to verify the session) or compiling; the
    # model-seconds include it; wall - model is the time spent waiting for decoded batches.
    return {"wall_seconds": round(t["wall"], 1), "setup_seconds": round(t["setup"], 1),
            "model_seconds": round(t["model"], 1), "waiting_for_decode_seconds": round(t["wall"] - t["model"], 1),
            "images_per_s": round(len(paths) / t["wall"], 1),
            "images_per_s_after_setup": round(len(paths) / (t["wall"] - t["setup"]), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N", help="also time the build path on N photos")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = DescriptorModel(create_backbone("efficientnet_lite0"), 128)
    with empty_export_cache():  # the export below is timed cold
        variants, setup = build_variants(model, args.batch)
    times = time_variants(variants, args.batch, args.rounds)
    close = agreement(variants, _batch(_photos(args.batch)))
    base = args.batch / statistics.median(times[BASELINE])
    result = {
        "machine": machine_info(),
        "backbone": "efficientnet_lite0", "image_size": 224, "batch": args.batch, "rounds": args.rounds,
        **setup, "baseline": BASELINE,
        "variants": {name: {"images_per_s": round(args.batch / statistics.median(t), 1),
                            "ratio_to_baseline": round(args.batch / statistics.median(t) / base, 2),
                            **close[name]} for name, t in times.items()},
    }
    if args.end_to_end:
        result["end_to_end"] = end_to_end(model, args.end_to_end, args.batch)
    return emit_json(result, args.out)


if __name__ == "__main__":
    main()
