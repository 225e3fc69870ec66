#!/usr/bin/env python3
"""Throughput harness: storescp against dcmtk ``storescp``, same corpus, same sender.

For every scenario and run, each server is started on a free port with a fresh storage
directory on the real disk (never tmpfs), fed by ``storescp-loadgen``, measured, verified and
stopped; servers take turns (A B A B ...) so that drift of the machine hits all alike.

Per run it records: wall time, images/s and MB/s (data set bytes, 10^6) from the load
generator; server CPU seconds (utime+stime from /proc, the process, its live descendants and
its reaped children, over the load generator's run plus a settle period); peak RSS (the
largest sampled sum of VmRSS over the process tree, and at least the main process's VmHWM);
and whether every instance arrived intact (each stored file's data set bytes, after its
group 0002, hashed and compared with the corpus file's).

Reports the median and range of the runs and the ratio against dcmtk ``storescp +B +xa``
(the median of per-run ratios, run k against run k) as markdown, and optionally JSON.

``--ceilings`` measures the machine instead (``storescp-loadgen ceilings``); ``--bounds``
measures, after each round of a scenario, the ceilings that bound it (``bounds.py``).

Usage::

    python3 benchmarks/harness.py --runs 5
    python3 benchmarks/harness.py --scenarios tiny1,tiny4 --servers dcmtk,storescp-nofsync
    python3 benchmarks/harness.py --scenarios tiny1s,tiny4s --servers storescp,storescp-nofsync
    python3 benchmarks/harness.py --ceilings --runs 3
    python3 benchmarks/harness.py --scenarios small4 --servers dcmtk,storescp --bounds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bounds as bounds_mod  # noqa: E402
import corpus as corpus_mod  # noqa: E402
from medians import median_range  # noqa: E402

DCMTK_STORESCP = "/usr/bin/storescp"
AE_TITLE = "BENCH"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One line of the issue's table: a corpus, a number of associations, a headline metric."""

    name: str
    title: str
    kind: str
    base_count: int
    associations: int
    metric: str  # "images_per_s" | "mb_per_s" | "peak_rss_mb"
    grouping: str = "grouped"  # corpus.py --grouping

    def corpus_key(self, scale: float) -> str:
        return f"{self.kind}-{self.grouping}-{max(1, round(self.base_count * scale))}"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("tiny1", "tiny, 1 assoc", "tiny", 5000, 1, "images_per_s"),
        Scenario("tiny4", "tiny, 4 assoc", "tiny", 5000, 4, "images_per_s"),
        Scenario("small4", "small, 4 assoc", "small", 1000, 4, "mb_per_s"),
        Scenario("large1", "large, 1 assoc", "large", 4, 1, "mb_per_s"),
        Scenario("large4", "peak RSS, large x4", "large", 4, 4, "peak_rss_mb"),
        # Not in the table: a study and series per instance (reports, radiographs),
        # so that each instance makes its folders.
        Scenario(
            "tiny1s", "tiny, 1 assoc, a study each", "tiny", 5000, 1, "images_per_s", "single"
        ),
        Scenario(
            "tiny4s", "tiny, 4 assoc, a study each", "tiny", 5000, 4, "images_per_s", "single"
        ),
    )
}
#: The issue's table, run when --scenarios is not given.
DEFAULT_SCENARIOS = ("tiny1", "tiny4", "small4", "large1", "large4")


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server under test. ``{port}`` and ``{dir}`` are substituted."""

    name: str
    title: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    index_db: bool = False
    forks: bool = False  # serves associations in child processes
    durable: bool = False  # every instance on disk before its success (fsync on)


def server_specs(python: str, storescp_cmd: list[str] | None) -> dict[str, ServerSpec]:
    ours = tuple(storescp_cmd) if storescp_cmd else (python, "-m", "storescp")
    logged = (*ours, "{port}", AE_TITLE, "--storage-dir", "{dir}")
    # dcmtk prints nothing per instance by default; --quiet compares like with like.
    base = (*logged, "--quiet")
    dcmtk = (DCMTK_STORESCP, "+B", "+xa", "-aet", AE_TITLE, "-od", "{dir}", "{port}")
    nodelay = (("TCP_NODELAY", "1"),)
    specs = (
        ServerSpec("dcmtk", "dcmtk storescp +B +xa", dcmtk, nodelay),
        ServerSpec(
            "dcmtk-fork",
            "dcmtk storescp +B +xa --fork",
            (*dcmtk[:-1], "--fork", dcmtk[-1]),
            nodelay,
            forks=True,
        ),
        ServerSpec("storescp", "storescp (fsync on, default)", base, durable=True),
        ServerSpec("storescp-nofsync", "storescp --no-fsync", (*base, "--no-fsync")),
        ServerSpec(
            "storescp-logged", "storescp, every C-STORE logged (fsync on)", logged, durable=True
        ),
        ServerSpec(
            "storescp-nofsync-logged",
            "storescp --no-fsync, every C-STORE logged",
            (*logged, "--no-fsync"),
        ),
        ServerSpec(
            "storescp-index",
            "storescp --index-db (fsync on)",
            (*base, "--index-db", "{index}"),
            index_db=True,
            durable=True,
        ),
    )
    return {s.name: s for s in specs}


DEFAULT_SERVERS = ("dcmtk", "storescp", "storescp-nofsync")


def server_available(spec: ServerSpec) -> str | None:
    """None if the server can be started, else why not."""
    exe = spec.argv[0]
    if spec.name.startswith("dcmtk"):
        return None if os.access(exe, os.X_OK) else f"{exe} not found"
    probe = [*spec.argv[: spec.argv.index("{port}")], "--help"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(probe)}: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return f"{' '.join(probe)} exited {done.returncode}: {tail[-1] if tail else ''}"
    return None


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Live (and zombie) descendants of ``pid``, by the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def tree_cpu_seconds(pid: int, forks: bool = True) -> float:
    """utime+stime of pid and its descendants, plus what pid has reaped (cutime+cstime).

    Scanning /proc for descendants costs ~2 ms; with ``forks`` false only pid is read.
    """
    if not forks:
        fields = _stat_fields(pid)
        if fields is None:
            return float("nan")
        return sum(int(f) for f in fields[11:15]) / CLK_TCK
    total = reaped = 0
    for _ in range(5):
        fields = _stat_fields(pid)
        if fields is None:
            return float("nan")
        reaped = int(fields[13]) + int(fields[14])
        total = int(fields[11]) + int(fields[12])
        for child in descendants(pid):
            cf = _stat_fields(child)
            if cf is not None:
                total += int(cf[11]) + int(cf[12]) + int(cf[13]) + int(cf[14])
        again = _stat_fields(pid)
        # A child reaped during the scan would be counted twice or not at all: retry.
        if again is not None and int(again[13]) + int(again[14]) == reaped:
            return (total + reaped) / CLK_TCK
    return (total + reaped) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over pid and its descendants, from /proc/<pid>/statm (cheap)."""
    total = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KB
    return total


