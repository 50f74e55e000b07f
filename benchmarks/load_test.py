"""Load test of a live ``waldo serve``: N concurrent clients for T seconds, on loopback only.

Each client thread posts query photos to ``POST /search`` back to back; an optional extra
client adds new photos through ``POST /images`` meanwhile. Reported per rerank mode:
queries/s, p50/p95/p99 end-to-end latency (client side: upload, queueing, inference, JSON),
status counts, and afterwards a check that every add the server acknowledged is there
(retrievable by id, counted by /healthz, found first when searched with its own bytes).
The run stops by itself: at the deadline or after ``--max-requests`` per client.

    # start a server on the index, test it, stop it (the usual way):
    .venv/bin/python benchmarks/load_test.py --index demo-index --clients 4 --seconds 20 \\
        --queries ../shared/data/grocery_store/dataset/test --rerank none,rrt,gv
    # or against a server already running on this machine:
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --queries PHOTOS_DIR

Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from waldo.data.images import list_images

__all__ = ["LoadReport", "check_loopback", "run_load"]


@dataclass
class LoadReport:
    """One mode's run. Latencies in ms over successful queries; ``lost_adds`` counts adds the
    server acknowledged (201, created) that are not in the index afterwards."""

    rerank: str
    clients: int
    seconds: float
    queries: int = 0
    qps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    transport_errors: int = 0
    adds_acknowledged: int = 0
    lost_adds: int = 0
    server_rss_bytes: int = 0


def check_loopback(url: str) -> None:
    """Refuse any target but this machine: a load test must never leave loopback."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load tests only target loopback (127.0.0.0/8, ::1, localhost), not {host!r}")


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else 0.0


