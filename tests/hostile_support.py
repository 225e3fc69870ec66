"""Support for the hostile-input, fault-injection and access-control tests
(test_malformed.py, test_faults.py, test_access.py).

The promise checked after every scenario (SPEC.md section 6) is held by `Guard`:

- the server process is alive and ends every association it was given (no connection but
  its listener, no temporary file open or left as `*.part` under `.storescp/tmp`);
- a normal C-STORE still succeeds;
- nothing already stored changed (SHA-256 before/after), every new file is one the test
  allowed, equals the data set that was sent and parses with dcmdump;
- nothing appeared, vanished or changed outside the storage dir (the tree the test owns,
  minus the storage dir and the server logs);
- every duplicate-registry link points inside the storage dir.

Also here: /proc probes (RSS, peak RSS, threads, descriptors), a TCP reset, a reader that
collects what the server answers before it closes, C-STORE byte streams with named offsets,
and large data sets generated chunk by chunk (never held in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conftest import DCMDUMP, START_TIMEOUT, RunningServer, free_port, make_dataset
from dicom_raw import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    EXPLICIT_LE,
    Context,
    RawAssociation,
    associate_rq,
    c_store_rq,
    data_set,
    element,
    fragments,
    parse_abort,
    parse_associate_rj,
    pdata_tf,
)
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage
from storescp.index.layout import StorageLayout

CT = CTImageStorage
UID_ROOT = "1.2.826.0.1.3680043.9.7.55"
_counter = itertools.count(1)


def new_uid(tag: str = "1") -> str:
    """A UID unique to this test process (at most 64 characters)."""
    return f"{UID_ROOT}.{tag}.{os.getpid()}.{next(_counter)}"


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """`ds` as little endian data set bytes (explicit VR unless `implicit`)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def instance_bytes(uid: str, *, pixel_bytes: int = 256, **kwargs: object) -> bytes:
    """A small valid CT image data set, explicit VR little endian."""
    study = str(kwargs.pop("study_uid", f"{UID_ROOT}.900"))
    return encode(make_dataset(uid, study_uid=study, pixel_bytes=pixel_bytes, **kwargs))  # type: ignore[arg-type]


# -- /proc probes ----------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) and Threads of a process, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def open_fds(pid: int) -> list[str]:
    """What each open descriptor of a process points to (vanishing ones skipped)."""
    base = Path(f"/proc/{pid}/fd")
    out = []
    for fd in base.iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue
    return out


# -- sockets ---------------------------------------------------------------------------------


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection with a timeout on every operation."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def reset(sock: socket.socket) -> None:
    """Closes with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Reply:
    """What the server sent before it closed (or before the wait ended)."""

    pdus: list[tuple[int, bytes]]
    closed: bool
    trailing: bytes = b""

    @property
    def abort(self) -> tuple[int, int] | None:
        """(source, reason) of the first PDU when it is an A-ABORT."""
        if self.pdus and self.pdus[0][0] == A_ABORT:
            return parse_abort(self.pdus[0][1])
        return None

    @property
    def reject(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of the first PDU when it is an A-ASSOCIATE-RJ."""
        if self.pdus and self.pdus[0][0] == A_ASSOCIATE_RJ:
            return parse_associate_rj(self.pdus[0][1])
        return None

    def types(self) -> list[int]:
        return [t for t, _ in self.pdus]


