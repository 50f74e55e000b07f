"""Crash consistency: SIGKILL ``waldo index add`` and ``waldo serve`` at random moments.

Two writers are killed over and over on one index built from real grocery photos:

* ``cli``: ``waldo index add --index ROOT photo...`` on a fresh batch of 4 to 12 photos. It
  commits the whole batch in one SQLite transaction and then prints ``added N images``: that
  line is the acknowledgement. The kill lands anywhere in the run (interpreter start-up, model
  load, decoding, descriptor and keypoint extraction, segment writing, the commit, the print).
  ``--commit-kills`` of them are aimed at the commit instead: the writer is killed as soon as
  its new segment folder appears (it has started writing the rows it is about to commit).
* ``server``: a live ``waldo serve`` while a client posts 1 to 3 new photos per ``POST /images``
  (acknowledged by its 201) and now and then deletes an acknowledged upload (acknowledged by
  its 200). The server is killed at a random moment while the client is busy.
* ``merge`` (``--merge-kills``, off by default): this process adds 2 to 4 photos one at a time
  without merging (one segment each), then a child process merges small segments
  (``IndexStore.merge_small_segments`` with merge factor 2, so every segment takes part) and is
  killed at a random moment of its merge, or as soon as its merged segment folder appears. A
  merge adds and removes nothing: after the kill the index must hold exactly what it held.

Each kill is SIGKILL to the writer's whole process group (no handler, no flush, no atexit:
what a power cut or the OOM killer does to the process). After each kill, in this process:
the index opens (``Waldo.open``), ``waldo index check`` passes (manifest, arrays, SQLite rows
and checksums agree), a query with an indexed photo finds that photo first, and the index holds
exactly the acknowledged images: none lost, no acknowledged removal undone, nothing unexpected.
The one operation in flight at the kill may have committed or not, but only whole (a partial
add is a failure). A kill that leaves a new segment folder no committed row names landed inside
the commit protocol (rows written, not committed): ``kills_mid_commit`` counts them. Then the
next round starts on the same index, which keeps growing.

    .venv/bin/python benchmarks/crash_kill.py --cli-kills 60 --commit-kills 10 --server-kills 40 \\
        --json results/crash_kill.json

Timing makes each run different, but the seed fixes the photos, batch sizes and kill delays.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from waldo.api import Waldo  # noqa: E402
from waldo.data.datasets import read_labels_csv  # noqa: E402
from waldo.paths import data_root  # noqa: E402
from waldo.serve.process import free_port  # noqa: E402

__all__ = ["CrashReport", "ModeReport", "run_crash_kill"]

CLI_IDENTITY = "crash-cli"
SERVER_IDENTITY = "crash-server"
MERGE_IDENTITY = "crash-merge"
# The merging child: factor 2 merges every small segment; "ready" once the index is open.
MERGE_CHILD = ("import sys\nfrom waldo.index import IndexStore, MergePolicy\n"
               "store = IndexStore.open(sys.argv[1])\nstore.merge_policy = MergePolicy(factor=2)\n"
               "print('ready', flush=True)\nprint(store.merge_small_segments(), flush=True)\n")


@dataclass
class ModeReport:
    """What the kills of one writer did. ``survived`` counts kills after which every check
    passed; the other counters say which check failed and how often."""

    mode: str
    kills: int = 0
    survived: int = 0
    runs_finished_before_kill: int = 0  # cli runs that ended (and acknowledged) before their kill time
    images_acknowledged: int = 0
    removes_acknowledged: int = 0
    lost_images: int = 0  # acknowledged, then missing after a kill (or under another id)
    resurrected_images: int = 0  # acknowledged removal, back after a kill
    unexpected_images: int = 0  # in the index, never sent or already removed
    partial_operations: int = 0  # the in-flight add or remove landed in part
    corrupt_opens: int = 0  # the index did not open
    failed_checks: int = 0  # `waldo index check` found problems
    failed_queries: int = 0  # a query failed or did not find an indexed photo first
    writer_errors: int = 0  # a writer failed on its own (not killed): exit != 0, or a 5xx
    inflight_committed: int = 0  # the operation in flight at the kill had committed
    inflight_not_committed: int = 0
    kills_mid_commit: int = 0  # the kill left a new segment folder that no committed row names
    leftover_before_restart: int = 0  # files under uploads/ that no live row names, right after the last kill
    orphan_uploads_cleaned: int = 0  # deleted by the start-up clean-up of one more server start
    leftover_upload_files: int = 0  # files under uploads/ that no live row names after that start
    kill_delay_s: list[float] = field(default_factory=list)  # min, max
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)


@dataclass
class CrashReport:
    seed: int
    images_in_index: int
    seconds: float
    cli_window_s: float
    server_window_s: float
    modes: list[ModeReport]

    @property
    def kills(self) -> int:
        return sum(m.kills for m in self.modes)

    @property
    def survived(self) -> int:
        return sum(m.survived for m in self.modes)

    @property
    def lost_images(self) -> int:
        return sum(m.lost_images for m in self.modes)

    @property
    def corrupt_opens(self) -> int:
        return sum(m.corrupt_opens for m in self.modes)

    def summary(self) -> dict:
        return {"kills": self.kills, "survived": self.survived, "lost_images": self.lost_images,
                "corrupt_opens": self.corrupt_opens}


class PhotoPool:
    """Real grocery photos in a seeded order; each is handed out once (so no add is a duplicate)."""

    def __init__(self, grocery: Path, rng: random.Random) -> None:
        records = [r for r in read_labels_csv(grocery).records if r.attrs.get("kind") == "natural"]
        self.paths = [str(Path(r.path).resolve()) for r in records]
        rng.shuffle(self.paths)
        self.next = 0

    def take(self, n: int) -> list[str]:
        if self.next + n > len(self.paths):
            raise RuntimeError("ran out of photos; use fewer kills")
        chosen = self.paths[self.next:self.next + n]
        self.next += n
        return chosen


@dataclass
class Operation:
    """The writer's operation in flight at the kill: paths it would add or remove."""

    kind: str  # "add" | "remove" | ""
    paths: set[str] = field(default_factory=set)


