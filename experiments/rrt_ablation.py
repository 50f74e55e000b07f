"""Issue 15 ablation: what the reranker learns from which pairs, on validation and on the tests.

Every variant trains the same small RRT (2 layers, feed-forward 256, global tokens) for the same
number of steps on the fixed base model's descriptors (runs/base-lite0, see rrt_views.py base),
with pairs from waldo.train.pairs' rules:

- ``pairs``: ``self`` (a positive is an augmented view of the anchor's own photo), ``labelled``
  (a real photo of its identity), ``both`` (half and half);
- ``skip``: with or without the residual global-similarity path (RRTConfig.global_skip);
- ``identities``: how many training identities (of grocery-open's 41 + coil100-open's 50) it sees;
- transfer: trained on grocery's training split only (or coil's), tested on both protocols.

Candidates are seen through augmented views made once (``--views`` per image, seeded): the
"cached views" setting (``online_views: false``); the online setting is the full trainer's
(``waldo train rrt``, configs/rrt-views-cpu.json), whose run is reported beside. Validation is
the trainer's (held-out training identities, searched like each protocol's test); the test
figures are reported and choose nothing.

    python experiments/rrt_ablation.py --out results/rrt_views/ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (name, pairs, skip, identities fraction, training source: None = both), most telling first
    ("self, skip", "self", True, 1.0, None),
    ("labelled, skip", "labelled", True, 1.0, None),
    ("both, skip", "both", True, 1.0, None),
    ("labelled, no skip", "labelled", False, 1.0, None),  # the seed's recipe, on these pairs
    # transfer: trained on one collection's training identities, tested on both protocols
    ("both, skip, grocery only", "both", True, 1.0, 0),
    ("both, skip, coil only", "both", True, 1.0, 1),
    ("both, skip, 25% identities", "both", True, 0.25, None),
    ("both, skip, 50% identities", "both", True, 0.5, None),
    ("self, no skip", "self", False, 1.0, None),
    ("both, no skip", "both", False, 1.0, None),
]


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from waldo.data.protocols import get_protocol
    from waldo.eval.metrics import retrieval_metrics
    from waldo.models.checkpoint import load_model
    from waldo.paths import default_cache_root
    from waldo.rerank.rrt import RerankingTransformer, RRTConfig
    from waldo.train.pairs import PairSampler, split_rows, top_k_neighbours, validation_sets
    from waldo.train.rrt_online import ViewMaker, ViewValidator, clean_descriptors
    from waldo.train.sources import parse_source, pool_sources
    from waldo.data.views import ViewAugment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/base-lite0")
    parser.add_argument("--out", default="results/rrt_views/ablation.json")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--variants", default="", help="semicolon-separated variant names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cache = default_cache_root()
    model, model_config = load_model(args.model)
    sources = [parse_source("grocery-open-cross"), parse_source("coil100-open")]
    pool = pool_sources(sources)
    global_desc, local_desc, ok = clean_descriptors(model, model_config, pool.paths, cache)
    held_out = split_rows(pool, 0.2, 0)
    sets = validation_sets(pool, held_out & ok, max_queries=150, seed=0)
    maker = ViewMaker(model, pool.paths, model_config.image_size, ViewAugment())
    grid = (model_config.image_size // model.backbone.stride,) * 2
    validator = ViewValidator(sets, pool, global_desc, local_desc, maker, top_k=100, seed=0, grid=grid)
    # the fixed views (the "cached views" setting), made once for every variant
    view_file = cache / "ablation-views" / f"{Path(args.model).name}-{args.views}.npz"
    if view_file.is_file():
        stored = np.load(view_file)
        view_global, view_local = stored["g"], stored["l"]
    else:
        rows = np.arange(len(pool))
        parts = [maker.describe(rows, [[0, 1000 + v, int(r)] for r in rows]) for v in range(args.views)]
        view_global = np.stack([g.half().numpy() for g, _ in parts], 1)
        view_local = np.stack([l_.half().numpy() for _, l_ in parts], 1)
        view_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(view_file, g=view_global, l=view_local)
    # the tests: descriptors of each protocol's queries and gallery, their global top-100
    tests = {}
    for name in ("grocery-open-cross", "coil100-open"):
        protocol = get_protocol(name)
        q_g, q_l, _ = clean_descriptors(model, model_config, protocol.queries.paths, cache)
        g_g, g_l, _ = clean_descriptors(model, model_config, protocol.gallery.paths, cache)
        vocab = {i: n for n, i in enumerate(sorted(set(protocol.queries.identities + protocol.gallery.identities)))}
        q_id = np.array([vocab[i] for i in protocol.queries.identities])
        g_id = np.array([vocab[i] for i in protocol.gallery.identities])
        top = np.argsort(-(q_g @ g_g.T), axis=1)[:, :100]
        tests[name] = {"q_g": q_g, "q_l": q_l.astype(np.float32), "g_g": g_g, "g_l": g_l, "top": top,
                       "matches": g_id[top] == q_id[:, None], "n_pos": (g_id[None, :] == q_id[:, None]).sum(1)}

    def test_metrics(rrt) -> dict:
        from waldo.rerank.base import RerankCandidates, RerankQuery
        from waldo.rerank.rrt_rerankers import RRTReranker

        out = {}
        rrt.eval()
        scorer = RRTReranker(rrt, grid=grid, precision="fp32")  # the serving scorer, fp32
        for name, t in tests.items():
            q, k = t["top"].shape
            scores = np.zeros((q, k), np.float32)
            for i in range(q):
                c = t["top"][i]
                scores[i] = scorer.logits(RerankQuery(t["q_l"][i], t["q_g"][i]),
                                          RerankCandidates(global_scores=t["q_g"][i] @ t["g_g"][c].T,
                                                           local_desc=t["g_l"][c], global_desc=t["g_g"][c]))
            order = np.argsort(-scores, axis=1, kind="stable")
            out[name] = {"global": retrieval_metrics(t["matches"], t["n_pos"], (1, 10)),
                         "rrt": retrieval_metrics(np.take_along_axis(t["matches"], order, 1), t["n_pos"], (1, 10))}
        return out

    wanted = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(";")]
    results = {"command": " ".join(["python", "experiments/rrt_ablation.py", *(argv or sys.argv[1:])]),
               "steps": args.steps, "batch_anchors": 32, "views": args.views, "variants": {}}
    out_path = Path(args.out)
    for name, pairs, skip, fraction, only_source in wanted:
        start = time.perf_counter()
        train = ok & ~held_out
        if only_source is not None:
            train &= pool.source == only_source
        if fraction < 1.0:  # keep a seeded fraction of each source's training identities
            rng = np.random.default_rng(5)
            keep = set()
            for index in range(len(pool.sources)):
                ids = np.unique(pool.identity[train & (pool.source == index)])
                keep |= set(rng.choice(ids, max(2, round(fraction * len(ids))), replace=False).tolist())
            train &= np.isin(pool.identity, list(keep))
        neighbours = top_k_neighbours(global_desc, np.flatnonzero(train), 100)
        real = {"self": 0.0, "labelled": 1.0, "both": 0.5}[pairs]
        sampler = PairSampler(pool, train, neighbours, seed=0, real_positive_prob=real, in_batch_negatives=True,
                              anchors_per_epoch=32 * args.steps)
        torch.manual_seed(0)
        config = RRTConfig(n_layers=2, ff_dim=256, use_global_tokens=True, global_skip=skip)
        rrt = RerankingTransformer(config)
        optimizer = torch.optim.AdamW(rrt.parameters(), lr=2e-3, weight_decay=4e-4)
        vrng = np.random.default_rng(1)
        losses = []
        rrt.train()
        for step, batch in enumerate(tqdm(sampler.epoch(0, 32), total=args.steps, desc=name, leave=False)):
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / 50)
            views = vrng.integers(args.views, size=len(batch.candidates))
            c_g = torch.from_numpy(view_global[batch.candidates, views].astype(np.float32))
            c_l = torch.from_numpy(view_local[batch.candidates, views].astype(np.float32))
            a_g = torch.from_numpy(global_desc[batch.anchors])
            a_l = torch.from_numpy(local_desc[batch.anchors].astype(np.float32))
            qa, qc = torch.from_numpy(batch.pair_anchor), torch.from_numpy(batch.pair_candidate)
            logits = rrt(a_l[qa], c_l[qc], grid=grid, query_global=a_g[qa], cand_global=c_g[qc])
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(batch.targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        validation = validator(rrt)
        entry = {"pairs": pairs, "global_skip": skip, "identities": int(len(np.unique(pool.identity[train]))),
                 "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
                 "validation": validation["macro"],
                 "validation_sets": {k: {m: v[m] for m in ("none", "rrt")} for k, v in validation["sets"].items()},
                 "test": test_metrics(rrt), "seconds": round(time.perf_counter() - start, 1)}
        results["variants"][name] = entry
        print(json.dumps({name: {"val R@1": {k: round(v["rrt"]["recall@1"], 3) for k, v in validation["sets"].items()},
                                 "test R@1": {k: round(v["rrt"]["recall@1"], 3) for k, v in entry["test"].items()}}}),
              flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
