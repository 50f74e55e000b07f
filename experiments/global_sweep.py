"""Issue 16 research sweep: pooling x projection x dimension on cached ImageNet feature maps.

Extracts each image's raw backbone feature map once (``cache/global-maps``, fp16 .npy), then
scores every pooling / projection / dimension on

- the *validation* twins of the training identities (waldo.data.protocols.VALIDATION_SPLITS:
  grocery's even classes test-split vs train/val photos; coil objects 1-50 views 0/90/180/270 vs
  >= 40 degrees away), which is what chooses, and
- the test protocols (grocery-open-cross, grocery-open, coil100-open), which are only reported.

Projections are fitted without labels on the protocol's training images (pooled vectors only).

    .venv/bin/python experiments/global_sweep.py maps          # ~6 min on 2 cores per scale
    .venv/bin/python experiments/global_sweep.py sweep --out results/global/sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from waldo.data.protocols import VALIDATION_SPLITS, get_protocol
from waldo.data.transforms import get_transform
from waldo.eval.metrics import retrieval_metrics
from waldo.models.checkpoint import ModelConfig, build_model
from waldo_experiments.doc_blocks import write_block

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "global-maps"
PROTOCOLS = ("grocery-open-cross", "grocery-open", "coil100-open")


def protocol_paths() -> list[str]:
    paths: dict[str, None] = {}
    for name in PROTOCOLS:
        p = get_protocol(name)
        for images in (p.train, p.queries, p.gallery):
            for record in images.records:
                paths[str(record.path)] = None
    return list(paths)


def extract_maps(size: int, backbone: str = "efficientnet_lite0") -> None:
    from torch.utils.data import DataLoader

    from waldo.models.extract import _collate, _ImageFiles

    paths = protocol_paths()
    out = CACHE / f"{backbone}-{size}.npy"
    if out.exists():
        print(f"{out} exists")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    model = build_model(ModelConfig(backbone=backbone, dim=128), pretrained=True).eval()
    resize = round(size * 256 / 224)
    transform = get_transform("resize256-crop224", size)
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=32, num_workers=1, collate_fn=_collate)
    maps = None
    with torch.inference_mode():
        for indices, batch, errors in tqdm(loader, desc=f"maps {size}px", unit="batch"):
            assert not errors, errors
            fmap = model.backbone.forward_features(batch.contiguous(memory_format=torch.channels_last))
            b, c, h, w = fmap.shape
            if maps is None:
                maps = np.lib.format.open_memmap(str(out) + ".part", "w+", np.float16, (len(paths), h * w, c))
            maps[indices] = fmap.flatten(2).transpose(1, 2).to(torch.float16).numpy()
    maps.flush()
    Path(str(out) + ".part").rename(out)
    (CACHE / f"{backbone}-{size}.json").write_text(json.dumps({"paths": paths, "resize": resize}))


def load_maps(size: int, backbone: str = "efficientnet_lite0") -> tuple[np.ndarray, dict[str, int]]:
    maps = np.load(CACHE / f"{backbone}-{size}.npy", mmap_mode="r")
    paths = json.loads((CACHE / f"{backbone}-{size}.json").read_text())["paths"]
    return maps, {p: i for i, p in enumerate(paths)}


def pool(maps: np.ndarray, how: str, chunk: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(maps), chunk):
        x = np.asarray(maps[start:start + chunk], np.float32)  # (B, L, C)
        if how == "avg":
            out.append(x.mean(1))
        elif how == "max":
            out.append(x.max(1))
        elif how.startswith("gem"):
            p = float(how[3:])
            out.append(np.power(np.power(np.clip(x, 1e-6, None), p).mean(1), 1.0 / p))
        else:
            raise ValueError(how)
    return np.concatenate(out)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


_EIGEN: dict = {}


def fit_projection(train: np.ndarray, dim: int, alpha: float, shrink: float, l2_first: bool) -> tuple:
    """Label-free PCA to ``dim``, each component scaled by (eigenvalue + shrink * mean)^-alpha
    (alpha 0: plain PCA, 0.5: whitening; shrinkage keeps weak components from being blown up)."""
    key = (id(train), train.shape, l2_first)
    if key not in _EIGEN:
        x = l2n(train) if l2_first else train
        mean = x.mean(0)
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov((x - mean).T))
        _EIGEN[key] = (mean, eigenvalues[::-1].copy(), eigenvectors[:, ::-1].copy(), train)
    mean, eigenvalues, eigenvectors, _ = _EIGEN[key]
    lam = np.clip(eigenvalues[:dim], 0, None)
    scale = (lam + shrink * lam.mean()) ** -alpha if alpha else np.ones_like(lam)
    return mean, (eigenvectors[:, :dim] * scale).astype(np.float32)


def project(x: np.ndarray, projection: tuple | None, l2_first: bool) -> np.ndarray:
    if projection is None:
        return l2n(x)
    mean, w = projection
    return l2n(((l2n(x) if l2_first else x) - mean) @ w)


def _print_row(row: dict) -> None:
    print(json.dumps({k: (v if not isinstance(v, dict) else f"{v['r1']:.4f}/{v['map']:.4f}")
                      for k, v in row.items()}), flush=True)


def _save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def score(q: np.ndarray, g: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, exclude_self: bool) -> dict:
    sims = q @ g.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : (len(g) - exclude_self)]
    matches = g_ids[order] == q_ids[:, None]
    n_pos = (g_ids[None, :] == q_ids[:, None]).sum(1) - exclude_self
    keep = n_pos > 0
    m = retrieval_metrics(matches[keep], n_pos[keep])
    return {"r1": m["recall@1"], "map": m["map"], "map100": m["map@100"], "n": int(keep.sum())}


def splits(index: dict[str, int]) -> dict[str, dict]:
    """name -> (train rows for fitting, query rows, gallery rows, query ids, gallery ids, loo)."""
    out = {}
    for name in PROTOCOLS:
        p = get_protocol(name)
        rows = lambda images: np.array([index[str(r.path)] for r in images.records])  # noqa: E731
        ids = lambda records: np.array([r.identity for r in records])  # noqa: E731
        rows_of = lambda records: np.array([index[str(r.path)] for r in records])  # noqa: E731
        out[name] = {"fit": rows(p.train), "q": rows(p.queries), "g": rows(p.gallery),
                     "qid": ids(p.queries.records), "gid": ids(p.gallery.records), "loo": p.leave_one_out}
        if name in VALIDATION_SPLITS:
            # Two folds over the training identities: the projection is fitted on one half's
            # images and the twin search runs on the other half, so validation (like the test)
            # searches identities the label-free fit never saw. Fitting on the searched
            # identities themselves would penalise whitening, which suppresses exactly the
            # directions that separate the identities it was fitted on.
            is_q, is_g = VALIDATION_SPLITS[name]
            tr = p.train.records
            identities = sorted({r.identity for r in tr})
            halves = [set(identities[0::2]), set(identities[1::2])]
            for fold, held in enumerate(halves):
                fit = [r for r in tr if r.identity not in held]
                q = [r for r in tr if r.identity in held and is_q(r)]
                g = [r for r in tr if is_g(r) and r.identity in held]
                out[f"val{fold}:{name}"] = {"fit": rows_of(fit), "q": rows_of(q), "g": rows_of(g),
                                            "qid": ids(q), "gid": ids(g), "loo": False}
    return out


def sweep(size: int, out: Path) -> None:
    maps, index = load_maps(size)
    sets = splits(index)
    poolings = ["avg", "max", "gem2", "gem3", "gem4"]
    projections = [("none", None)]
    for dim in (128, 256, 512, 1024):
        for alpha in (0.0, 0.25, 0.5):
            for shrink in ((0.0,) if alpha == 0 else (0.0, 0.1, 1.0)):
                projections.append((f"pca{dim}-a{alpha}-s{shrink}", (dim, alpha, shrink)))
    rows = []
    for how in poolings:
        t = time.time()
        pooled = pool(maps, how)
        print(f"pooled {how} in {time.time() - t:.0f}s", flush=True)
        train_of = {name: pooled[s["fit"]] for name, s in sets.items()}
        for l2_first in (False, True):
            for pname, params in projections:
                if pname == "none" and l2_first:
                    continue
                row = {"pooling": how, "projection": pname, "l2_first": l2_first}
                fitted = {}
                for sname, s in sets.items():
                    if params is None:
                        proj = None
                    else:
                        fkey = sname
                        if fkey not in fitted:
                            fitted[fkey] = fit_projection(train_of[fkey], *params, l2_first=l2_first)
                        proj = fitted[fkey]
                    q = project(pooled[s["q"]], proj, l2_first)
                    g = q if s["loo"] else project(pooled[s["g"]], proj, l2_first)
                    row[sname] = score(q, g, s["qid"], s["gid"], s["loo"])
                rows.append(row)
                _print_row(row)
    _save(out, {"size": size, "rows": rows})


def main() -> int:
    # command -> (what it runs with --size and --out, its default results file)
    studies = {"sweep": (sweep, "sweep.json"), "transfer": (transfer, "transfer.json"),
               "transductive": (transductive, "transductive.json"), "selfsup": (selfsup, "selfsup.json"),
               "views": (view_agreement, "view_agreement.json")}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("maps").add_argument("--size", type=int, default=224)
    sub.add_parser("doc")
    for name, (_, file) in studies.items():
        study = sub.add_parser(name)
        study.add_argument("--size", type=int, default=224)
        study.add_argument("--out", type=Path, default=ROOT / "results" / "global" / file)
        if name == "transductive":
            study.add_argument("--regime", choices=("searched", "own"), default="searched")
    args = parser.parse_args()
    if args.command == "doc":
        doc()
    elif args.command == "maps":
        extract_maps(args.size)
    elif args.command == "transductive":
        transductive(args.size, args.out, args.regime)
    else:
        studies[args.command][0](args.size, args.out)
    return 0


def transfer(size: int, out: Path) -> None:
    """Where the label-free fit comes from: the protocol's own training images, another
    collection's (grocery <-> coil), both, or (transductively) the searched images themselves."""
    maps, index = load_maps(size)
    sets = splits(index)
    grocery_fit, coil_fit = sets["grocery-open"]["fit"], sets["coil100-open"]["fit"]
    configs = [("avg", None)] + [(how, (dim, 0.25, shrink)) for how in ("avg", "gem2", "gem3")
                                 for dim in (256, 512, 1024) for shrink in (0.1, 1.0)]
    rows = []
    for how, params in configs:
        pooled = pool(maps, how)
        for fit_name in ("own", "other", "both", "searched"):
            row = {"pooling": how, "projection": "none" if params is None else f"pca{params[0]}-a{params[1]}-s{params[2]}",
                   "fit": fit_name}
            for name in PROTOCOLS:
                s = sets[name]
                own = s["fit"]
                other = coil_fit if name.startswith("grocery") else grocery_fit
                fit_rows = {"own": own, "other": other, "both": np.concatenate([grocery_fit, coil_fit]),
                            "searched": np.unique(np.concatenate([s["q"], s["g"]]))}[fit_name]
                proj = None if params is None else fit_projection(pooled[fit_rows], *params, l2_first=False)
                q = project(pooled[s["q"]], proj, False)
                g = q if s["loo"] else project(pooled[s["g"]], proj, False)
                row[name] = score(q, g, s["qid"], s["gid"], s["loo"])
            rows.append(row)
            _print_row(row)
            if params is None:
                break
    _save(out, {"size": size, "rows": rows})


