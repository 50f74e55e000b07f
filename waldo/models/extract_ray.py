"""Descriptor extraction as a Ray Data pipeline: the same work as :mod:`waldo.models.extract`,
spread over a Ray cluster (or over a local Ray instance when none is configured).

Why a second engine: the in-process path decodes in DataLoader workers of one machine, so it
stops scaling at that machine's cores. Here the image list becomes a Ray dataset of
``(key, path)`` rows and a pool of actors, each holding the model, maps batches of rows to
descriptors; Ray places the actors on every node of the cluster. The driver (the process that
called :meth:`waldo.api.Waldo.add`) consumes the results in input order and writes the index
itself, because the index store has a single writer.

Choices, and why:

* **One stage: decode and model in the same actor.** A separate decoding stage would ship each
  decoded (3, 224, 224) float32 tensor (600 KB, more than the JPEG) through the object store to
  the model actors, and on CPU nodes it would compete with them for the same cores (an actor
  pool that takes every CPU can even starve it). With one stage, decoding and model work
  overlap *across* actors, as the DataLoader workers and the model do locally.
* **The model travels as its checkpoint files** (``config.json`` + ``model.safetensors``, as
  bytes), not as a pickled module: each actor rebuilds it with :func:`load_model` from the very
  bytes the driver checked against the index's model hash, and workers need no access to the
  index folder. The images, in
  contrast, are read by path: every worker must see them at the same path (a shared file
  system).
* **What comes back is plain arrays**: global (D,) float32, local (L, D) float16, an error
  string (empty when the image was read), and, when the index stores keypoints for geometric
  verification, each image's SIFT keypoints and descriptors as raw bytes, computed from the
  image the actor already decoded.
* **Bounded memory**: results are consumed with ``iter_batches`` and handed on in chunks of
  ``chunk_size`` consecutive inputs (each becomes one committed index segment), never collected
  whole. Identities and attributes never leave the driver; rows carry their input position
  (``key``), which is also the transform's per-image seed key, exactly as in the local path.

Unreadable images are reported and skipped with the same messages as the local path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from waldo.data.images import ImageLoadError, load_image

if TYPE_CHECKING:
    from waldo.models.keypoints import LocalFeatures, SiftConfig

#: The checkpoint files an actor needs to rebuild the model (see waldo.models.checkpoint).
MODEL_FILES = ("config.json", "model.safetensors")
#: Inputs per chunk handed to the caller (one index segment each): about 25 MB of descriptors,
#: plus about 100 KB per image of keypoints when the index stores them.
DEFAULT_CHUNK_SIZE = 2048
INSTALL_HINT = "pip install -e '.[ray]' in the Waldo checkout (the ray extra, pinned in pyproject.toml)"


@dataclass
class ExtractedChunk:
    """Results for the consecutive inputs ``start:stop``, in input order.

    ok: (stop - start,) bool, which of them were read; N = ok.sum().
    global_desc: (N, D) float32, L2-normalised.   local_desc: (N, L, D) float16.
    keypoints: per read image, its SIFT features (None when none were asked for).
    errors: (path, reason) for each input that was skipped.
    """

    start: int
    stop: int
    ok: np.ndarray
    global_desc: np.ndarray
    local_desc: np.ndarray
    keypoints: list[LocalFeatures] | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)


def import_ray():
    """``ray`` and ``ray.data``, or a RuntimeError that says how to install them (the CLI
    reports RuntimeErrors as one clear line instead of a traceback)."""
    try:
        import ray
        import ray.data  # the pipeline API is a separate import
    except ImportError as error:
        raise RuntimeError(f"the ray engine needs Ray Data, which is not installed ({error}); "
                           f"install it with: {INSTALL_HINT}") from error
    return ray


def ensure_ray(progress: bool = True) -> None:
    """Connect to Ray unless this process already did. With ``RAY_ADDRESS`` set,
    ``ray.init()`` joins that cluster; otherwise it starts a local instance with one CPU per
    core of this machine and no dashboard (nothing to look at for a batch job, and one server
    fewer). Worker output reaches this terminal unless ``progress`` is off (``--quiet``); the
    full logs stay in Ray's session folder either way."""
    ray = import_ray()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=progress, logging_level=logging.WARNING)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=progress, logging_level=logging.WARNING)


def read_model_files(folder: str | Path) -> dict[str, bytes]:
    """The bytes of a model folder's checkpoint files, to ship to actors."""
    folder = Path(folder)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a Waldo model folder (missing {', '.join(missing)})")
    return {name: (folder / name).read_bytes() for name in MODEL_FILES}


def load_model_files(files: dict[str, bytes]):
    """(model, config) from checkpoint bytes, through the project's own :func:`load_model`
    (safetensors and JSON only: nothing is unpickled)."""
    from waldo.models.checkpoint import load_model

    with tempfile.TemporaryDirectory(prefix="waldo-model-") as folder:
        for name, data in files.items():
            if name not in MODEL_FILES:
                raise ValueError(f"unexpected model file {name!r}; expected {MODEL_FILES}")
            (Path(folder) / name).write_bytes(data)
        return load_model(folder)