def read_reply(sock: socket.socket, timeout: float = 10.0) -> Reply:
    """Reads until the server closes the connection or `timeout` passes; splits PDUs."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    closed = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
    pdus = []
    offset = 0
    while offset + 6 <= len(buf):
        pdu_type, _, length = struct.unpack_from(">BBI", buf, offset)
        if offset + 6 + length > len(buf):
            break
        pdus.append((pdu_type, bytes(buf[offset + 6 : offset + 6 + length])))
        offset += 6 + length
    return Reply(pdus, closed, bytes(buf[offset:]))


def assert_ended(
    reply: Reply,
    *,
    abort_reasons: Sequence[int] | None = None,
    allow_close: bool = True,
    allow_reject: tuple[int, int, int] | None = None,
) -> None:
    """The server ended the connection: with an A-ABORT from the service provider
    (source 2) whose reason is in `abort_reasons` (any when None), with the
    A-ASSOCIATE-RJ `allow_reject`, or (when `allow_close`) by closing without a word."""
    assert reply.closed, f"server did not close the connection; it sent {reply.types()}"
    assert not reply.trailing, f"half a PDU before close: {reply.trailing[:16]!r}"
    if not reply.pdus:
        assert allow_close, "connection closed without an A-ABORT"
        return
    first_type, _ = reply.pdus[0]
    if first_type == A_ASSOCIATE_RJ and allow_reject is not None:
        assert reply.reject == allow_reject, f"A-ASSOCIATE-RJ {reply.reject}"
    else:
        assert first_type == A_ABORT, f"expected A-ABORT, got PDU type {first_type:#x}"
        source, reason = reply.abort or (-1, -1)
        assert source == 2, f"A-ABORT source {source}, expected 2 (service provider)"
        if abort_reasons is not None:
            assert reason in abort_reasons, f"A-ABORT reason {reason}, expected {abort_reasons}"
    assert len(reply.pdus) == 1, f"PDUs after the first: {reply.types()}"


def establish(
    port: int,
    contexts: Sequence[Context] = (Context(1, CT, [EXPLICIT_LE]),),
    *,
    called: str = "STORESCP",
    calling: str = "HOSTILE",
    timeout: float = 10.0,
    max_pdu: int = 16384,
) -> RawAssociation:
    """A RawAssociation that was accepted (asserted)."""
    raw = RawAssociation.connect(port, timeout=timeout)
    try:
        raw.associate(called, calling, contexts, max_pdu=max_pdu)
    except BaseException:
        raw.close()
        raise
    return raw


def store_ok(
    port: int,
    uid: str | None = None,
    data: bytes | None = None,
    *,
    called: str = "STORESCP",
    calling: str = "CANARY",
    host: str = "127.0.0.1",
) -> tuple[str, bytes]:
    """A normal C-STORE over a fresh association, asserted to succeed (status 0)."""
    uid = uid or new_uid("9")
    data = data if data is not None else instance_bytes(uid)
    with RawAssociation.connect(port, host=host, timeout=15) as raw:
        ac = raw.associate(called, calling, [Context(1, CT, [EXPLICIT_LE])])
        assert ac.accepted(1), f"CT context not accepted: {ac.results}"
        rsp = raw.c_store(1, CT, uid, data)
        assert rsp.status == 0, f"C-STORE status {rsp.status:#06x}: {rsp.error_comment}"
        raw.release()
    return uid, data


# -- files -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_set_digest(path: Path) -> str:
    """SHA-256 of the bytes after the file meta group of a Part 10 file (streamed)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        head = f.read(144)
        assert head[128:132] == b"DICM", f"{path}: no DICM prefix"
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dcmdump_ok(paths: Sequence[Path]) -> None:
    """Every file parses with dcmdump (long values not loaded)."""
    for i in range(0, len(paths), 50):
        batch = [str(p) for p in paths[i : i + 50]]
        result = subprocess.run(
            [DCMDUMP, "-q", "-M", *batch], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"dcmdump failed on {batch}: {result.stderr[-2000:]}"


def outside_tree(root: Path, storage: Path) -> dict[str, tuple[str, int, int]]:
    """{relative path: (kind, size, mtime_ns)} below `root`, the storage dir and the
    server logs (server-*.log) left out; directories are listed without times."""
    out: dict[str, tuple[str, int, int]] = {}
    skip = storage.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).resolve() != skip]
        for d in dirnames:
            out[str((here / d).relative_to(root))] = ("dir", 0, 0)
        for name in filenames:
            p = here / name
            if p.parent == root and name.startswith("server-") and name.endswith(".log"):
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns)
    return out