def transductive(size: int, out: Path, regime: str = "searched") -> None:
    """An index fits its projection on the very images it searches (Waldo.create fits on the
    collection): score that, on the validation folds (which choose) and the tests (reported).
    ``regime="own"`` scores the same grid fitted on other identities (as ``sweep``)."""
    maps, index = load_maps(size)
    sets = splits(index)
    projections = [("none", None)] + [(f"pca{dim}-a{alpha}-s{shrink}", (dim, alpha, shrink))
                                      for dim in (128, 256, 512, 1024) for alpha in (0.25, 0.5)
                                      for shrink in (0.1, 1.0, 3.0, 10.0)]
    rows = []
    for how in ("avg", "gem2"):
        pooled = pool(maps, how)
        searched = {name: pooled[np.unique(np.concatenate([s["q"], s["g"]]))] for name, s in sets.items()}
        train_of = {name: pooled[s["fit"]] for name, s in sets.items()}
        for pname, params in projections:
            row = {"pooling": how, "projection": pname, "fit": regime}
            for name, s in sets.items():
                fit = searched[name] if regime == "searched" else train_of[name]
                proj = None if params is None else fit_projection(fit, *params, l2_first=False)
                q = project(pooled[s["q"]], proj, False)
                g = q if s["loo"] else project(pooled[s["g"]], proj, False)
                row[name] = score(q, g, s["qid"], s["gid"], s["loo"])
            rows.append(row)
            _print_row(row)
    _save(out, {"size": size, "rows": rows})


