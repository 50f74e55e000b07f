"""Descriptor extraction through ONNX Runtime: the same fp32 model, about 2-2.5x faster than
torch.compile and 4-6x faster than eager PyTorch on this project's 2-core CPUs
(``benchmarks/extraction_speed.py`` measures all of them in one run).

Why it is faster: EfficientNet-Lite spends its time in depthwise convolutions and small 1x1
convolutions on small maps, where per-operator overhead and memory traffic dominate, not FLOPs.
ONNX Runtime's CPU provider folds every BatchNorm into its convolution, fuses the ReLU6/residual
work, and runs the whole network in a blocked channel layout (NCHWc) with kernels written for
exactly these shapes. Arithmetic stays fp32, so descriptors match eager ones to float rounding
(cosine 0.99999+, measured, and checked again on every run: see below).

How: the model is exported with the torch.export-based exporter (``torch.onnx.export(...,
dynamo=True)``; the older TorchScript exporter mis-exports timm's BatchNormAct2d, so it is not
used), the ONNX bytes are handed to an InferenceSession, one session per input size, any batch
size. Exporting costs about 10-20 s, so ``runtime="auto"`` exports only for runs of at least
``AUTO_ONNX_MIN_IMAGES`` images, and uses an export already cached for runs of at least
``AUTO_ONNX_CACHED_MIN_IMAGES`` (a small ``index add`` after the build); the exported bytes are kept in
``$WALDO_CACHE/onnx/`` (an ONNX protobuf, no pickle), keyed by a hash of the weights, the input
size and the torch/onnx versions, so the next build or add with the same model skips the export.
The cache is best effort: an unwritable cache folder only costs the export again.

Trust, but verify: the first batch of every input size runs through both the session and the
eager model, and unless every descriptor agrees (cosine >= ``MIN_AGREEMENT``) the run falls back
to eager with a warning. An exporter bug can then cost speed, never correctness. Any failure to
export or to create the session falls back the same way: a build must never fail because an
optimisation did.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from waldo.fsutil import atomic_write_bytes
from waldo.models.descriptor import DescriptorModel, Descriptors, pack_cells

__all__ = ["MIN_AGREEMENT", "OnnxBackboneMaps", "OnnxDescriptorModel", "onnx_available"]

log = logging.getLogger(__name__)

#: Smallest cosine between a session's descriptors and eager ones that lets the session be used.
MIN_AGREEMENT = 0.999


def onnx_available() -> bool:
    """Whether onnxruntime and the exporter's dependencies (onnx, onnxscript) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