def run_load(url: str, query_photos: list[Path], *, clients: int = 4, seconds: float = 5.0, rerank: str = "none",
             k: int = 10, add_photos: Sequence[Path] = (), max_requests: int = 10_000) -> LoadReport:
    """Drive ``clients`` query threads (and one adder when ``add_photos``) for ``seconds``."""
    check_loopback(url)
    if not query_photos:
        raise ValueError("no query photos")
    # At most 64 photos spread evenly over the list (a sorted folder groups them by class), read
    # once, outside the clock.
    spread = query_photos[:: max(1, len(query_photos) // 64)][:64]
    payloads = [(p.name, p.read_bytes()) for p in spread]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    transport_errors = 0
    acknowledged: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    deadline = 0.0  # set once the warm-up is done

    def record(status: str, latency_ms: float | None = None) -> None:
        with lock:
            statuses[status] += 1
            if latency_ms is not None:
                latencies.append(latency_ms)

    def query_client(offset: int) -> None:
        nonlocal transport_errors
        with httpx.Client(base_url=url, timeout=120) as client:
            for n in itertools.count():
                if n >= max_requests or time.monotonic() >= deadline:
                    return
                name, data = payloads[(offset + n) % len(payloads)]
                start = time.perf_counter()
                try:
                    response = client.post("/search", params={"k": k, "rerank": rerank}, files={"image": (name, data)})
                except httpx.HTTPError:
                    with lock:
                        transport_errors += 1
                    continue
                elapsed = (time.perf_counter() - start) * 1000
                record(str(response.status_code), elapsed if response.status_code == 200 else None)

    def add_client() -> None:
        nonlocal transport_errors
        with httpx.Client(base_url=url, timeout=120) as client:
            for photo in add_photos:
                if time.monotonic() >= deadline:
                    return
                data = photo.read_bytes()
                try:
                    response = client.post("/images", files={"image": (photo.name, data)}, data={"identity": "load-test"})
                except httpx.HTTPError:
                    with lock:
                        transport_errors += 1
                    continue
                record(f"add-{response.status_code}")
                if response.status_code == 201:
                    for image in response.json()["images"]:
                        if image["created"]:
                            acknowledged.append((image["id"], data))

    with httpx.Client(base_url=url, timeout=60) as probe:
        before = probe.get("/healthz").json()["images"]
        for name, data in payloads[:2]:  # warm-up: a reranker may load its model on first use
            probe.post("/search", params={"k": k, "rerank": rerank}, files={"image": (name, data)})
    threads = [threading.Thread(target=query_client, args=(i * 7,)) for i in range(clients)]
    if add_photos:
        threads.append(threading.Thread(target=add_client))
    started = time.monotonic()
    deadline = started + seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    report = LoadReport(rerank=rerank, clients=clients, seconds=round(elapsed, 2), queries=len(latencies),
                        qps=round(len(latencies) / elapsed, 2), p50_ms=_percentile(latencies, 50),
                        p95_ms=_percentile(latencies, 95), p99_ms=_percentile(latencies, 99),
                        max_ms=round(max(latencies, default=0.0), 1), statuses=dict(sorted(statuses.items())),
                        server_errors=sum(v for s, v in statuses.items() if s.removeprefix("add-").startswith("5")),
                        transport_errors=transport_errors, adds_acknowledged=len(acknowledged))
    with httpx.Client(base_url=url, timeout=60) as probe:
        lost = sum(probe.get(f"/images/{image_id}").status_code != 200 for image_id, _ in acknowledged)
        for image_id, data in acknowledged[-3:]:  # an acknowledged add is found by its own bytes
            top = probe.post("/search", params={"k": 1}, files={"image": ("check.jpg", data)}).json()["results"]
            lost += not top or top[0]["id"] != image_id
        after = probe.get("/healthz").json()["images"]
        lost += abs(after - before - len(acknowledged)) if add_photos else 0
        report.lost_adds = lost
        report.server_rss_bytes = int(probe.get("/stats").json()["resident_memory_bytes"])
    return report


def _photos(folder: str) -> list[Path]:
    return [Path(p) for p in list_images(folder)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    target.add_argument("--index", help="start `waldo serve` on this index for the run")
    parser.add_argument("--queries", required=True, help="folder of query photos")
    parser.add_argument("--adds", default=None, help="folder of photos to add during the first mode's run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rerank", default="none", help="comma-separated modes, each run in turn")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client and mode")
    parser.add_argument("--json", default=None, help="write the reports here")
    args = parser.parse_args(argv)

    queries = _photos(args.queries)
    adds = _photos(args.adds) if args.adds else []
    server = None
    if args.index:
        from waldo.serve.process import start_server

        log = Path(tempfile.mkdtemp(prefix="waldo-load-")) / "server.log"
        server = start_server(args.index, log)
    url = server.url if server else args.url
    reports = []
    try:
        for i, mode in enumerate(m.strip() for m in args.rerank.split(",") if m.strip()):
            report = run_load(url, queries, clients=args.clients, seconds=args.seconds, rerank=mode, k=args.k,
                              add_photos=adds if i == 0 else [], max_requests=args.max_requests)
            reports.append(report)
            print(f"{mode:>8}: {report.queries} queries in {report.seconds:.1f} s = {report.qps:.1f} q/s, "
                  f"p50 {report.p50_ms:.0f} ms, p95 {report.p95_ms:.0f} ms, 5xx {report.server_errors}, "
                  f"transport errors {report.transport_errors}, adds {report.adds_acknowledged} "
                  f"(lost {report.lost_adds}), server RSS {report.server_rss_bytes / 2**20:.0f} MiB", flush=True)
    finally:
        peak = server.peak_memory_bytes() if server else None
        if server:
            server.stop()
    summary = {"clients": args.clients, "seconds": args.seconds, "k": args.k, "queries_dir": args.queries,
               "server_peak_rss_bytes": peak, "reports": [asdict(r) for r in reports]}
    if peak:
        print(f"server peak RSS {peak / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r.queries and r.server_errors == 0 and r.lost_adds == 0 for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
