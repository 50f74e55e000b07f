"""Resource abuse: one bounded scenario per resource finding of issue 19, each checking its promise.

Each scenario attacks a live ``waldo serve`` (started on a private copy of an index, through the
real CLI, on a free loopback port) or the ``waldo index`` CLI, measures what a client sees and
what the server process holds, and checks the promise the service makes about it:

* ``slow_uploads``: 16 sockets send ``POST /search`` headers (multipart, Content-Length 200 KB)
  and then one body byte every 10 s while one client searches with a real grocery photo.
  Promise: every search answers 200, its p95 within 2x the same client's idle p95.
* ``scan_bombs``: two concurrent uploads of a progressive JPEG of 6000x6000 with 20,000
  end-of-band-only scans (``decode_bombs.scan_bomb_jpeg``) to ``POST /search``, searches
  meanwhile. Promise: the bombs are refused (4xx) within a few seconds; the searches keep their
  p95 within 2x idle.
* ``held_lock``: another process holds the index's write lock (``flock`` on
  ``INDEX/write.lock``) for 40 s while 4 clients add new photos and one searches. Promise:
  searches all 200 within 2x idle p95; an add answers 201 or 503 (with Retry-After) and never
  waits past a bound; nothing acknowledged is lost.
* ``memory``: the server's resident memory (VmRSS, VmHWM from ``/proc``) through a 1x39,999,999
  PNG search, twelve 6300x6300 1-bit PNGs in one ``POST /images`` and two such requests at
  once, eight big JPEGs added and their eight thumbnails at once. Promise: the peak stays under
  1.5 GiB on the demo index, and memory is returned afterwards.
* ``full_disk``: (root: a 30 MB tmpfs) the server adds distinct photos until the disk is full
  and then some more; then ``waldo index add`` 10 times on the full disk. Promise: 201 then 507
  with a clear detail, never a 500 or a server killed by a signal; the server still searches;
  the index opens, passes ``waldo index check`` and holds every acknowledged image; the CLI
  exits 1 with a clear message, never by a signal.
* ``many_uploads``: 10,000 one-photo ``POST /images`` with distinct bytes, the server started
  with 1024 file descriptors (a common default). Promise: live segments and open descriptors
  bounded (and descriptors not still growing over the second half), the last 10% of adds within
  2x the latency of the first 10%, no 5xx.
* ``overlapping_adds``: two ``waldo index add`` runs started together on overlapping sets (40
  photos each, 20 shared). Promise: both exit 0; the index holds the union, once each.

    # every scenario, full size (30 to 60 minutes on 2 cores):
    .venv/bin/python benchmarks/resource_abuse.py --index /tmp/demo-idx --label after \\
        --json results/resource_abuse.json
    # a few, short (minutes), and the Markdown table for docs/reliability.md:
    .venv/bin/python benchmarks/resource_abuse.py --scenarios slow_uploads,held_lock --quick \\
        --json results/resource_abuse_quick.json
    .venv/bin/python benchmarks/resource_abuse.py --doc --json results/resource_abuse.json

``--json`` merges into the file: one entry per ``--label`` (default ``now``) and scenario, so a
run after a fix keeps the ``before`` figures beside its own; ``--doc`` prints the table of the
file's ``before`` and latest other label (without ``--scenarios`` it runs nothing). The demo
index (``--index``, used by ``memory``) is built with ``waldo index build`` when the folder is
absent. Every scenario stops by itself: each phase has a deadline and every request a timeout.
Progress goes to stderr; the exit status is 0 only when every scenario kept its promise.

To measure a commit while the working tree changes (the ``before`` figures), export it, put it
first on PYTHONPATH and run from a folder that holds no ``waldo/``: the server and the CLI runs
are ``python -m waldo.cli`` children, which import from their working folder first::

    git archive HEAD waldo | tar -x -C /tmp/waldo-head
    cd /tmp && PYTHONPATH=/tmp/waldo-head WALDO_DATA=/work/shared/data /work/main/.venv/bin/python \\
        /work/main/benchmarks/resource_abuse.py --label before --json /work/main/results/resource_abuse.json

Each result records which code ran (``code``: git HEAD, the package imported, PYTHONPATH).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere; appended, so PYTHONPATH can pick the code
    sys.path.append(str(REPO))

from waldo.data.datasets import read_labels_csv  # noqa: E402
from waldo.index.maintenance import LOCK_FILE  # noqa: E402
from waldo.paths import data_root  # noqa: E402
from waldo.serve.metrics import process_memory_bytes  # noqa: E402
from waldo.serve.process import ServerProcess, start_server  # noqa: E402

__all__ = ["SCENARIOS", "Scenario", "build_small_index", "markdown", "parse_args", "run_scenarios", "served_index",
           "serving"]

MiB = 1024 * 1024
# The classes of tests/reliability/conftest.py's small index: banana, orange juice, oat milk.
SMALL_CLASSES = ("6", "29", "45")
SMALL_PER_CLASS = 3


def _say(message: str) -> None:
    """Progress, on stderr (stdout stays for --doc's table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- photos
def grocery_photos(grocery: Path, split: str) -> list[Path]:
    """Natural grocery photos of one split, in the labels file's order."""
    records = read_labels_csv(grocery).records
    return [Path(r.path) for r in records if r.attrs.get("split") == split and r.attrs.get("kind") == "natural"]


class PhotoVariants:
    """Distinct real-looking photos: a grocery photo with a few seeded random pixels changed,
    re-encoded as JPEG (quality 90). Variant ``i`` of a seed is always the same bytes, and no
    two variants handed out by one object are the same bytes (a repeat is redrawn)."""

    def __init__(self, photos: list[Path], seed: int, changed_pixels: int = 8) -> None:
        if not photos:
            raise ValueError("no photos to make variants of")
        self.photos = photos
        self.seed = seed
        self.changed_pixels = changed_pixels
        self._pixels: dict[int, np.ndarray] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def _base(self, index: int) -> np.ndarray:
        with self._lock:
            if index not in self._pixels:
                with Image.open(self.photos[index]) as image:
                    self._pixels[index] = np.asarray(image.convert("RGB"))
            return self._pixels[index]

    def get(self, i: int) -> bytes:
        """Variant ``i`` (thread-safe)."""
        base = self._base(i % len(self.photos))
        for salt in range(100):
            rng = np.random.default_rng([self.seed, i, salt])
            pixels = base.copy()
            ys = rng.integers(0, pixels.shape[0], self.changed_pixels)
            xs = rng.integers(0, pixels.shape[1], self.changed_pixels)
            pixels[ys, xs] = rng.integers(0, 256, (self.changed_pixels, 3), dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
            data = out.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            with self._lock:
                if digest not in self._seen:
                    self._seen.add(digest)
                    return data
        raise RuntimeError(f"could not make a new variant {i}")


def _decode_bombs() -> ModuleType:
    """benchmarks/decode_bombs.py (the crafting functions), imported from its file."""
    spec = importlib.util.spec_from_file_location("waldo_decode_bombs", REPO / "benchmarks" / "decode_bombs.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("benchmarks/decode_bombs.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- indexes and servers
def build_small_index(root: Path, grocery: Path) -> Path:
    """The small index of tests/reliability/conftest.py: 3 classes x 3 train photos, a random
    projection (no fitting pass), default verification keypoints."""
    from waldo.api import Waldo

    records = read_labels_csv(grocery).records
    photos = []
    for identity in SMALL_CLASSES:
        photos += [r.path for r in records if r.identity == identity and r.attrs.get("split") == "train"][
            :SMALL_PER_CLASS]
    engine = Waldo.create(root, backbone="efficientnet_lite0", projection="random", progress=False)
    report = engine.add(photos, progress=False, num_workers=0)
    engine.store.close()
    if len(report.added) != len(photos) or report.errors:
        raise RuntimeError(f"could not build the small index: {report.errors}")
    return root


def ensure_demo_index(root: Path, grocery: Path) -> Path:
    """The demo index (grocery train + val + gallery, the shipped lite0-rrt model); built with
    ``waldo index build`` when ``root`` does not exist yet (a few minutes), reused otherwise."""
    if (root / "manifest.json").is_file():
        return root
    _say(f"building the demo index at {root} (a few minutes)")
    command = [sys.executable, "-m", "waldo.cli", "index", "build", "--data", str(grocery),
               "--where", "split=train,val,gallery", "--model", "lite0-rrt", "--out", str(root), "--quiet"]
    subprocess.run(command, check=True)
    return root


@contextlib.contextmanager
def _open_file_limit(limit: int | None) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE while a child is started (the child inherits it)."""
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def serving(index: Path, log: Path, server_args: list[str], open_files: int | None = None) -> Iterator[ServerProcess]:
    """``waldo serve`` on ``index`` for the block; stopped (SIGTERM) afterwards. ``open_files``:
    the server's soft limit on file descriptors."""
    with _open_file_limit(open_files):
        server = start_server(index, log, *server_args, timeout=300)
    try:
        yield server
    finally:
        server.stop()


def served_index(server: ServerProcess) -> Path:
    """The index folder a server was started on (its ``--index`` argument: the service does not
    tell clients where its files are)."""
    argv = [str(a) for a in server.process.args]
    return Path(argv[argv.index("--index") + 1])


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _open_files_limit_of(pid: int) -> int | None:
    """The soft 'Max open files' of a process, from /proc/PID/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _exit_description(code: int | None) -> str | None:
    """'signal SIGBUS (7)' for a negative return code, 'exit N' otherwise, None while running."""
    if code is None:
        return None
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name} ({-code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


# ----------------------------------------------------------------------------- requests
@dataclass
class Answer:
    """One request as the client saw it: when it started (s since the scenario's clock zero),
    its status ("200", or "error: ReadTimeout" when none came), how long it took, the error
    detail of a non-2xx answer and its Retry-After header."""

    at_s: float
    status: str
    ms: float
    detail: str = ""
    retry_after: str | None = None


def _answer(response: httpx.Response, at_s: float, ms: float) -> Answer:
    detail = ""
    if response.status_code >= 300:
        try:
            detail = str(response.json().get("detail", ""))[:300]
        except (ValueError, AttributeError):
            detail = response.text[:300]
    return Answer(round(at_s, 3), str(response.status_code), round(ms, 1), detail, response.headers.get("retry-after"))


def _request(client: httpx.Client, zero: float, method: str, path: str, **kwargs: Any) -> tuple[Answer, Any]:
    """Send one request; returns its Answer and the parsed JSON body of a 2xx (else None)."""
    start = time.monotonic()
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        return Answer(round(start - zero, 3), f"error: {type(error).__name__}",
                      round((time.monotonic() - start) * 1000, 1), str(error)[:300]), None
    ms = (time.monotonic() - start) * 1000
    body = None
    if 200 <= response.status_code < 300 and response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
    return _answer(response, start - zero, ms), body


def _search_loop(url: str, photos: list[bytes], zero: float, until: Callable[[], bool], hard_deadline: float,
                 timeout: float) -> list[Answer]:
    """One client searching back to back (k=10, the global ranking) until ``until()`` is true or
    ``hard_deadline`` (monotonic) passes."""
    answers = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for n in range(10**9):
            if until() or time.monotonic() >= hard_deadline:
                break
            answer, _ = _request(client, zero, "POST", "/search", params={"k": 10, "rerank": "none"},
                                 files={"image": (f"query-{n % len(photos)}.jpg", photos[n % len(photos)])})
            answers.append(answer)
            _back_off(answer)
    return answers


def _back_off(answer: Answer) -> None:
    """A client told 429 or 503 waits as Retry-After says (at most 1 s), as a polite client does."""
    if answer.status in ("429", "503"):
        try:
            time.sleep(min(float(answer.retry_after or 0.1), 1.0))
        except ValueError:
            time.sleep(0.1)


def _searches_for(url: str, photos: list[bytes], seconds: float, timeout: float = 120.0) -> list[Answer]:
    zero = time.monotonic()
    end = zero + seconds
    return _search_loop(url, photos, zero, lambda: time.monotonic() >= end, end + timeout, timeout)


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def latency_summary(answers: list[Answer]) -> dict[str, Any]:
    """Statuses of all answers; p50/p95/max of the 200s (ms)."""
    ok = [a.ms for a in answers if a.status == "200"]
    return {"requests": len(answers), "statuses": dict(sorted(Counter(a.status for a in answers).items())),
            "p50_ms": _percentile(ok, 50), "p95_ms": _percentile(ok, 95), "max_ms": max(ok, default=None)}


def _server_state(server: ServerProcess) -> dict[str, Any]:
    """What the server process holds right now: RSS, peak RSS, open fds (None once it exited)."""
    pid = server.process.pid
    rss, hwm = process_memory_bytes("VmRSS", pid), process_memory_bytes("VmHWM", pid)
    return {"rss_mib": None if rss is None else round(rss / MiB, 1),
            "hwm_mib": None if hwm is None else round(hwm / MiB, 1), "fds": _fd_count(pid),
            "exit": _exit_description(server.process.poll())}


class Checks:
    """Named pass/fail checks of one scenario's promise, each with the figures it judged."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def expect(self, name: str, ok: bool, detail: str) -> None:
        self.items[name] = {"ok": bool(ok), "detail": detail}

    @property
    def passed(self) -> bool:
        return bool(self.items) and all(item["ok"] for item in self.items.values())

    def result(self, **figures: Any) -> dict[str, Any]:
        return {"passed": self.passed, "checks": self.items, **figures}


def _query_photos(args: argparse.Namespace) -> list[bytes]:
    """The ordinary client's queries: held-out grocery test photos of the small index's classes."""
    records = read_labels_csv(args.grocery).records
    paths = [r.path for r in records if r.identity in SMALL_CLASSES and r.attrs.get("split") == "test"][:4]
    return [Path(p).read_bytes() for p in paths]


def _add_photos(args: argparse.Namespace, salt: int) -> PhotoVariants:
    """Variants of the grocery test photos (never in an index these scenarios start from);
    ``salt`` keeps two scenarios' variants apart."""
    return PhotoVariants(grocery_photos(args.grocery, "test"), seed=args.seed * 1000 + salt)


def _within(p95: float | None, idle_p95: float | None, factor: float) -> bool:
    return p95 is not None and idle_p95 is not None and p95 <= factor * idle_p95


# ----------------------------------------------------------------------------- 1. slow uploads
class SlowUpload:
    """A client that sends a ``POST /search`` request's headers (multipart, a declared body of
    ``body_bytes``) and then one body byte every ``interval`` seconds, watching for an answer."""

    BOUNDARY = "waldo-slow-upload"

    def __init__(self, url: str, body_bytes: int, interval: float) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.body_bytes, self.interval = body_bytes, interval
        self.status: int | None = None
        self.closed = False
        self.after_s: float | None = None  # when the answer or the close came
        self.bytes_sent = 0
        self.error = ""

    def run(self, stop: threading.Event) -> None:
        start = time.monotonic()
        head = (f"POST /search HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={self.BOUNDARY}\r\n"
                f"Content-Length: {self.body_bytes}\r\n\r\n").encode()
        body = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"slow.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8" + b"\x00" * self.body_bytes
        try:
            sock = socket.create_connection((self.host, self.port), timeout=10)
        except OSError as error:
            self.error = f"connect: {error}"
            return
        received = b""
        try:
            sock.sendall(head)
            next_byte = time.monotonic()
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_byte:
                    sock.send(body[self.bytes_sent:self.bytes_sent + 1])
                    self.bytes_sent += 1
                    # The whole declared body is never sent (200 KB at a byte per interval).
                    next_byte = now + self.interval if self.bytes_sent < self.body_bytes else float("inf")
                readable, _, _ = select.select([sock], [], [], max(0.0, min(0.2, next_byte - time.monotonic())))
                if not readable:
                    continue
                chunk = sock.recv(4096)
                if not chunk:
                    self.closed = True
                    break
                received += chunk
                if self.status is None and b"\r\n" in received:
                    status_line = received.split(b"\r\n", 1)[0].split(b" ")
                    self.status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else -1
                    self.after_s = round(time.monotonic() - start, 2)
        except OSError as error:  # reset by the server, or a send after its close
            self.closed = True
            self.error = type(error).__name__
        finally:
            sock.close()
        if self.closed and self.after_s is None:
            self.after_s = round(time.monotonic() - start, 2)

    def outcome(self) -> str:
        if self.error.startswith("connect"):
            return "connect failed"
        if self.status is not None:
            return f"{self.status}" + (" then closed" if self.closed else "")
        return "closed without an answer" if self.closed else "still open at the end"


def scenario_slow_uploads(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Ordinary searches while ``args.slow_sockets`` clients trickle request bodies."""
    photos = _query_photos(args)
    _say(f"slow_uploads: idle baseline, {args.idle_seconds:g} s")
    idle = _searches_for(server.url, photos, args.idle_seconds)
    stop = threading.Event()
    slow = [SlowUpload(server.url, args.slow_body_bytes, args.slow_interval) for _ in range(args.slow_sockets)]
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in slow]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the server has accepted them and read their headers before the first search
    _say(f"slow_uploads: {len(slow)} slow sockets, searching for {args.attack_seconds:g} s")
    attack = _searches_for(server.url, photos, args.attack_seconds, timeout=args.attack_seconds + 30)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    idle_summary, attack_summary = latency_summary(idle), latency_summary(attack)
    outcomes = Counter(s.outcome() for s in slow)
    answered = [s.after_s for s in slow if s.after_s is not None]
    checks = Checks()
    others = {s: n for s, n in attack_summary["statuses"].items() if s != "200"}
    checks.expect("searches_all_200", bool(attack) and not others,
                  f"{attack_summary['statuses']} during the attack")
    checks.expect("p95_within_factor_of_idle", _within(attack_summary["p95_ms"], idle_summary["p95_ms"],
                                                       args.latency_factor),
                  f"p95 {attack_summary['p95_ms']} ms vs idle {idle_summary['p95_ms']} ms "
                  f"(limit {args.latency_factor:g}x)")
    checks.expect("no_5xx_to_slow_sockets", not any(s.status and s.status >= 500 for s in slow),
                  f"slow sockets: {dict(outcomes)}")
    return checks.result(
        idle=idle_summary, during_attack=attack_summary, slow_sockets=len(slow),
        slow_interval_s=args.slow_interval, slow_declared_bytes=args.slow_body_bytes,
        slow_outcomes=dict(outcomes), slow_answered_after_s=[min(answered), max(answered)] if answered else None,
        slow_bytes_sent=sum(s.bytes_sent for s in slow), server=_server_state(server))


# ----------------------------------------------------------------------------- 2. scan bombs
def scenario_scan_bombs(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Concurrent scan-bomb JPEGs to ``POST /search`` while an ordinary client searches."""
    photos = _query_photos(args)
    start = time.monotonic()
    bomb = _decode_bombs().scan_bomb_jpeg(args.bomb_side, args.bomb_side, args.bomb_scans)
    crafted_s = round(time.monotonic() - start, 1)
    _say(f"scan_bombs: {len(bomb) / MiB:.2f} MB bomb ({args.bomb_scans} scans) crafted in {crafted_s} s; "
         f"idle baseline {args.idle_seconds:g} s")
    idle = _searches_for(server.url, photos, args.idle_seconds)
    zero = time.monotonic()
    bombs: list[Answer | None] = [None] * args.bombs

    def send_bomb(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=args.bomb_timeout) as client:
            bombs[i], _ = _request(client, zero, "POST", "/search", params={"k": 10, "rerank": "none"},
                                   files={"image": (f"bomb-{i}.jpg", bomb, "image/jpeg")})

    threads = [threading.Thread(target=send_bomb, args=(i,), daemon=True) for i in range(args.bombs)]
    for thread in threads:
        thread.start()
    _say(f"scan_bombs: {args.bombs} bombs sent; searching until they are answered (at least "
         f"{args.attack_seconds:g} s, at most {args.bomb_timeout:g} s)")
    during = _search_loop(server.url, photos, zero,
                          lambda: time.monotonic() - zero >= args.attack_seconds and all(b is not None for b in bombs),
                          zero + args.bomb_timeout + 10, timeout=args.bomb_timeout)
    for thread in threads:
        thread.join(timeout=args.bomb_timeout + 10)
    answered = [b for b in bombs if b is not None]
    idle_summary, during_summary = latency_summary(idle), latency_summary(during)
    checks = Checks()
    refused = [b for b in answered if b.status in ("400", "413", "415", "422")]
    checks.expect("bombs_refused_4xx", len(refused) == args.bombs,
                  f"bomb answers {[b.status for b in answered]} of {args.bombs}")
    slowest = max((b.ms for b in answered), default=None)
    checks.expect("bombs_answered_within_bound", len(answered) == args.bombs and slowest is not None
                  and slowest <= args.bomb_bound_s * 1000,
                  f"slowest bomb answer {slowest} ms (bound {args.bomb_bound_s:g} s)")
    others = {s: n for s, n in during_summary["statuses"].items() if s != "200"}
    checks.expect("searches_all_200", bool(during) and not others, f"{during_summary['statuses']} meanwhile")
    checks.expect("p95_within_factor_of_idle", _within(during_summary["p95_ms"], idle_summary["p95_ms"],
                                                       args.latency_factor),
                  f"p95 {during_summary['p95_ms']} ms vs idle {idle_summary['p95_ms']} ms "
                  f"(limit {args.latency_factor:g}x)")
    return checks.result(
        bomb={"bytes": len(bomb), "side": args.bomb_side, "scans": args.bomb_scans, "crafted_s": crafted_s},
        bombs=[asdict(b) for b in answered], idle=idle_summary, during_bombs=during_summary,
        server=_server_state(server))


# ----------------------------------------------------------------------------- 3. held lock
_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
os.close(fd)
print("released", flush=True)
"""


def _lost_adds(url: str, acknowledged: dict[int, bytes], before: int, created: int) -> tuple[int, int]:
    """(acknowledged images that do not answer GET /images/{id} with their bytes, drift of the
    /healthz count from before + created)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        lost = 0
        for image_id, data in acknowledged.items():
            response = client.get(f"/images/{image_id}")
            lost += response.status_code != 200 or response.content != data
        count = client.get("/healthz").json()["images"]
    return lost, count - before - created


def scenario_held_lock(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Adds and searches while another process holds the index's write lock."""
    photos = _query_photos(args)
    variants = _add_photos(args, salt=3)
    index = served_index(server)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = client.get("/healthz").json()["images"]
    _say(f"held_lock: idle baseline, {args.idle_seconds:g} s")
    idle = _searches_for(server.url, photos, args.idle_seconds)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(index / LOCK_FILE), str(args.hold_seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout is None or holder.stdout.readline().strip() != "held":
            raise RuntimeError("the lock holder did not start")
        zero = time.monotonic()
        release = zero + args.hold_seconds
        window_end = release + args.after_release_s
        _say(f"held_lock: {LOCK_FILE} held for {args.hold_seconds:g} s; {args.adders} adders and a searcher")
        adds: list[Answer] = []
        acknowledged: dict[int, bytes] = {}
        created = 0
        lock = threading.Lock()
        counter = iter(range(10**9))

        def adder() -> None:
            nonlocal created
            # The timeout only keeps the run bounded: an add slower than add_bound_s fails the check.
            with httpx.Client(base_url=server.url, timeout=args.add_bound_s + args.hold_seconds + 30) as client:
                while time.monotonic() < window_end:
                    with lock:
                        n = next(counter)
                    data = variants.get(n)
                    answer, body = _request(client, zero, "POST", "/images", data={"identity": "held-lock"},
                                            files={"image": (f"held-{n}.jpg", data, "image/jpeg")})
                    with lock:
                        adds.append(answer)
                        if body:
                            for image in body["images"]:
                                acknowledged[image["id"]] = data
                                created += bool(image["created"])
                    _back_off(answer)

        threads = [threading.Thread(target=adder, daemon=True) for _ in range(args.adders)]
        for thread in threads:
            thread.start()
        during = _search_loop(server.url, photos, zero, lambda: time.monotonic() >= window_end,
                              window_end + args.add_bound_s + 30, timeout=args.hold_seconds + 60)
        for thread in threads:
            thread.join(timeout=args.add_bound_s + args.hold_seconds + 60)
        released_line = holder.stdout.readline().strip()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    lost, drift = _lost_adds(server.url, acknowledged, before, created)
    while_held = [a for a in adds if a.at_s < args.hold_seconds]
    during_held = [a for a in during if a.at_s < args.hold_seconds]
    idle_summary, searches_summary = latency_summary(idle), latency_summary(during_held)
    checks = Checks()
    others = {s: n for s, n in latency_summary(during)["statuses"].items() if s != "200"}
    checks.expect("searches_all_200", bool(during_held) and not others,
                  f"{latency_summary(during)['statuses']} (whole window)")
    checks.expect("p95_within_factor_of_idle", _within(searches_summary["p95_ms"], idle_summary["p95_ms"],
                                                       args.latency_factor),
                  f"p95 while held {searches_summary['p95_ms']} ms ({searches_summary['requests']} searches) vs idle "
                  f"{idle_summary['p95_ms']} ms (limit {args.latency_factor:g}x)")
    slowest = max((a.ms for a in adds), default=None)
    checks.expect("adds_never_wait_past_bound", bool(adds) and slowest is not None
                  and slowest <= args.add_bound_s * 1000,
                  f"slowest add {slowest} ms (bound {args.add_bound_s:g} s; the lock was held "
                  f"{args.hold_seconds:g} s)")
    unexpected = Counter(a.status for a in adds if a.status not in ("201", "503"))
    checks.expect("adds_answer_201_or_503", not unexpected, f"other statuses: {dict(unexpected)}")
    # Once the lock is free the service writes again: an add sent after the release succeeds.
    after = [a for a in adds if a.at_s >= args.hold_seconds]
    checks.expect("adds_after_release_succeed", bool(after) and all(a.status == "201" for a in after),
                  f"adds sent after the release: {dict(Counter(a.status for a in after))}")
    busy = [a for a in adds if a.status == "503"]
    checks.expect("503_has_retry_after", all(a.retry_after for a in busy),
                  f"{sum(bool(a.retry_after) for a in busy)} of {len(busy)} 503s carry Retry-After")
    checks.expect("nothing_acknowledged_lost", lost == 0 and drift == 0,
                  f"{lost} of {len(acknowledged)} acknowledged images missing; /healthz drift {drift}")
    return checks.result(
        hold_s=args.hold_seconds, released=released_line == "released", idle=idle_summary,
        searches_while_held=searches_summary, searches_whole_window=latency_summary(during),
        adds={"requests": len(adds), "statuses": dict(sorted(Counter(a.status for a in adds).items())),
              "started_while_held": len(while_held),
              "statuses_started_while_held": dict(sorted(Counter(a.status for a in while_held).items())),
              "p50_ms": _percentile([a.ms for a in adds], 50), "max_ms": slowest,
              "503_details": sorted({a.detail for a in busy})[:3], "acknowledged": len(acknowledged),
              "created": created},
        lost=lost, healthz_drift=drift, server=_server_state(server))


# ----------------------------------------------------------------------------- 4. memory
class MemoryWatch:
    """Samples a process's VmRSS every 50 ms; :meth:`mark` closes a step with its figures."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.steps: list[dict[str, Any]] = []

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            rss = process_memory_bytes("VmRSS", self.pid) or 0
            with self._lock:
                self._peak = max(self._peak, rss)

    def mark(self, step: str, **figures: Any) -> dict[str, Any]:
        rss = process_memory_bytes("VmRSS", self.pid) or 0
        hwm = process_memory_bytes("VmHWM", self.pid) or 0
        with self._lock:
            peak, self._peak = max(self._peak, rss), rss
        entry = {"step": step, "rss_mib": round(rss / MiB, 1), "hwm_mib": round(hwm / MiB, 1),
                 "peak_rss_during_mib": round(peak / MiB, 1), **figures}
        self.steps.append(entry)
        _say(f"memory: {step}: RSS {entry['rss_mib']:.0f} MiB, peak during the step "
             f"{entry['peak_rss_during_mib']:.0f} MiB, VmHWM {entry['hwm_mib']:.0f} MiB")
        return entry


def _big_jpeg(photo: Path, side: int, seed: int) -> bytes:
    """A grocery photo enlarged to ``side`` x ``side`` with a few seeded coloured boxes (distinct
    bytes per seed), JPEG quality 85: big in pixels, a few MB on the wire."""
    rng = np.random.default_rng(seed)
    with Image.open(photo) as image:
        big = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(big).copy()
    del big
    for _ in range(6):
        y, x = (int(v) for v in rng.integers(0, side - side // 10, 2))
        pixels[y:y + side // 10, x:x + side // 10] = rng.integers(0, 256, 3, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def scenario_memory(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """The server's resident memory through the decode-heavy requests of the reviewer's report."""
    bombs = _decode_bombs()
    start = time.monotonic()
    strip = bombs.long_strip_png(args.strip_length)
    bilevel = [bombs.bilevel_png(args.bilevel_side, seed) for seed in range(3 * args.bilevel_count)]
    base = grocery_photos(args.grocery, "test")
    big = [_big_jpeg(base[i], args.big_side, args.seed + i) for i in range(args.big_jpegs)]
    _say(f"memory: payloads crafted in {time.monotonic() - start:.0f} s (strip PNG {len(strip) / 1024:.0f} KB, "
         f"bilevel PNGs ~{np.mean([len(b) for b in bilevel]) / 1024:.0f} KB, big JPEGs "
         f"~{np.mean([len(b) for b in big]) / MiB:.1f} MB)")
    zero = time.monotonic()
    timeout = args.memory_timeout

    def post(path: str, files: list[tuple[str, tuple[str, bytes, str]]], **kwargs: Any) -> tuple[Answer, Any]:
        with httpx.Client(base_url=server.url, timeout=timeout) as client:
            return _request(client, zero, "POST", path, files=files, **kwargs)

    def concurrently(calls: list[Callable[[], tuple[Answer, Any]]]) -> list[tuple[Answer, Any]]:
        results: list[tuple[Answer, Any] | None] = [None] * len(calls)

        def run(i: int) -> None:
            results[i] = calls[i]()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=timeout + 30)
        return [r if r is not None else (Answer(0, "error: no answer", 0), None) for r in results]

    def brief(answers: list[Answer]) -> dict[str, Any]:
        return {"statuses": [a.status for a in answers], "ms": [a.ms for a in answers],
                "details": sorted({a.detail for a in answers if a.detail})[:3]}

    def png_files(chunk: list[bytes], tag: str) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("image", (f"{tag}-{i}.png", data, "image/png")) for i, data in enumerate(chunk)]

    n = args.bilevel_count
    with MemoryWatch(server.process.pid) as watch:
        time.sleep(2)
        watch.mark("start")
        strip_answer, _ = post("/search", [("image", ("strip.png", strip, "image/png"))],
                               params={"k": 10, "rerank": "none"})
        watch.mark("search with a 1x39,999,999 PNG", **brief([strip_answer]))
        one, _ = post("/images", png_files(bilevel[:n], "bilevel-a"), data={"identity": "memory"})
        watch.mark(f"{n} {args.bilevel_side}x{args.bilevel_side} 1-bit PNGs in one POST /images", **brief([one]))
        pair = concurrently([lambda: post("/images", png_files(bilevel[n:2 * n], "bilevel-b"),
                                          data={"identity": "memory"}),
                             lambda: post("/images", png_files(bilevel[2 * n:], "bilevel-c"),
                                          data={"identity": "memory"})])
        watch.mark("two such requests at once", **brief([a for a, _ in pair]))
        ids, added = [], []
        for i, data in enumerate(big):
            answer, body = post("/images", [("image", (f"big-{i}.jpg", data, "image/jpeg"))],
                                data={"identity": "memory"})
            added.append(answer)
            ids += [image["id"] for image in body["images"]] if body else []
        watch.mark(f"{len(big)} {args.big_side}x{args.big_side} JPEGs added, one request each", **brief(added))

        def thumbnail(image_id: int) -> Callable[[], tuple[Answer, Any]]:
            def call() -> tuple[Answer, Any]:
                with httpx.Client(base_url=server.url, timeout=timeout) as client:
                    return _request(client, zero, "GET", f"/thumbnails/{image_id}")
            return call

        thumbs = concurrently([thumbnail(i) for i in ids])
        watch.mark(f"{len(ids)} thumbnails of them at once", **brief([a for a, _ in thumbs]))
        time.sleep(args.settle_seconds)
        watch.mark(f"end ({args.settle_seconds:g} s later)")
    steps = watch.steps
    start_rss, end_rss = steps[0]["rss_mib"], steps[-1]["rss_mib"]
    peak = max(s["hwm_mib"] for s in steps)
    statuses = Counter(sorted(s for step in steps for s in step.get("statuses", [])))
    checks = Checks()
    checks.expect("peak_under_bound", peak <= args.memory_bound_mib,
                  f"VmHWM {peak:.0f} MiB (bound {args.memory_bound_mib} MiB)")
    checks.expect("memory_returned", end_rss <= start_rss + args.memory_return_mib,
                  f"RSS {start_rss:.0f} MiB at start, {end_rss:.0f} MiB at the end "
                  f"(allowed growth {args.memory_return_mib} MiB)")
    checks.expect("no_500", not any(s.startswith("5") and s != "503" for s in statuses) and not any(
        s.startswith("error") for s in statuses), f"statuses {dict(statuses)}")
    checks.expect("server_alive", server.process.poll() is None,
                  f"server {_exit_description(server.process.poll()) or 'running'}")
    return checks.result(steps=steps, start_rss_mib=start_rss, end_rss_mib=end_rss, peak_hwm_mib=peak,
                         statuses=dict(statuses), thumbnails=len(ids))


# ----------------------------------------------------------------------------- 5. full disk
def _index_check(root: Path) -> tuple[int, str]:
    """``waldo index check --index ROOT`` through the CLI's entry point, in this process."""
    from waldo.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["index", "check", "--index", str(root)])
    except Exception as error:  # noqa: BLE001 - an error the CLI does not turn into a message is a finding
        return 1, f"{out.getvalue()}\n{error!r}"
    return code, out.getvalue()


def _index_state(root: Path, acknowledged: dict[int, str]) -> dict[str, Any]:
    """Whether the index opens, passes its check, and holds every acknowledged image: its id,
    live, naming the stored file the answer named (``<sha256>.<ext>``; answers may give the path
    relative to the index, the catalogue holds it absolute)."""
    from waldo.index import IndexStore

    try:
        with contextlib.closing(IndexStore.open(root)) as store:
            live = {r.id: r.path for r in store.records()}
    except Exception as error:  # noqa: BLE001 - reported
        return {"opens": False, "error": repr(error)[:300]}
    code, output = _index_check(root)
    missing = [i for i, path in acknowledged.items() if Path(live.get(i, "")).name != Path(path).name]
    return {"opens": True, "check_ok": code == 0, "check_output": output.strip()[-300:], "images": len(live),
            "acknowledged_missing": len(missing)}


_FULL_MESSAGE = ("no space", "disk is full", "disk full", "storage full", "space left")


def _clear_full_message(text: str) -> bool:
    low = text.lower()
    return any(words in low for words in _FULL_MESSAGE) and "traceback" not in low


@contextlib.contextmanager
def _tmpfs(folder: Path, size_mb: int) -> Iterator[None]:
    """A ``size_mb`` tmpfs mounted on ``folder`` for the block (needs root), unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs ({mounted.stderr.strip() or mounted.returncode}); "
                              f"this scenario needs root")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def scenario_full_disk(index: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Adds through the server, then through the CLI, on a small tmpfs that fills up."""
    if os.geteuid() != 0:
        return {"passed": None, "skipped": "needs root (mount -t tmpfs)", "checks": {}}
    work = Path(tempfile.mkdtemp(prefix="waldo-full-disk-", dir=args.workdir))
    mount = work / "disk"
    variants = _add_photos(args, salt=5)
    photos = _query_photos(args)
    # The last test photos: the server's variants are of the first ones, so these are new to the index.
    fresh = grocery_photos(args.grocery, "test")[-args.cli_runs:] if args.cli_runs else []
    statuses: Counter[str] = Counter()
    details: dict[str, str] = {}
    acknowledged: dict[int, str] = {}
    first_full: int | None = None
    requests = 0
    server_exit: str | None = None
    try:
        with _tmpfs(mount, args.tmpfs_mb):
            root = mount / "index"
            shutil.copytree(index, root)
            used = shutil.disk_usage(mount)
            _say(f"full_disk: {args.tmpfs_mb} MB tmpfs, the index takes {used.used / MiB:.1f} MB")
            with serving(root, work / "server.log", args.server_arg) as server:
                zero = time.monotonic()
                deadline = zero + args.fill_seconds
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    while requests < args.max_fill_requests and time.monotonic() < deadline:
                        if first_full is not None and requests - first_full >= args.after_full_requests:
                            break
                        answer, body = _request(client, zero, "POST", "/images", data={"identity": "full-disk"},
                                                files={"image": (f"fill-{requests}.jpg", variants.get(requests),
                                                                 "image/jpeg")})
                        requests += 1
                        statuses[answer.status] += 1
                        details.setdefault(answer.status, answer.detail)
                        if body:
                            for image in body["images"]:
                                acknowledged[image["id"]] = image["path"]
                        elif first_full is None:
                            first_full = requests
                            _say(f"full_disk: first refusal at request {requests}: {answer.status} {answer.detail}")
                        if server.process.poll() is not None:
                            break
                    server_exit = _exit_description(server.process.poll())
                    search_after = None
                    if server_exit is None:
                        search_after, _ = _request(client, zero, "POST", "/search", params={"k": 5, "rerank": "none"},
                                                   files={"image": ("q.jpg", photos[0], "image/jpeg")})
                free_at_end = shutil.disk_usage(mount).free
            server_stop = _exit_description(server.process.returncode)
            log_tail = server.log_text()[-2000:]
            after_server = _index_state(root, acknowledged)
            _say(f"full_disk: {requests} adds {dict(statuses)}; server {server_exit or 'alive'}; "
                 f"{len(fresh)} `waldo index add` runs next")
            cli = []
            for photo in fresh:
                start = time.monotonic()
                run = subprocess.run([sys.executable, "-m", "waldo.cli", "index", "add", "--index", str(root),
                                      "--quiet", "--workers", "0", "--identity", "full-disk-cli", str(photo)],
                                     capture_output=True, text=True, timeout=600)
                output = (run.stdout + run.stderr).strip()
                cli.append({"exit": _exit_description(run.returncode), "seconds": round(time.monotonic() - start, 1),
                            "clear_message": _clear_full_message(output), "added": run.returncode == 0,
                            "last_line": output.splitlines()[-1][:300] if output else ""})
            after_cli = _index_state(root, acknowledged) if cli else after_server
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    checks = Checks()
    refused = {s: n for s, n in statuses.items() if s != "201"}
    checks.expect("disk_filled", first_full is not None, f"first refusal at request {first_full} of {requests}")
    checks.expect("only_201_and_507", set(refused) <= {"507"}, f"statuses {dict(statuses)}")
    checks.expect("507_detail_clear", "507" not in details or _clear_full_message(details["507"]),
                  f"507 detail: {details.get('507', '')!r}")
    checks.expect("server_never_killed", server_exit is None, f"server during the run: {server_exit or 'alive'}")
    checks.expect("search_after_full", search_after is not None and search_after.status == "200",
                  f"search after the disk filled: {search_after.status if search_after else 'not tried'}")
    for label, state in (("after_server", after_server), ("after_cli", after_cli)):
        checks.expect(f"index_valid_{label}", state.get("opens") and state.get("check_ok")
                      and state.get("acknowledged_missing") == 0,
                      f"opens {state.get('opens')}, check ok {state.get('check_ok')}, "
                      f"{state.get('acknowledged_missing')} of {len(acknowledged)} acknowledged missing")
    signalled = [c for c in cli if c["exit"] and c["exit"].startswith("signal")]
    unclear = [c for c in cli if not c["added"] and not (c["exit"] == "exit 1" and c["clear_message"])]
    checks.expect("cli_never_signalled", not signalled, f"{len(signalled)} of {len(cli)} runs died by a signal")
    checks.expect("cli_exit_1_clear_message", not unclear,
                  f"{len(unclear)} of {len(cli)} runs neither added nor exited 1 with a clear message")
    return checks.result(
        tmpfs_mb=args.tmpfs_mb, requests=requests, statuses=dict(sorted(statuses.items())),
        details={s: d for s, d in details.items() if s != "201"}, first_refusal_at=first_full,
        acknowledged=len(acknowledged), server_during_run=server_exit or "alive", server_stop=server_stop,
        search_after_full=search_after.status if search_after else None, free_bytes_at_end=free_at_end,
        index_after_server=after_server, index_after_cli=after_cli,
        cli_runs=cli, cli_exits=dict(Counter(c["exit"] for c in cli)),
        server_log_tail=log_tail if not checks.passed else "")


# ----------------------------------------------------------------------------- 6. many uploads
def scenario_many_uploads(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """``args.uploads`` one-photo adds back to back; every ``report_every``: latency, segments, fds."""
    variants = _add_photos(args, salt=6)
    pid = server.process.pid
    zero = time.monotonic()
    deadline = zero + args.many_seconds
    with httpx.Client(base_url=server.url, timeout=120) as client:
        def segments() -> int | None:
            try:
                return int(client.get("/stats").json()["segments"])
            except (httpx.HTTPError, ValueError, KeyError):
                return None

        start_segments, start_fds = segments(), _fd_count(pid)
        checkpoints = []
        latencies: list[float] = []  # of answered adds, in order
        statuses: Counter[str] = Counter()
        block: list[float] = []
        first_error = ""
        done = failed_in_a_row = 0
        gave_up_at = None
        for n in range(args.uploads):
            if time.monotonic() >= deadline or server.process.poll() is not None:
                break
            if failed_in_a_row >= args.give_up_after:  # the promise is broken; the rest would only repeat it
                gave_up_at = done
                _say(f"many_uploads: {failed_in_a_row} adds in a row failed; stopping at {done}")
                break
            answer, _ = _request(client, zero, "POST", "/images", data={"identity": "many"},
                                 files={"image": (f"many-{n}.jpg", variants.get(n), "image/jpeg")})
            done += 1
            statuses[answer.status] += 1
            failed_in_a_row = 0 if answer.status == "201" else failed_in_a_row + 1
            if answer.status == "201":
                latencies.append(answer.ms)
                block.append(answer.ms)
            elif not first_error:
                first_error = f"upload {n + 1}: {answer.status} {answer.detail}"
                _say(f"many_uploads: first failure at {first_error}")
            if done % args.report_every == 0 or n == args.uploads - 1 or failed_in_a_row >= args.give_up_after:
                point = {"uploads": done, "median_add_ms": _percentile(block, 50), "segments": segments(),
                         "fds": _fd_count(pid), "server_errors": sum(v for s, v in statuses.items()
                                                                     if s.startswith("5") or s.startswith("error"))}
                checkpoints.append(point)
                block = []
                _say(f"many_uploads: {point}")
    tenth = max(1, len(latencies) // 10)
    first, last = _percentile(latencies[:tenth], 50), _percentile(latencies[-tenth:], 50)
    seen_segments = [c["segments"] for c in checkpoints if c["segments"] is not None]
    seen_fds = [c["fds"] for c in checkpoints if c["fds"] is not None]
    errors = sum(v for s, v in statuses.items() if s.startswith("5") or s.startswith("error"))
    checks = Checks()
    alive = _exit_description(server.process.poll()) or "alive"
    checks.expect("all_uploads_done", done == args.uploads and alive == "alive",
                  f"{done} of {args.uploads} uploads sent; server {alive}")
    checks.expect("segments_bounded", bool(seen_segments) and max(seen_segments) <= args.max_segments,
                  f"live segments: {start_segments} at start, at most {max(seen_segments, default=None)} "
                  f"(bound {args.max_segments})")
    checks.expect("fds_bounded", bool(seen_fds) and start_fds is not None
                  and max(seen_fds) <= start_fds + args.fd_slack,
                  f"open fds: {start_fds} at start, at most {max(seen_fds, default=None)} "
                  f"(bound start + {args.fd_slack})")
    # A leak grows with the uploads; a bounded pool (threads' connections) levels off early.
    half = len(seen_fds) // 2
    growth = max(seen_fds[half:]) - max(seen_fds[:half]) if half else None
    checks.expect("fds_not_growing", growth is not None and growth <= args.fd_growth_slack,
                  f"open fds grew by {growth} over the second half of the uploads (allowed {args.fd_growth_slack})")
    checks.expect("latency_last_tenth_within_2x_first", first is not None and last is not None and last <= 2 * first,
                  f"median add {first} ms over the first 10%, {last} ms over the last 10%")
    checks.expect("no_5xx", errors == 0, f"{errors} 5xx or transport errors; first failure: {first_error or 'none'}")
    return checks.result(
        uploads=done, statuses=dict(sorted(statuses.items())), open_files_limit=_open_files_limit_of(pid),
        start_segments=start_segments, start_fds=start_fds, first_tenth_median_ms=first,
        last_tenth_median_ms=last, max_segments=max(seen_segments, default=None), max_fds=max(seen_fds, default=None),
        first_failure=first_error, gave_up_at=gave_up_at, checkpoints=checkpoints,
        seconds_sending=round(time.monotonic() - zero, 1))


# ----------------------------------------------------------------------------- 7. overlapping adds
def scenario_overlapping_adds(index: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two ``waldo index add`` runs on overlapping photo sets, started at the same moment."""
    from waldo.index import IndexStore

    work = Path(tempfile.mkdtemp(prefix="waldo-overlap-", dir=args.workdir))
    try:
        root = work / "index"
        shutil.copytree(index, root)
        with contextlib.closing(IndexStore.open(root)) as store:
            before = {r.path for r in store.records()}
        shared = args.overlap_shared
        photos = [str(p) for p in grocery_photos(args.grocery, "test")][:2 * args.overlap_each - shared]
        sets = [photos[:args.overlap_each], photos[args.overlap_each - shared:]]
        commands = [[sys.executable, "-m", "waldo.cli", "index", "add", "--index", str(root), "--quiet",
                     "--workers", "0", "--identity", f"overlap-{i}", *paths] for i, paths in enumerate(sets)]
        _say(f"overlapping_adds: two `waldo index add` runs of {args.overlap_each} photos, {shared} shared")
        start = time.monotonic()
        runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for c in commands]
        outputs = []
        for run in runs:
            try:
                out, _ = run.communicate(timeout=args.overlap_timeout)
            except subprocess.TimeoutExpired:
                run.kill()
                out, _ = run.communicate()
            outputs.append(out)
        seconds = round(time.monotonic() - start, 1)
        with contextlib.closing(IndexStore.open(root)) as store:
            records = store.records()
        code, check_output = _index_check(root)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    paths = [r.path for r in records]
    union = before | set(photos)
    duplicates = len(paths) - len(set(paths))
    exits = [_exit_description(r.returncode) for r in runs]
    checks = Checks()
    checks.expect("both_exit_0", exits == ["exit 0", "exit 0"], f"exits {exits}")
    checks.expect("index_holds_the_union", set(paths) == union,
                  f"{len(set(photos) - set(paths))} of the {len(photos)} new photos missing, "
                  f"{len(set(paths) - union)} unexpected")
    checks.expect("no_duplicates", duplicates == 0, f"{duplicates} paths indexed twice")
    checks.expect("index_check_ok", code == 0, check_output.strip()[-200:])
    return checks.result(
        photos_each=args.overlap_each, shared=shared, new_photos=len(photos), exits=exits, seconds=seconds,
        images_before=len(before), images_after=len(paths),
        last_lines=[o.strip().splitlines()[-1][:300] if o.strip() else "" for o in outputs])


# ----------------------------------------------------------------------------- the scenarios
@dataclass(frozen=True)
class Scenario:
    """A scenario function, what it runs against ("small": a server on a copy of the small
    index, "demo": on a copy of the demo index, "index": the small index itself, which the
    scenario copies), and the finding and promise it checks."""

    run: Callable[[Any, argparse.Namespace], dict[str, Any]]
    target: str
    finding: str
    promise: str


SCENARIOS: dict[str, Scenario] = {
    "slow_uploads": Scenario(scenario_slow_uploads, "small",
                             "16 slow-upload sockets lock every other client out (429)",
                             "searches all 200, p95 within 2x idle"),
    "scan_bombs": Scenario(scenario_scan_bombs, "small",
                           "a 20,000-scan progressive JPEG decodes for minutes, twice per search",
                           "bombs refused (4xx) within 5 s; other searches all 200, p95 within 2x idle"),
    "held_lock": Scenario(scenario_held_lock, "small",
                          "an index write lock held by another process stalls adds and searches",
                          "searches all 200 within 2x idle p95; adds 201 or 503 + Retry-After within the bound; "
                          "nothing acknowledged lost"),
    "memory": Scenario(scenario_memory, "demo",
                       "decodes of small files raise the server's memory by GBs, kept afterwards",
                       "peak RSS under 1.5 GiB on the demo index; memory returned afterwards"),
    "full_disk": Scenario(scenario_full_disk, "index",
                          "a full disk kills the server or the CLI by SIGBUS, or answers a bare 500",
                          "201 then 507 with a clear detail, no 500, no signal; index valid, nothing acknowledged "
                          "lost; CLI exits 1 with a clear message"),
    "many_uploads": Scenario(scenario_many_uploads, "small",
                             "segments pile up: fds run out (~251 segments at 1024 fds), adds slow down",
                             "segments and fds bounded, fds not growing, last 10% of adds within 2x the first 10%, "
                             "no 5xx"),
    "overlapping_adds": Scenario(scenario_overlapping_adds, "index",
                                 "two overlapping `waldo index add` runs: the loser exits 2 and adds nothing",
                                 "both exit 0; the index holds the union, no duplicates"),
}

# Full size, and --quick: (option, type, full, quick). Every other option has one default.
SIZES: list[tuple[str, type, float, float]] = [
    ("idle_seconds", float, 10, 4), ("attack_seconds", float, 40, 12), ("bomb_scans", int, 20000, 2000),
    ("bomb_timeout", float, 600, 180), ("hold_seconds", float, 40, 15), ("add_bound_s", float, 30, 12),
    ("cli_runs", int, 10, 3), ("after_full_requests", int, 20, 10), ("uploads", int, 10000, 300),
    ("report_every", int, 100, 50), ("many_seconds", float, 7200, 900), ("overlap_each", int, 40, 20),
    ("overlap_shared", int, 20, 10),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options (also what each scenario function reads); ``--quick`` fills in the
    short sizes of :data:`SIZES` for every option not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated, from: {', '.join(SCENARIOS)}; 'all' for every one "
                             f"(default: all, unless --doc alone)")
    parser.add_argument("--quick", action="store_true", help="short sizes (minutes instead of an hour)")
    parser.add_argument("--json", type=Path, default=None, help="merge the results into this file")
    parser.add_argument("--label", default="now", help="name of this run in the --json file (e.g. before, after)")
    parser.add_argument("--doc", action="store_true", help="print the Markdown table of the --json file's runs")
    parser.add_argument("--index", type=Path, default=REPO / "demo-index",
                        help="the demo index for `memory` (built with `waldo index build` when absent)")
    parser.add_argument("--small-index", type=Path, default=None,
                        help="a small index to copy for the other scenarios (default: build one)")
    parser.add_argument("--grocery", type=Path, default=None, help="the grocery_store folder (default: WALDO_DATA's)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="a flag for every `waldo serve` started, e.g. --server-arg=--query-slots=2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-factor", type=float, default=2.0,
                        help="p95 under attack must stay within this factor of the idle p95")
    for name, kind, full, quick in SIZES:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {full:g}, {quick:g} with --quick")
    # slow_uploads
    parser.add_argument("--slow-sockets", type=int, default=16)
    parser.add_argument("--slow-body-bytes", type=int, default=200_000, help="the Content-Length they declare")
    parser.add_argument("--slow-interval", type=float, default=10.0, help="seconds between their body bytes")
    # scan_bombs
    parser.add_argument("--bombs", type=int, default=2)
    parser.add_argument("--bomb-side", type=int, default=6000)
    parser.add_argument("--bomb-bound-s", type=float, default=5.0, help="a bomb must be answered within this")
    # held_lock
    parser.add_argument("--adders", type=int, default=4)
    parser.add_argument("--after-release-s", type=float, default=5.0, help="adds and searches go on this long")
    # memory
    parser.add_argument("--strip-length", type=int, default=39_999_999)
    parser.add_argument("--bilevel-side", type=int, default=6300)
    parser.add_argument("--bilevel-count", type=int, default=12, help="1-bit PNGs per POST /images")
    parser.add_argument("--big-jpegs", type=int, default=8)
    parser.add_argument("--big-side", type=int, default=6000)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument("--memory-timeout", type=float, default=900.0, help="per request")
    parser.add_argument("--memory-bound-mib", type=int, default=1536, help="the server's VmHWM must stay under")
    parser.add_argument("--memory-return-mib", type=int, default=256,
                        help="RSS at the end may exceed RSS at the start by at most this")
    # full_disk
    parser.add_argument("--tmpfs-mb", type=int, default=30)
    parser.add_argument("--max-fill-requests", type=int, default=3000)
    parser.add_argument("--fill-seconds", type=float, default=900.0)
    # many_uploads
    parser.add_argument("--open-files", type=int, default=1024, help="the server's soft fd limit (ulimit -n)")
    parser.add_argument("--max-segments", type=int, default=48, help="live segments must stay at or under")
    parser.add_argument("--fd-slack", type=int, default=64, help="open fds may grow by at most this")
    parser.add_argument("--fd-growth-slack", type=int, default=16,
                        help="open fds may grow by at most this over the second half of the uploads")
    parser.add_argument("--give-up-after", type=int, default=100, help="stop after this many failed adds in a row")
    # overlapping_adds
    parser.add_argument("--overlap-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    for name, kind, full, quick in SIZES:
        if getattr(args, name) is None:
            setattr(args, name, kind(quick if args.quick else full))
    args.grocery = args.grocery or data_root() / "grocery_store"
    if args.scenarios is None:
        args.scenarios = "" if args.doc else "all"
    names = list(SCENARIOS) if args.scenarios == "all" else [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.names = names
    return args


def run_scenarios(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run ``args.names`` in turn; a scenario that raises is reported (``error``), not fatal."""
    owned = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="waldo-abuse-")) if owned else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        small = args.small_index
        for name in args.names:
            scenario = SCENARIOS[name]
            _say(f"== {name}: {scenario.finding}")
            start = time.monotonic()
            try:
                if scenario.target in ("small", "index") and small is None:
                    _say("building the small index (9 grocery photos, random projection)")
                    small = build_small_index(args.workdir / "small-index", args.grocery)
                if scenario.target == "index":
                    result = scenario.run(small, args)
                else:
                    source = ensure_demo_index(args.index, args.grocery) if scenario.target == "demo" else small
                    folder = args.workdir / name
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    shutil.copytree(source, folder / "index")
                    open_files = args.open_files if name == "many_uploads" else None
                    with serving(folder / "index", folder / "server.log", args.server_arg, open_files) as server:
                        result = scenario.run(server, args)
                        exited = server.process.poll()
                    result["server_exited_by_itself"] = _exit_description(exited)
                    log = server.log_text()
                    result["server_log_tail"] = log[-1500:] if (exited is not None or not result.get("passed")) else ""
            except Exception as error:  # noqa: BLE001 - the harness failed, not necessarily the promise
                _say(f"{name}: the scenario itself failed: {error!r}")
                result = {"passed": False, "error": repr(error)[:1000], "checks": {}}
            result.update(scenario=name, finding=scenario.finding, promise=scenario.promise,
                          seconds=round(time.monotonic() - start, 1))
            verdict = {True: "PASS", False: "FAIL", None: "SKIPPED"}[result.get("passed")]
            _say(f"== {name}: {verdict} in {result['seconds']:.0f} s")
            for check, item in result.get("checks", {}).items():
                _say(f"   {'ok ' if item['ok'] else 'NO '} {check}: {item['detail']}")
            results[name] = result
    finally:
        if owned and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- report
def provenance() -> dict[str, Any]:
    """Which code ran: git HEAD, the waldo package imported, and files changed since HEAD."""
    import waldo

    package = Path(waldo.__file__).resolve().parent

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], capture_output=True, text=True, cwd=REPO)
        return done.stdout.rstrip() if done.returncode == 0 else ""  # porcelain lines start with a space

    changed = git("status", "--porcelain", "--", "waldo").splitlines() if package == REPO / "waldo" else []
    # `python -m waldo.cli` children (the server, the CLI runs) import from their working folder
    # first, then PYTHONPATH: both are recorded, with the package this process imported.
    return {"git_head": git("rev-parse", "--short", "HEAD"), "waldo_package": str(package), "cwd": os.getcwd(),
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "repo_waldo": package == REPO / "waldo", "changed_since_head": [line[3:] for line in changed]}


def summary_line(result: dict[str, Any]) -> str:
    """One line of what a scenario measured, for the table."""
    if result.get("error"):
        return f"error: {result['error'][:120]}"
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    name = result["scenario"]
    if name == "slow_uploads":
        attack, idle = result["during_attack"], result["idle"]
        after = result["slow_answered_after_s"]
        return (f"searches {_statuses(attack['statuses'])}, p95 {_ms(attack['p95_ms'])} vs idle {_ms(idle['p95_ms'])}; "
                f"slow sockets: {_statuses(result['slow_outcomes'])}"
                + (f" after {after[0]:g}-{after[1]:g} s" if after else ""))
    if name == "scan_bombs":
        bombs = ", ".join(f"{b['status']} in {_ms(b['ms'])}" for b in result["bombs"]) or "no answer"
        during, idle = result["during_bombs"], result["idle"]
        return (f"bombs ({result['bomb']['scans']} scans): {bombs}; searches {_statuses(during['statuses'])}, "
                f"p95 {_ms(during['p95_ms'])} (max {_ms(during['max_ms'])}) vs idle {_ms(idle['p95_ms'])}")
    if name == "held_lock":
        adds, held = result["adds"], result["searches_while_held"]
        return (f"lock held {result['hold_s']:g} s: searches {_statuses(result['searches_whole_window']['statuses'])}, "
                f"p95 while held {_ms(held['p95_ms'])} vs idle {_ms(result['idle']['p95_ms'])}; adds "
                f"{_statuses(adds['statuses'])}, slowest {_ms(adds['max_ms'])}; lost {result['lost']}")
    if name == "memory":
        steps = result["steps"]
        raised = max(range(1, len(steps)), key=lambda i: steps[i]["hwm_mib"] - steps[i - 1]["hwm_mib"])
        return (f"RSS {result['start_rss_mib']:.0f} MiB at start, peak (VmHWM) {result['peak_hwm_mib']:.0f} MiB "
                f"(most raised by: {steps[raised]['step']}), {result['end_rss_mib']:.0f} MiB at the end; "
                f"statuses {_statuses(result['statuses'])}")
    if name == "full_disk":
        cli = result["cli_runs"]
        clear = sum(c["clear_message"] for c in cli)
        example = next((c["last_line"] for c in cli if not c["added"] and not c["clear_message"]), "")
        return (f"{result['requests']} adds: {_statuses(result['statuses'])}; server {result['server_during_run']}; "
                f"index valid: {result['index_after_cli'].get('check_ok')}, acknowledged missing "
                f"{result['index_after_cli'].get('acknowledged_missing')}; CLI: {_statuses(result['cli_exits'])}, "
                f"{clear} with a clear message" + (f" (else: `{example[:80]}`)" if example else ""))
    if name == "many_uploads":
        fds = [c["fds"] for c in result["checkpoints"] if c["fds"] is not None]
        half = len(fds) // 2
        growth = f" (+{max(fds[half:]) - max(fds[:half])} over the second half)" if half else ""
        return (f"{result['uploads']} uploads ({result['open_files_limit']} fds): {_statuses(result['statuses'])}; "
                f"segments up to {result['max_segments']}, fds {result['start_fds']} at start, up to "
                f"{result['max_fds']}{growth}; median add "
                f"{_ms(result['first_tenth_median_ms'])} first 10%, {_ms(result['last_tenth_median_ms'])} last 10%")
    if name == "overlapping_adds":
        return (f"{result['photos_each']} photos each, {result['shared']} shared: {', '.join(result['exits'])}; "
                f"{result['images_after'] - result['images_before']} of {result['new_photos']} new photos indexed")
    return ""


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {s}" for s, n in counts.items()) or "none"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def markdown(body: dict[str, Any]) -> str:
    """The table of a --json file: per scenario, the finding, the promise, what the ``before``
    run measured and what the latest other run measured, and whether that run kept the promise."""
    runs = body.get("runs", {})
    before = runs.get("before", {}).get("scenarios", {})
    latest_label = max((label for label in runs if label != "before"), default=None,
                       key=lambda label: runs[label].get("updated", ""))
    now = runs.get(latest_label, {}).get("scenarios", {}) if latest_label else {}
    header = f"| finding | promise | before | {latest_label or 'now'} | kept? |"
    lines = [header, "|---|---|---|---|---|"]
    for name, scenario in SCENARIOS.items():
        if name not in before and name not in now:
            continue
        then, current = before.get(name), now.get(name)
        verdict = ("n/a" if current is None
                   else {True: "pass", False: "**fail**", None: "skipped"}[current.get("passed")])
        stored = current or then or {}  # the words the run itself recorded, so the table follows the JSON
        finding, promise = stored.get("finding", scenario.finding), stored.get("promise", scenario.promise)
        lines.append(f"| `{name}`: {finding} | {promise} | "
                     f"{summary_line(then) if then else 'not run'} | {summary_line(current) if current else 'not run'} "
                     f"| {verdict} |")
    produced = []
    for label in [label for label in ("before", latest_label) if label in runs]:
        seen = {}
        for result in runs[label]["scenarios"].values():
            seen.setdefault(result.get("command", ""), result.get("code", {}))
        produced += [f"- {label}: `.venv/bin/python {command}`, on {_code_note(code)}"
                     for command, code in seen.items()]
    lines += ["", "Runs:", *produced]
    return "\n".join(lines)


def _code_note(code: dict[str, Any]) -> str:
    """Which code a run measured, in words, from :func:`provenance`."""
    if not code:
        return "code unknown"
    if code.get("repo_waldo"):
        changed = len(code.get("changed_since_head", []))
        return f"the working tree at {code['git_head']}" + (f", {changed} files of waldo/ changed" if changed else "")
    return f"commit {code['git_head']} (exported to {Path(code['waldo_package']).parent}, first on PYTHONPATH)"


def merge_results(path: Path, label: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge this run's scenarios into the JSON file at ``path`` under ``label``."""
    body = json.loads(path.read_text()) if path.is_file() else {}
    run = body.setdefault("runs", {}).setdefault(label, {"scenarios": {}})
    run["scenarios"].update(results)
    run["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    return body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    if args.names:
        command = "benchmarks/resource_abuse.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = {"command": command, "quick": args.quick,
                 "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "code": provenance(), "machine": {"cpu_count": os.cpu_count(),
                                                   "load_average": [round(v, 2) for v in os.getloadavg()]}}
        results = {name: {**result, **stamp} for name, result in run_scenarios(args).items()}
    body = merge_results(args.json, args.label, results) if args.json and results else None
    if args.doc:
        if body is None:
            body = json.loads(args.json.read_text()) if args.json else {"runs": {args.label: {"scenarios": results}}}
        print(markdown(body))
    elif results:
        print(json.dumps(results, indent=2))
    return 0 if all(r.get("passed") is not False for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