DOC = ROOT / "docs" / "results.md"
START, END = "<!-- global-sweep:start -->", "<!-- global-sweep:end -->"
SHOWN = [("avg", "none"), ("avg", "pca128-a0.25-s10.0"), ("avg", "pca512-a0.25-s10.0"), ("avg", "pca1024-a0.25-s0.1"),
         ("avg", "pca1024-a0.25-s1.0"), ("avg", "pca1024-a0.25-s10.0"), ("avg", "pca1024-a0.5-s10.0"),
         ("gem2", "none"), ("gem2", "pca1024-a0.25-s0.1"), ("gem2", "pca1024-a0.25-s10.0")]
DEFAULT_ROW = ("avg", "pca1024-a0.25-s10.0")


def _label(pooling: str, projection: str) -> str:
    pooling = {"avg": "avg", "max": "max"}.get(pooling, f"GeM p={pooling[3:]}")
    if projection == "none":
        return f"{pooling}, 1280-d, no projection"
    dim, alpha, shrink = projection[3:].split("-")
    return f"{pooling}, {dim}-d, power {alpha[1:]}, shrink {float(shrink[1:]):g}"


def _validation(row: dict, collection: str) -> float:
    folds = [row[k]["map"] for k in row if k.startswith("val") and collection in k]
    return sum(folds) / len(folds)