def stored_files(storage: Path) -> list[Path]:
    """Files under the storage dir, the private .storescp area excluded."""
    if not storage.exists():
        return []
    return sorted(
        p
        for p in storage.rglob("*")
        if p.is_file() and ".storescp" not in p.relative_to(storage).parts
    )


# -- the guard -------------------------------------------------------------------------------


@dataclass
class Guard:
    """Snapshot taken before a scenario and the checks of SPEC.md section 6 after it."""

    server: RunningServer
    root: Path
    called: str = "STORESCP"
    calling: str = "CANARY"
    host: str = "127.0.0.1"
    listeners: int = 1
    stored: dict[Path, str] = field(default_factory=dict)
    outside: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    log_mark: int = 0

    @classmethod
    def arm(cls, server: RunningServer, root: Path, **kwargs: object) -> Guard:
        """Waits until the server is idle, then snapshots what must not change."""
        guard = cls(server, root, **kwargs)  # type: ignore[arg-type]
        guard.wait_idle()
        guard.snapshot()
        return guard

    def snapshot(self) -> None:
        self.stored = {p: sha256_file(p) for p in stored_files(self.server.storage)}
        self.outside = outside_tree(self.root, self.server.storage)
        self.log_mark = len(self.server.log())

    def busy(self) -> list[str]:
        """Why the server is not idle: open connections, temporaries."""
        pid = self.server.proc.pid
        assert self.server.proc.poll() is None, (
            f"server died (exit {self.server.proc.returncode}); log tail:\n"
            + self.server.log()[-3000:]
        )
        links = open_fds(pid)
        problems = []
        sockets = [link for link in links if link.startswith("socket:")]
        if len(sockets) > self.listeners:
            problems.append(f"{len(sockets) - self.listeners} connection(s) still open")
        # Files inside a run's temporary folder; the folder itself is held open by design.
        temps = [link for link in links if "/" in link.partition("/.storescp/tmp/")[2]]
        if temps:
            problems.append(f"temporary files open: {temps}")
        tmp = self.server.storage / ".storescp" / "tmp"
        parts = sorted(tmp.rglob("*.part")) if tmp.exists() else []
        if parts:
            problems.append(f"temporary files left: {parts}")
        return problems

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until `busy()` is empty (asserted within `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.busy()
            if not problems:
                return
            assert time.monotonic() < deadline, f"server not idle after {timeout} s: {problems}"
            time.sleep(0.05)

    def new_log(self) -> str:
        return self.server.log()[self.log_mark :]

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log written since the snapshot, once it contains `text` (asserted)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.new_log()):
            assert time.monotonic() < deadline, f"{text!r} not logged; new log:\n{log[-3000:]}"
            time.sleep(0.05)
        return log

    def check(
        self,
        *,
        allowed: Mapping[str, bytes | str] | None = None,
        required: Sequence[str] = (),
        canary: bool = True,
    ) -> list[Path]:
        """The checks after a scenario. `allowed` maps the SOP Instance UIDs that may have
        been stored to their data set bytes (or the SHA-256 hex digest of them); those in
        `required` must have been. Returns the new files."""
        allowed = dict(allowed or {})
        self.wait_idle()
        if canary:
            uid, data = store_ok(
                self.server.port, called=self.called, calling=self.calling, host=self.host
            )
            allowed[uid] = data
            required = [*required, uid]
            self.wait_idle()
        storage = self.server.storage
        for path, digest in self.stored.items():
            assert path.is_file(), f"stored file vanished: {path}"
            assert sha256_file(path) == digest, f"stored file changed: {path}"
        new = [p for p in stored_files(storage) if p not in self.stored]
        seen = set()
        for path in new:
            assert path.resolve().is_relative_to(storage.resolve()), f"{path} escapes"
            uid = path.name.removesuffix(".dcm")
            assert uid in allowed, f"unexpected file {path.relative_to(storage)}"
            expected = allowed[uid]
            if isinstance(expected, bytes):
                got = data_set_digest(path)
                assert got == hashlib.sha256(expected).hexdigest(), f"{path} differs from sent"
            else:
                assert data_set_digest(path) == expected, f"{path} differs from sent"
            seen.add(uid)
        missing = [uid for uid in required if uid not in seen]
        assert not missing, f"not stored: {missing}"
        dcmdump_ok(new)
        for uid, relpath in StorageLayout(storage).registry().items():
            target = (storage / relpath).resolve()
            assert target.is_relative_to(storage.resolve()), f"{uid} -> {target}"
        assert outside_tree(self.root, storage) == self.outside, "files changed outside"
        self.snapshot()
        return new


# -- C-STORE streams -------------------------------------------------------------------------


@dataclass
class Transfer:
    """The bytes a client sends for one C-STORE over a fresh association: the
    A-ASSOCIATE-RQ, then (after the A-ASSOCIATE-AC) the P-DATA-TF PDUs, with named
    offsets into `rq + stream`."""

    uid: str
    data: bytes
    rq: bytes
    stream: bytes
    marks: dict[str, int]

    @property
    def total(self) -> int:
        return len(self.rq) + len(self.stream)


def transfer(uid: str | None = None, *, pixel_bytes: int = 20000, fragment: int = 4096) -> Transfer:
    """A C-STORE transfer whose command is split in two PDUs and whose data set spans
    several PDUs of at most `fragment` bytes of data."""
    uid = uid or new_uid("2")
    data = instance_bytes(uid, pixel_bytes=pixel_bytes)
    rq = associate_rq("STORESCP", "HOSTILE", [Context(1, CT, [EXPLICIT_LE])])
    command = c_store_rq(1, CT, uid)
    half = len(command) // 2
    cmd_pdus = [
        pdata_tf(1, command[:half], command=True, last=False),
        pdata_tf(1, command[half:], command=True, last=True),
    ]
    data_pdus = fragments(1, data, command=False, max_pdu=fragment + 6)
    assert len(data_pdus) >= 4, "want several data fragments"
    base = len(rq)
    offsets = [base]
    for p in cmd_pdus + data_pdus:
        offsets.append(offsets[-1] + len(p))
    after_cmd = offsets[2]
    n = len(data_pdus)
    marks = {
        "start": 0,
        "rq-header": 3,
        "rq-body": len(rq) // 2,
        "rq-last-byte-missing": len(rq) - 1,
        "after-rq": len(rq),
        "command-pdu-header": base + 4,
        "inside-command": base + len(cmd_pdus[0]) // 2,
        "between-command-fragments": offsets[1],
        "inside-second-command-fragment": offsets[1] + 9,
        "after-command": after_cmd,
        "inside-first-data-fragment": after_cmd + 200,
        "between-data-fragments": offsets[2 + n // 2],
        "inside-middle-fragment": offsets[2 + n // 2] + 1000,
        "before-last-fragment": offsets[2 + n - 1],
        "inside-last-fragment": offsets[2 + n - 1] + 10,
        "last-byte-missing": offsets[-1] - 1,
        "all-sent": offsets[-1],
    }
    return Transfer(uid, data, rq, b"".join(cmd_pdus + data_pdus), marks)


def send_prefix(port: int, xfer: Transfer, offset: int, timeout: float = 10.0) -> socket.socket:
    """Connects and sends the first `offset` bytes of `xfer` (reading the A-ASSOCIATE-AC
    once the whole request went); returns the open socket."""
    sock = connect(port, timeout=timeout)
    try:
        sock.sendall(xfer.rq[:offset])
        if offset >= len(xfer.rq):
            pdu_type, _, length = struct.unpack(">BBI", _recv_exact(sock, 6))
            _recv_exact(sock, length)
            assert pdu_type == A_ASSOCIATE_AC, f"expected A-ASSOCIATE-AC, got {pdu_type:#x}"
            sock.sendall(xfer.stream[: offset - len(xfer.rq)])
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


# -- large data sets, generated ----------------------------------------------------------------


@dataclass
class LargeInstance:
    """A CT data set whose Pixel Data (OB) has `pixel_bytes` bytes generated chunk by
    chunk from a seed: sent and verified without ever being held whole in memory."""

    uid: str
    pixel_bytes: int
    chunk: int = 128 * 1024  # one PDV per chunk, within the 256 KiB maximum PDU
    study_uid: str = f"{UID_ROOT}.901"

    def header(self) -> bytes:
        """Every element before Pixel Data, and Pixel Data's own header."""
        head = data_set(
            {
                0x00080016: ("UI", CT),
                0x00080018: ("UI", self.uid),
                0x00080020: ("DA", "20240102"),
                0x00080060: ("CS", "CT"),
                0x00100010: ("PN", "Large^Test"),
                0x00100020: ("LO", "PID-LARGE"),
                0x0020000D: ("UI", self.study_uid),
                0x0020000E: ("UI", self.study_uid + ".1"),
            },
            explicit=True,
        )
        return head + element(0x7FE00010, b"", "OB", explicit=True, length=self.pixel_bytes)

    def pieces(self) -> Iterator[bytes]:
        """The data set: header, then Pixel Data in chunks of `chunk` bytes."""
        yield self.header()
        block = random.Random(self.uid).randbytes(self.chunk + 256)
        sent = 0
        i = 0
        while sent < self.pixel_bytes:
            size = min(self.chunk, self.pixel_bytes - sent)
            rot = i % 256
            yield block[rot : rot + size]
            sent += size
            i += 1

    @property
    def size(self) -> int:
        return len(self.header()) + self.pixel_bytes

    def digest(self) -> str:
        h = hashlib.sha256()
        for piece in self.pieces():
            h.update(piece)
        return h.hexdigest()


def send_large(
    raw: RawAssociation,
    inst: LargeInstance,
    *,
    context_id: int = 1,
    pace: float = 0.0,
    progress: list[int] | None = None,
) -> int:
    """Sends a C-STORE of `inst` over an established association, one PDV per piece
    (sleeping `pace` seconds between pieces); returns the response status."""
    raw.send_message(context_id, c_store_rq(raw.next_message_id(), CT, inst.uid))
    pieces = inst.pieces()
    current = next(pieces)
    for following in pieces:
        raw.send(pdata_tf(context_id, current, command=False, last=False))
        if progress is not None:
            progress[0] += len(current)
        current = following
        if pace:
            time.sleep(pace)
    raw.send(pdata_tf(context_id, current, command=False, last=True))
    if progress is not None:
        progress[0] += len(current)
    return raw.read_command().status


# -- starting servers on any address ---------------------------------------------------------


def launch(
    tmp_path: Path,
    extra: Sequence[str],
    *,
    host: str,
    storage: Path | None = None,
    ae_title: str = "STORESCP",
) -> RunningServer:
    """Starts the server bound to `host` (conftest's start_server binds 127.0.0.1 and
    waits there); waits until `host` accepts connections."""
    port = free_port()
    storage = storage or tmp_path / "store"
    log_path = tmp_path / f"server-{port}.log"
    args = [
        sys.executable,
        "-m",
        "storescp",
        str(port),
        ae_title,
        "--storage-dir",
        str(storage),
        "--bind",
        host,
        *extra,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = RunningServer(proc, port, storage, log_path, args)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {server.log()[-2000:]}")
        try:
            connect(port, host, timeout=0.5).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                raise
            time.sleep(0.05)