class Verifier:
    """What the index must hold, and the checks run after each kill."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.live: dict[str, int | None] = {}  # path -> id (None: not known yet) of every acknowledged image

    def adopt(self) -> None:
        with contextlib.closing(_open_store(self.root)) as store:
            self.live = {r.path: r.id for r in store.records()}

    def uncommitted_segments(self) -> set[str]:
        """Segment folders no committed row names: a writer died between writing and committing
        (the next writer deletes them under its lock)."""
        with contextlib.closing(_open_store(self.root)) as store:
            committed = {s["name"] for s in store.info()["segments"]}
        return {p.name for p in (self.root / "segments").iterdir() if p.is_dir()} - committed

    def after_kill(self, report: ModeReport, label: str, inflight: Operation, uncommitted_before: set[str]) -> bool:
        """Run every check; True when all pass. Updates the expectation to what is there.
        ``uncommitted_before``: :meth:`uncommitted_segments` before the killed writer started."""
        report.kills_mid_commit += bool(self.uncommitted_segments() - uncommitted_before)
        try:
            engine = Waldo.open(self.root)
        except Exception as error:  # noqa: BLE001 - the point is to report it
            report.corrupt_opens += 1
            report.fail(f"{label}: the index did not open: {error!r}")
            return False
        try:
            return self._check_open(engine, report, label, inflight)
        finally:
            engine.store.close()

    def _check_open(self, engine: Waldo, report: ModeReport, label: str, inflight: Operation) -> bool:
        ok = True
        code, output = _index_check(self.root)
        if code != 0:
            report.failed_checks += 1
            report.fail(f"{label}: waldo index check: {output.strip()[-500:]}")
            ok = False
        live = {r.path: r.id for r in engine.store.records()}
        expected = set(self.live)
        lost = [p for p in expected - set(live) if not (inflight.kind == "remove" and p in inflight.paths)]
        moved = [p for p, i in self.live.items() if i is not None and p in live and live[p] != i]
        extra = set(live) - expected
        if inflight.kind == "add":
            landed = extra & inflight.paths
            extra -= inflight.paths
            if landed and landed != inflight.paths - expected:
                report.partial_operations += 1
                report.fail(f"{label}: {len(landed)} of the {len(inflight.paths)} photos of the add in flight landed")
                ok = False
            report.inflight_committed += bool(landed)
            report.inflight_not_committed += not landed
        elif inflight.kind == "remove":
            gone = inflight.paths - set(live)
            report.inflight_committed += bool(gone)
            report.inflight_not_committed += not gone
        if lost or moved:
            report.lost_images += len(lost) + len(moved)
            report.fail(f"{label}: acknowledged images missing or renumbered: {sorted(lost + moved)[:3]}")
            ok = False
        if extra:
            report.unexpected_images += len(extra)
            report.fail(f"{label}: images nobody acknowledged: {sorted(extra)[:3]}")
            ok = False
        ok &= self._query(engine, live, report, label)
        self.live = {p: live.get(p) for p in live}  # the in-flight outcome becomes the new truth
        return ok

    def _query(self, engine: Waldo, live: dict[str, int], report: ModeReport, label: str) -> bool:
        """A photo in the index, used as the query, must come back first (its own descriptor)."""
        if not live:
            return True
        path = self.rng.choice(sorted(live))
        try:
            hits = engine.search(path, k=3).hits
        except Exception as error:  # noqa: BLE001
            report.failed_queries += 1
            report.fail(f"{label}: query failed: {error!r}")
            return False
        # Its own descriptor scores 1; a byte-identical photo elsewhere in the index may tie.
        best = [h.id for h in hits if h.score >= hits[0].score - 1e-4] if hits else []
        if live[path] not in best or any(h.id not in live.values() for h in hits):
            report.failed_queries += 1
            report.fail(f"{label}: query with {path} returned {[(h.id, h.path) for h in hits]}")
            return False
        return True

    def record_removed(self, path: str) -> None:
        self.live.pop(path, None)


def _open_store(root: Path):
    from waldo.index import IndexStore

    return IndexStore.open(root)


def _index_check(root: Path) -> tuple[int, str]:
    """``waldo index check --index ROOT``, run through the CLI's own entry point (in process:
    a subprocess would spend seconds importing torch for each of the hundred kills)."""
    from waldo.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["index", "check", "--index", str(root)])
    except Exception as error:  # noqa: BLE001 - an error the CLI does not turn into a message
        return 1, f"{out.getvalue()}\n{error!r}"
    return code, out.getvalue()


def _kill_group(process: subprocess.Popen) -> bool:
    """SIGKILL the process and everything it started; False if it had already exited."""
    if process.poll() is not None:
        return False
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    process.wait(timeout=30)
    return process.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- cli
def _cli_command(root: Path, photos: list[str]) -> list[str]:
    return [sys.executable, "-m", "waldo.cli", "index", "add", "--index", str(root), "--quiet", "--workers", "0",
            "--batch-size", "4", "--identity", CLI_IDENTITY, *photos]


def _run_cli(root: Path, photos: list[str], delay: float | None, *,
             at_commit: bool = False) -> tuple[bool, int | None, str]:
    """Start ``waldo index add``; kill it after ``delay`` s (None: let it finish), or with
    ``at_commit`` as soon as its new segment folder appears. Returns (killed, exit code, output)."""
    process = subprocess.Popen(_cli_command(root, photos), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, cwd=REPO)
    if at_commit:
        _wait_for_new_segment(root / "segments", process)
        delay = 0.0
    try:
        output, _ = process.communicate(timeout=delay)
        return False, process.returncode, output
    except subprocess.TimeoutExpired:
        killed = _kill_group(process)
        output, _ = process.communicate()
        return killed, process.returncode, output


def _wait_for_new_segment(segments: Path, process: subprocess.Popen) -> None:
    """Return once a segment folder appears under ``segments`` or ``process`` exits. Output is
    small (one line), so the unread pipe cannot block the writer meanwhile."""
    before = {p.name for p in segments.iterdir()}
    while process.poll() is None:
        if any(p.name not in before for p in segments.iterdir()):
            return
        time.sleep(0.0005)


def calibrate_cli(root: Path, pool: PhotoPool, verifier: Verifier) -> float:
    """One uninterrupted add: its duration sets the window the kill delays are drawn from."""
    photos = pool.take(8)
    start = time.monotonic()
    killed, code, output = _run_cli(root, photos, None)
    if code != 0 or "added 8 images" not in output:
        raise RuntimeError(f"waldo index add failed without a kill:\n{output}")
    verifier.adopt()
    return time.monotonic() - start


def run_cli_kills(root: Path, pool: PhotoPool, verifier: Verifier, rng: random.Random, kills: int,
                  window: float, report: ModeReport, commit_kills: int = 0) -> None:
    """Kill ``waldo index add`` ``kills`` times, the last ``commit_kills`` of them as soon as its
    new segment folder appears; runs that finish first are acknowledged adds."""
    delays: list[float] = []
    while report.kills < kills:
        photos = pool.take(rng.randint(4, 12))
        # Half the random kills anywhere in the run; half in its last stretch, where the photos
        # are decoded, described, written and committed (start-up takes most of a short run).
        delay = rng.uniform(0.05, window) if rng.random() < 0.5 else rng.uniform(0.5 * window, 0.9 * window)
        aimed = report.kills >= kills - commit_kills
        uncommitted_before = verifier.uncommitted_segments()
        killed, code, output = _run_cli(root, photos, delay, at_commit=aimed)
        label = f"cli kill {report.kills + 1} " + ("at its commit" if aimed else f"at {delay:.2f} s")
        if not killed:
            report.runs_finished_before_kill += 1
            if code == 0 and f"added {len(photos)} images" in output:
                report.images_acknowledged += len(photos)
                verifier.live.update({p: None for p in photos})  # ids are learnt from the next check
            else:
                report.writer_errors += 1
                report.fail(f"cli run exited {code} without being killed: {output.strip()[-400:]}")
            continue
        report.kills += 1
        if not aimed:
            delays.append(delay)
        ok = verifier.after_kill(report, label, Operation("add", set(photos)), uncommitted_before)
        report.survived += ok
        print(f"{label}: {'survived' if ok else 'FAILED'}", flush=True)
    report.kill_delay_s = [round(min(delays), 2), round(max(delays), 2)] if delays else []


# ----------------------------------------------------------------------------- server
@dataclass
class ClientLog:
    """What the client thread saw; read by the main thread only after the thread has ended."""

    acked_adds: dict[str, int] = field(default_factory=dict)  # path -> id from a 201
    acked_removes: list[str] = field(default_factory=list)
    inflight: Operation = field(default_factory=lambda: Operation(""))
    server_errors: list[str] = field(default_factory=list)


def _stored_path(uploads: Path, data: bytes) -> str:
    """Where the service stores these bytes: uploads/<sha256>.<ext> (all grocery photos are JPEG)."""
    return str(uploads / f"{hashlib.sha256(data).hexdigest()}.jpg")


def _indexed_path(uploads: Path, answered: str) -> str:
    """The path the index stores for an upload the service answered with: the service names
    files relative to the index folder (older versions: absolute)."""
    return answered if Path(answered).is_absolute() else str(uploads.parent / answered)


def _client(url: str, uploads: Path, pool: PhotoPool, rng: random.Random, removable: list[tuple[str, int]],
            stop: threading.Event, log: ClientLog) -> None:
    """Add 1 to 3 photos per request; every fourth request or so, delete an acknowledged upload."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            try:
                if removable and rng.random() < 0.25:
                    path, image_id = removable.pop(rng.randrange(len(removable)))
                    log.inflight = Operation("remove", {path})
                    response = client.delete(f"/images/{image_id}")
                    if response.status_code == 200:
                        log.acked_removes.append(path)
                else:
                    photos = pool.take(rng.randint(1, 3))
                    payload = [Path(p).read_bytes() for p in photos]
                    log.inflight = Operation("add", {_stored_path(uploads, d) for d in payload})
                    response = client.post("/images", data={"identity": SERVER_IDENTITY},
                                           files=[("image", (Path(p).name, d, "image/jpeg"))
                                                  for p, d in zip(photos, payload)])
                    if response.status_code == 201:
                        for image in response.json()["images"]:
                            path = _indexed_path(uploads, image["path"])
                            log.acked_adds[path] = image["id"]
                            removable.append((path, image["id"]))
            except httpx.HTTPError:
                return  # the server died under this request: it stays in flight
            if response.status_code >= 500 or response.status_code not in (200, 201):
                log.server_errors.append(f"{response.status_code} {response.text[:200]}")
            log.inflight = Operation("")