def doc() -> None:
    """Write docs/results.md's block "global-sweep" (:func:`block`)."""
    write_block(DOC, block(), START, END, heading="## Global descriptors: pooling and projection (issue 16)")


def block() -> str:
    """docs/results.md block "global-sweep" from results/global/*.json (no computation)."""
    folder = ROOT / "results" / "global"
    own = {(r["pooling"], r["projection"]): r for r in json.loads((folder / "inductive-grid.json").read_text())["rows"]}
    searched = {(r["pooling"], r["projection"]): r for r in json.loads((folder / "transductive.json").read_text())["rows"]}
    sweep = json.loads((folder / "sweep.json").read_text())["rows"]
    fmt = lambda m: f"{m['r1']:.4f} / {m['map']:.4f}"  # noqa: E731
    lines = [START, "", "Projection fitted on *other* images (an evaluation fits on the protocol's training "
             "images) and on the *searched* images themselves (an index fits on its own collection). "
             "Validation: mAP over two folds of each protocol's training identities, searched like its "
             "test (the projection fitted on the other fold's images, or on the searched fold itself); "
             "**`pca-shrink`'s setting is the best mean of the four validation columns**. Test: R@1 / mAP.", "",
             "| global descriptor | val grocery (other) | val coil (other) | val grocery (searched) | "
             "val coil (searched) | mean | grocery-open-cross (other) | coil100-open (other) | "
             "grocery-open-cross (searched) | coil100-open (searched) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in SHOWN:
        o, t = own[key], searched[key]
        vals = [_validation(o, "grocery"), _validation(o, "coil"), _validation(t, "grocery"), _validation(t, "coil")]
        name = _label(*key) + (" **(`pca-shrink`)**" if key == DEFAULT_ROW else "")
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {sum(vals) / 4:.4f} | "
                     f"{fmt(o['grocery-open-cross'])} | {fmt(o['coil100-open'])} | "
                     f"{fmt(t['grocery-open-cross'])} | {fmt(t['coil100-open'])} |")
    lines += ["", "Pooling alone (no projection; 1280-d), and with the projection the *other-images* "
              "validation prefers (1024-d, power 0.25, shrink 0.1):", "",
              "| pooling | projection | val grocery mAP | val coil mAP | grocery-open-cross | coil100-open | "
              "grocery-open (LOO) |", "|---|---|---|---|---|---|---|"]
    for row in sweep:
        if row["l2_first"] or row["projection"] not in ("none", "pca1024-a0.25-s0.1"):
            continue
        lines.append(f"| {_label(row['pooling'], 'none').split(',')[0]} | "
                     f"{'none' if row['projection'] == 'none' else '1024-d, power 0.25, shrink 0.1'} | "
                     f"{_validation(row, 'grocery'):.4f} | {_validation(row, 'coil'):.4f} | "
                     f"{fmt(row['grocery-open-cross'])} | {fmt(row['coil100-open'])} | {fmt(row['grocery-open'])} |")
    selfsup_file = folder / "selfsup.json"
    if selfsup_file.exists():
        data = json.loads(selfsup_file.read_text())["rows"]
        lines += ["", "Learned whitening **without labels** (`views-whiten`): each of 600 sampled photos and two "
                  "strong augmented views of it form one group (waldo.models.whitening), fitted on other images "
                  "(the protocol's training images; for validation the other fold) or on the searched images. "
                  "Validation mAP is the mean over both fits and both collections' folds, as in the first "
                  "table (`pca-shrink` default there: 0.8007; plain pooling 0.7929).", "",
                  "| setting | validation mean mAP | grocery-open-cross (other) | coil100-open (other) | "
                  "grocery-open (other) | grocery-open-cross (searched) | coil100-open (searched) |",
                  "|---|---|---|---|---|---|---|"]
        settings = sorted({tuple(r["setting"]) for r in data})
        best = max(settings, key=lambda st: np.mean([r["map"] for r in data
                                                     if tuple(r["setting"]) == st and r["set"].startswith("val")]))
        for st in settings:
            pick = {(r["set"], r["fit"]): r for r in data if tuple(r["setting"]) == st}
            val = np.mean([r["map"] for (name, _), r in pick.items() if name.startswith("val")])
            name = f"{st[0]}-d, shrink {st[1]:g}, mix {st[2]:g}" + (" **(default)**" if st == best else "")
            lines.append(f"| {name} | {val:.4f} | {fmt(pick[('grocery-open-cross', 'own')])} | "
                         f"{fmt(pick[('coil100-open', 'own')])} | {fmt(pick[('grocery-open', 'own')])} | "
                         f"{fmt(pick[('grocery-open-cross', 'searched')])} | {fmt(pick[('coil100-open', 'searched')])} |")
    agreement = folder / "view_agreement.json"
    if agreement.exists():
        data = json.loads(agreement.read_text())
        lines += ["", f"Label-free pooling choice tested: {data['n']} photos of each collection searched for by "
                  "a strong augmented view of themselves (waldo.data.views) among the whole collection "
                  "(1024-d shrunk whitening fitted on it). Self-retrieval MRR, against the labelled "
                  "validation mAP (other-images fit) of the same pooling:", "",
                  "| collection | pooling | view -> own photo R@1 | MRR | labelled validation mAP |",
                  "|---|---|---|---|---|"]
        by_key = {(r["pooling"], r["projection"]): r for r in sweep if not r["l2_first"]}
        for row in data["rows"]:
            collection = "grocery" if row["collection"].startswith("grocery") else "coil"
            labelled = _validation(by_key[(row["pooling"], "pca1024-a0.25-s0.1")], collection)
            lines.append(f"| {row['collection']} | {row['pooling']} | {row['self_r1']:.3f} | {row['self_mrr']:.3f} | "
                         f"{labelled:.4f} |")
    lines += ["", "Produced by `.venv/bin/python experiments/global_sweep.py maps` (ImageNet lite0 feature "
              "maps, 224 px, cached once), then `sweep` (results/global/sweep.json), `transductive` "
              "(transductive.json), `transductive --regime own` (inductive-grid.json), `selfsup` "
              "(selfsup.json), `views` (view_agreement.json) and `doc`. Computed "
              "in numpy from the cached maps with all training images as the fit; the product path's "
              "figures (1000 sampled fit images) are in the retrieval-core table above.", "", END]
    return "\n".join(lines)