def _read_one(path: str, key: int, transform) -> tuple[Any, torch.Tensor | None, str]:
    """(decoded image, transformed tensor, "") or (None, None, reason): the local path's
    rules (waldo.models.extract._ImageFiles), so both engines skip and word errors alike."""
    try:
        image = load_image(path)
        return image, transform(image, key), ""
    except ImageLoadError as error:
        return None, None, str(error)
    except Exception as error:  # a transform failing on an odd image must not kill the run
        return None, None, f"{path}: {type(error).__name__}: {error}"


class DescriptorActor:
    """A Ray Data class-based UDF: built once per actor (loads the model), then called on
    batches of ``{"key", "path"}`` rows. Torch uses as many threads as the CPUs Ray gave the
    actor (Ray sets ``OMP_NUM_THREADS`` to the actor's ``num_cpus``)."""

    def __init__(self, model_files: dict[str, bytes], sift: dict | None = None, runtime: str = "eager",
                 batch_size: int = 32, images_per_actor: int = 0) -> None:
        from waldo.data.transforms import get_transform
        from waldo.models.compiled import prepare_runtime

        model, config = load_model_files(model_files)
        self.model = model.eval().to(memory_format=torch.channels_last)  # as the local path
        # As the local path too: "auto" weighs the export/compile cost against this actor's share.
        self.run_model = prepare_runtime(self.model, runtime, batch_size=batch_size, n_images=images_per_actor)
        self.dim = config.dim
        self.global_dim = config.descriptor_width
        self.local_cells = model.local_rows(config.image_size)
        self.transform = get_transform(config.transform, config.image_size)
        self.sift: SiftConfig | None = None
        if sift is not None:
            from waldo.models.keypoints import SiftConfig

            self.sift = SiftConfig.model_validate(sift)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = np.asarray(batch["key"], dtype=np.int64)
        paths = [str(p) for p in batch["path"]]
        n = len(keys)
        errors = np.full(n, "", dtype=object)
        tensors, rows, images = [], [], []
        for row, (key, path) in enumerate(zip(keys, paths)):
            image, tensor, message = _read_one(path, int(key), self.transform)
            if tensor is None:
                errors[row] = message
            else:
                tensors.append(tensor)
                rows.append(row)
                images.append(image)
        global_desc = np.zeros((n, self.global_dim), np.float32)
        local_desc = np.zeros((n, self.local_cells, self.dim), np.float16)
        if tensors:
            out = self.run_model(torch.stack(tensors).contiguous(memory_format=torch.channels_last))
            global_desc[rows] = out.global_desc.float().numpy()
            local_desc[rows] = out.local_desc.to(torch.float16).numpy()
        result = {"key": keys, "error": errors, "global_desc": global_desc, "local_desc": local_desc}
        if self.sift is not None:
            from waldo.models.keypoints import extract_sift

            keypoints = np.full(n, b"", dtype=object)
            descriptors = np.full(n, b"", dtype=object)
            for row, image in zip(rows, images):
                features = extract_sift(image, self.sift)  # = extract_sift_file(path): same loader
                keypoints[row] = np.ascontiguousarray(features.keypoints, np.float32).tobytes()
                descriptors[row] = np.ascontiguousarray(features.descriptors, np.uint8).tobytes()
            result["sift_keypoints"], result["sift_descriptors"] = keypoints, descriptors
        return result


def _features_from_bytes(keypoints: bytes, descriptors: bytes) -> LocalFeatures:
    from waldo.models.keypoints import LocalFeatures

    xy = np.frombuffer(keypoints, np.float32).reshape(-1, 2).copy()
    if len(xy) == 0:
        return LocalFeatures.empty()
    # Each keypoint's descriptor bytes (SIFT's 128 or TEBLID's 32): what the actor was asked for.
    return LocalFeatures(xy, np.frombuffer(descriptors, np.uint8).reshape(len(xy), -1).copy())


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Ray Data settings for one extraction, restored afterwards (they are process-global):
    results in input order, Ray's own progress bars off (the driver shows one bar over images),
    and its per-run INFO lines only when ``progress`` is on."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    loggers = {name: logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")}
    levels = {name: logger.level for name, logger in loggers.items()}
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    loggers["ray.data._internal.progress"].setLevel(logging.ERROR)  # "progress bars disabled": on purpose
    if not progress:
        loggers["ray.data"].setLevel(logging.WARNING)
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def default_actors(cpus_per_actor: float = 1.0) -> int:
    """One model actor per ``cpus_per_actor`` CPUs the cluster has now (at least one)."""
    ray = import_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))