class _MapsOnly(torch.nn.Module):
    """The descriptor model with plain tensor outputs: (global (B, G), local map (B, D, h, w)[, match
    cells' map (B, c, h2, w2) for a model with ``match_stage``])."""

    def __init__(self, model: DescriptorModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        if model.match_stage is not None:  # a third output: the match cells' map
            features, tapped = model.backbone.forward_tapped(images, model.match_stage)
            local = model.local_proj(features)
            global_desc = F.normalize(model.global_proj(model.pool(features)), dim=-1)
            return model.multiscale_global(images, global_desc), local, model.match_proj(tapped)
        if model.local_stage is None:
            features = model.backbone.forward_features(images)
            local = model.local_proj(features)
        else:
            features, tapped = model.backbone.forward_tapped(images, model.local_stage)
            local = model.local_proj(tapped)
        global_desc = F.normalize(model.global_proj(model.pool(features)), dim=-1)
        return model.multiscale_global(images, global_desc), local


def _export(make_wrapper, height: int, width: int, output_names: list[str]) -> bytes:
    """ONNX bytes of the module ``make_wrapper()`` builds, for (any batch, 3, height, width) fp32 input."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Export traces with autograd state; extraction itself runs under inference_mode, where
    # weights converted (e.g. to channels-last) become inference tensors that make the export
    # about twice as slow (measured 21 s against 10 s): export a plain copy (make_wrapper's).
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        wrapper = make_wrapper().eval()
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (torch.rand(2, 3, height, width),), dynamo=True, input_names=["images"],
                                    output_names=output_names, dynamic_shapes={"images": {0: batch}}, verbose=False)
    return program.model_proto.SerializeToString()


def export_onnx(model: DescriptorModel, height: int, width: int) -> bytes:
    """The descriptor model as ONNX bytes for (any batch, 3, height, width) fp32 input."""
    return _export(lambda: _MapsOnly(copy.deepcopy(model).to(memory_format=torch.contiguous_format)), height, width,
                   ["global", "local", "cells"][: 2 + (model.match_stage is not None)])


def _cached_export(path: Path | None, export) -> tuple[bytes, Path | None]:
    """The bytes cached at ``path``, or ``export()``'s, cached there now (best effort); and the
    cache file they came from (None when freshly exported)."""
    try:
        if path is not None and path.is_file():
            return path.read_bytes(), path
    except OSError:  # an unreadable cache only costs the export
        path = None
    onnx_bytes = export()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, onnx_bytes)
        except OSError as error:
            log.info("could not cache the ONNX export in %s (%s)", path, error)
    return onnx_bytes, None


#: Bumped when the exported graph changes (outputs, exporter settings): old cache files are ignored.
EXPORT_FORMAT = 1


def cache_path(model: DescriptorModel, height: int, width: int) -> Path:
    """Where the export of ``model`` for ``height`` x ``width`` input is cached."""
    import onnx

    from waldo.models.checkpoint import model_hash
    from waldo.paths import default_cache_root

    # The pooling is in the key: avg and max pooling have the same weights (and weights hash).
    # Global scales need no entry: model_hash covers them whenever a model has any.
    key = hashlib.sha256(f"{model_hash(model)}|{model.pooling}|{height}x{width}|torch {torch.__version__}|onnx {onnx.__version__}|"
                         f"format {EXPORT_FORMAT}".encode()).hexdigest()
    return default_cache_root() / "onnx" / f"descriptor-{key[:40]}.onnx"


def exported_onnx(model: DescriptorModel, height: int, width: int) -> tuple[bytes, Path | None]:
    """The ONNX bytes of ``model`` from the cache, or exported now (and cached); and the cache
    file they came from (None when freshly exported)."""
    try:
        path = cache_path(model, height, width)
    except OSError:
        path = None
    return _cached_export(path, lambda: export_onnx(model, height, width))


def _export_cached(model: DescriptorModel, height: int, width: int) -> bool:
    try:
        return cache_path(model, height, width).is_file()
    except (OSError, ImportError):
        return False


def _session(onnx_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: extraction's decoding workers share these cores,
    # and a spinning pool burns the cycles they need (7% faster extraction on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the optimiser's notices are not the user's business
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _forget(cached: Path | None) -> None:
    """Drop a cache file that failed (corrupt, or wrong): the next run exports afresh."""
    if cached is not None:
        cached.unlink(missing_ok=True)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row cosines; two (near-)zero rows agree (cosine 1), a zero row against a non-zero one does not."""
    a, b = a.float(), b.float()
    cos = F.cosine_similarity(a, b, dim=-1)
    both_zero = (a.norm(dim=-1) < 1e-6) & (b.norm(dim=-1) < 1e-6)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def _min_cosine(a: Descriptors, b: Descriptors) -> float:
    return min(float(_cosines(a.global_desc, b.global_desc).min()), float(_cosines(a.local_desc, b.local_desc).min()))


class _CheckedSessions:
    """One ONNX Runtime session per input size, made from an export (cached) on the first batch
    of that size and checked against eager there; eager for good after any failure (an export or
    session error, a disagreement, or with ``cached_only`` no cached export). Subclasses say what
    is exported and run (:meth:`_exported`, :meth:`_is_cached`, :meth:`_run_session`,
    :meth:`_eager`, :meth:`_agreement`) and how a fallback is worded (:meth:`_disabled`)."""

    def __init__(self, *, threads: int | None, verify: bool, cached_only: bool) -> None:
        #: use a session only where the export is already cached (no export cost): the choice of
        #: ``runtime="auto"`` for runs too small to pay for an export
        self.cached_only = cached_only
        self.threads = threads or torch.get_num_threads()
        self.verify = verify
        self._sessions: dict[tuple[int, int], object] = {}
        self._failed = False
        #: min cosine to eager measured on each input size's first batch (for reports and tests)
        self.agreement: dict[tuple[int, int], float] = {}
        #: seconds spent exporting, creating sessions and verifying them (not extracting)
        self.setup_seconds = 0.0

    @property
    def fell_back(self) -> bool:
        """Whether every batch from now on runs eager (no cached export, or a failure)."""
        return self._failed

    def _fallback(self, reason: str, images: torch.Tensor):
        warnings.warn(self._disabled(reason), RuntimeWarning, stacklevel=3)
        self._failed = True
        return self._eager(images)

    def __call__(self, images: torch.Tensor):
        if self._failed:
            return self._eager(images)
        size = (int(images.shape[2]), int(images.shape[3]))
        session = self._sessions.get(size)
        if session is not None:
            return self._run_session(session, images)
        if self.cached_only and not self._is_cached(*size):
            log.info("no cached ONNX export for %s px; running in eager mode", size)
            self._failed = True  # not a failure: too few images to pay for an export
            return self._eager(images)
        start = time.perf_counter()
        cached = None
        try:
            onnx_bytes, cached = self._exported(*size)
            session = _session(onnx_bytes, self.threads)
            self.setup_seconds += time.perf_counter() - start
            out = self._run_session(session, images)
        except Exception as error:  # noqa: BLE001 - an optimisation must never fail a build
            _forget(cached)
            return self._fallback(f"{type(error).__name__}: {error}", images)
        if self.verify:
            start = time.perf_counter()
            reference = self._eager(images)
            self.setup_seconds += time.perf_counter() - start
            self.agreement[size] = self._agreement(out, reference)
            if not self.agreement[size] >= MIN_AGREEMENT:
                _forget(cached)
                return self._fallback(f"its outputs differ from eager ones: min cosine "
                                      f"{self.agreement[size]:.6f} < {MIN_AGREEMENT}", images)
            log.info("ONNX Runtime session for %s px agrees with eager (min cosine %.6f)", size, self.agreement[size])
        self._sessions[size] = session
        return out


class OnnxDescriptorModel(_CheckedSessions):
    """Calls ``model`` through ONNX Runtime; behaves like ``DescriptorModel.__call__`` on batches
    of (B, 3, H, W) float images in [0, 1] and returns :class:`Descriptors` (float32)."""

    def __init__(self, model: DescriptorModel, *, threads: int | None = None, verify: bool = True,
                 cached_only: bool = False) -> None:
        super().__init__(threads=threads, verify=verify, cached_only=cached_only)
        self.model = model.eval()
        self.dim = model.dim
        self.global_dim = model.descriptor_width

    def _eager(self, images: torch.Tensor) -> Descriptors:
        return self.model(images)

    def _exported(self, height: int, width: int) -> tuple[bytes, Path | None]:
        return exported_onnx(self.model, height, width)

    def _is_cached(self, height: int, width: int) -> bool:
        return _export_cached(self.model, height, width)

    @staticmethod
    def _agreement(out: Descriptors, reference: Descriptors) -> float:
        return _min_cosine(out, reference)

    @staticmethod
    def _disabled(reason: str) -> str:
        return f"ONNX Runtime extraction disabled ({reason}); extracting in eager mode"

    def _run_session(self, session, images: torch.Tensor) -> Descriptors:
        array = np.ascontiguousarray(images.detach().float().contiguous().numpy())
        global_desc, local_map, *cells_map = session.run(None, {"images": array})
        b, d, h, w = local_map.shape
        local = torch.from_numpy(local_map).reshape(b, d, h * w).transpose(1, 2)
        if cells_map:  # match cells, packed after the locals as the eager model stores them
            cells = torch.from_numpy(cells_map[0]).flatten(2).transpose(1, 2)
            local = torch.cat([local, pack_cells(cells, d)], 1)
        # the colour signature is appended here, in torch: the export holds the model up to its global head
        return Descriptors(self.model.with_colour(images, torch.from_numpy(global_desc)), local, (h, w))


# ----------------------------------------------------------------------------- backbone maps
class _BackboneMaps(torch.nn.Module):
    """A backbone's raw maps as plain tensors: (last map,) or (last map, stage ``stage``'s map)."""

    def __init__(self, backbone: torch.nn.Module, stage: int | None) -> None:
        super().__init__()
        self.backbone, self.stage = backbone, stage

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.stage is None:
            return (self.backbone.forward_features(images),)
        return self.backbone.forward_tapped(images, self.stage)


def backbone_cache_path(backbone: torch.nn.Module, stage: int | None, height: int, width: int) -> Path:
    """Where the export of ``backbone``'s maps (and stage ``stage``'s) is cached. Keyed by the
    backbone's weights alone, so every untrained model on the ImageNet weights (and every
    checkpoint that kept them frozen) shares one export."""
    import onnx

    from waldo.models.checkpoint import model_hash
    from waldo.paths import default_cache_root

    key = hashlib.sha256(f"backbone {model_hash(backbone)}|stage {stage}|{height}x{width}|torch {torch.__version__}|"
                         f"onnx {onnx.__version__}|format {EXPORT_FORMAT}".encode()).hexdigest()
    return default_cache_root() / "onnx" / f"backbone-{key[:40]}.onnx"


class OnnxBackboneMaps(_CheckedSessions):
    """``backbone``'s maps through ONNX Runtime, for the passes that *fit* a model's projections
    (waldo.models.extract.extract_pooled_features, the untrained default's augmented views):
    ``(images) -> (last map, stage map or None)`` as eager ``forward_tapped`` /
    ``forward_features`` give them, to float rounding. The pooling and projections stay in
    PyTorch, so the export depends on the backbone's weights only and is cached once for every
    index built on them. Checked and fallen back from as :class:`OnnxDescriptorModel` (every
    image's maps at cosine >= ``MIN_AGREEMENT`` on the first batch of each size).
    ``cached_only``: use an export only if already cached."""

    def __init__(self, backbone: torch.nn.Module, stage: int | None = None, *, threads: int | None = None,
                 cached_only: bool = False) -> None:
        super().__init__(threads=threads, verify=True, cached_only=cached_only)
        self.backbone, self.stage = backbone.eval(), stage

    def _eager(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.stage is None:
            return self.backbone.forward_features(images), None
        return self.backbone.forward_tapped(images, self.stage)

    def _exported(self, height: int, width: int) -> tuple[bytes, Path | None]:
        return _cached_export(backbone_cache_path(self.backbone, self.stage, height, width), lambda: _export(
            lambda: _BackboneMaps(copy.deepcopy(self.backbone).to(memory_format=torch.contiguous_format), self.stage),
            height, width, ["last", "stage"][: 1 + (self.stage is not None)]))

    def _is_cached(self, height: int, width: int) -> bool:
        return backbone_cache_path(self.backbone, self.stage, height, width).is_file()

    @staticmethod
    def _agreement(out: tuple, reference: tuple) -> float:
        return min(float(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).min())
                   for a, b in zip(out, reference) if b is not None)

    @staticmethod
    def _disabled(reason: str) -> str:
        return f"ONNX Runtime for the backbone disabled ({reason}); running it in eager mode"

    @staticmethod
    def _run_session(session, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = session.run(None, {"images": np.ascontiguousarray(images.detach().float().contiguous().numpy())})
        return torch.from_numpy(outputs[0]), (torch.from_numpy(outputs[1]) if len(outputs) > 1 else None)
