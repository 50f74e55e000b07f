"""Issue 20: the sharded index served on Ray Serve with 1, 2 and 4 shards, on this machine.

For each shard count the source index (make demo's: grocery train + val + gallery, the shipped
lite0-rrt model, ORB+TEBLID keypoints) is resharded (rows copied, nothing described again) and
deployed with waldo.serve.cluster.start_cluster on a fresh local Ray: one query-model replica,
one replica per shard. Then, per ranking (global only; gv), ``--clients`` threads send searches
back to back for ``--seconds`` (after a warm-up) through ClusterEngine.search, the path
`waldo serve --engine ray` runs after decoding an upload: the model deployment describes the
query, every shard searches (and verifies) its own candidates, the ingress merges. Queries are
grocery test photos, decoded once beforehand at the service's query size.

Reported: queries/s, p50 / p95 latency, the per-shard search and rerank milliseconds (from the
shards' own timings), and the resident memory of each shard replica and of the model replica
(their processes' VmRSS, read from /proc: the replicas run on this machine).

    .venv/bin/python benchmarks/serve_shards.py                 # ~12 min; results/serve_shards.json
    .venv/bin/python benchmarks/serve_shards.py --doc           # docs/performance.md and docs/scaling.md from the JSON
    .venv/bin/python benchmarks/serve_shards.py --shards 1,2 --seconds 5 --out /tmp/s.json   # a quick check

On one 2-core machine every replica shares the same two cores: more shards cannot add
throughput here (each query costs N shard calls instead of one); what sharding buys is memory
and disk spread over machines. The table shows what that fan-out costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _report import machine_info  # noqa: E402

RESULTS = ROOT / "results" / "serve_shards.json"
DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- serve-shards:start -->", "<!-- serve-shards:end -->"
DATA = Path(os.environ.get("WALDO_DATA", ROOT.parent / "shared" / "data"))
BUILD = ["index", "build", "--data", str(DATA / "grocery_store"), "--where", "split=train,val,gallery",
         "--model", "lite0-rrt"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (this machine), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def queries(count: int) -> list:
    """``count`` grocery test photos, decoded at the service's query size (2048 px at most)."""
    from waldo.data.datasets import read_labels_csv
    from waldo.data.images import load_image

    records = [r for r in read_labels_csv(DATA / "grocery_store").records if r.attrs.get("split") == "test"]
    step = max(1, len(records) // count)
    return [load_image(r.path, max_side=2048) for r in records[::step][:count]]


def load(engine, images: list, rerank: str, clients: int, seconds: float, warmup: float) -> dict:
    """``clients`` threads searching back to back; latencies of the searches that started
    after ``warmup`` seconds and ended before ``warmup + seconds``."""
    latencies: list[float] = []
    per_shard: list[tuple[float, float]] = []
    extract: list[float] = []
    errors: list[str] = []
    partial = 0
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + seconds

    def client(offset: int) -> None:
        nonlocal partial
        i = offset
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            try:
                outcome = engine.search(images[i % len(images)], k=10, rerank=rerank)
            except Exception as error:  # noqa: BLE001 - counted, reported
                errors.append(repr(error))
                continue
            finally:
                i += clients
            ended = time.perf_counter()
            if started >= measure_from and ended <= stop_at:
                latencies.append((ended - started) * 1000)
                per_shard.append((outcome.timings_ms.get("search", 0.0), outcome.timings_ms.get("rerank", 0.0)))
                extract.append(outcome.timings_ms.get("extract", 0.0))
                partial += outcome.partial

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    n = engine.n_shards
    return {"rerank": rerank, "queries": len(latencies), "queries_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
            "shard_search_ms": round(statistics.mean(s for s, _ in per_shard) / n, 2),
            "shard_rerank_ms": round(statistics.mean(r for _, r in per_shard) / n, 2),
            "extract_ms_p50": round(percentile(extract, 50), 1),
            "partial": partial, "errors": len(errors), "first_error": errors[0] if errors else ""}


def run_layout(source: Path, shards: int, work: Path, images: list, args: argparse.Namespace) -> dict:
    from waldo.serve.cluster import start_cluster
    from waldo.sharded import reshard

    layout = work / f"shards-{shards}"
    if layout.exists():
        shutil.rmtree(layout)
    reshard(source, layout, shards, progress=False)
    if shards == 1:  # start_cluster serves sharded layouts: a 1-shard one is resharded as such
        shutil.rmtree(layout)
        from waldo.index.shards import create_sharded_dir

        create_sharded_dir(layout, 1, lambda folder, _: reshard(source, folder, 1, progress=False))
    log(f"{shards} shard(s): starting Ray Serve")
    started = time.perf_counter()
    engine = start_cluster(layout, replicas_per_shard=1, model_replicas=1, shard_cpus=1, model_cpus=1,
                           shard_timeout_s=60.0)
    start_s = time.perf_counter() - started
    try:
        runs = []
        for rerank in args.rerank.split(","):
            log(f"{shards} shard(s), rerank={rerank}: {args.clients} clients for {args.seconds:g} s")
            runs.append(load(engine, images, rerank, args.clients, args.seconds, args.warmup))
            log(f"  {runs[-1]}")
        single = []
        if shards == 1:  # the uncontended cost of one query: what the estimates of docs/scaling.md use
            for rerank in args.rerank.split(","):
                log(f"1 shard, rerank={rerank}: 1 client for {args.seconds / 2:g} s")
                single.append(load(engine, images, rerank, 1, args.seconds / 2, args.warmup))
                log(f"  {single[-1]}")
        info = engine.catalogue.info()
        shard_rss = [rss_mib(pid) for shard in range(shards) for pid in sorted(engine.replica_pids(shard, calls=4))]
        model_rss = [rss_mib(pid) for pid in sorted(engine.replica_pids(None, calls=4))]
        return {"shards": shards, "images": info["count"], "start_s": round(start_s, 1),
                "images_per_shard": [row["count"] for row in info["per_shard"]],
                "index_mib_per_shard": round(sum(info["bytes"].values()) / shards / 2**20, 1),
                "shard_rss_mib": shard_rss, "model_rss_mib": model_rss, "runs": runs, "single_client_runs": single}
    finally:
        engine.close()
        shutil.rmtree(layout, ignore_errors=True)


def markdown(results: dict) -> str:
    lines = [START, "",
             f"The {results['layouts'][0]['images']:,}-photo grocery index (`make demo`'s: the shipped lite0-rrt model, "
             f"ORB+TEBLID keypoints) resharded and served by `waldo.serve.cluster` on a local Ray, one replica per "
             f"shard and one query-model replica, all on this machine ({results['machine']['cpu_count']} cores). "
             f"{results['clients']} client threads search back to back for {results['seconds']:g} s per row "
             f"(grocery test photos decoded beforehand; k = 10). Per shard: the shard's own search and rerank time "
             f"per query; RSS: each replica process's resident memory.", "",
             "| shards | ranking | queries/s | p50 ms | p95 ms | per-shard search ms | per-shard rerank ms "
             "| RSS per shard replica MiB | model replica MiB | index MiB per shard | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layout in results["layouts"]:
        for run in layout["runs"]:
            lines.append(f"| {layout['shards']} | {run['rerank']} | {run['queries_per_s']:.2f} | {run['p50_ms']:.0f} "
                         f"| {run['p95_ms']:.0f} | {run['shard_search_ms']:.1f} | {run['shard_rerank_ms']:.1f} "
                         f"| {', '.join(f'{v:.0f}' for v in layout['shard_rss_mib'])} "
                         f"| {', '.join(f'{v:.0f}' for v in layout['model_rss_mib'])} "
                         f"| {layout['index_mib_per_shard']:.1f} | {run['errors']} |")
    starts = ", ".join(f"{layout['shards']}: {layout['start_s']:.0f} s" for layout in results["layouts"])
    single = [run for layout in results["layouts"] for run in layout.get("single_client_runs", [])]
    alone = "; ".join(f"{run['rerank']}: {run['queries_per_s']:.2f} queries/s, p50 {run['p50_ms']:.0f} ms, "
                      f"p95 {run['p95_ms']:.0f} ms" for run in single)
    lines += ["", f"One client at a time on the 1-shard layout: {alone}." if single else "",
              f"Time from `start_cluster` to every replica answering: {starts}. On one machine the shards "
                  f"share its cores, so more shards cannot add queries per second here: each query costs one call "
                  f"per shard, and the geometric reranker verifies each shard's own top-100 (N x 100 candidates). "
                  f"Sharding is for holding an index too big for one machine's memory and disk "
                  f"(docs/scaling.md). Produced by `{results['command']}` (results/serve_shards.json).", "", END]
    return "\n".join(lines)


SCALING_DOC = ROOT / "docs" / "scaling.md"
SCALING_START, SCALING_END = "<!-- scaling-estimates:start -->", "<!-- scaling-estimates:end -->"
#: The machine the estimates plan for (an assumption, stated in the table's text).
NODE = {"ram_gib": 64, "cores": 16, "ssd_tb": 2.0}
IMAGES_PER_SHARD = 5_000_000
INT8_LOCAL_BYTES = 49 * 128 + 49 * 2  # --local-dtype int8: 6,370 bytes (docs/performance.md, bytes per image)
PQ_BYTES = 64  # IVF-PQ with 64 one-byte codes per global descriptor (faiss "IVF16384,PQ64")


def scaling_markdown(results: dict, ann: dict) -> str:
    """docs/scaling.md's table: shards, nodes and expected latency for 10M / 100M / 1B images,
    from this benchmark's measured per-image bytes and per-shard costs and the 1M-vector search
    timings of benchmarks/ann_search.py."""
    per_image = results["source"]["bytes_per_image"]
    keypoint_bytes = per_image.get("keypoints", per_image.get("verification", 0.0))
    one = next(layout for layout in results["layouts"] if layout["shards"] == 1)
    runs = {run["rerank"]: run for run in one["single_client_runs"]}  # one query at a time: no contention
    flat_ms_per_million = next(c for c in ann["configs"] if c["spec"] == "Flat")["runs"][0]["single_ms_median"]
    ivf = next(c for c in ann["configs"] if c["spec"] == "IVF4096,Flat")["runs"][0]
    extract_ms = runs["none"]["extract_ms_p50"]
    rerank_ms = runs["gv"]["shard_rerank_ms"] if "gv" in runs else 0.0
    shard_disk_gb = IMAGES_PER_SHARD * (INT8_LOCAL_BYTES + keypoint_bytes) / 1e9
    shard_flat_gib = IMAGES_PER_SHARD * 512 / 2**30
    shard_pq_gib = IMAGES_PER_SHARD * PQ_BYTES / 2**30
    shard_rss_gib = max(one["shard_rss_mib"]) / 1024  # a replica's own memory besides its globals
    flat_ms = flat_ms_per_million * IMAGES_PER_SHARD / 1e6
    lines = [SCALING_START, "",
             f"Per image, measured on the benchmark's index (`waldo index info`, results/serve_shards.json): "
             f"global {per_image.get('global', 0):.0f} B, local descriptors {per_image.get('local', 0):,.0f} B "
             f"({results['source']['local_dtype']}; int8: {INT8_LOCAL_BYTES:,} B), keypoints {keypoint_bytes:,.0f} B. "
             f"A shard holds {IMAGES_PER_SHARD:,} images: its globals take {shard_flat_gib:.1f} GiB of RAM exact "
             f"(float32) or {shard_pq_gib:.2f} GiB as IVF-PQ ({PQ_BYTES} B codes), its reranking data "
             f"(int8 locals + keypoints) {shard_disk_gb:,.0f} GB of local SSD; a replica process needs about "
             f"{shard_rss_gib:.1f} GiB besides (measured RSS of a 1-shard replica, model and libraries included). "
             f"Nodes: {NODE['ram_gib']} GiB RAM, {NODE['cores']} cores, {NODE['ssd_tb']:g} TB NVMe; one core per "
             f"shard replica.", "",
             "| images | shards | reranking data | globals in RAM (exact / IVF-PQ) | nodes (exact / IVF-PQ) "
             "| expected p50, exact search | expected p50, IVF search |",
             "|---|---|---|---|---|---|---|"]
    for total in (10_000_000, 100_000_000, 1_000_000_000):
        shards = -(-total // IMAGES_PER_SHARD)
        disk_tb = total * (INT8_LOCAL_BYTES + keypoint_bytes) / 1e12
        flat_gib, pq_gib = total * 512 / 2**30, total * PQ_BYTES / 2**30
        nodes = []
        for shard_ram in (shard_flat_gib, shard_pq_gib):
            per_node = int(min(NODE["ram_gib"] // (shard_ram + shard_rss_gib), NODE["cores"] - 1,
                               NODE["ssd_tb"] * 1e3 // shard_disk_gb))
            nodes.append(-(-shards // max(1, per_node)))
        exact_p50 = extract_ms + flat_ms + rerank_ms
        ivf_p50 = extract_ms + ivf["single_ms_median"] * 2 + rerank_ms
        lines.append(f"| {total / 1e6:,.0f}M | {shards} | {disk_tb:,.1f} TB | {flat_gib:,.0f} / {pq_gib:,.0f} GiB "
                     f"| {nodes[0]} / {nodes[1]} | {exact_p50:,.0f} ms | {ivf_p50:,.0f} ms |")
    shard_query_ms = runs["none"]["shard_search_ms"] + rerank_ms
    lines += ["", f"Expected p50 = the query model ({extract_ms:.0f} ms) + one shard's search + its geometric "
                  f"reranking of 100 candidates ({rerank_ms:.0f} ms), the shards working in parallel; both measured "
                  f"with one query at a time on the 1-shard layout (results/serve_shards.json, single_client_runs). "
                  f"Every query visits every shard, so a cluster serves about {1000 / shard_query_ms:.1f} gv "
                  f"queries/s per core given to each shard (a shard replica per core): add replicas per shard "
                  f"for throughput, shards for size. Exact search of {IMAGES_PER_SHARD / 1e6:g}M float32 vectors: "
                  f"{flat_ms:,.0f} ms ({flat_ms_per_million:.1f} ms per million, benchmarks/ann_search.py, memory "
                  f"bandwidth bound); IVF: {ivf['single_ms_median'] * 2:.1f} ms (twice the "
                  f"{ivf['single_ms_median']:.2f} ms measured at 1M with IVF4096 nprobe {ivf['nprobe']}, recall@100 "
                  f"{ivf['recall@100']:.3f}, for a shard five times larger with four times the lists). p95: a query "
                  f"waits for its slowest shard, so with hundreds of shards the p95 approaches the per-shard p99; "
                  f"the shard timeout (`--shard-timeout`) bounds it, answering `partial: true`. Computed by "
                  f"`.venv/bin/python benchmarks/serve_shards.py --doc` from results/serve_shards.json and "
                  f"results/ann_search.json.", "", SCALING_END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/performance.md block from the JSON")
    parser.add_argument("--source", type=Path, default=None,
                        help="a single index to reshard (default: built into a temporary folder with make "
                             "demo's command)")
    parser.add_argument("--shards", default="1,2,4", help="comma-separated shard counts")
    parser.add_argument("--rerank", default="none,gv", help="comma-separated rankings to load")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--queries", type=int, default=64, help="distinct query photos")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (and --doc reads it)")
    args = parser.parse_args()
    if args.doc:
        from waldo_experiments.doc_blocks import write_block

        results = json.loads(args.out.read_text())
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "write_performance_doc.py")], check=True)
        write_block(SCALING_DOC, markdown(results), START, END, heading="## Measured on this machine")
        ann = json.loads((ROOT / "results" / "ann_search.json").read_text())
        write_block(SCALING_DOC, scaling_markdown(results, ann), SCALING_START, SCALING_END,
                    heading="## Estimates from measured costs")
        return 0
    with tempfile.TemporaryDirectory(prefix="serve-shards-") as tmp:
        work = Path(tmp)
        source = args.source
        if source is None:
            source = work / "source"
            log(f"building the source index: waldo {' '.join(BUILD)} --out {source}")
            subprocess.run([str(ROOT / ".venv" / "bin" / "waldo"), *BUILD, "--out", str(source), "--quiet"],
                           check=True)
        from waldo.index import IndexStore

        with IndexStore.open(source) as store:
            source_info = store.info()
        images = queries(args.queries)
        layouts = [run_layout(source, int(n), work, images, args) for n in args.shards.split(",")]
    command = " ".join([".venv/bin/python", "benchmarks/serve_shards.py", *(shlex.quote(a) for a in sys.argv[1:])])
    results = {"command": command, "machine": machine_info(), "clients": args.clients, "seconds": args.seconds,
               "warmup": args.warmup, "queries": args.queries,
               "source": {"images": source_info["count"], "bytes_per_image": source_info["bytes_per_image"],
                          "local_dtype": source_info["local_dtype"]},
               "layouts": layouts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
