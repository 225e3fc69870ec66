"""The Python API (storescp.server.StorageSCP) driven by a real peer (pynetdicom) in-process."""

from __future__ import annotations

import io
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("storescp._core", reason="the Rust core is not built")
pynetdicom = pytest.importorskip("pynetdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402
from storescp import ServerConfig, StartError, StorageSCP  # noqa: E402
from storescp.console import Console  # noqa: E402

AE_TITLE = "API_SCP"


def make_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7.2.1"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-2"
    ds.Modality = "CT"
    ds.StudyDescription = "API test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class Peer:
    """One pynetdicom association to the server under test."""

    def __init__(self, port: int) -> None:
        ae = pynetdicom.AE(ae_title="API_SCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert self.assoc.is_established

    def echo(self) -> int:
        return int(self.assoc.send_c_echo().Status)

    def store(self, ds: Dataset) -> int:
        return int(self.assoc.send_c_store(ds).Status)

    def release(self) -> None:
        self.assoc.release()


@pytest.fixture
def logs() -> Iterator[tuple[Console, io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    yield Console(out, err), out, err


def make_config(tmp_path: Path, **changes: object) -> ServerConfig:
    arguments: dict[str, object] = {
        "ae_title": AE_TITLE,
        "storage_dir": str(tmp_path / "store"),
        "port": 0,
        "bind": "127.0.0.1",
        "fsync": False,
        **changes,
    }
    return ServerConfig(**arguments)  # type: ignore[arg-type]


def test_run_in_thread_echo_store_stop(
    tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]
) -> None:
    console, out, err = logs
    scp = StorageSCP(make_config(tmp_path), console)
    thread = scp.run_in_thread()
    assert scp.port > 0
    peer = Peer(scp.port)
    assert peer.echo() == 0x0000
    ds = make_dataset()
    assert peer.store(ds) == 0x0000
    assert peer.store(ds) == 0x0111  # duplicate, rejected by default
    peer.release()
    scp.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert scp.wait(0)

    stored = tmp_path / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert (stored / f"{ds.SOPInstanceUID}.dcm").is_file()
    stats = scp.stats()
    assert (stats.associations, stats.rejected_associations) == (1, 0)
    assert (stats.messages, stats.images_received) == (3, 2)
    assert (stats.instances_stored, stats.duplicates, stats.failures) == (1, 1, 0)
    assert stats.stored_bytes > 0 and stats.bytes_received > 0
    assert stats.uptime > 0
    text = out.getvalue()
    assert "Association established from: API_SCU -> API_SCP (127.0.0.1:" in text
    assert "C-ECHO from API_SCU" in text
    assert "C-STORE from API_SCU: CT - Doe^Jane (API test)\n" in text
    assert "-> duplicate (0x0111)" in text
    assert "Association released: API_SCU" in text
    assert err.getvalue() == ""


def test_context_manager_drains_without_a_loop(
    tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]
) -> None:
    console, out, _err = logs
    with StorageSCP(make_config(tmp_path), console) as scp:
        peer = Peer(scp.port)
        assert peer.echo() == 0x0000
        peer.release()
    assert scp.wait(0)
    assert scp.stats().associations == 1
    assert "C-ECHO from API_SCU" in out.getvalue()


def test_stop_before_start_finishes_at_once(
    tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]
) -> None:
    console, _out, _err = logs
    scp = StorageSCP(make_config(tmp_path), console)
    scp.stop(drain_timeout=0)
    scp.start()
    thread = scp.run_in_thread()
    thread.join(timeout=15)
    assert not thread.is_alive()


def test_misuse_is_reported(tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]) -> None:
    console, _out, _err = logs
    scp = StorageSCP(make_config(tmp_path), console)
    with pytest.raises(RuntimeError, match="not started"):
        scp.stats()
    with pytest.raises(RuntimeError, match="not started"):
        scp.serve_forever()
    with scp, pytest.raises(RuntimeError, match="already called"):
        scp.start()


def test_port_in_use(tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]) -> None:
    console, out, _err = logs
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        scp = StorageSCP(make_config(tmp_path, port=port), console)
        with pytest.raises(StartError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: "):
            scp.start()
    # What start said before it failed is not lost in the console's queue.
    assert out.getvalue() == f"Created storage directory: {tmp_path / 'store'}\n"


def test_unopenable_index(tmp_path: Path, logs: tuple[Console, io.StringIO, io.StringIO]) -> None:
    console, _out, _err = logs
    db = tmp_path / "missing-dir" / "index.db"
    scp = StorageSCP(make_config(tmp_path, index_db=str(db)), console)
    with pytest.raises(StartError, match=r"^cannot open index database "):
        scp.start()


def test_index_rows_and_index_failure(
    tmp_path: Path,
    logs: tuple[Console, io.StringIO, io.StringIO],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from storescp.index import Index

    console, out, err = logs
    db = tmp_path / "index.db"
    scp = StorageSCP(make_config(tmp_path, index_db=str(db)), console)
    thread = scp.run_in_thread()
    peer = Peer(scp.port)
    first = make_dataset()
    assert peer.store(first) == 0x0000

    def broken(self: Index, events: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Index, "record", broken)
    status = peer.store(make_dataset())
    assert 0xA700 <= status <= 0xA7FF
    monkeypatch.undo()
    peer.release()
    scp.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()

    assert "index update failed: disk I/O error" in err.getvalue()
    assert "-> failed: index not updated" in err.getvalue()
    assert out.getvalue().count("C-STORE from API_SCU") == 1
    with Index.open(db, tmp_path / "store") as index:
        uids = [row.sop_instance_uid for row in index.instances()]
    assert first.SOPInstanceUID in uids
