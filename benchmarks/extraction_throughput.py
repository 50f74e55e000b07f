"""Extraction throughput per backbone, next to the machine's measured compute limit.

Prints JSON: for each backbone, GFLOPs per 224 px image (counted by torch.utils.flop_counter),
images/s of the descriptor model at batch 32 (median over repeats, random input, eager fp32,
channels_last, inference_mode, large buffers kept in the heap as the product's eager passes keep
them: waldo.models.cpu_memory), the implied GFLOP/s, and its ratio to this machine's measured
fp32 matmul GFLOP/s. With ``--end-to-end`` also the images/s of the whole path over real grocery
photos (decode + transform in DataLoader workers + model).

    .venv/bin/python benchmarks/extraction_throughput.py --out results/extraction_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from waldo.models.backbones import create_backbone
from waldo.models.cpu_memory import reuse_large_buffers
from waldo.models.descriptor import DescriptorModel


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Peak-ish fp32 GEMM rate: median over repeats of an n x n x n matmul (2 n^3 FLOPs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_gflops(model: torch.nn.Module, image_size: int = 224) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def images_per_second(model: torch.nn.Module, batch: int, repeats: int, image_size: int = 224) -> float:
    x = torch.rand(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode(), reuse_large_buffers():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def end_to_end(model: torch.nn.Module, n_images: int, batch: int) -> float:
    from waldo.data.datasets import read_labels_csv
    from waldo.data.transforms import get_transform
    from waldo.models.extract import extract_descriptors
    from waldo.paths import dataset_dir

    paths = read_labels_csv(dataset_dir("grocery_store")).paths[:n_images]
    start = time.perf_counter()
    extract_descriptors(model, paths, get_transform("resize256-crop224"), batch_size=batch, progress=False)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time extraction of N real grocery photos")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    peak = matmul_gflops()
    report = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "matmul_fp32_gflops": round(peak, 1)},
              "batch": args.batch, "image_size": 224, "repeats": args.repeats, "backbones": {}}
    for name in args.backbones:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resnet50 random init: the timing is the same
            model = DescriptorModel(create_backbone(name, pretrained=name != "resnet50"), dim=128).eval()
        gflops = model_gflops(model)
        rate = images_per_second(model, args.batch, args.repeats)
        row = {"gflops_per_image": round(gflops, 3), "images_per_s": round(rate, 2),
               "achieved_gflops": round(rate * gflops, 1), "fraction_of_matmul_peak": round(rate * gflops / peak, 3)}
        if args.end_to_end:
            row["end_to_end_images_per_s"] = round(end_to_end(model, args.end_to_end, args.batch), 2)
        report["backbones"][name] = row
        print(f"{name}: {row}", flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
