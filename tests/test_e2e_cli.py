"""End to end: the server process as the operator sees it (SPEC.md sections 1-2): failures
to start (exit 1, one clear stderr line), the startup blocks, and the timestamped log lines
of associations and C-STOREs, non-success outcomes included."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    RunningServer,
    echoscu,
    free_port,
    make_dataset,
    storescu,
    write_part10,
)
from dicom_raw import AssociationRejected, Context, RawAssociation
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

pytest.importorskip("storescp._core", reason="the Rust core is not built")

ServerFactory = Callable[..., RunningServer]

ROOT = "1.2.826.0.1.3680043.9.7.22"
STAMP = r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}\] "


def run_server(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Runs `python -m storescp ARGS` to completion (for servers that must fail to start)."""
    return subprocess.run(
        [sys.executable, "-m", "storescp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def lines_matching(log: str, pattern: str) -> list[str]:
    """Log lines that are timestamped and match `pattern` after the stamp."""
    rx = re.compile(STAMP + pattern)
    return [line for line in log.splitlines() if rx.match(line)]


# -- failing to start ------------------------------------------------------------------------


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    """A port already taken: exit 1 and exactly one stderr line naming the cause."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server(
            str(port), "STORESCP", "--storage-dir", str(tmp_path / "s"), "--bind", "127.0.0.1"
        )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "in use" in lines[0].lower()
    assert "Traceback" not in result.stdout + result.stderr
    assert "is running on port" not in result.stdout


@pytest.mark.parametrize("kind", ["under-a-file", "is-a-file", "proc"])
def test_unusable_storage_dir_exits_1(tmp_path: Path, kind: str) -> None:
    """A storage dir that cannot be created or used (a path under a regular file, a regular
    file, a path in /proc): exit 1, one stderr line naming the path, no listener."""
    regular = tmp_path / "regular"
    regular.write_text("not a directory")
    storage = {
        "under-a-file": regular / "store",
        "is-a-file": regular,
        "proc": Path("/proc/self/storescp-store"),
    }[kind]
    port = free_port()
    result = run_server(str(port), "STORESCP", "--storage-dir", str(storage), "--bind", "127.0.0.1")
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert str(storage) in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "is running on port" not in result.stdout
    assert regular.read_text() == "not a directory"


# -- startup blocks --------------------------------------------------------------------------


def test_banner_config_block_and_running_box(server_factory: ServerFactory, tmp_path: Path) -> None:
    """The banner, then "Starting Storage SCP..." with the effective configuration, then the
    running box, in that order, before any association line."""
    server = server_factory(
        [
            "--accept",
            "CT,MR",
            "--naming",
            "date",
            "--duplicate",
            "ignore",
            "--max-assoc",
            "3",
            "--timeout",
            "0",
            "--index-db",
            str(tmp_path / "idx.db"),
        ],
        ae_title="OPERATOR_AE",
    )
    assert echoscu(server.port).returncode == 0
    assert server.stop() == 0
    log = server.log()
    banner = log.index("DICOM Image Receiver Server")
    starting = log.index("Starting Storage SCP...")
    box = log.index(f"Storage SCP is running on port {server.port}")
    first_association = re.search(STAMP + "Association ", log)
    assert first_association is not None
    assert banner < starting < box < first_association.start()
    block = log[starting:box]
    for label, value in (
        ("AE Title", "OPERATOR_AE"),
        ("Port", str(server.port)),
        ("Storage Directory", str(server.storage)),
        ("Index Database", str(tmp_path / "idx.db")),
        ("Max Associations", "3"),
        ("Accepted Classes", "4 SOP class(es)"),
    ):
        assert re.search(rf"^\s+{re.escape(label)}:\s+{re.escape(value)}\s*$", block, re.M), label
    assert re.search(r"^\s+Idle Timeout:\s+\S", block, re.M)
    assert f"Storage: {server.storage}" in log[box:]
    assert "Ctrl+C" in log[box:]


# -- log lines -------------------------------------------------------------------------------


def test_association_and_store_log_lines(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Association established/released lines name calling -> called; each C-STORE line
    names calling AE, modality, patient name and study description; duplicates and refusals
    carry their status and reason; rejected and aborted associations are logged."""
    server = server_factory(["--require-called-ae"], ae_title="LOGSCP")
    ds = make_dataset(f"{ROOT}.1.1", modality="MR", patient_name="Roe^Richard")
    ds.SOPClassUID = MRImageStorage
    ds.StudyDescription = "Knee left"
    path = write_part10(ds, tmp_path / "in" / "a.dcm")
    args = ["-aet", "MODALITY7", "-aec", "LOGSCP"]
    assert storescu(server.port, path, args=args).returncode == 0
    storescu(server.port, path, args=args)  # duplicate: 0111
    with RawAssociation.connect(server.port) as raw:
        raw.associate("LOGSCP", "RAWSENDER", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        bad = make_dataset(f"{ROOT}.1.2", patient_name="No^Study")
        del bad.StudyInstanceUID
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_dataset(fp, bad)
        rsp = raw.c_store(1, CTImageStorage, bad.SOPInstanceUID, fp.getvalue())
        assert 0xC000 <= rsp.status <= 0xC0FF
        raw.abort()
    with RawAssociation.connect(server.port) as raw, pytest.raises(AssociationRejected):
        raw.associate("NOT_LOGSCP", "INTRUDER", [Context(1, CTImageStorage)])
    assert server.stop() == 0
    log = server.log()

    established = lines_matching(log, r"Association established from: MODALITY7 -> LOGSCP")
    assert len(established) == 2
    assert len(lines_matching(log, r"Association released: MODALITY7\b")) == 2
    stores = lines_matching(log, r"C-STORE from MODALITY7: MR - Roe\^Richard \(Knee left\)")
    assert len(stores) == 2
    assert "->" not in stores[0]
    assert re.search(r"-> duplicate \(0x0111\): \S", stores[1])
    refused = lines_matching(log, r"C-STORE from RAWSENDER: CT - No\^Study \(Test study\)")
    assert len(refused) == 1
    assert re.search(r"-> refused \(0xC0[0-9A-F]{2}\): .*Study Instance UID", refused[0])
    assert lines_matching(log, r"Association aborted: RAWSENDER\b")
    rejected = lines_matching(log, r"Association rejected: INTRUDER -> NOT_LOGSCP")
    assert len(rejected) == 1


def test_log_lines_cannot_be_forged_by_peer_text(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Peer text with line breaks (patient name, study description) stays on one log line."""
    server = server_factory()
    ds = make_dataset(f"{ROOT}.2.1", patient_name="Evil\n[2000-01-01 00:00:00.000] Fake")
    ds.StudyDescription = "desc\r\nAssociation released: NOBODY"
    path = write_part10(ds, tmp_path / "in" / "a.dcm")
    assert storescu(server.port, path, args=["-aet", "HONEST"]).returncode == 0
    assert server.stop() == 0
    log = server.log()
    assert "[2000-01-01" not in "\n".join(line[:11] for line in log.splitlines())
    assert not any(line.startswith("Association released: NOBODY") for line in log.splitlines())
    (line,) = lines_matching(log, r"C-STORE from HONEST: ")
    assert "Evil" in line and "Fake" in line and "NOBODY" in line


def test_quiet_still_logs_non_success(server_factory: ServerFactory, tmp_path: Path) -> None:
    """--quiet drops successful C-STORE/C-ECHO lines but keeps associations and the
    duplicate's line."""
    server = server_factory(["--quiet"])
    path = write_part10(make_dataset(f"{ROOT}.3.1"), tmp_path / "in" / "a.dcm")
    assert storescu(server.port, path, args=["-aet", "QUIETSCU"]).returncode == 0
    storescu(server.port, path, args=["-aet", "QUIETSCU"])
    assert echoscu(server.port, ["-aet", "QUIETSCU"]).returncode == 0
    assert server.stop() == 0
    log = server.log()
    stores = lines_matching(log, r"C-STORE from QUIETSCU: ")
    assert len(stores) == 1
    assert "-> duplicate (0x0111)" in stores[0]
    assert not lines_matching(log, r"C-ECHO from")
    assert len(lines_matching(log, r"Association established from: QUIETSCU -> ")) == 3


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
def test_log_decodes_names_in_the_declared_character_set(
    server_factory: ServerFactory, tmp_path: Path, charset: str
) -> None:
    """The C-STORE line shows the patient name and study description as the sender meant
    them, decoded with the data set's Specific Character Set (UTF-8 or Latin-1)."""
    server = server_factory()
    ds = make_dataset(f"{ROOT}.4.{charset[-3:]}", patient_name="Müller^Jürgen")
    ds.SpecificCharacterSet = charset
    ds.StudyDescription = "Schädel nativ"
    path = write_part10(ds, tmp_path / "in" / "a.dcm")
    raw_name = "Müller^Jürgen".encode("utf-8" if charset == "ISO_IR 192" else "latin-1")
    assert raw_name in path.read_bytes()
    assert storescu(server.port, path, args=["-xe", "-aet", "CHARSET"]).returncode == 0
    assert server.stop() == 0
    (line,) = lines_matching(server.log(), r"C-STORE from CHARSET: ")
    assert line.endswith("C-STORE from CHARSET: CT - Müller^Jürgen (Schädel nativ)"), line