class RssSampler:
    """Samples the process tree's RSS every ``interval`` seconds in a thread (~2 ms of CPU
    per sample, so only for servers that fork; for the others VmHWM is exact and free)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid), status_kb(self.pid, "VmHWM"))


# --------------------------------------------------------------------------- files


def dataset_digest(path: Path) -> tuple[str, str] | None:
    """(SOP Instance UID from the file meta, SHA-1 of the data set bytes after group 0002).

    None if the file is not a Part 10 file. Group 0002 is walked element by element in
    explicit VR little endian (PS3.10 7.1), as the load generator does.
    """
    with open(path, "rb") as fh:
        head = fh.read(65536)
        if head[128:132] != b"DICM":
            return None
        at = 132
        sop = ""
        while len(head) >= at + 8 and head[at : at + 2] == b"\x02\x00":
            element = int.from_bytes(head[at + 2 : at + 4], "little")
            vr = head[at + 4 : at + 6]
            if vr in LONG_VRS:
                length = int.from_bytes(head[at + 8 : at + 12], "little")
                value_at = at + 12
            else:
                length = int.from_bytes(head[at + 6 : at + 8], "little")
                value_at = at + 8
            if element == 0x0003:
                sop = head[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
            at = value_at + length
        digest = hashlib.sha1(head[at:], usedforsecurity=False)
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return sop, digest.hexdigest()


def part10_files(root: Path) -> Iterator[Path]:
    """Regular files under root, skipping hidden directories (the server's private area)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path


@dataclass
class Corpus:
    """A generated corpus and the expected digest of every instance."""

    path: Path
    kind: str
    count: int
    syntax: str
    expected: dict[str, str] = field(default_factory=dict)
    dataset_bytes: int = 0
    file_bytes: int = 0


def ensure_corpus(
    base: Path, kind: str, count: int, syntax: str, grouping: str = "grouped"
) -> Corpus:
    """Generate the corpus unless an identical one is already there; load its digests."""
    suffix = "" if grouping == "grouped" else f"-{grouping}"
    path = base / f"{kind}-{syntax}-{count}{suffix}"
    stamp = path / "corpus.json"
    wanted = {
        "version": corpus_mod.CORPUS_VERSION,
        "kind": kind,
        "count": count,
        "syntax": syntax,
        "grouping": grouping,
    }
    current: dict[str, Any] = {"grouping": "grouped"}  # stamps from before groupings
    if stamp.exists():
        with contextlib.suppress(ValueError):
            current |= json.loads(stamp.read_text())
    if any(current.get(k) != v for k, v in wanted.items()):
        if path.exists():
            shutil.rmtree(path)
        log(f"generating corpus {path.name} ...")
        corpus_mod.write_corpus(path, kind, count, syntax, grouping)
    result = Corpus(path, kind, count, syntax)
    for file in part10_files(path):
        found = dataset_digest(file)
        if found is None:
            continue
        sop, digest = found
        result.expected[sop] = digest
        result.file_bytes += file.stat().st_size
    if len(result.expected) != count:
        raise SystemExit(f"corpus {path}: {len(result.expected)} instances, expected {count}")
    return result


@dataclass
class Verification:
    """What arrived: every expected instance exactly once and bit-identical, or not."""

    files: int = 0
    intact: int = 0
    missing: int = 0
    corrupt: int = 0
    unexpected: int = 0

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.corrupt == 0 and self.unexpected == 0


def verify(storage: Path, corpus: Corpus) -> Verification:
    result = Verification()
    seen: set[str] = set()
    for file in part10_files(storage):
        result.files += 1
        found = dataset_digest(file)
        if found is None or found[0] not in corpus.expected or found[0] in seen:
            result.unexpected += 1
            continue
        seen.add(found[0])
        if corpus.expected[found[0]] == found[1]:
            result.intact += 1
        else:
            result.corrupt += 1
    result.missing = len(corpus.expected) - len(seen)
    return result


# --------------------------------------------------------------------------- running


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"server not listening on {port} after {timeout:.0f} s")


