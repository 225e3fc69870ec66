"""The command line as the operator sees it: startup blocks, log lines, statistics on a
signal, exit status 0 (SPEC.md section 2). Real server process, dcmtk peers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    RunningServer,
    echoscu,
    free_port,
    interrupt,
    make_dataset,
    stored_files,
    storescu,
    wait_for_port,
    write_part10,
)

pytest.importorskip("storescp._core", reason="the Rust core is not built")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_prints_statistics_and_exits_0(
    sig: signal.Signals, server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = server_factory(["--accept", "CT,MR"], ae_title="MY_PACS")
    path = write_part10(make_dataset("1.2.826.0.1.3680043.9.7.3.1"), tmp_path / "in" / "a.dcm")
    assert echoscu(server.port, ["-aet", "ECHOER", "-aec", "MY_PACS"]).returncode == 0
    assert storescu(server.port, path, args=["-aet", "MODALITY", "-aec", "MY_PACS"]).returncode == 0
    # The same instance again: a duplicate, refused with 0111 and counted.
    storescu(server.port, path, args=["-aet", "MODALITY", "-aec", "MY_PACS"])

    assert server.stop(sig) == 0
    log = server.log()
    for text in (
        "DICOM Image Receiver Server",
        "Starting Storage SCP...",
        "  AE Title:           MY_PACS\n",
        f"  Port:               {server.port}\n",
        "  Index Database:     (none)\n",
        "  Accepted Classes:   4 SOP class(es)\n",
        f"  Storage SCP is running on port {server.port}\n",
        "Association established from: ECHOER -> MY_PACS (127.0.0.1:",
        "C-ECHO from ECHOER (127.0.0.1:",
        "C-STORE from MODALITY: CT - Doe^Jane (Test study)\n",
        "-> duplicate (0x0111): ",
        "Association released: MODALITY (127.0.0.1:",
        f"Received {sig.name}, shutting down...",
        "  Total Associations:    3\n",
        "  Rejected Associations: 0\n",
        "  Messages Processed:    3\n",
        "  Images Received:       2\n",
        "  Instances Stored:      1\n",
        "  Duplicates:            1\n",
        "  Failures:              0\n",
        "Storage SCP terminated",
    ):
        assert text in log
    assert len(server.files()) == 1


def test_all_standard_classes_and_index_in_config_block(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = server_factory(["--index-db", str(tmp_path / "pacs.db"), "--quiet"])
    path = write_part10(make_dataset("1.2.826.0.1.3680043.9.7.3.2"), tmp_path / "in" / "b.dcm")
    assert storescu(server.port, path, args=["-aec", "STORESCP"]).returncode == 0
    assert server.stop() == 0
    log = server.log()
    assert "  Accepted Classes:   All standard storage classes (" in log
    assert f"  Index Database:     {tmp_path / 'pacs.db'}\n" in log
    assert "C-STORE from" not in log  # --quiet
    assert "  Instances Stored:      1\n" in log


def test_a_log_reader_that_goes_away_does_not_stop_the_server(tmp_path: Path) -> None:
    # `storescp ... | head`: once head exits, every write to stdout fails (EPIPE).
    port = free_port()
    storage = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "storescp", str(port), "STORESCP", "--storage-dir", str(storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port(port, proc)
        assert proc.stdout is not None
        proc.stdout.close()
        paths = [
            write_part10(make_dataset(f"1.2.826.0.1.3680043.9.7.3.9{i}"), tmp_path / f"{i}.dcm")
            for i in range(3)
        ]
        for path in paths:  # one association each: each one's lines fail to be written
            assert storescu(port, path).returncode == 0
        assert proc.poll() is None
    finally:
        err = interrupt(proc)
    assert proc.returncode == 0
    assert err.count("Error: standard output failed (Broken pipe)") == 1
    assert len(stored_files(storage)) == 3


def test_a_server_started_with_stdout_closed_stores_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    storage = tmp_path / "store"
    command = [sys.executable, "-m", "storescp", str(port), "STORESCP"]
    proc = subprocess.Popen(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command, "--storage-dir", str(storage)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, proc)
        path = write_part10(make_dataset("1.2.826.0.1.3680043.9.7.3.100"), tmp_path / "a.dcm")
        assert storescu(port, path).returncode == 0
    finally:
        err = interrupt(proc)
    assert proc.returncode == 0
    assert err.count("Error: standard output failed (closed at start)") == 1
    assert len(stored_files(storage)) == 1

    bad = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command, "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (bad.returncode, bad.stderr) == (1, "Error: No such option '--bogus'.\n")