def view_agreement(size: int, out: Path, n: int = 300) -> None:
    """The label-free pooling choice the issue suggests, tested: does an image's strong augmented
    view (waldo.data.views) find the image itself among its collection more often with one
    pooling than another, and does that order agree with the labelled validation's?"""
    from waldo.data.images import load_image
    from waldo.data.views import strong_view

    maps, index = load_maps(size)
    sets = splits(index)
    paths = {row: path for path, row in index.items()}
    model = build_model(ModelConfig(), pretrained=True).eval()
    rng = np.random.default_rng(0)
    rows = []
    for name in ("grocery-open-cross", "coil100-open"):
        s = sets[name]
        searched = np.unique(np.concatenate([s["q"], s["g"]]))
        sample = np.sort(rng.choice(searched, min(n, len(searched)), replace=False))
        views = torch.stack([strong_view(load_image(paths[i]), size, np.random.default_rng(int(i))) for i in sample])
        with torch.inference_mode():
            view_maps = torch.cat([model.backbone.forward_features(views[k:k + 50]) for k in range(0, len(views), 50)])
        view_maps = view_maps.flatten(2).transpose(1, 2).numpy()
        target = np.searchsorted(searched, sample)
        for how in ("avg", "gem2", "gem3", "max"):
            originals, viewed = pool(maps[searched], how), pool(view_maps, how)
            projection = fit_projection(originals, 1024, 0.25, 10.0, l2_first=False)
            sims = project(viewed, projection, False) @ project(originals, projection, False).T
            rank = (sims > sims[np.arange(len(sample)), target][:, None]).sum(1)
            rows.append({"collection": name, "pooling": how, "self_r1": float(np.mean(rank == 0)),
                         "self_mrr": float(np.mean(1 / (rank + 1)))})
            print(json.dumps(rows[-1]), flush=True)
    _save(out, {"size": size, "n": n, "rows": rows})