def settle_cpu(pid: int, forks: bool, limit: float = 3.0) -> float:
    """Tree CPU seconds once they stop growing (the server finishing deferred work)."""
    last = tree_cpu_seconds(pid, forks)
    deadline = time.monotonic() + limit
    steady = 0
    while time.monotonic() < deadline and steady < 2:
        time.sleep(0.1)
        now = tree_cpu_seconds(pid, forks)
        steady = steady + 1 if now - last < 1.5 / CLK_TCK else 0
        last = now
    return last


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # forked children of dcmtk --fork


def sync_disks() -> None:
    subprocess.run(["sync"], check=False)


# Every run starts with a clean page cache. Left alone, the cache of earlier runs' files
# grows into memory this guest has never touched, and each page it takes first then costs
# the hypervisor a fault: after a few GB written, copies into the page cache ran 3-4x
# slower and whole runs halved (small, 4 assoc: ~1,300 -> ~600 img/s for every server).
# Needs root; without it runs go on as they are (reported once).
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_drop_warned = False


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean page cache (a no-op without root)."""
    global _drop_warned
    sync_disks()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        if not _drop_warned:
            log(f"cannot drop the page cache before runs ({exc}); results are noisier")
            _drop_warned = True


# File creation on a journal-less ext4 (this machine's root) skips inodes deleted in the last
# 60 s (360 s while their inode table block is dirty): fs/ext4/ialloc.c recently_deleted().
# Deleting the thousands of files of one run right before the next run would slow the next
# server's creates, so storage dirs with many files are removed only after the last run,
# then `sync`, and the next invocation waits until 6 minutes have passed (measured: after
# deleting 30,000 files, 4 KB creates ran at ~1,300/s for 200 s, ~18,000/s after 300 s;
# new inodes dirty the same inode-table blocks, which extends the window to 360 s).
IMMEDIATE_DELETE_MAX_FILES = 64
CLEANUP_QUIET_SECONDS = 365.0


def cleanup(out_dir: Path, paths: list[Path]) -> None:
    """Remove ``paths``, sync, and stamp the time for :func:`wait_after_cleanup`."""
    if not paths:
        return
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    stamp_cleanup(out_dir)


def stamp_cleanup(out_dir: Path) -> None:
    """Syncs, and notes now as the time of the last mass deletion."""
    sync_disks()
    (out_dir / ".last-cleanup").write_text(f"{time.time():.3f}\n")


def wait_after_cleanup(out_dir: Path) -> None:
    stamp = out_dir / ".last-cleanup"
    try:
        last = float(stamp.read_text())
    except (OSError, ValueError):
        return
    remaining = last + CLEANUP_QUIET_SECONDS - time.time()
    if remaining > 0:
        log(f"waiting {remaining:.0f} s after the last mass deletion (ext4 recently_deleted)")
        time.sleep(remaining)


@dataclass
class RunResult:
    scenario: str
    server: str
    run: int
    ok: bool
    error: str = ""
    instances: int = 0
    failed: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    mb_per_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    verification: dict[str, int] = field(default_factory=dict)
    loadgen: dict[str, Any] = field(default_factory=dict)
    rundir: str = ""  # left for removal at the end (or kept)


def run_once(
    scenario: Scenario,
    spec: ServerSpec,
    run: int,
    corpus: Corpus,
    loadgen: Path,
    workdir: Path,
    sender_args: list[str],
    keep: bool,
    delete_each: bool = False,
) -> RunResult:
    result = RunResult(scenario.name, spec.name, run, ok=False)
    rundir = workdir / f"{scenario.name}-{spec.name}-{run}"
    if rundir.exists():
        shutil.rmtree(rundir)
    storage = rundir / "store"
    storage.mkdir(parents=True)
    port = free_port()
    subst = {"{port}": str(port), "{dir}": str(storage), "{index}": str(rundir / "index.db")}
    argv = [subst.get(a, a) for a in spec.argv]
    env = {**os.environ, **dict(spec.env)}
    if not delete_each:
        # Dropping the cache also evicts the inode tables, which ends the regime that
        # --delete-each-run measures (recently_deleted() trusts an uncached block).
        drop_page_cache()
    server_log = open(rundir / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        argv,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=rundir,
        start_new_session=True,
    )
    try:
        wait_listening(port, proc)
        time.sleep(0.2)  # let the readiness probe's association (or fork) finish
        cpu_before = tree_cpu_seconds(proc.pid, spec.forks)
        sampler = RssSampler(proc.pid) if spec.forks else contextlib.nullcontext()
        with sampler:
            done = subprocess.run(
                [
                    str(loadgen),
                    "--port",
                    str(port),
                    "--called-ae",
                    AE_TITLE,
                    "--associations",
                    str(scenario.associations),
                    "--files",
                    str(corpus.path),
                    *sender_args,
                    "--json",
                ],
                capture_output=True,
                timeout=1800,
                check=False,
            )
            cpu_after = settle_cpu(proc.pid, spec.forks)
        result.cpu_s = cpu_after - cpu_before
        peak_kb = status_kb(proc.pid, "VmHWM")
        if isinstance(sampler, RssSampler):
            peak_kb = max(peak_kb, sampler.peak_kb)
        result.peak_rss_mb = peak_kb / 1024
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            result.error = f"loadgen exited {done.returncode}: {done.stderr.decode()[-500:]}"
            return result
        result.loadgen = report
        result.instances = int(report["instances"])
        result.failed = int(report["failed"])
        result.seconds = float(report["seconds"])
        result.images_per_s = float(report["images_per_s"])
        result.mb_per_s = float(report["mb_per_s"])
        if report["errors"]:
            result.error = "; ".join(report["errors"])[:500]
        elif report["failure_examples"]:
            result.error = f"non-success statuses: {report['failure_examples'][:3]}"
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        result.error = str(exc)
        return result
    finally:
        stop_server(proc)
        server_log.close()
    check = verify(storage, corpus)
    result.verification = asdict(check)
    result.ok = bool(report["ok"]) and check.ok and not result.error
    if not check.ok and not result.error:
        result.error = f"verification failed: {asdict(check)}"
    if not keep and result.ok and (delete_each or check.files <= IMMEDIATE_DELETE_MAX_FILES):
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        result.rundir = str(rundir)
    return result


# --------------------------------------------------------------------------- reporting


def fmt(value: float, metric: str) -> str:
    if value != value:  # NaN
        return "-"
    if metric == "images_per_s":
        return f"{value:,.0f}"
    if metric in ("mb_per_s", "peak_rss_mb"):
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{value:.2f}"


UNITS = {"images_per_s": "img/s", "mb_per_s": "MB/s", "peak_rss_mb": "MB", "cpu_s": "s"}


def summarize(
    results: list[RunResult], scenarios: list[Scenario], servers: list[ServerSpec]
) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> server -> {metric: (median, min, max), ratio: ..., runs, ok_runs}."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in scenarios:
        per: dict[str, dict[str, Any]] = {}
        baseline = {
            r.run: r for r in results if r.scenario == scenario.name and r.server == "dcmtk"
        }
        for spec in servers:
            runs = [r for r in results if r.scenario == scenario.name and r.server == spec.name]
            good = [r for r in runs if r.ok]
            entry: dict[str, Any] = {"runs": len(runs), "ok_runs": len(good)}
            for metric in ("images_per_s", "mb_per_s", "cpu_s", "peak_rss_mb", "seconds"):
                entry[metric] = median_range([float(getattr(r, metric)) for r in good])
            ratios = []
            for r in good:
                base = baseline.get(r.run)
                if base is None or not base.ok:
                    continue
                ours = float(getattr(r, scenario.metric))
                theirs = float(getattr(base, scenario.metric))
                if theirs > 0:
                    ratios.append(ours / theirs)
            entry["ratio"] = median_range(ratios)
            entry["errors"] = sorted({r.error for r in runs if r.error})[:3]
            per[spec.name] = entry
        summary[scenario.name] = per
    return summary


def markdown(
    summary: dict[str, dict[str, dict[str, Any]]],
    scenarios: list[Scenario],
    servers: list[ServerSpec],
    skipped: dict[str, str],
    bounds: dict[str, dict[str, Any]],
) -> str:
    lines: list[str] = []
    head = "| server | " + " | ".join(s.title for s in scenarios) + " |"
    lines += ["### Headline (median of runs; ratio vs dcmtk +B in the same runs)", "", head]
    lines.append("|---|" + "---|" * len(scenarios))
    for spec in servers:
        cells = []
        for s in scenarios:
            e = summary[s.name][spec.name]
            med = e[s.metric][0]
            cell = f"{fmt(med, s.metric)} {UNITS[s.metric]}" if e["ok_runs"] else "failed"
            ratio = e["ratio"][0]
            if spec.name != "dcmtk" and ratio == ratio:
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append(f"| {spec.title} | " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        lines.append(f"| {name} | " + " | ".join("pending" for _ in scenarios) + " |")
        lines.append("")
        lines.append(f"{name}: not measured ({why})")
    lines.append("")
    for s in scenarios:
        lines += [
            f"### {s.title}",
            "",
            "| server | runs ok | img/s med (min-max) | MB/s med (min-max) | ratio med (min-max)"
            " | CPU s med | peak RSS MB med (max) | wall s med |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for spec in servers:
            e = summary[s.name][spec.name]
            img, mbs, cpu, rss, secs, ratio = (
                e["images_per_s"],
                e["mb_per_s"],
                e["cpu_s"],
                e["peak_rss_mb"],
                e["seconds"],
                e["ratio"],
            )
            ratio_cell = (
                f"{ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f})" if ratio[0] == ratio[0] else "-"
            )
            lines.append(
                f"| {spec.title} | {e['ok_runs']}/{e['runs']} "
                f"| {img[0]:,.0f} ({img[1]:,.0f}-{img[2]:,.0f}) "
                f"| {mbs[0]:,.1f} ({mbs[1]:,.1f}-{mbs[2]:,.1f}) | {ratio_cell} "
                f"| {cpu[0]:.2f} | {rss[0]:,.1f} ({rss[2]:,.1f}) | {secs[0]:.3f} |"
            )
            for err in e["errors"]:
                lines.append(f"|  ↳ error: {err[:160]} |||||||")
        lines.append("")
        titles = {spec.name: spec.title for spec in servers}
        lines += bounds_mod.markdown(bounds.get(s.name, {}), UNITS[s.metric], titles)
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dcmtk = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([DCMTK_STORESCP, "--version"], capture_output=True, timeout=10)
        dcmtk = out.stdout.decode(errors="replace").splitlines()[0]
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            timeout=10,
        )
        commit = out.stdout.decode().strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dcmtk": dcmtk,
        "commit": commit,
    }


# --------------------------------------------------------------------------- main


def find_loadgen(explicit: str | None, build: bool) -> Path:
    if explicit:
        return Path(explicit)
    path = ROOT / "target" / "release" / "storescp-loadgen"
    if build or not path.exists():
        log("building storescp-loadgen (release) ...")
        subprocess.run(
            ["cargo", "build", "--release", "-p", "storescp-loadgen"], cwd=ROOT, check=True
        )
    return path


def run_ceilings(args: argparse.Namespace, loadgen: Path) -> int:
    out_dir = Path(args.out_dir)
    workdir = out_dir / "ceilings"
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_wait:
        wait_after_cleanup(out_dir)
    runs: list[dict[str, float]] = []
    labels: dict[str, str] = {}  # key -> label, in the load generator's order
    for k in range(args.runs):
        log(f"ceilings run {k + 1}/{args.runs}")
        drop_page_cache()
        argv = [str(loadgen), "ceilings", "--dir", str(workdir / f"run{k}"), "--json"]
        done = subprocess.run(
            [*argv, "--scale", str(args.scale), "--no-cleanup"], capture_output=True, check=True
        )
        measured = json.loads(done.stdout)
        labels = measured.pop("labels")
        runs.append(measured)
    cleanup(out_dir, [workdir])
    lines = ["| ceiling | median | min | max |", "|---|---|---|---|"]
    for key, label in labels.items():
        med, lo, hi = median_range([r[key] for r in runs])
        digits = 2 if "_ms_" in key else 0
        lines.append(f"| {label} | {med:,.{digits}f} | {lo:,.{digits}f} | {hi:,.{digits}f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "labels": labels, "ceilings": runs}, indent=2) + "\n"
        )
    return 0


LOCK_PATH = Path("/tmp/storescp-bench-harness.lock")


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One harness at a time on this machine: two would disturb each other's figures and
    race on the corpus directory."""
    with open(LOCK_PATH, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            log(f"waiting for another harness run ({fh.read().strip() or 'unknown'}) to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield


def main(argv: list[str] | None = None) -> int:
    with machine_lock():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="storescp vs dcmtk storescp throughput harness",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per server and scenario")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma list of dcmtk, dcmtk-fork, storescp, storescp-nofsync, storescp-index, "
        "storescp-logged, storescp-nofsync-logged",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply corpus sizes")
    parser.add_argument(
        "--syntax", default="mixed", choices=("explicit", "implicit", "rle", "mixed")
    )
    parser.add_argument("--max-pdu", type=int, default=16384, help="loadgen --max-pdu")
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="loadgen --nagle: Nagle's algorithm on, each PDU written in pieces (as storescu)",
    )
    parser.add_argument("--corpus-dir", default=str(HERE / "corpus"))
    parser.add_argument("--out-dir", default=str(HERE / "out"), help="storage dirs (real disk)")
    parser.add_argument("--loadgen", help="path of storescp-loadgen (default: build it)")
    parser.add_argument("--build", action="store_true", help="rebuild storescp-loadgen first")
    parser.add_argument("--python", default=sys.executable, help="interpreter for storescp")
    parser.add_argument(
        "--storescp-cmd", help='command that starts storescp, default "PYTHON -m storescp"'
    )
    parser.add_argument("--json", help="write all runs and the summary to this file")
    parser.add_argument("--markdown", help="write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep storage dirs of good runs")
    parser.add_argument("--ceilings", action="store_true", help="measure machine ceilings")
    parser.add_argument(
        "--bounds",
        action="store_true",
        help="after each round, measure the ceilings that bound the scenario (bounds.py)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait 6 min after the previous invocation's mass deletion (dev runs)",
    )
    parser.add_argument(
        "--delete-each-run",
        action="store_true",
        help="remove every run's storage dir as soon as it is verified, and keep the page "
        "cache, as a harness that cleans up between runs does (the next runs then create "
        "files among inodes freed moments ago: see RESULTS.md)",
    )
    args = parser.parse_args(argv)

    loadgen = find_loadgen(args.loadgen, args.build)
    if args.ceilings:
        return run_ceilings(args, loadgen)

    scenarios = [SCENARIOS[name] for name in args.scenarios.split(",") if name]
    specs = server_specs(args.python, args.storescp_cmd.split() if args.storescp_cmd else None)
    wanted = [specs[name] for name in args.servers.split(",") if name]
    if "dcmtk" not in [s.name for s in wanted]:
        wanted.insert(0, specs["dcmtk"])  # the baseline of every ratio
    skipped: dict[str, str] = {}
    servers: list[ServerSpec] = []
    for spec in wanted:
        why = server_available(spec)
        if why is None:
            servers.append(spec)
        else:
            skipped[spec.title] = why
            log(f"skipping {spec.name}: {why}")

    corpora: dict[str, Corpus] = {}
    for s in scenarios:
        key = s.corpus_key(args.scale)
        if key not in corpora:
            count = max(1, round(s.base_count * args.scale))
            corpora[key] = ensure_corpus(
                Path(args.corpus_dir), s.kind, count, args.syntax, s.grouping
            )
    workdir = Path(args.out_dir) / "runs"
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_wait:
        wait_after_cleanup(Path(args.out_dir))

    sender_args = ["--max-pdu", str(args.max_pdu), *(["--nagle"] if args.nagle else [])]
    results: list[RunResult] = []
    measured_bounds: list[bounds_mod.BoundResult] = []
    bound_dirs: list[Path] = []
    started = time.monotonic()
    for s in scenarios:
        corpus = corpora[s.corpus_key(args.scale)]
        for run in range(args.runs):
            for spec in servers:
                r = run_once(
                    s,
                    spec,
                    run,
                    corpus,
                    loadgen,
                    workdir,
                    sender_args,
                    args.keep,
                    args.delete_each_run,
                )
                results.append(r)
                status = "ok" if r.ok else f"FAILED: {r.error}"
                log(
                    f"{s.name} {spec.name} run {run + 1}/{args.runs}: {r.images_per_s:,.0f} img/s "
                    f"{r.mb_per_s:,.1f} MB/s cpu {r.cpu_s:.2f} s rss {r.peak_rss_mb:.1f} MB "
                    f"{status}"
                )
            if args.bounds and s.name in bounds_mod.BOUNDS:
                bound_dirs.append(workdir / f"bounds-{s.name}-{run}")
                drop_page_cache()
                found = bounds_mod.measure(loadgen, s.name, run, bound_dirs[-1], args.scale)
                measured_bounds += found
                log(
                    f"{s.name} bounds run {run + 1}: "
                    + ", ".join(f"{b.key} {b.value:,.0f}" for b in found)
                )
    if not args.keep:
        good = [Path(r.rundir) for r in results if r.rundir and r.ok]
        cleanup(Path(args.out_dir), good + bound_dirs)
    if args.delete_each_run:
        stamp_cleanup(Path(args.out_dir))
    summary = summarize(results, scenarios, servers)
    durable = {spec.name: spec.durable for spec in servers}
    bound_summary = {
        s.name: bounds_mod.summarize(s.name, s.metric, measured_bounds, results, durable)
        for s in scenarios
    }
    report = markdown(summary, scenarios, servers, skipped, bound_summary)
    header = (
        f"runs={args.runs} scale={args.scale} syntax={args.syntax} max_pdu={args.max_pdu} "
        f"nagle={args.nagle} delete_each_run={args.delete_each_run} "
        f"elapsed={time.monotonic() - started:.0f}s"
    )
    print(header + "\n\n" + report)
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + report + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args),
                    "skipped": skipped,
                    "summary": summary,
                    "bounds": bound_summary,
                    "runs": [asdict(r) for r in results],
                    "bound_runs": [asdict(b) for b in measured_bounds],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
