"""Faults injected into a real server (SPEC.md sections 2-4 and 6, README conformance):
a full disk, a storage dir made read-only or removed while running, SIGKILL and SIGTERM
with large transfers in flight, connection floods beyond --max-assoc, idle and drip-fed
connections (ARTIM), idle associations, a thousand aborted associations (descriptors,
threads, memory back to baseline) and a 200 MB data set in bounded memory.

Root-only techniques (a small tmpfs as the storage dir, remounted read-only) skip with the
reason when not root; CI runs as root, so every test runs there. After each scenario
`Guard.check` proves SPEC.md section 6: a normal C-STORE succeeds, nothing stored changed,
nothing partial is under a final name, nothing changed outside the storage dir."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.config
import pytest
from conftest import RunningServer, data_set_bytes, make_dataset, write_part10
from dicom_raw import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    VERIFICATION,
    AssociationRejected,
    Context,
    RawAssociation,
    abort_pdu,
    associate_rq,
)
from hostile_support import (
    CT,
    Guard,
    LargeInstance,
    assert_ended,
    connect,
    establish,
    instance_bytes,
    new_uid,
    open_fds,
    proc_status,
    read_reply,
    reset,
    send_large,
    store_ok,
    stored_files,
    transfer,
)
from index_support import registry_link
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from storescp.index.layout import read_journal

pytest.importorskip("storescp._core", reason="the Rust core is not built")

ServerFactory = Callable[..., RunningServer]
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _send_files_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are in the file."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)


# -- helpers ---------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """`path` as a fresh tmpfs of `size` (root only; skips with the reason otherwise),
    unmounted at exit (lazily if something still holds it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        _run("mount", "-o", "remount,rw", str(path))
        if _run("umount", str(path)).returncode != 0:
            _run("umount", "-l", str(path))


def stop_quietly(server: RunningServer) -> None:
    """Stops a server (SIGTERM, then SIGKILL) so that its filesystem can be unmounted."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


@contextmanager
def pynetdicom_association(port: int) -> Iterator[object]:
    """A pynetdicom association proposing CT (explicit VR LE) and Verification."""
    ae = AE(ae_title="FAULTSCU")
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 10
    ae.add_requested_context(CT, [EXPLICIT_LE])
    ae.add_requested_context(VERIFICATION, [IMPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


def a700_with_comment(status: int, comment: str) -> None:
    assert 0xA700 <= status <= 0xA7FF, f"status {status:#06x} ({comment!r}), expected A7xx"
    assert comment.strip(), "an A7xx failure without an Error Comment"


@dataclass
class Sender:
    """A thread sending one large C-STORE over its own association."""

    port: int
    inst: LargeInstance
    pace: float
    progress: list[int] = field(default_factory=lambda: [0])
    status: int | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Sender:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            raw = establish(self.port, timeout=30, calling="LARGE")
            with raw:
                self.status = send_large(raw, self.inst, pace=self.pace, progress=self.progress)
                with contextlib.suppress(Exception):
                    raw.release()
        except BaseException as e:
            self.error = e

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"sender of {self.inst.uid} still running"


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def raw_store(port: int, uid: str, data: bytes) -> tuple[int, str]:
    """(status, Error Comment) of one C-STORE over a fresh association."""
    with RawAssociation.connect(port, timeout=15) as raw:
        raw.associate("STORESCP", "FAULTS", [Context(1, CT, [EXPLICIT_LE])])
        rsp = raw.c_store(1, CT, uid, data)
        with contextlib.suppress(Exception):
            raw.release()
    return rsp.status, rsp.error_comment


# -- disk full, read-only, removed -------------------------------------------------------------


def test_disk_full_a700_then_stores_again_once_space_is_freed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The storage dir on a 2 MB tmpfs: instances of 300 KB are stored until one does
    not fit; that one gets an A7xx status with an Error Comment (as pynetdicom shows it),
    leaves no partial file, and the association and server go on (C-ECHO). After a stored
    file is deleted, new stores succeed."""
    sources: list[tuple[str, Path]] = []
    for i in range(12):
        ds: Dataset = make_dataset(new_uid("30"), pixel_bytes=300_000, patient_id=f"P{i}")
        sources.append((ds.SOPInstanceUID, write_part10(ds, tmp_path / "src" / f"{i}.dcm")))
    storage = tmp_path / "store"
    with tmpfs(storage, "2m"):
        server = server_factory(storage=storage)
        try:
            guard = Guard.arm(server, tmp_path)
            stored: dict[str, bytes] = {}
            failure = None
            with pynetdicom_association(server.port) as assoc:
                for uid, src in sources:
                    status = assoc.send_c_store(src)  # type: ignore[attr-defined]
                    code = int(status.Status)
                    if code == 0:
                        stored[uid] = data_set_bytes(src)
                        continue
                    failure = (code, str(status.get("ErrorComment", "")))
                    break
                assert failure is not None, "2 MB never filled up"
                a700_with_comment(*failure)
                assert 2 <= len(stored) <= 7, f"{len(stored)} instances of 300 KB fit in 2 MB"
                echo = assoc.send_c_echo()  # type: ignore[attr-defined]
                assert echo.Status == 0
            guard.check(allowed=stored, required=list(stored), canary=False)
            # Free space, then store again (a small canary and a 100 KB instance).
            victim = stored_files(storage)[0]
            victim.unlink()
            guard.snapshot()
            uid = new_uid("31")
            data = instance_bytes(uid, pixel_bytes=100_000)
            assert raw_store(server.port, uid, data) == (0, "")
            guard.check(allowed={uid: data}, required=[uid])
            assert server.proc.poll() is None
        finally:
            stop_quietly(server)


def test_large_instances_past_the_direct_write_offset_are_stored_or_fail_cleanly(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """With fsync on, the bytes of an instance past its first 4 MB bypass the page cache
    (direct writes on threads of their own). On a 16 MB tmpfs: a 6 MB instance is
    stored byte for byte; a 20 MB one does not fit and gets an A7xx status with an
    Error Comment, leaving no partial file; the server goes on."""
    storage = tmp_path / "store"
    with tmpfs(storage, "16m"):
        server = server_factory(storage=storage)
        try:
            guard = Guard.arm(server, tmp_path)
            fits = new_uid("32")
            fits_data = instance_bytes(fits, pixel_bytes=6 * MB + 1234)
            assert raw_store(server.port, fits, fits_data) == (0, "")
            too_big = new_uid("33")
            a700_with_comment(
                *raw_store(server.port, too_big, instance_bytes(too_big, pixel_bytes=20 * MB))
            )
            guard.check(allowed={fits: fits_data}, required=[fits])
            assert server.proc.poll() is None
        finally:
            stop_quietly(server)


@contextmanager
def read_only_bind(path: Path) -> Iterator[None]:
    """`path` made read-only in place for everyone, root included: a bind mount of the
    directory on itself, remounted read-only; unmounting it makes it writable again.
    (A plain `mount -o remount,ro` of the filesystem fails with "mount point is busy"
    while the server holds its lock files open for writing, as any running server does.)"""
    bound = _run("mount", "--bind", str(path), str(path))
    assert bound.returncode == 0, bound.stderr
    try:
        ro = _run("mount", "-o", "remount,bind,ro", str(path))
        assert ro.returncode == 0, ro.stderr
        yield
    finally:
        if _run("umount", str(path)).returncode != 0:
            _run("umount", "-l", str(path))


def test_storage_made_read_only_then_writable_again(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The storage dir turned read-only while the server runs (root ignores chmod, so a
    read-only bind mount): C-STOREs get A7xx with an Error Comment, the stored file is
    untouched, the server answers C-ECHO; once writable again, C-STOREs succeed (twice:
    not a one-off)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs the tests as root)")
    server = server_factory()
    try:
        store_ok(server.port)
        guard = Guard.arm(server, tmp_path)
        with read_only_bind(server.storage):
            for _ in range(2):
                uid = new_uid("32")
                a700_with_comment(*raw_store(server.port, uid, instance_bytes(uid)))
            with RawAssociation.connect(server.port) as raw:
                raw.associate("STORESCP", "FAULTS", [Context(1, VERIFICATION)])
                assert raw.c_echo(1).status == 0
                raw.release()
        guard.check()
        guard.check()
    finally:
        stop_quietly(server)


def test_storage_dir_removed_while_running(server_factory: ServerFactory, tmp_path: Path) -> None:
    """`rm -rf` of the whole storage dir while the server runs: the next C-STORE either
    succeeds (directories recreated) or fails with A7xx and an Error Comment; the server
    survives; once the operator recreates the dir (mkdir), C-STOREs succeed and the
    files are complete."""
    server = server_factory()
    store_ok(server.port)
    shutil.rmtree(server.storage)
    guard = Guard.arm(server, tmp_path)
    uid = new_uid("33")
    data = instance_bytes(uid)
    status, comment = raw_store(server.port, uid, data)
    allowed: dict[str, bytes | str] = {}
    if status == 0:
        allowed[uid] = data
    else:
        a700_with_comment(status, comment)
    assert server.proc.poll() is None
    server.storage.mkdir(exist_ok=True)
    guard.check(allowed=allowed)
    guard.check()


def test_private_area_removed_between_messages_of_one_association(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """`rm -rf` + `mkdir` of the storage dir between two C-STOREs of one association
    (whose next temporary file is opened as soon as the first is answered): the second
    is stored too, under its final name and registered, and the area is whole again."""
    server = server_factory()
    first, second = new_uid("35"), new_uid("35")
    with establish(server.port) as raw:
        assert raw.c_store(1, CT, first, instance_bytes(first)).status == 0
        shutil.rmtree(server.storage)
        server.storage.mkdir()
        data = instance_bytes(second)
        rsp = raw.c_store(1, CT, second, data)
        assert rsp.status == 0, f"C-STORE status {rsp.status:#06x}: {rsp.error_comment}"
        raw.release()
    (stored,) = stored_files(server.storage)
    assert stored.name == f"{second}.dcm"
    assert stored.read_bytes().endswith(data)
    assert registry_link(server.storage, second).is_symlink()
    assert (server.storage / ".storescp" / "tmp").is_dir()


def test_private_area_removed_while_running_is_rebuilt_whole(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """After `rm -rf` + `mkdir` of the storage dir under a server with an index, the
    recreated private area again holds what other processes and the index rely on: the
    run lock, held; every shard lock file; and this run's journal, naming what was stored
    since (read across the hole where the removed lines were)."""
    server = server_factory(["--index-db", str(tmp_path / "index.db")])
    store_ok(server.port)
    shutil.rmtree(server.storage)
    server.storage.mkdir()
    after = [store_ok(server.port)[0] for _ in range(2)]
    private = server.storage / ".storescp"
    (run_lock,) = (private / "run").iterdir()
    with run_lock.open("rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sorted(p.name for p in (private / "lock.d").iterdir()) == sorted(map(str, range(16)))
    (journal,) = (private / "journal").iterdir()
    assert journal.stem == run_lock.stem
    assert [line.sop_instance_uid for line in read_journal(journal, 0)] == after


# -- signals with transfers in flight ----------------------------------------------------------


def dead_run_dirs(storage: Path) -> list[Path]:
    tmp = storage / ".storescp" / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def test_sigkill_during_transfers_then_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """SIGKILL while four 8 MB C-STOREs are in flight (and three instances already
    stored), then a restart on the same storage dir: no partial file under a final name,
    every final file equals its source, the stored ones are intact, and the dead run's
    temporary area is swept (a named *.part left in it included)."""
    storage = tmp_path / "store"
    server = server_factory(["--max-assoc", "20"], storage=storage)
    guard = Guard.arm(server, tmp_path)
    before = dict(store_ok(server.port) for _ in range(3))
    senders = [
        Sender(server.port, LargeInstance(new_uid("34"), 8 * MB), pace=0.1).start()
        for _ in range(4)
    ]
    wait_until("transfers in flight", lambda: all(s.progress[0] > MB for s in senders), 30)
    server.proc.kill()
    server.proc.wait(timeout=10)
    for s in senders:
        s.join(30)
    runs = dead_run_dirs(storage)
    assert runs, "no temporary area of the killed run"
    (runs[0] / "0.part").write_bytes(b"\0" * 4096)  # a named temporary of the dead run
    finals = [s.inst.uid for s in senders if s.status == 0]
    allowed: dict[str, bytes | str] = dict(before)
    allowed.update({s.inst.uid: s.inst.digest() for s in senders})
    restarted = server_factory(["--max-assoc", "20"], storage=storage)
    assert not set(runs) & set(dead_run_dirs(storage)), "dead run's temporaries not swept"
    guard.server = restarted
    guard.check(allowed=allowed, required=[*before, *finals])


def test_sigterm_drains_in_flight_transfers_and_exits_0(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """SIGTERM while four large C-STOREs are in flight, their senders streaming steadily:
    two that need ~2 s complete (the sender gets 0000, the file is complete); two that
    would need ~25 s are aborted at the 10 s drain bound (no file). The server exits 0
    within 10 s + margin and prints its statistics."""
    storage = tmp_path / "store"
    server = server_factory(["--max-assoc", "20"], storage=storage)
    guard = Guard.arm(server, tmp_path)
    fast = [
        Sender(server.port, LargeInstance(new_uid("35"), 4 * MB), pace=0.05).start()
        for _ in range(2)
    ]
    slow = [
        Sender(server.port, LargeInstance(new_uid("36"), 60 * MB), pace=0.05).start()
        for _ in range(2)
    ]
    senders = fast + slow
    wait_until("transfers in flight", lambda: all(s.progress[0] > MB // 2 for s in senders), 30)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.proc.wait(timeout=10 + 4)
    except subprocess.TimeoutExpired:
        code = None
    elapsed = time.monotonic() - started
    if code is None:
        server.proc.kill()
        server.proc.wait(timeout=10)
    for s in senders:
        s.join(40)
    assert code is not None, (
        f"still running {elapsed:.0f} s after SIGTERM with transfers in flight "
        "(the drain bound is 10 s); progress of the slow senders: "
        f"{[s.progress[0] // MB for s in slow]} MB of 60"
    )
    assert code == 0
    for s in fast:
        assert s.status == 0, f"an in-flight transfer was not drained: {s.error!r}"
    for s in slow:
        assert s.status is None, "a 25 s transfer completed within the 10 s drain"
    log = server.log()
    assert "Server Statistics" in log and "Storage Statistics" in log
    restarted = server_factory(storage=storage)
    guard.server = restarted
    guard.check(
        allowed={s.inst.uid: s.inst.digest() for s in fast},
        required=[s.inst.uid for s in fast],
    )


# -- floods and timers -------------------------------------------------------------------------


def admitted(port: int, calling: str) -> RawAssociation:
    """An association, retried for a second while a slot of a connection that just
    ended (the fixture's readiness probe) is still being released."""
    for _ in range(20):
        try:
            return establish(port, calling=calling)
        except AssociationRejected as e:
            assert e.args[0] == (2, 3, 2), e.args
            time.sleep(0.05)
    raise AssertionError("no association slot came free")


def test_flood_beyond_max_assoc(server_factory: ServerFactory, tmp_path: Path) -> None:
    """--max-assoc 3 with three associations held: twenty more connections that send an
    A-ASSOCIATE-RQ each get A-ASSOCIATE-RJ 2/3/2 (at least the 16 the server answers at
    once; any beyond are closed unanswered), while the three admitted associations keep
    storing; afterwards a new association is admitted again."""
    server = server_factory(["--max-assoc", "3"])
    guard = Guard.arm(server, tmp_path)
    held = [admitted(server.port, f"HELD{i}") for i in range(3)]
    sent: dict[str, bytes | str] = {}
    try:
        extras = [connect(server.port) for _ in range(20)]
        try:
            uid = new_uid("37")
            data = sent[uid] = instance_bytes(uid)
            assert held[0].c_store(1, CT, uid, data).status == 0
            rq = associate_rq("STORESCP", "FLOOD", [Context(1, CT, [EXPLICIT_LE])])
            for sock in extras:
                with contextlib.suppress(OSError):
                    sock.sendall(rq)
            replies = [read_reply(sock, timeout=10) for sock in extras]
        finally:
            for sock in extras:
                sock.close()
        rejected = 0
        for reply in replies:
            assert reply.closed
            if reply.pdus:
                assert reply.reject == (2, 3, 2), reply.types()
                assert len(reply.pdus) == 1
                rejected += 1
        assert rejected >= 16, f"only {rejected} of 20 got A-ASSOCIATE-RJ 2/3/2"
        for i, raw in enumerate(held):
            uid = new_uid("37")
            data = sent[uid] = instance_bytes(uid)
            rsp = raw.c_store(1, CT, uid, data)
            assert rsp.status == 0, f"held association {i}: {rsp.error_comment}"
            raw.release()
    finally:
        for raw in held:
            raw.close()
    guard.wait_log("2/3/2")
    guard.check(allowed=sent, required=list(sent))


@pytest.mark.parametrize(
    "options", [["--artim-timeout", "2"], ["--timeout", "2"]], ids=["artim-2", "timeout-2"]
)
def test_idle_connections_dropped_on_artim(
    server_factory: ServerFactory, tmp_path: Path, options: list[str]
) -> None:
    """Connections that never send an A-ASSOCIATE-RQ are closed by the server after the
    ARTIM timeout: 2 s with --artim-timeout 2, and also with --timeout 2 alone (ARTIM
    defaults to --timeout when that is shorter than 30 s); not long before it."""
    server = server_factory(options)
    guard = Guard.arm(server, tmp_path)
    socks = [connect(server.port) for _ in range(3)]
    started = time.monotonic()
    try:
        for sock in socks:
            reply = read_reply(sock, timeout=10)
            assert reply.closed, "an idle connection was kept past ARTIM"
            assert reply.types() in ([], [0x07]), reply.types()
        elapsed = time.monotonic() - started
        assert 1.5 <= elapsed <= 6, f"dropped after {elapsed:.1f} s, ARTIM is 2 s"
    finally:
        for sock in socks:
            sock.close()
    guard.check()


def test_drip_fed_associate_rq_dropped_on_artim(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A peer that drip-feeds its A-ASSOCIATE-RQ (one byte every 0.5 s) has not sent an
    A-ASSOCIATE-RQ when ARTIM (2 s) expires: it is dropped, it cannot hold an association
    slot for as long as it likes (PS3.8 9.1.5: ARTIM runs from the connection to the
    request, it is not an idle timer)."""
    server = server_factory(["--artim-timeout", "2", "--max-assoc", "2"])
    guard = Guard.arm(server, tmp_path)
    rq = associate_rq("STORESCP", "DRIP", [Context(1, CT, [EXPLICIT_LE])])
    sock = connect(server.port)
    started = time.monotonic()
    closed_after = None
    try:
        for i in range(16):  # 8 s at most
            try:
                sock.sendall(rq[i : i + 1])
            except OSError:
                closed_after = time.monotonic() - started
                break
            reply = read_reply(sock, timeout=0.5)
            if reply.closed:
                closed_after = time.monotonic() - started
                break
    finally:
        sock.close()
    assert closed_after is not None, "a drip-fed A-ASSOCIATE-RQ held the connection for 8 s"
    assert closed_after <= 6, f"dropped after {closed_after:.1f} s, ARTIM is 2 s"
    guard.check()


def test_idle_association_aborted_after_timeout(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """An established association idle for longer than --timeout 2 is aborted by the
    server (A-ABORT, service provider, reason 0 per the README) within a few seconds."""
    server = server_factory(["--timeout", "2"])
    guard = Guard.arm(server, tmp_path)
    raw = establish(server.port)
    started = time.monotonic()
    try:
        reply = read_reply(raw.sock, timeout=10)
    finally:
        raw.close()
    elapsed = time.monotonic() - started
    assert_ended(reply, abort_reasons=[0], allow_close=False)
    assert 1.5 <= elapsed <= 6, f"aborted after {elapsed:.1f} s, the timeout is 2 s"
    guard.check()


# -- resources ---------------------------------------------------------------------------------


def _hostile_association(port: int, seed: int) -> tuple[str, bytes]:
    """One connection that sends a valid C-STORE transfer up to a random byte (pipelined,
    not waiting for the A-ASSOCIATE-AC) and then resets, aborts or closes."""
    rng = random.Random(seed)
    xfer = transfer(pixel_bytes=2000, fragment=512)
    whole = xfer.rq + xfer.stream
    offset = rng.randrange(0, len(whole) + 1)
    how = rng.choice(["reset", "abort", "close"])
    try:
        sock = connect(port, timeout=10)
    except OSError:
        return xfer.uid, xfer.data
    data = xfer.data
    missing = len(whole) - offset
    if how == "abort" and 0 < missing <= len(abort_pdu()):
        # The A-ABORT's first bytes complete the last PDU: a whole (altered) data set.
        data = data[:-missing] + abort_pdu()[:missing]
    try:
        sock.sendall(whole[:offset])
        if how == "abort":
            sock.sendall(abort_pdu())
    except OSError:
        pass
    finally:
        if how == "reset":
            reset(sock)
        else:
            sock.close()
    return xfer.uid, data


def test_thousand_aborted_associations_leak_nothing(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """1000 connections (10 at a time) that stop at a random byte of a C-STORE transfer and
    reset, abort or close: afterwards the server's open descriptors and threads are back
    to their baseline within a few seconds and its RSS grew by less than 30 MB."""
    server = server_factory(["--max-assoc", "50"])
    store_ok(server.port)  # warm up: whatever the first store allocates is baseline
    guard = Guard.arm(server, tmp_path)
    pid = server.proc.pid
    base = proc_status(pid)
    base_fds = len(open_fds(pid))
    with ThreadPoolExecutor(max_workers=10) as pool:
        sent = dict(pool.map(lambda i: _hostile_association(server.port, i), range(1000)))
    guard.wait_idle(timeout=30)
    wait_until(
        "threads back to baseline",
        lambda: proc_status(pid)["Threads"] <= base["Threads"],
        10,
    )
    wait_until("descriptors back to baseline", lambda: len(open_fds(pid)) <= base_fds, 10)
    grown = proc_status(pid)["VmRSS"] - base["VmRSS"]
    assert grown < 30 * 1024, f"RSS grew by {grown} kB over 1000 aborted associations"
    guard.check(allowed=sent)


def test_200_mb_data_set_in_bounded_memory(server_factory: ServerFactory, tmp_path: Path) -> None:
    """A C-STORE of a 200 MB data set (generated chunk by chunk, never held whole by the
    test) is stored complete, while the server's peak RSS (VmHWM) stays under 64 MB."""
    server = server_factory()
    guard = Guard.arm(server, tmp_path)
    inst = LargeInstance(new_uid("38"), 200 * MB)
    raw = establish(server.port, timeout=60)
    with raw:
        assert send_large(raw, inst) == 0
        raw.release()
    hwm = proc_status(server.proc.pid)["VmHWM"]
    assert hwm < 64 * 1024, f"peak RSS {hwm} kB for a 200 MB data set"
    try:
        guard.check(allowed={inst.uid: inst.digest()}, required=[inst.uid])
    finally:
        for path in stored_files(server.storage):
            if path.stat().st_size > 100 * MB:
                path.unlink()