SELF_SETTINGS = ((512, 0.3, 0.0), (1024, 1.0, 0.0), (1024, 3.0, 0.0), (1024, 1.0, 0.5), (1024, 10.0, 0.0))


def view_features(rows: np.ndarray, paths: dict[int, str], size: int, views: int = 2) -> np.ndarray:
    """(views, len(rows), C) average-pooled ImageNet features of strong views of each row's
    image (seeded by row and view: a row's views are the same in every run), cached."""
    from waldo.data.images import load_image
    from waldo.data.views import strong_view

    cache = CACHE / f"views-{size}.npz"
    known: dict[tuple[int, int], np.ndarray] = {}
    if cache.exists():
        data = np.load(cache)
        known = {(int(r), int(k)): f for r, k, f in zip(data["rows"], data["views"], data["features"])}
    missing = [(int(r), k) for k in range(views) for r in rows if (int(r), k) not in known]
    if missing:
        model = build_model(ModelConfig(), pretrained=True).eval()
        for start in tqdm(range(0, len(missing), 50), desc="views", unit="batch"):
            chunk = missing[start:start + 50]
            batch = torch.stack([strong_view(load_image(paths[r]), size, np.random.default_rng([r, k, 5]))
                                 for r, k in chunk])
            with torch.inference_mode():
                pooled = model.backbone.forward_features(batch).mean(dim=(2, 3)).numpy()
            known.update({key: f for key, f in zip(chunk, pooled)})
        keys = sorted(known)
        np.savez(cache, rows=np.array([k[0] for k in keys]), views=np.array([k[1] for k in keys]),
                 features=np.stack([known[k] for k in keys]))
    return np.stack([[known[(int(r), k)] for r in rows] for k in range(views)])


def selfsup(size: int, out: Path, n: int = 600) -> None:
    """Self-supervised learned whitening (waldo.train.whitening on a photo and its strong views as
    one identity; no labels): fitted on other images and on the searched ones, validation folds
    (which choose) and tests (reported), as ``sweep`` and ``transductive`` score the untrained
    projections."""
    from waldo.train.whitening import WhiteningSetting, _describe, learned_projection

    maps, index = load_maps(size)
    sets = splits(index)
    paths = {row: path for path, row in index.items()}
    pooled = pool(maps, "avg").astype(np.float64)
    rng = np.random.default_rng(0)
    rows = []
    for name, s in sets.items():
        for regime in ("own", "searched"):
            fit = s["fit"] if regime == "own" else np.unique(np.concatenate([s["q"], s["g"]]))
            sample = np.sort(rng.choice(fit, min(n, len(fit)), replace=False))
            viewed = view_features(sample, paths, size)
            x = np.concatenate([pooled[sample], *viewed])
            groups = np.tile(np.arange(len(sample)), 1 + len(viewed))
            for dim, shrink, mix in SELF_SETTINGS:
                mean, projection = learned_projection(x, groups, pooled[fit], WhiteningSetting(dim, shrink, mix))
                q = _describe(pooled[s["q"]], mean, projection)
                g = q if s["loo"] else _describe(pooled[s["g"]], mean, projection)
                row = {"set": name, "fit": regime, "setting": [dim, shrink, mix],
                       **score(q, g, s["qid"], s["gid"], s["loo"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    _save(out, {"size": size, "n": n, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
