"""Compiled descriptor extraction: the same model, through torch.compile (Inductor), fp32.

Why compile and not bf16: on this project's CPUs bf16 autocast made EfficientNet-Lite0 about 3x
faster but moved the descriptors too far (cosine to fp32 about 0.998 for globals and 0.98 for
the worst local, measured on grocery photos), while the issue asks for 0.999. Inductor with
*freezing* folds every BatchNorm into its convolution, fuses the ReLU6/residual elementwise work
into the convolutions' epilogues and prepacks the weights for oneDNN: fp32 arithmetic, so the
descriptors stay within float rounding of eager (cosine 0.99999+), at about 2x the eager
channels-last throughput (``benchmarks/extraction_speed.py`` measures both).

Costs: compiling takes tens of seconds on 2 cores (cached on disk by Inductor afterwards, so a
second run in the same environment starts faster), and needs a C++ compiler. Shapes are fixed:
every batch is padded to ``batch_size`` so the last, smaller batch does not trigger a second
compilation. Anything that goes wrong while compiling falls back to eager with a warning: a
build must never fail because an optimisation did.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings

import torch

from waldo.compiling import pad_rows, run_frozen
from waldo.models.descriptor import DescriptorModel, Descriptors

__all__ = ["AUTO_COMPILE_MIN_IMAGES", "AUTO_ONNX_CACHED_MIN_IMAGES", "AUTO_ONNX_MIN_IMAGES", "RUNTIMES", "CompiledDescriptorModel", "can_compile",
           "prepare_runtime"]

log = logging.getLogger(__name__)

#: ``eager``: PyTorch eager, channels-last; ``compile``: torch.compile with freezing;
#: ``onnx``: ONNX Runtime (waldo.models.onnx_runtime), the fastest on CPU;
#: ``auto``: for runs of at least ``AUTO_ONNX_MIN_IMAGES`` images ONNX Runtime if installed, else
#: compile from ``AUTO_COMPILE_MIN_IMAGES``; from ``AUTO_ONNX_CACHED_MIN_IMAGES`` ONNX Runtime
#: where this model's export is cached already (an earlier big run made it); eager below (all
#: give the same descriptors).
RUNTIMES = ("eager", "compile", "onnx", "auto")
#: Below these many images exporting (about 10-20 s) or compiling (about 30-60 s on 2 cores)
#: costs more than it saves.
AUTO_ONNX_MIN_IMAGES = 2000
AUTO_COMPILE_MIN_IMAGES = 3000
#: With the export cached, a session costs about a second to create and check against eager.
AUTO_ONNX_CACHED_MIN_IMAGES = 200


def can_compile() -> bool:
    """Inductor's CPU backend needs a C++ compiler on PATH."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


class CompiledDescriptorModel:
    """Calls a compiled copy of ``model`` on batches padded to ``batch_size``.

    Behaves like ``DescriptorModel.__call__`` for batches of at most ``batch_size`` images
    (channels-last float tensors in [0, 1]) and returns :class:`Descriptors` for the real rows.
    """

    def __init__(self, model: DescriptorModel, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.dim = model.dim
        self.global_dim = model.descriptor_width
        self._compiled = torch.compile(self.model, dynamic=False)
        self._failed = False
        #: seconds of the first call, which compiles (the extraction of one batch included)
        self.setup_seconds = 0.0

    def __call__(self, images: torch.Tensor) -> Descriptors:
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images is larger than the compiled batch size {self.batch_size}")
        if self._failed:
            return self.model(images)
        padded = pad_rows(images, self.batch_size).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        try:
            out = run_frozen(self._compiled, padded)
            if not self.setup_seconds:  # the first call compiled
                self.setup_seconds = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - an optimisation must never fail a build
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); extracting in eager mode",
                          RuntimeWarning, stacklevel=2)
            self._failed = True
            return self.model(images)
        return Descriptors(out.global_desc[:n], out.local_desc[:n], out.grid)


def prepare_runtime(model: DescriptorModel, runtime: str, *, batch_size: int, n_images: int):
    """The callable extraction should run: ``model`` itself (eager), an ONNX Runtime wrapper or
    a compiled wrapper."""
    from waldo.models.onnx_runtime import OnnxDescriptorModel, onnx_available

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "auto":
        if n_images >= AUTO_ONNX_MIN_IMAGES and onnx_available():
            runtime = "onnx"
        elif n_images >= AUTO_COMPILE_MIN_IMAGES and can_compile():
            runtime = "compile"
        elif n_images >= AUTO_ONNX_CACHED_MIN_IMAGES and onnx_available():
            return OnnxDescriptorModel(model, cached_only=True)  # eager unless the export is cached
        else:
            runtime = "eager"
    if runtime == "eager":
        return model
    if runtime == "onnx":
        if onnx_available():
            return OnnxDescriptorModel(model)
        warnings.warn("runtime 'onnx' needs onnxruntime, onnx and onnxscript (pip install them); "
                      "extracting in eager mode", RuntimeWarning, stacklevel=2)
        return model
    if not can_compile():
        warnings.warn("torch.compile needs a C++ compiler (g++/clang++); extracting in eager mode",
                      RuntimeWarning, stacklevel=2)
        return model
    return CompiledDescriptorModel(model, batch_size)