def _start_server(root: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "waldo.cli", "serve", "--index", str(root), "--port", str(port),
             "--log-level", "warning"], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"waldo serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        time.sleep(0.2)
    _kill_group(process)
    raise RuntimeError(f"waldo serve did not start: {log_path.read_text()[-2000:]}")


def _unnamed_uploads(uploads: Path, live: set[str]) -> int:
    """Files under uploads/ (temporary ones included, the lock file not) that no live row names."""
    if not uploads.is_dir():
        return 0
    return sum(1 for f in uploads.iterdir() if f.is_file() and f.name != ".lock" and str(f) not in live)


def run_server_kills(root: Path, pool: PhotoPool, verifier: Verifier, rng: random.Random, kills: int,
                     window: float, report: ModeReport, log_path: Path) -> None:
    uploads = root / "uploads"
    removable: list[tuple[str, int]] = []  # acknowledged uploads the client may delete
    delays: list[float] = []
    for n in range(1, kills + 1):
        process, url = _start_server(root, log_path)
        log, stop = ClientLog(), threading.Event()
        client_rng = random.Random(rng.random())
        thread = threading.Thread(target=_client, args=(url, uploads, pool, client_rng, removable, stop, log))
        delay = rng.uniform(0.05, window)
        uncommitted_before = verifier.uncommitted_segments()
        thread.start()
        time.sleep(delay)
        killed = _kill_group(process)
        stop.set()
        thread.join(timeout=120)
        delays.append(delay)
        report.kills += killed
        if not killed:
            report.writer_errors += 1
            report.fail(f"server kill {n}: the server had exited by itself: {log_path.read_text()[-800:]}")
        report.images_acknowledged += len(log.acked_adds)
        report.removes_acknowledged += len(log.acked_removes)
        report.writer_errors += len(log.server_errors)
        for error in log.server_errors[:3]:
            report.fail(f"server kill {n}: the server answered {error}")
        verifier.live.update({p: i for p, i in log.acked_adds.items() if p not in log.acked_removes})
        for path in log.acked_removes:
            verifier.record_removed(path)
        before = set(verifier.live)
        ok = verifier.after_kill(report, f"server kill {n} at {delay:.2f} s", log.inflight, uncommitted_before)
        report.survived += ok and killed
        print(f"server kill {n} at {delay:.2f} s: {'survived' if ok and killed else 'FAILED'}", flush=True)
        resurrected = [p for p in log.acked_removes if p in verifier.live and p not in before]
        if resurrected:  # after_kill counted them as unexpected already; say what they are
            report.resurrected_images += len(resurrected)
        # Uploads whose add did not commit are dropped from the client's choice of deletions.
        removable[:] = [(p, i) for p, i in removable if p in verifier.live]
    # The clean-up at start-up deletes the files of adds the kills cut short: start the server
    # once more, let it finish starting, stop it cleanly, then look for files no row names.
    report.leftover_before_restart = _unnamed_uploads(uploads, set(verifier.live))
    process, url = _start_server(root, log_path)
    try:
        report.orphan_uploads_cleaned = int(httpx.get(f"{url}/stats", timeout=10).json()["orphan_uploads_removed"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(process)
    report.leftover_upload_files = _unnamed_uploads(uploads, set(verifier.live))
    report.kill_delay_s = [round(min(delays), 2), round(max(delays), 2)] if delays else []


# ----------------------------------------------------------------------------- merge
def _run_merge(root: Path, delay: float | None, *,
               at_commit: bool = False) -> tuple[bool, int | None, str, float]:
    """Start a merging child; kill it ``delay`` s after it opened the index (None: let it
    finish), or with ``at_commit`` as soon as its merged segment folder appears. Returns
    (killed, exit code, output, seconds from its "ready" to its end)."""
    process = subprocess.Popen([sys.executable, "-c", MERGE_CHILD, str(root)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
    first = process.stdout.readline()
    ready = time.monotonic()
    if first.strip() != "ready":
        process.wait(timeout=60)
        return False, process.returncode, first + process.stdout.read(), 0.0
    if at_commit:
        _wait_for_new_segment(root / "segments", process)
        delay = 0.0
    try:
        process.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        killed = _kill_group(process)
    return killed, process.returncode, first + process.stdout.read(), time.monotonic() - ready


def run_merge_kills(root: Path, pool: PhotoPool, verifier: Verifier, rng: random.Random, kills: int,
                    report: ModeReport) -> float:
    """Kill merges of small segments ``kills`` times (every other one aimed at its commit);
    returns the window the random delays were drawn from (1.2 times an uninterrupted merge)."""
    engine = Waldo.open(root)

    def small_segments() -> None:
        for photo in pool.take(rng.randint(2, 4)):  # one segment each: the merge's work
            added = engine.add([photo], [MERGE_IDENTITY], progress=False, num_workers=0, merge=False).added
            report.images_acknowledged += len(added)
            verifier.live.update({photo: added[0]} if added else {})

    try:
        small_segments()
        killed, code, output, seconds = _run_merge(root, None)
        if killed or code != 0:
            raise RuntimeError(f"a merge failed without a kill:\n{output}")
        verifier.adopt()  # what the uninterrupted merge left is the truth (ids included)
        window = round(1.2 * seconds, 3)
        delays: list[float] = []
        while report.kills < kills:
            small_segments()
            aimed = report.kills % 2 == 1
            delay = rng.uniform(0.0, window)
            uncommitted_before = verifier.uncommitted_segments()
            killed, code, output, _ = _run_merge(root, delay, at_commit=aimed)
            label = f"merge kill {report.kills + 1} " + ("at its commit" if aimed else f"at {delay:.2f} s")
            if not killed:
                report.runs_finished_before_kill += 1
                if code != 0:
                    report.writer_errors += 1
                    report.fail(f"merge exited {code} without being killed: {output.strip()[-400:]}")
                continue
            report.kills += 1
            if not aimed:
                delays.append(delay)
            ok = verifier.after_kill(report, label, Operation(""), uncommitted_before)
            report.survived += ok
            print(f"{label}: {'survived' if ok else 'FAILED'}", flush=True)
        report.kill_delay_s = [round(min(delays), 2), round(max(delays), 2)] if delays else []
    finally:
        engine.store.close()
    return window


# ----------------------------------------------------------------------------- driver
def build_index(root: Path, pool: PhotoPool) -> None:
    """A fresh index (random projection: no fitting pass) holding 8 photos, keypoints included."""
    engine = Waldo.create(root, backbone="efficientnet_lite0", projection="random", progress=False)
    photos = pool.take(8)
    report = engine.add(photos, ["seed"] * len(photos), progress=False, num_workers=0)
    engine.store.close()
    if len(report.added) != len(photos):
        raise RuntimeError(f"could not build the starting index: {report.errors}")


def run_crash_kill(workdir: Path, *, cli_kills: int, server_kills: int, commit_kills: int = 0, seed: int = 0,
                   server_window: float = 6.0, grocery: Path | None = None, merge_kills: int = 0) -> CrashReport:
    """Build an index under ``workdir`` and kill its writers ``cli_kills + server_kills +
    merge_kills`` times (``commit_kills`` of the cli kills aimed at the commit). The report's
    modes are cli and server, then merge when ``merge_kills``."""
    start = time.monotonic()
    rng = random.Random(seed)
    pool = PhotoPool(grocery or data_root() / "grocery_store", rng)
    root = workdir / "index"
    build_index(root, pool)
    verifier = Verifier(root, rng)
    verifier.adopt()
    cli = ModeReport("cli")
    cli_window = 0.0
    if cli_kills:
        duration = calibrate_cli(root, pool, verifier)
        cli.images_acknowledged += 8
        cli_window = round(1.2 * duration, 2)  # some runs finish before their kill: acknowledged adds
        run_cli_kills(root, pool, verifier, rng, cli_kills, cli_window, cli, commit_kills)
    server = ModeReport("server")
    if server_kills:
        run_server_kills(root, pool, verifier, rng, server_kills, server_window, server, workdir / "server.log")
    modes = [cli, server]
    if merge_kills:
        merge = ModeReport("merge")
        run_merge_kills(root, pool, verifier, rng, merge_kills, merge)
        modes.append(merge)
    with contextlib.closing(_open_store(root)) as store:
        size = len(store)
    return CrashReport(seed=seed, images_in_index=size, seconds=round(time.monotonic() - start, 1),
                       cli_window_s=cli_window, server_window_s=server_window, modes=modes)


WRITERS = {"cli": "`waldo index add`", "server": "`waldo serve` (`POST /images`, `DELETE`)",
           "merge": "merge of small segments (`IndexStore.merge_small_segments`)"}


def markdown(body: dict) -> str:
    """docs/reliability.md's table of a ``--json`` report, and what the run left behind."""
    header = ("| writer | kills | survived | lost images | corrupt opens | failed checks / queries | partial ops "
              "| acknowledged | in flight at the kill: committed / not | kills mid-commit |")
    lines = [header, "|---" * 10 + "|"]
    for m in body["modes"]:
        acknowledged = (f"{m['images_acknowledged']} images ({m['runs_finished_before_kill']} runs finished before "
                        f"their kill)" if m["mode"] == "cli" else
                        f"{m['images_acknowledged']} images added, {m['removes_acknowledged']} removed")
        lines.append(f"| {WRITERS[m['mode']]} | {m['kills']} | {m['survived']} | {m['lost_images']} | "
                     f"{m['corrupt_opens']} | {m['failed_checks']} / {m['failed_queries']} | {m['partial_operations']} "
                     f"| {acknowledged} | {m['inflight_committed']} / {m['inflight_not_committed']} | "
                     f"{m['kills_mid_commit']} |")
    delays = {m["mode"]: m["kill_delay_s"] for m in body["modes"]}
    server = next(m for m in body["modes"] if m["mode"] == "server")
    lines += ["", f"The index ended with {body['images_in_index']} images; the run took {body['seconds']:.0f} s (each "
              f"restart loads torch and the model). Kill delays: {min(delays['cli']):.2f} to {max(delays['cli']):.2f} s "
              f"into a CLI run, {min(delays['server']):.2f} to {max(delays['server']):.2f} s into a server's life. "
              f"Upload files of adds that never committed, left by the last server kill: "
              f"{server['leftover_before_restart']}; deleted by the restart that closes the run: "
              f"{server['orphan_uploads_cleaned']}; left after it: {server['leftover_upload_files']}. "
              + (f"Merges were killed {min(delays['merge']):.2f} to {max(delays['merge']):.2f} s after the merging "
                 f"process opened the index (or as soon as its merged segment appeared). "
                 if delays.get("merge") else "")
              + f"Produced by `.venv/bin/python {body['command']}` (`results/crash_kill.json`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cli-kills", type=int, default=60)
    parser.add_argument("--commit-kills", type=int, default=10,
                        help="of the cli kills, how many strike as soon as the writer's segment folder appears")
    parser.add_argument("--server-kills", type=int, default=40)
    parser.add_argument("--merge-kills", type=int, default=0,
                        help="also kill merges of small segments this many times (half as soon as the merged "
                             "segment folder appears)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-window", type=float, default=6.0,
                        help="kill the server up to this many seconds after it answers")
    parser.add_argument("--workdir", default=None, help="where the index is built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--doc", action="store_true", help="also rewrite the crash-kill block of docs/reliability.md")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="waldo-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_crash_kill(workdir, cli_kills=args.cli_kills, server_kills=args.server_kills,
                                commit_kills=args.commit_kills, seed=args.seed, server_window=args.server_window,
                                merge_kills=args.merge_kills)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    body = {"command": "benchmarks/crash_kill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **report.summary(), **{k: v for k, v in asdict(report).items() if k != "modes"},
            "modes": [asdict(m) for m in report.modes]}
    for mode in report.modes:
        print(f"{mode.mode:>6}: {mode.kills} kills, {mode.survived} survived, {mode.lost_images} lost, "
              f"{mode.corrupt_opens} corrupt opens, {mode.failed_checks} failed checks, {mode.failed_queries} "
              f"failed queries, {mode.partial_operations} partial, {mode.unexpected_images} unexpected; "
              f"{mode.images_acknowledged} images acknowledged, in flight committed/not "
              f"{mode.inflight_committed}/{mode.inflight_not_committed}, {mode.kills_mid_commit} mid-commit")
        for failure in mode.failures[:10]:
            print(f"    {failure}")
    print(f"total: {report.kills} kills, {report.survived} survived, {report.lost_images} lost images, "
          f"{report.corrupt_opens} corrupt opens; {report.images_in_index} images in the index; {report.seconds} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
    if args.doc:
        from waldo_experiments.doc_blocks import markers, write_block

        start, end = markers("crash-kill")
        write_block(Path(__file__).resolve().parents[1] / "docs" / "reliability.md",
                    f"{start}\n\n{markdown(body)}\n\n{end}", start, end)
    ok = report.survived == report.kills and all(not m.failures for m in report.modes)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
