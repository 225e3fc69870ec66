"""SIGKILL of a server with an index while several associations store, then a restart:
every stored file has exactly one row, every row points at an existing file, and every
instance answered with success is findable (SPEC.md section 5).

Several associations commit in parallel and finish in any order; the journal watermark the
index records must never pass a line whose row is not committed, or the restart would skip
that file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import start_server
from dicom_raw import Context, RawAssociation
from hostile_support import CT, EXPLICIT_LE, instance_bytes, new_uid
from storescp.index import Index

pytest.importorskip("storescp._core", reason="the Rust core is not built")

SENDERS = 4


def send_until_killed(port: int, tag: str, succeeded: list[str], halt: threading.Event) -> None:
    """Stores new instances over one association until the server dies or `halt` is set;
    appends the UIDs answered with success."""
    try:
        with RawAssociation.connect(port, timeout=10) as raw:
            raw.associate("STORESCP", f"CRASH{tag}", [Context(1, CT, [EXPLICIT_LE])])
            for _ in range(5000):
                if halt.is_set():
                    return
                uid = new_uid(f"78{tag}")
                if raw.c_store(1, CT, uid, instance_bytes(uid, pixel_bytes=512)).status == 0:
                    succeeded.append(uid)
    except Exception:  # the server was killed mid-transfer: any error ends this sender
        return


def indexed_uids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instance")}


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_sigkill_under_concurrent_load_then_restart_agrees(tmp_path: Path, fsync: bool) -> None:
    storage, db = tmp_path / "store", tmp_path / "index.db"
    extra = ["--index-db", str(db), "--quiet", *([] if fsync else ["--no-fsync"])]
    succeeded: list[str] = []
    for cycle, delay in enumerate((0.6, 1.1, 0.3)):
        server = start_server(tmp_path, extra, storage=storage)
        halt = threading.Event()
        senders = [
            threading.Thread(
                target=send_until_killed, args=(server.port, f"{cycle}{k}", succeeded, halt)
            )
            for k in range(SENDERS)
        ]
        for s in senders:
            s.start()
        before = len(succeeded)
        deadline = time.monotonic() + 20
        time.sleep(delay)
        while len(succeeded) - before < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.kill()
        server.proc.wait(timeout=10)
        halt.set()
        for s in senders:
            s.join(timeout=30)
            assert not s.is_alive()
        assert len(succeeded) - before >= 20, "the senders stored too little before the kill"

    # The restart reconciles; a clean stop leaves index and files to compare.
    server = start_server(tmp_path, extra, storage=storage)
    assert server.stop() == 0
    with Index.open(db, storage) as index:
        report = index.verify()
    assert report.ok, report
    assert report.rows == report.files == len(server.files())
    missing = set(succeeded) - indexed_uids(db)
    assert not missing, f"{len(missing)} instances answered with success have no row"
