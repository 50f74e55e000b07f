"""Load test of a live ``waldo serve``: N concurrent clients for T seconds, on loopback only.

Each client thread posts query photos to ``POST /search`` back to back; an optional extra
client adds new photos through ``POST /images`` meanwhile. Reported per rerank mode:
queries/s, p50/p95/p99 end-to-end latency (client side: upload, queueing, inference, JSON),
status counts, and afterwards a check that every add the server acknowledged is there
(retrievable by id, counted by /healthz, found first when searched with its own bytes).
The run stops by itself: at the deadline or after ``--max-requests`` per client.

With ``--churn`` the extra client both adds and removes, for the whole run: each add posts a
photo and a re-encoded copy of it in one request, every second round deletes the copy of an
earlier pair, and every fifth re-posts an indexed photo (which must answer "already indexed",
same id). A probe client meanwhile searches with the pair photos and checks each answer against
what was acknowledged before the query was sent: a copy never shows without its photo (an add
is atomic), an acknowledged add is found, an acknowledged removal is not, ranks and scores are
well formed. Afterwards every acknowledged image must be there exactly once, and every
acknowledged removal gone.

    # start a server on the index, test it, stop it (the usual way):
    .venv/bin/python benchmarks/load_test.py --index demo-index --clients 4 --seconds 20 \\
        --queries ../shared/data/grocery_store/dataset/test --rerank none,rrt,gv
    # or against a server already running on this machine:
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --queries PHOTOS_DIR
    # 20 clients for 60 s while a 21st adds and removes, on a scratch copy of the index:
    .venv/bin/python benchmarks/load_test.py --index demo-index --scratch-copy --clients 20 --seconds 60 \\
        --queries ../shared/data/grocery_store/dataset/test --adds ../shared/data/grocery_store/dataset/test --churn \\
        --server-arg=--max-inflight-uploads=32

Only loopback addresses are accepted as targets. ``--json FILE --doc NAME`` also rewrites the
``NAME`` block of docs/service.md with the run's latency table (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import ipaddress
import itertools
import json
import random
import shutil
import sys
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
from PIL import Image

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
    stage_p50_ms: dict[str, float] = field(default_factory=dict)  # the server's own timings, per stage
    # --churn only: removals, duplicates, and the probe's snapshot checks.
    removes_acknowledged: int = 0
    duplicated_adds: int = 0  # an image indexed twice, or a re-post that did not return the same id
    resurrected_images: int = 0  # an acknowledged removal still there (during or after the run)
    snapshot_checks: int = 0
    snapshot_violations: int = 0
    violations: list[str] = field(default_factory=list)


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


def _back_off(response: httpx.Response) -> None:
    """A client told 429 waits as Retry-After says (capped) instead of hammering the server."""
    if response.status_code == 429:
        try:
            time.sleep(min(float(response.headers.get("retry-after", "0.1")), 1.0))
        except ValueError:
            time.sleep(0.1)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reencoded(data: bytes) -> bytes:
    """The same photo saved again (JPEG, quality 90): other bytes, almost the same descriptor."""
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class _Pair:
    """A photo and its re-encoded copy, added in one request; the copy may be removed later.
    Times are ``time.monotonic()`` when the server's answer arrived (None: not yet)."""

    photo: bytes
    copy: bytes
    added_at: float | None = None
    ids: tuple[int, int] = (-1, -1)
    copy_removed_at: float | None = None

    @property
    def stems(self) -> tuple[str, str]:  # stored as INDEX/uploads/<sha256>.<ext>
        return _sha(self.photo), _sha(self.copy)


