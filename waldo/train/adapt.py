"""``waldo index adapt``: train the reranker on an index's own photos, no labels needed.

Every indexed photo is its own identity (waldo.train.sources: an unlabelled source): positives
are strong augmented views of it, negatives the other photos of its global top-k and random
ones (waldo.train.pairs). The index's descriptor model stays as it is (waldo.train.rrt_online,
``rrt-only``), so the stored descriptors stay valid and only the reranker is new. When the index
already has an RRT of the same shape (e.g. the shipped one), training starts from it.

The run lives in ``INDEX/adapt/`` (resumable: rerun the command; an interrupted run loses at
most the epoch in progress) and touches the index only at the end: the best checkpoint's
``rrt.safetensors`` then ``rrt.json`` replace the index's, each atomically, so a crash leaves
either the old reranker or the new one (a crash between the two files leaves a pair that does
not load: the reranker is withdrawn, search goes on, and rerunning the command installs it).
``waldo serve`` offers the new reranker, and its validated default, from its next start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from waldo.train.config import RRTTrainConfig

__all__ = ["ADAPT_DEFAULTS", "adapt_index"]

#: The run's settings when the command names no config (the CPU recipe of configs/rrt-views-cpu.json).
ADAPT_DEFAULTS = {
    "mode": "rrt-only",
    "rrt": {"n_layers": 2, "ff_dim": 256, "use_global_tokens": True, "global_skip": True},
    "anchors_per_epoch": 1024, "batch_triplets": 32, "epochs": 8, "lr": 2e-3, "warmup_steps": 50,
    "milestones": [0.75], "val_fraction": 0.1, "val_top_k": 100, "val_max_queries": 200, "negatives_top_k": 100,
}

ADAPT_FOLDER = "adapt"


def adapt_index(index_dir: str | Path, *, config: RRTTrainConfig | None = None, epochs: int | None = None,
                progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the index's reranker on its own photos, then install it (module doc).
    Returns {"run": run folder, "installed": bool, "default_reranker", "validation": macro figures}."""
    from waldo.api import MODEL_FOLDER
    from waldo.data.datasets import ImageRecord, ImageSet
    from waldo.fsutil import atomic_write_bytes
    from waldo.index.store import IndexStore
    from waldo.rerank.rrt_checkpoint import has_rrt, read_rrt_info
    from waldo.train.common import read_train_state
    from waldo.train.rrt_online import train_rrt_on_views
    from waldo.train.sources import TrainingSource

    root = Path(index_dir)
    model_dir = root / MODEL_FOLDER
    with IndexStore.open(root) as store:
        paths = [record.path for record in store.records()]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} indexed photos are no longer on disk (e.g. {missing[0]}); "
                                f"adapt reads the photos themselves")
    if len(paths) < 20:
        raise ValueError(f"{root} holds {len(paths)} photos; adapting needs at least 20")
    settings = dict(ADAPT_DEFAULTS) if config is None else config.model_dump()
    init_rrt = None
    if has_rrt(model_dir):
        existing = read_rrt_info(model_dir)["rrt"]
        if config is None:
            settings["rrt"] = existing  # fine-tune the index's reranker in place of a fresh one
        if settings["rrt"] == existing or RRTTrainConfig(**settings).rrt_config().model_dump() == existing:
            init_rrt = model_dir
    if epochs is not None:
        settings["epochs"] = epochs
    config = RRTTrainConfig.model_validate(settings)
    images = ImageSet([ImageRecord(path=p, identity="") for p in paths], root, root.name)
    source = TrainingSource(f"{root.name}:indexed photos", images, labelled=False)
    run = root / ADAPT_FOLDER
    if init_rrt is not None and (run / "state").exists() is False:
        # Starting from the index's reranker: keep a copy, so a resumed run starts from the same one.
        (run / "init").mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "rrt.json", "rrt.safetensors"):
            shutil.copyfile(model_dir / name, run / "init" / name)
    if (run / "init" / "rrt.json").is_file():
        init_rrt = run / "init"
    best = train_rrt_on_views(config, [source], model_dir, run / "run", cache_root=run / "cache", progress=progress,
                              stop_after=stop_after, allow_test_images=True, init_rrt=init_rrt, copy_model=False)
    state = read_train_state(run / "run" / "state")
    finished = state is not None and state.epoch == config.epochs and state.extra.get("default_chosen")
    result = {"run": str(run), "installed": False}
    if finished:
        for name in ("rrt.safetensors", "rrt.json"):  # the json last: it names the weights' shape
            atomic_write_bytes(model_dir / name, (best / name).read_bytes())
        info = read_rrt_info(model_dir)["training"]
        result.update(installed=True, default_reranker=info.get("default_reranker"),
                      validation=info.get("fusion_val", {}).get("macro"))
    return result
