"""Shared fixtures: a real server process on a free loopback port, DICOM files made
with pydicom, and the dcmtk peers called by absolute path (a virtual environment's
pynetdicom installs console scripts with the same names)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMDUMP = "/usr/bin/dcmdump"
DCMTK_STORESCP = "/usr/bin/storescp"

START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_dataset(
    sop_instance_uid: str,
    *,
    study_uid: str = "1.2.826.0.1.3680043.9.7.1",
    series_uid: str | None = None,
    sop_class_uid: str = CTImageStorage,
    modality: str = "CT",
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-1",
    study_date: str | None = "20240102",
    pixel_bytes: int = 128,
) -> Dataset:
    """A small valid image data set."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    if study_date is not None:
        ds.StudyDate = study_date
    ds.Modality = modality
    ds.StudyDescription = "Test study"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or study_uid + ".1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    side = max(1, int((pixel_bytes // 2) ** 0.5))
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 7) & 0xFF for i in range(side * side * 2))
    return ds


def write_part10(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Writes `ds` as a Part 10 file in `transfer_syntax` (uncompressed syntaxes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set_bytes(path: Path) -> bytes:
    """The bytes after the file meta group of a Part 10 file."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


@dataclass
class RunningServer:
    """A `python -m storescp` process on 127.0.0.1."""

    proc: subprocess.Popen[str]
    port: int
    storage: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signals the server and waits for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def files(self) -> list[Path]:
        """Stored files (the private .storescp area excluded)."""
        return stored_files(self.storage)


def stored_files(storage: Path) -> list[Path]:
    """The files stored under `storage` (the private .storescp area excluded)."""
    return sorted(
        p
        for p in storage.rglob("*")
        if p.is_file() and ".storescp" not in p.relative_to(storage).parts
    )


def interrupt(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Sends SIGINT to a server started with stderr piped, waits; returns its stderr."""
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return err


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"server not listening on {port} after {timeout} s")


def start_server(
    tmp_path: Path,
    extra: Sequence[str] = (),
    *,
    ae_title: str = "STORESCP",
    storage: Path | None = None,
    port: int | None = None,
) -> RunningServer:
    """Starts the real server with `extra` options; waits until it accepts."""
    port = port or free_port()
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
        "127.0.0.1",
        *extra,
    ]
    log = log_path.open("w")
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    server = RunningServer(proc, port, storage, log_path, args)
    try:
        wait_for_port(port, proc)
    except Exception:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Call with option lists to start servers; all are stopped at teardown."""
    started: list[RunningServer] = []

    def factory(extra: Sequence[str] = (), **kwargs: object) -> RunningServer:
        server = start_server(tmp_path, extra, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


@pytest.fixture
def server(server_factory) -> RunningServer:  # type: ignore[no-untyped-def]
    """A server with default options."""
    return server_factory()  # type: ignore[no-any-return]


def storescu(
    port: int, *paths: Path | str, args: Sequence[str] = (), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs dcmtk's storescu against 127.0.0.1:port."""
    return subprocess.run(
        [STORESCU, *args, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def echoscu(
    port: int, args: Sequence[str] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Runs dcmtk's echoscu against 127.0.0.1:port."""
    return subprocess.run(
        [ECHOSCU, *args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=timeout
    )
