"""``waldo index adapt``: train the reranker on an index's own photos, no labels needed.

Every indexed photo is its own identity (waldo.train.sources: an unlabelled source): positives
are strong augmented views of it, negatives the other photos of its global top-k and random
ones (waldo.train.pairs). The index's descriptor model stays as it is (waldo.train.rrt_online,
``rrt-only``), so the stored descriptors stay valid and only the reranker is new. When the index
already has an RRT (e.g. the shipped one), training starts from it, at the lower
:data:`FINETUNE_LR`.

The run lives in ``INDEX/adapt/`` (resumable: rerun the command; an interrupted run loses at
most the epoch in progress) and touches the index only at the end: the best checkpoint's
``rrt.safetensors`` then ``rrt.json`` replace the index's, each atomically, so a crash leaves
either the old reranker or the new one (a crash between the two files leaves a pair that does
not load: the reranker is withdrawn, search goes on, and rerunning the command installs it).
``waldo serve`` offers the new reranker, and its validated default, from its next start.
"""

from __future__ import annotations

from pathlib import Path

from waldo.train.config import RRTTrainConfig

__all__ = ["ADAPT_DEFAULTS", "FINETUNE_LR", "GROUP_NEIGHBOURS", "adapt_index", "verified_groups"]

#: The run's settings when the command names no config and the index has no reranker to start
#: from (the CPU recipe of configs/rrt-views-lw-cpu.json: the residual reads the index's own global
#: descriptor, which for a model whose global is as wide as its locals is the token itself).
ADAPT_DEFAULTS = {
    "mode": "rrt-only",
    "rrt": {"n_layers": 2, "ff_dim": 256, "use_global_tokens": True, "global_skip": True,
            "global_skip_from": "descriptor"},
    "anchors_per_epoch": 1024, "batch_triplets": 32, "epochs": 8, "lr": 2e-3, "warmup_steps": 50,
    "milestones": [0.75], "val_fraction": 0.1, "val_top_k": 100, "val_max_queries": 200, "negatives_top_k": 100,
    # Stop once 2 epochs bring no better held-out figure: on the validation collection of
    # experiments/adapt_patience.py it installs the same epoch (2 of 8) in 917 s instead of 1,627 s.
    "patience": 2,
}

#: The lr when adapt fine-tunes the index's own trained reranker (no config given): where the
#: shipped RRTs' training ended (the recipe's 2e-3 x gamma 0.1 after its milestone). Chosen over
#: the recipe's 2e-3 on a validation collection (experiments/adapt_lr.py: fold 0 of coil100-open's
#: training objects, make demo's model with its global head refitted without them): R@1 0.98 at
#: both, mAP 0.9522 against 0.9514 (a near tie; the rule, fixed before the run, took the higher).
FINETUNE_LR = 2e-4

ADAPT_FOLDER = "adapt"
#: Neighbours verified per photo by ``--group-verified``: on validation identities, verified pairs
#: in the global top-10 were the same object 98% (grocery) and 100% (coil100) of the time
#: (docs/results.md, "Verified neighbours as label-free positives?").
GROUP_NEIGHBOURS = 10


def verified_groups(index_dir: str | Path, *, neighbours: int = GROUP_NEIGHBOURS, progress: bool = True,
                    chunk: int = 256) -> tuple[dict[str, str], dict]:
    """Photos of an index that geometric verification says show the same object, as groups.

    Each photo's global top-``neighbours`` (itself left out) is verified with the index's stored
    keypoints and the product's "same object" claim (:meth:`waldo.rerank.gv.GVConfig.verifies`);
    verified pairs join their photos, and every connected set of two or more photos is a group.
    Returns ``({path: group name}, summary)``: photos in no group are left out. No labels are
    read. ValueError for an index that stores no keypoints."""
    import numpy as np

    from waldo.index.store import IndexStore
    from waldo.models.keypoints import unpack_features
    from waldo.rerank.gv import GeometricReranker, GVConfig

    config = GVConfig()
    with IndexStore.open(Path(index_dir)) as store:
        snapshot = store.snapshot()
        ids = np.asarray(snapshot.ids, np.int64)
        if len(ids) and snapshot.verification_features(ids[:1]) is None:
            raise ValueError(f"{index_dir} stores no keypoints; --group-verified needs an index built with local "
                             f"features (the default of `waldo index build`)")
        row_of = {int(image_id): row for row, image_id in enumerate(ids)}
        parent = list(range(len(ids)))

        def find(row: int) -> int:
            while parent[row] != row:
                parent[row] = parent[parent[row]]
                row = parent[row]
            return row

        edges = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="verify neighbours", unit="img")
        with GeometricReranker(config) as reranker:
            for start in range(0, len(ids), chunk):
                block = ids[start:start + chunk]
                found = snapshot.search(snapshot.global_descriptors(block), neighbours + 1)
                lists = [[int(i) for i in near if i >= 0 and int(i) != int(query_id)][:neighbours]
                         for query_id, near in zip(block, found.ids)]
                # Every photo the block touches (its own and its neighbours) read and unpacked once.
                wanted = sorted({int(i) for i in block} | {i for near in lists for i in near})
                features = dict(zip(wanted, unpack_features(snapshot.verification_features(wanted))))
                for query_id, near in zip(block, lists):
                    if not near:
                        continue
                    verifications = reranker.verify_many(features[int(query_id)], [features[i] for i in near])
                    for other, verification in zip(near, verifications):
                        if config.verifies(verification):
                            edges += 1
                            parent[find(row_of[int(query_id)])] = find(row_of[other])
                if bar is not None:
                    bar.update(len(block))
        if bar is not None:
            bar.close()
        paths = list(snapshot.paths)
    roots = [find(row) for row in range(len(ids))]
    sizes: dict[int, int] = {}
    for root in roots:
        sizes[root] = sizes.get(root, 0) + 1
    groups = {path: f"group-{root}" for path, root in zip(paths, roots) if sizes[root] > 1}
    summary = {"photos": len(ids), "neighbours": neighbours, "verified_pairs": edges,
               "groups": sum(1 for size in sizes.values() if size > 1), "grouped_photos": len(groups),
               "largest_group": max(sizes.values(), default=0)}
    return groups, summary