class _Churn:
    """The --churn adder and probe: shared state, each method run in its own thread."""

    def __init__(self, url: str, photos: Sequence[Path], deadline: float, k: int = 5, seed: int = 0) -> None:
        self.url, self.photos, self.deadline, self.k = url, list(photos), deadline, k
        self.pairs: list[_Pair] = []
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.transport_errors = 0
        self.created = self.removed = self.duplicated = self.resurrected = 0
        self.checks = 0
        self.violations: list[str] = []
        self.rng = random.Random(seed)

    def violation(self, message: str) -> None:
        with self.lock:
            self.violations.append(message)

    def count(self, status: str) -> None:
        with self.lock:  # the adder and the probe both count
            self.statuses[status] += 1

    # ------------------------------------------------------------------ the adder
    def adder(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for round_ in itertools.count():
                if round_ >= len(self.photos) or time.monotonic() >= self.deadline:
                    return
                try:
                    self._add_pair(client, self.photos[round_])
                    if round_ % 2 == 1:
                        self._remove_a_copy(client)
                    if round_ % 5 == 4:
                        self._repost(client)
                except httpx.HTTPError:
                    with self.lock:
                        self.transport_errors += 1

    def _add_pair(self, client: httpx.Client, photo: Path) -> None:
        data = photo.read_bytes()
        pair = _Pair(data, _reencoded(data))
        with self.lock:
            self.pairs.append(pair)  # visible to the probe before the request: it may be in flight
        response = client.post("/images", data={"identity": "churn"},
                               files=[("image", (photo.name, pair.photo)), ("image", ("copy-" + photo.name, pair.copy))])
        self.count(f"add-{response.status_code}")
        _back_off(response)
        if response.status_code != 201:
            return
        images = response.json()["images"]
        by_stem = {Path(i["path"]).stem: i for i in images}
        if set(by_stem) != set(pair.stems):
            self.violation(f"add answered {sorted(by_stem)} for {pair.stems}")
            return
        photo_image, copy_image = (by_stem[s] for s in pair.stems)
        with self.lock:
            pair.ids = (photo_image["id"], copy_image["id"])
            pair.added_at = time.monotonic()
            self.created += photo_image["created"] + copy_image["created"]

    def _remove_a_copy(self, client: httpx.Client) -> None:
        with self.lock:
            candidates = [p for p in self.pairs if p.added_at is not None and p.copy_removed_at is None]
        if not candidates:
            return
        pair = candidates[0]
        response = client.delete(f"/images/{pair.ids[1]}")
        self.count(f"remove-{response.status_code}")
        _back_off(response)
        if response.status_code == 200:
            with self.lock:
                pair.copy_removed_at = time.monotonic()
                self.removed += 1

    def _repost(self, client: httpx.Client) -> None:
        """The same bytes again: the service must recognise them (created false, the same id)."""
        with self.lock:
            added = [p for p in self.pairs if p.added_at is not None]
        if not added:
            return
        pair = self.rng.choice(added)
        response = client.post("/images", data={"identity": "churn"}, files={"image": ("again.jpg", pair.photo)})
        self.count(f"repost-{response.status_code}")
        _back_off(response)
        if response.status_code == 201:
            (image,) = response.json()["images"]
            if image["created"] or image["id"] != pair.ids[0]:
                with self.lock:
                    self.duplicated += 1
                self.violation(f"re-posting image {pair.ids[0]} answered {image}")

    # ------------------------------------------------------------------ the probe
    def probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < self.deadline:
                with self.lock:
                    if not self.pairs:
                        pair = None
                    else:
                        pair = self.rng.choice(self.pairs)
                        known_added, known_removed = pair.added_at, pair.copy_removed_at
                if pair is None:
                    time.sleep(0.05)
                    continue
                sent = time.monotonic()
                try:
                    response = client.post("/search", params={"k": self.k}, files={"image": ("probe.jpg", pair.photo)})
                except httpx.HTTPError:
                    with self.lock:
                        self.transport_errors += 1
                    continue
                self.count(f"probe-{response.status_code}")
                _back_off(response)
                if response.status_code == 200:
                    self._check(pair, response.json()["results"], sent,
                                known_added if known_added is not None and known_added < sent else None,
                                known_removed if known_removed is not None and known_removed < sent else None)

    def _check(self, pair: _Pair, results: list[dict], sent: float, added: float | None,
               removed: float | None) -> None:
        """One answer against what had been acknowledged before it was asked."""
        with self.lock:
            self.checks += 1
        stems = [Path(r["path"]).stem for r in results]
        photo, copy = pair.stems
        problems = []
        if [r["rank"] for r in results] != list(range(1, len(results) + 1)) or len(results) != self.k:
            problems.append(f"ranks {[r['rank'] for r in results]}")
        scores = [r["score"] for r in results]
        if scores != sorted(scores, reverse=True) or len({r["id"] for r in results}) != len(results):
            problems.append("scores out of order or an id twice")
        if copy in stems and photo not in stems:
            problems.append("the copy is visible without its photo: half an add")
        if added is not None and photo not in stems:
            problems.append("an acknowledged add is not found")
        if removed is not None and copy in stems:
            problems.append("an acknowledged removal is still returned")
            with self.lock:
                self.resurrected += 1
        if problems:
            self.violation(f"query with image {pair.ids[0]} sent at {sent:.2f}: {'; '.join(problems)}")

    # ------------------------------------------------------------------ afterwards
    def final_check(self, client: httpx.Client) -> int:
        """Lost adds after the run; counts resurrected removals and duplicates on the way."""
        lost = 0
        for pair in self.pairs:
            if pair.added_at is None:
                continue
            lost += client.get(f"/images/{pair.ids[0]}").status_code != 200
            copy_status = client.get(f"/images/{pair.ids[1]}").status_code
            if pair.copy_removed_at is None:
                lost += copy_status != 200
            elif copy_status != 404:
                self.resurrected += 1
                self.violation(f"removed image {pair.ids[1]} answers {copy_status}")
        for pair in self.pairs[-3:]:  # found by their own bytes, once each
            if pair.added_at is None:
                continue
            found = client.post("/search", params={"k": 10}, files={"image": ("check.jpg", pair.photo)}).json()
            stems = [Path(r["path"]).stem for r in found["results"]]
            self.duplicated += max(0, stems.count(pair.stems[0]) - 1)
            lost += stems[:2].count(pair.stems[0]) != 1
        return lost


def run_load(url: str, query_photos: list[Path], *, clients: int = 4, seconds: float = 5.0, rerank: str = "none",
             k: int = 10, add_photos: Sequence[Path] = (), max_requests: int = 10_000, churn: bool = False) -> LoadReport:
    """Drive ``clients`` query threads (and one adder when ``add_photos``) for ``seconds``;
    with ``churn`` the adder also removes, and a probe checks every answer's snapshot."""
    check_loopback(url)
    if not query_photos:
        raise ValueError("no query photos")
    # At most 64 photos spread evenly over the list (a sorted folder groups them by class), read
    # once, outside the clock.
    spread = query_photos[:: max(1, len(query_photos) // 64)][:64]
    payloads = [(p.name, p.read_bytes()) for p in spread]
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}  # the server's per-stage timings of each answered query
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
                if response.status_code == 200:
                    with lock:
                        for stage, ms in response.json()["timings"].items():
                            stages.setdefault(stage, []).append(ms)
                _back_off(response)

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
                _back_off(response)
                if response.status_code == 201:
                    for image in response.json()["images"]:
                        if image["created"]:
                            acknowledged.append((image["id"], data))

    with httpx.Client(base_url=url, timeout=60) as probe:
        before = probe.get("/healthz").json()["images"]
        for name, data in payloads[:2]:  # warm-up: a reranker may load its model on first use
            probe.post("/search", params={"k": k, "rerank": rerank}, files={"image": (name, data)})
    threads = [threading.Thread(target=query_client, args=(i * 7,)) for i in range(clients)]
    started = time.monotonic()
    deadline = started + seconds
    churner = _Churn(url, add_photos, deadline) if churn and add_photos else None
    if churner:
        threads += [threading.Thread(target=churner.adder), threading.Thread(target=churner.probe)]
    elif add_photos:
        threads.append(threading.Thread(target=add_client))
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
                        transport_errors=transport_errors, adds_acknowledged=len(acknowledged),
                        stage_p50_ms={stage: _percentile(values, 50) for stage, values in stages.items()})
    with httpx.Client(base_url=url, timeout=60) as probe:
        lost = sum(probe.get(f"/images/{image_id}").status_code != 200 for image_id, _ in acknowledged)
        for image_id, data in acknowledged[-3:]:  # an acknowledged add is found by its own bytes
            top = probe.post("/search", params={"k": 1}, files={"image": ("check.jpg", data)}).json()["results"]
            lost += not top or top[0]["id"] != image_id
        after = probe.get("/healthz").json()["images"]
        if churner:
            lost += churner.final_check(probe)
            # Every image created and not removed is counted once: more is a duplicate, less a loss.
            drift = after - before - churner.created + churner.removed
            report.duplicated_adds = churner.duplicated + max(drift, 0)
            lost += max(-drift, 0)
            report.adds_acknowledged, report.removes_acknowledged = churner.created, churner.removed
            report.resurrected_images = churner.resurrected
            report.snapshot_checks, report.violations = churner.checks, churner.violations[:20]
            report.snapshot_violations = len(churner.violations)
            report.transport_errors += churner.transport_errors
            report.statuses = dict(sorted((statuses + churner.statuses).items()))
            report.server_errors = sum(v for s, v in report.statuses.items() if s.rsplit("-", 1)[-1].startswith("5"))
        else:
            lost += abs(after - before - len(acknowledged)) if add_photos else 0
        report.lost_adds = lost
        report.server_rss_bytes = int(probe.get("/stats").json()["resident_memory_bytes"])
    return report


def _photos(folder: str) -> list[Path]:
    return [Path(p) for p in list_images(folder)]


def markdown(summary: dict) -> str:
    """The latency table of a ``--json`` summary, one row per rerank mode (client-side latency,
    the server's own median per stage, its resident memory after the mode); runs with several
    clients add the server errors and the adds lost (of those acknowledged)."""
    several = summary["clients"] > 1
    stages = ("decode", "extract", "search", "rerank", "total")
    header = ("| rerank | queries | q/s | p50 ms | p95 ms | " + ("5xx | lost adds |" if several else "p99 ms |")
              + " server p50 ms: " + " / ".join(stages) + " | server RSS MiB |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in summary["reports"]:
        tail = (f"{r['server_errors']} | {r['lost_adds']} ({r['adds_acknowledged']} acknowledged) |" if several
                else f"{r['p99_ms']:.0f} |")
        server = " / ".join(f"{r['stage_p50_ms'].get(stage, 0):.0f}" for stage in stages)
        lines.append(f"| {r['rerank']} | {r['queries']} | {r['qps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{tail} {server} | {r['server_rss_bytes'] / 2**20:.0f} |")
    peak = summary.get("server_peak_rss_bytes")
    lines += ["", f"Server peak resident memory over the run: {peak / 2**20:.0f} MiB." if peak else ""]
    return "\n".join(lines + [f"Produced by `.venv/bin/python {summary['command']}`."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    target.add_argument("--index", help="start `waldo serve` on this index for the run")
    parser.add_argument("--queries", required=True, help="folder of query photos")
    parser.add_argument("--adds", default=None, help="folder of photos to add during the first mode's run")
    parser.add_argument("--churn", action="store_true",
                        help="the adder also removes and re-posts, and a probe checks every answer's snapshot")
    parser.add_argument("--scratch-copy", action="store_true",
                        help="run on a temporary copy of --index (adds and removes leave the index as it was)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="a flag for the `waldo serve` that --index starts, e.g. --server-arg=--max-inflight-uploads=32")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rerank", default="none", help="comma-separated modes, each run in turn")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client and mode")
    parser.add_argument("--json", default=None, help="write the reports here")
    parser.add_argument("--doc", default=None, metavar="NAME", help="rewrite this block of docs/service.md")
    args = parser.parse_args(argv)

    queries = _photos(args.queries)
    adds = _photos(args.adds) if args.adds else []
    server = None
    scratch = Path(tempfile.mkdtemp(prefix="waldo-load-"))
    if args.index:
        from waldo.serve.process import start_server

        index = args.index
        if args.scratch_copy:
            index = scratch / "index"
            shutil.copytree(args.index, index)
        server = start_server(index, scratch / "server.log", *args.server_arg)
    url = server.url if server else args.url
    reports = []
    try:
        for i, mode in enumerate(m.strip() for m in args.rerank.split(",") if m.strip()):
            report = run_load(url, queries, clients=args.clients, seconds=args.seconds, rerank=mode, k=args.k,
                              add_photos=adds if i == 0 else [], max_requests=args.max_requests,
                              churn=args.churn)
            reports.append(report)
            print(f"{mode:>8}: {report.queries} queries in {report.seconds:.1f} s = {report.qps:.1f} q/s, "
                  f"p50 {report.p50_ms:.0f} ms, p95 {report.p95_ms:.0f} ms, 5xx {report.server_errors}, "
                  f"transport errors {report.transport_errors}, adds {report.adds_acknowledged} "
                  f"(lost {report.lost_adds}), server RSS {report.server_rss_bytes / 2**20:.0f} MiB", flush=True)
            if args.churn and i == 0:
                print(f"          removes {report.removes_acknowledged}, duplicated {report.duplicated_adds}, "
                      f"resurrected {report.resurrected_images}, snapshot checks {report.snapshot_checks} "
                      f"(violations {report.snapshot_violations}); statuses {report.statuses}", flush=True)
                for violation in report.violations[:10]:
                    print(f"          {violation}")
    finally:
        peak = server.peak_memory_bytes() if server else None
        if server:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {"command": "benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "clients": args.clients, "seconds": args.seconds, "k": args.k, "queries_dir": args.queries,
               "churn": args.churn, "server_peak_rss_bytes": peak, "reports": [asdict(r) for r in reports]}
    if peak:
        print(f"server peak RSS {peak / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.doc:
        from waldo_experiments.doc_blocks import markers, write_block

        start, end = markers(args.doc)
        write_block(Path(__file__).resolve().parents[1] / "docs" / "service.md",
                    f"{start}\n\n{markdown(summary)}\n\n{end}", start, end)
    return 0 if all(r.queries and r.server_errors == 0 and r.lost_adds == 0 and r.duplicated_adds == 0
                    and r.resurrected_images == 0 and r.snapshot_violations == 0 for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