def iter_extract_ray(model_folder: str | Path, paths: Sequence[str], *, sift: SiftConfig | None = None,
                     expected_hash: str | None = None, batch_size: int = 32, actors: int | None = None,
                     cpus_per_actor: float = 1.0, chunk_size: int | None = None, runtime: str = "auto",
                     progress: bool = True, description: str = "index (ray)") -> Iterator[ExtractedChunk]:
    """Extract descriptors of ``paths`` with the model saved in ``model_folder`` on Ray actors;
    yield them as :class:`ExtractedChunk` objects covering the inputs in order.

    ``actors`` model actors (default: one per ``cpus_per_actor`` CPUs of the cluster) each take
    ``batch_size`` images at a time. ``sift`` also computes keypoints for geometric
    verification. ``runtime``: how each actor runs the model (waldo.models.compiled.RUNTIMES;
    ``auto`` decides from the images each actor will see). With ``expected_hash``, the model files are checked here, before any actor
    starts, to be that very model (an actor that fails to start reaches the driver only as an
    opaque "actor died"). Connects to Ray first (see :func:`ensure_ray`). A failure inside the
    pipeline is raised as a RuntimeError naming its cause.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be at least 1, got {batch_size}, {chunk_size}")
    if actors is not None and actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    paths = [str(p) for p in paths]
    if not paths:
        return
    files = read_model_files(model_folder)
    if expected_hash is not None:
        from waldo.models.checkpoint import model_hash

        if model_hash(load_model_files(files)[0]) != expected_hash:
            raise ValueError(f"the model in {model_folder} is not the index's model (its hash differs)")
    ensure_ray(progress)
    ray = import_ray()
    import pyarrow as pa

    n = len(paths)
    # One input block per actor batch: blocks are what Ray hands out, so small blocks spread the
    # work evenly over the actors and keep little in flight.
    blocks = [pa.table({"key": np.arange(s, min(s + batch_size, n), dtype=np.int64), "path": paths[s:s + batch_size]})
              for s in range(0, n, batch_size)]
    wanted = actors if actors is not None else default_actors(cpus_per_actor)
    pool = min(wanted, len(blocks))  # an actor with no batch to take would only load the model
    with _data_context(progress):
        dataset = ray.data.from_arrow(blocks).map_batches(
            DescriptorActor,
            fn_constructor_kwargs={"model_files": files, "sift": sift.model_dump() if sift is not None else None,
                                   "runtime": runtime, "batch_size": batch_size,
                                   "images_per_actor": -(-n // pool)},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=cpus_per_actor)
        bar = tqdm(total=n, desc=description, unit="img", disable=not progress, leave=False)
        pending: dict[int, tuple] = {}  # key -> row: a reorder buffer (stays tiny: Ray keeps order)
        chunk_rows: list[tuple] = []
        next_key = 0
        for batch in _batches(dataset, batch_size):
            columns = [batch["key"], batch["error"], batch["global_desc"], batch["local_desc"]]
            if sift is not None:
                columns += [batch["sift_keypoints"], batch["sift_descriptors"]]
            for row in zip(*columns):
                pending[int(row[0])] = row
            while next_key in pending:
                chunk_rows.append(pending.pop(next_key))
                next_key += 1
                if len(chunk_rows) == chunk_size:
                    yield _chunk(chunk_rows, paths, sift is not None)
                    bar.update(len(chunk_rows))
                    chunk_rows = []
        if chunk_rows:
            yield _chunk(chunk_rows, paths, sift is not None)
            bar.update(len(chunk_rows))
        bar.close()
    if next_key != n or pending:
        raise RuntimeError(f"the Ray pipeline returned {next_key} of {n} images in order "
                           f"({len(pending)} out of order); nothing after image {next_key} was written")


def _batches(dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``dataset.iter_batches`` with Ray's failures (an actor that died, a task that raised)
    turned into a RuntimeError whose message is their cause: the CLI prints that one line, and
    the full Ray error stays chained for whoever debugs."""
    import ray.exceptions

    iterator = iter(dataset.iter_batches(batch_size=batch_size, batch_format="numpy"))
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ray.exceptions.RayError as error:
            lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
            raise RuntimeError(f"the Ray extraction failed: {lines[-1] if lines else type(error).__name__}") from error
        yield batch


def _chunk(rows: list[tuple], paths: Sequence[str], with_sift: bool) -> ExtractedChunk:
    start = int(rows[0][0])
    ok = np.array([not row[1] for row in rows], dtype=bool)
    good = [row for row in rows if not row[1]]
    dim = rows[0][2].shape[0]
    local_shape = rows[0][3].shape
    global_desc = np.stack([row[2] for row in good]).astype(np.float32, copy=False) if good \
        else np.zeros((0, dim), np.float32)
    local_desc = np.stack([row[3] for row in good]).astype(np.float16, copy=False) if good \
        else np.zeros((0, *local_shape), np.float16)
    keypoints = [_features_from_bytes(row[4], row[5]) for row in good] if with_sift else None
    errors = [(paths[int(row[0])], str(row[1])) for row in rows if row[1]]
    return ExtractedChunk(start, start + len(rows), ok, global_desc, local_desc, keypoints, errors)


__all__ = ["DEFAULT_CHUNK_SIZE", "DescriptorActor", "ExtractedChunk", "default_actors", "ensure_ray",
           "import_ray", "iter_extract_ray", "read_model_files"]