def adapt_index(index_dir: str | Path, *, config: RRTTrainConfig | None = None, epochs: int | None = None,
                lr: float | None = None, patience: int | None = None, progress: bool = True,
                stop_after: int | None = None,
                groups: dict[str, str] | None = None, group_verified: bool = False) -> dict:
    """Train (or resume) the index's reranker on its own photos, then install it (module doc).
    ``groups``: path -> a group name for photos known (without labels, e.g. by geometric
    verification: experiments/adapt_verified.py) to show the same object; photos of one group
    are each other's positives (and never negatives), every other photo stays its own identity.
    ``group_verified``: make those groups with :func:`verified_groups` (when ``groups`` is None).
    ``epochs`` / ``lr`` / ``patience``: override the config's (or the defaults'); ``patience=0``
    runs every epoch.
    Returns {"run": run folder, "installed": bool, and once installed "default_reranker",
    "validation" (macro figures), "epochs" (trained), "best_epoch" (installed; 0 = the reranker it
    started from) and "stopped_early"}."""
    from waldo.api import MODEL_FOLDER
    from waldo.data.datasets import ImageRecord, ImageSet
    from waldo.fsutil import atomic_write_bytes
    from waldo.index.store import IndexStore
    from waldo.rerank.rrt import RRTConfig
    from waldo.rerank.rrt_checkpoint import has_rrt, read_rrt_info
    from waldo.train.common import read_train_state
    from waldo.train.loop import STOPPED_EARLY, run_finished
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
    if group_verified and groups is None:
        groups, _ = verified_groups(root, progress=progress)
    run = root / ADAPT_FOLDER
    if (config is None and epochs is None and lr is None and patience is None
            and (run / "run" / "train_config.json").is_file()):
        # Rerunning the bare command resumes the run in progress as it was started (its --lr or
        # --config, or the defaults of the version that started it).
        from waldo.train.config import load_config

        config = load_config(run / "run" / "train_config.json", RRTTrainConfig)
    settings = dict(ADAPT_DEFAULTS) if config is None else config.model_dump()
    init_rrt = None
    if has_rrt(model_dir):
        existing = read_rrt_info(model_dir)["rrt"]
        if config is None:  # fine-tune the index's reranker in place of a fresh one, gently
            settings["rrt"], settings["lr"] = existing, FINETUNE_LR
        # compared as configs: an rrt.json written before a later option reads as that option's default
        if RRTTrainConfig(**settings).rrt_config() == RRTConfig.model_validate(existing):
            init_rrt = model_dir
    if epochs is not None:
        settings["epochs"] = epochs
    if lr is not None:
        settings["lr"] = lr
    if patience is not None:
        settings["patience"] = patience or None
    config = RRTTrainConfig.model_validate(settings)
    if groups:  # a labelled source whose identities are the groups, one of its own for every other photo
        images = ImageSet([ImageRecord(path=p, identity=groups.get(p, f"photo-{i}")) for i, p in enumerate(paths)],
                          root, root.name)
        source = TrainingSource(f"{root.name}:indexed photos, grouped", images, labelled=True)
    else:
        images = ImageSet([ImageRecord(path=p, identity="") for p in paths], root, root.name)
        source = TrainingSource(f"{root.name}:indexed photos", images, labelled=False)
    if init_rrt is not None and not (run / "init" / "rrt.json").is_file():
        # Starting from the index's reranker: keep a copy, so a resumed run starts from the same
        # one (not from the adapted one it installs). rrt.json last: its presence marks a whole copy.
        (run / "init").mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "rrt.safetensors", "rrt.json"):
            atomic_write_bytes(run / "init" / name, (model_dir / name).read_bytes())
    if (run / "init" / "rrt.json").is_file():
        init_rrt = run / "init"
    best = train_rrt_on_views(config, [source], model_dir, run / "run", cache_root=run / "cache", progress=progress,
                              stop_after=stop_after, allow_test_images=True, init_rrt=init_rrt, copy_model=False)
    state = read_train_state(run / "run" / "state")
    finished = run_finished(state, config) and state.extra.get("default_chosen")
    result = {"run": str(run), "installed": False}
    if finished:
        for name in ("rrt.safetensors", "rrt.json"):  # the json last: it names the weights' shape
            atomic_write_bytes(model_dir / name, (best / name).read_bytes())
        info = read_rrt_info(model_dir)["training"]
        result.update(installed=True, default_reranker=info.get("default_reranker"),
                      validation=info.get("fusion_val", {}).get("macro"), epochs=state.epoch,
                      best_epoch=state.best_epoch, stopped_early=bool(state.extra.get(STOPPED_EARLY)))
    return result
