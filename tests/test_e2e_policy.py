"""End to end: storage policies and protocol limits of a real server process (SPEC.md
sections 2-4): file layouts, duplicates (also under concurrency), --accept, refusals with
their statuses and Error Comments, path safety, association limits and rejections, the
idle timeout, and the statistics printed on a signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pydicom.config
import pytest
from conftest import (
    DCMDUMP,
    RunningServer,
    data_set_bytes,
    make_dataset,
    storescu,
    write_part10,
)
from dicom_raw import (
    VERIFICATION,
    Aborted,
    AssociationRejected,
    Context,
    RawAssociation,
    c_store_rq,
    fragments,
)
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)
from pynetdicom import AE, _config

pytest.importorskip("storescp._core", reason="the Rust core is not built")

ServerFactory = Callable[..., RunningServer]

ROOT = "1.2.826.0.1.3680043.9.7.21"
STUDY = f"{ROOT}.100"
SERIES = f"{ROOT}.100.1"
STUDY_DEFAULT = "1.2.826.0.1.3680043.9.7.1"  # make_dataset's default Study Instance UID


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lenient_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets pydicom write the invalid values these tests send on purpose."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)


@pytest.fixture(autouse=True)
def _send_files_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are in the file (no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@contextmanager
def association(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]] = ((CTImageStorage, [ExplicitVRLittleEndian]),),
    *,
    ae_title: str = "PYSCU",
    called: str = "STORESCP",
) -> Iterator[object]:
    """A pynetdicom association (asserted established), released or aborted at exit."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 10
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


def part10(ds: Dataset, directory: Path, name: str | None = None) -> Path:
    """`ds` written as an explicit VR little endian Part 10 file under `directory`."""
    return write_part10(ds, directory / (name or f"{ds.SOPInstanceUID}.dcm"))


def store(assoc: object, path: Path) -> Dataset:
    """Sends the file's data set as it is; returns the response status data set."""
    status: Dataset = assoc.send_c_store(path)  # type: ignore[attr-defined]
    assert "Status" in status, "no C-STORE response"
    return status


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """`ds` encoded as little endian data set bytes (explicit VR unless `implicit`)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def assert_dcmdump_ok(path: Path) -> None:
    result = subprocess.run(
        [DCMDUMP, "-M", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def all_files(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and directory below `root`."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def today_candidates(before: datetime, after: datetime) -> set[str]:
    return {before.strftime("%Y/%m/%d"), after.strftime("%Y/%m/%d")}


def format_bytes(count: int) -> str:
    """The statistics' byte format (SPEC.md seed example): ``512 B``, ``1.50 KB``, ..."""
    units = ("B", "KB", "MB", "GB", "TB")
    size = float(count)
    unit = 0
    while size >= 1024.0 and unit < len(units) - 1:
        size /= 1024.0
        unit += 1
    return f"{count} B" if unit == 0 else f"{size:.2f} {units[unit]}"


# -- naming ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("naming", "expected"),
    [
        ("hierarchical", f"{STUDY}/{SERIES}/{ROOT}.1.1.dcm"),
        ("date", f"2024/01/02/{STUDY}/{ROOT}.1.1.dcm"),
        ("flat", f"{ROOT}.1.1.dcm"),
    ],
)
def test_naming_layouts_exact_paths(
    server_factory: ServerFactory, tmp_path: Path, naming: str, expected: str
) -> None:
    """Each layout puts the file exactly where SPEC.md section 4 says, and nowhere else."""
    server = server_factory(["--naming", naming])
    ds = make_dataset(f"{ROOT}.1.1", study_uid=STUDY, series_uid=SERIES, study_date="20240102")
    source = part10(ds, tmp_path / "in")
    with association(server.port) as assoc:
        assert store(assoc, source).Status == 0x0000
    assert server.files() == [server.storage / expected]
    assert data_set_bytes(server.storage / expected) == data_set_bytes(source)
    assert_dcmdump_ok(server.storage / expected)


def test_date_naming_falls_back_to_today(server_factory: ServerFactory, tmp_path: Path) -> None:
    """With date naming, an absent, empty or invalid StudyDate files the instance under the
    local date of reception; a valid one (leap day included) under its own date."""
    server = server_factory(["--naming", "date"])
    cases = {
        "absent": None,
        "empty": "",
        "month13": "20241301",
        "feb30": "20240230",
        "letters": "2024AB02",
        "short": "2024010",
        "dashed": "2024-01-02",
        "leap": "20240229",
    }
    before = datetime.now()
    with association(server.port) as assoc:
        for i, (label, date) in enumerate(cases.items()):
            ds = make_dataset(f"{ROOT}.2.{i}", study_uid=STUDY, study_date=date)
            status = store(assoc, part10(ds, tmp_path / "in"))
            assert status.Status == 0x0000, label
    after = datetime.now()
    found = {p.name: str(p.parent.parent.relative_to(server.storage)) for p in server.files()}
    assert len(found) == len(cases)
    for i, label in enumerate(cases):
        folder = found[f"{ROOT}.2.{i}.dcm"]
        if label == "leap":
            assert folder == "2024/02/29"
        else:
            assert folder in today_candidates(before, after), (label, folder)
    for p in server.files():
        assert p.parent.name == STUDY


# -- duplicates ------------------------------------------------------------------------------


def test_duplicate_reject_leaves_file_untouched(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """reject: a second instance with the same SOP Instance UID (different content, even a
    different series, so a different path) gets 0111 with an Error Comment; the stored file
    keeps its bytes and mtime and no second file appears."""
    server = server_factory(["--duplicate", "reject"])
    uid = f"{ROOT}.3.1"
    first = part10(make_dataset(uid, patient_name="First^One"), tmp_path / "a")
    again = part10(make_dataset(uid, patient_name="Second^Two"), tmp_path / "b")
    moved = part10(make_dataset(uid, series_uid=f"{ROOT}.3.99"), tmp_path / "c")
    with association(server.port) as assoc:
        assert store(assoc, first).Status == 0x0000
        (stored,) = server.files()
        before = (stored.read_bytes(), stored.stat().st_mtime_ns)
        time.sleep(0.05)
        for dup in (again, moved, first):
            status = store(assoc, dup)
            assert status.Status == 0x0111
            assert str(status.get("ErrorComment", "")).strip()
    assert server.files() == [stored]
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before
    assert data_set_bytes(stored) == data_set_bytes(first)


def test_duplicate_replace_in_place(server_factory: ServerFactory, tmp_path: Path) -> None:
    """replace: 0000 and the new bytes under the same name."""
    server = server_factory(["--duplicate", "replace"])
    uid = f"{ROOT}.4.1"
    first = part10(make_dataset(uid, patient_name="First^One"), tmp_path / "a")
    second = part10(make_dataset(uid, patient_name="Second^Two", pixel_bytes=512), tmp_path / "b")
    with association(server.port) as assoc:
        assert store(assoc, first).Status == 0x0000
        (stored,) = server.files()
        assert store(assoc, second).Status == 0x0000
    assert server.files() == [stored]
    assert data_set_bytes(stored) == data_set_bytes(second)
    assert_dcmdump_ok(stored)


@pytest.mark.parametrize("naming", ["date", "hierarchical"])
def test_duplicate_replace_moves_to_new_location(
    server_factory: ServerFactory, tmp_path: Path, naming: str
) -> None:
    """replace with a new location (another StudyDate with date naming, another series with
    hierarchical naming): the old file is removed, one file per SOP Instance UID."""
    server = server_factory(["--duplicate", "replace", "--naming", naming])
    uid = f"{ROOT}.5.1"
    first = part10(make_dataset(uid, study_date="20200315"), tmp_path / "a")
    second = part10(
        make_dataset(uid, study_date="20230704", series_uid=f"{ROOT}.5.99", patient_name="B^B"),
        tmp_path / "b",
    )
    with association(server.port) as assoc:
        assert store(assoc, first).Status == 0x0000
        (old,) = server.files()
        assert store(assoc, second).Status == 0x0000
    if naming == "date":
        new = server.storage / "2023/07/04" / STUDY_DEFAULT / f"{uid}.dcm"
    else:
        new = server.storage / STUDY_DEFAULT / f"{ROOT}.5.99" / f"{uid}.dcm"
    assert old != new
    assert server.files() == [new]
    assert not old.exists()
    assert data_set_bytes(new) == data_set_bytes(second)


def test_duplicate_ignore_keeps_old_file(server_factory: ServerFactory, tmp_path: Path) -> None:
    """ignore: 0000 for the duplicate, the first file's bytes and mtime are kept."""
    server = server_factory(["--duplicate", "ignore"])
    uid = f"{ROOT}.6.1"
    first = part10(make_dataset(uid, patient_name="First^One"), tmp_path / "a")
    second = part10(make_dataset(uid, patient_name="Second^Two"), tmp_path / "b")
    with association(server.port) as assoc:
        assert store(assoc, first).Status == 0x0000
        (stored,) = server.files()
        mtime = stored.stat().st_mtime_ns
        assert store(assoc, second).Status == 0x0000
    assert server.files() == [stored]
    assert data_set_bytes(stored) == data_set_bytes(first)
    assert stored.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("policy", ["reject", "replace", "ignore"])
def test_concurrent_duplicates_on_two_associations(
    server_factory: ServerFactory, tmp_path: Path, policy: str
) -> None:
    """The same SOP Instance UID sent at the same moment on two associations, several rounds:
    exactly one file per UID; with reject exactly one success and one 0111; the file holds
    one of the two senders' data sets whole."""
    server = server_factory(["--duplicate", policy, "--no-fsync"])
    rounds = 6
    sources = {
        (r, who): part10(
            make_dataset(f"{ROOT}.7.{r}", patient_name=f"Sender^{who}", pixel_bytes=4096 + who),
            tmp_path / f"s{who}",
        )
        for r in range(rounds)
        for who in range(2)
    }
    barrier = threading.Barrier(2, timeout=30)
    statuses: dict[tuple[int, int], int] = {}
    errors: list[BaseException] = []

    def sender(who: int) -> None:
        try:
            with association(server.port, ae_title=f"SENDER{who}") as assoc:
                for r in range(rounds):
                    barrier.wait()
                    statuses[(r, who)] = int(store(assoc, sources[(r, who)]).Status)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=sender, args=(who,)) for who in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(statuses) == 2 * rounds
    files = server.files()
    assert len(files) == rounds
    for r in range(rounds):
        pair = sorted((statuses[(r, 0)], statuses[(r, 1)]))
        if policy == "reject":
            assert pair == [0x0000, 0x0111], (r, pair)
        else:
            assert pair == [0x0000, 0x0000], (r, pair)
        (stored,) = [f for f in files if f.name == f"{ROOT}.7.{r}.dcm"]
        body = data_set_bytes(stored)
        candidates = [data_set_bytes(sources[(r, who)]) for who in range(2)]
        assert body in candidates
        if policy == "reject":
            winner = 0 if statuses[(r, 0)] == 0 else 1
            assert body == candidates[winner]


def race_same_uids(
    servers: Sequence[RunningServer], uids: Sequence[str], tmp_path: Path
) -> tuple[dict[tuple[int, int], Path], dict[tuple[int, int], int]]:
    """Round r sends uids[r] to both servers at the same moment, each over its own
    association, with different pixel data. Returns the sources and the statuses, both
    keyed by (round, server)."""
    sources = {
        (r, who): part10(
            make_dataset(uid, patient_name=f"Proc^{who}", pixel_bytes=8192 + who),
            tmp_path / f"p{who}",
        )
        for r, uid in enumerate(uids)
        for who in range(2)
    }
    barrier = threading.Barrier(2, timeout=30)
    statuses: dict[tuple[int, int], int] = {}
    errors: list[BaseException] = []

    def sender(who: int) -> None:
        try:
            with association(servers[who].port, ae_title=f"PROC{who}") as assoc:
                for r in range(len(uids)):
                    barrier.wait()
                    statuses[(r, who)] = int(store(assoc, sources[(r, who)]).Status)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=sender, args=(who,)) for who in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return sources, statuses


def test_concurrent_duplicates_across_two_processes(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Two server processes on the same storage root receive the same SOP Instance UID at the
    same moment, several rounds, with reject: one 0000 and one 0111 per round, one file."""
    storage = tmp_path / "shared-store"
    servers = [server_factory(["--no-fsync"], storage=storage) for _ in range(2)]
    rounds = 6
    uids = [f"{ROOT}.25.{r}" for r in range(rounds)]
    sources, statuses = race_same_uids(servers, uids, tmp_path)
    files = servers[0].files()
    assert len(files) == rounds
    for r in range(rounds):
        assert sorted((statuses[(r, 0)], statuses[(r, 1)])) == [0x0000, 0x0111], r
        winner = 0 if statuses[(r, 0)] == 0 else 1
        (stored,) = [f for f in files if f.name == f"{ROOT}.25.{r}.dcm"]
        assert data_set_bytes(stored) == data_set_bytes(sources[(r, winner)])


@pytest.mark.parametrize("duplicate", ["reject", "replace"])
def test_two_receivers_on_one_index(
    server_factory: ServerFactory, tmp_path: Path, duplicate: str
) -> None:
    """Two server processes share one storage root and one index (fsync on) and receive the
    same SOP Instance UID at the same moment, several rounds: one file and one row per UID,
    every row pointing at its file, as `python -m storescp.index` reports in JSON."""
    storage = tmp_path / "shared-store"
    db = tmp_path / "shared.db"
    args = ["--index-db", str(db), "--duplicate", duplicate]
    servers = [server_factory(args, storage=storage) for _ in range(2)]
    rounds = 6
    policy = ("reject", "replace").index(duplicate)
    uids = [f"{ROOT}.26.{policy}.{r}" for r in range(rounds)]
    _, statuses = race_same_uids(servers, uids, tmp_path)
    expected = [0x0000, 0x0111] if duplicate == "reject" else [0x0000, 0x0000]
    for r in range(rounds):
        assert sorted((statuses[(r, 0)], statuses[(r, 1)])) == expected, r
    for server in servers:
        assert server.stop() == 0
    index = [sys.executable, "-m", "storescp.index", "--db", str(db)]
    listed = subprocess.run(
        [*index, "instances", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    rows = json.loads(listed.stdout)
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(uids)
    files = {f.relative_to(storage).as_posix(): f for f in servers[0].files()}
    assert sorted(row["path"] for row in rows) == sorted(files)
    for row in rows:
        assert row["file_size"] == files[row["path"]].stat().st_size
    verified = subprocess.run([*index, "verify"], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- --accept --------------------------------------------------------------------------------


def test_accept_ct_refuses_mr(server_factory: ServerFactory, tmp_path: Path) -> None:
    """--accept CT: an MR context is rejected (result 3) while CT is accepted; pynetdicom
    cannot send the MR, storescu fails on it, and nothing but the CT is stored."""
    server = server_factory(["--accept", "CT"])
    mr = make_dataset(f"{ROOT}.8.1", sop_class_uid=MRImageStorage, modality="MR")
    ct = make_dataset(f"{ROOT}.8.2")
    mr_path, ct_path = part10(mr, tmp_path / "in"), part10(ct, tmp_path / "in")
    contexts = [
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian]),
    ]
    with association(server.port, contexts) as assoc:
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}  # type: ignore[attr-defined]
        rejected = {c.abstract_syntax: c.result for c in assoc.rejected_contexts}  # type: ignore[attr-defined]
        assert accepted == {CTImageStorage}
        assert rejected == {MRImageStorage: 0x03}
        with pytest.raises(ValueError):
            store(assoc, mr_path)
        assert store(assoc, ct_path).Status == 0x0000
    result = storescu(server.port, mr_path, args=["-R"])
    assert result.returncode != 0
    assert [p.name for p in server.files()] == [f"{ROOT}.8.2.dcm"]


def test_accept_list_is_case_insensitive_and_trimmed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """--accept "ct, mr" accepts CT and MR (any case, spaces trimmed) and nothing else."""
    server = server_factory(["--accept", "ct, mr"])
    contexts = [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (UltrasoundImageStorage, [ExplicitVRLittleEndian]),
    ]
    ct = part10(make_dataset(f"{ROOT}.9.1"), tmp_path)
    mr = part10(make_dataset(f"{ROOT}.9.2", sop_class_uid=MRImageStorage, modality="MR"), tmp_path)
    with association(server.port, contexts) as assoc:
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}  # type: ignore[attr-defined]
        assert accepted == {CTImageStorage, MRImageStorage}
        assert store(assoc, ct).Status == 0x0000
        assert store(assoc, mr).Status == 0x0000
    assert len(server.files()) == 2


def test_accept_raw_uid(server_factory: ServerFactory, tmp_path: Path) -> None:
    """--accept with a raw SOP Class UID accepts exactly that class (and Verification)."""
    server = server_factory(["--accept", SecondaryCaptureImageStorage])
    with RawAssociation.connect(server.port) as raw:
        ac = raw.associate(
            "STORESCP",
            "RAWSCU",
            [
                Context(1, SecondaryCaptureImageStorage, [ExplicitVRLittleEndian]),
                Context(3, CTImageStorage, [ExplicitVRLittleEndian]),
                Context(5, VERIFICATION, [ImplicitVRLittleEndian]),
            ],
        )
        assert ac.accepted(1) and ac.accepted(5)
        assert ac.results[3][0] == 3
        ds = make_dataset(f"{ROOT}.10.1", sop_class_uid=SecondaryCaptureImageStorage)
        data = encode(ds)
        rsp = raw.c_store(1, SecondaryCaptureImageStorage, ds.SOPInstanceUID, data)
        assert rsp.status == 0x0000
        raw.release()
    (stored,) = server.files()
    assert data_set_bytes(stored) == data
    assert_dcmdump_ok(stored)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["hierarchical", "flat"])
def test_missing_uid_refused_with_c000(
    server_factory: ServerFactory, tmp_path: Path, naming: str
) -> None:
    """A data set without its Study, Series or SOP Instance UID is refused (C000-C0FF) with
    an Error Comment naming the missing attribute, whatever the layout; nothing is written;
    the association goes on."""
    server = server_factory(["--naming", naming])
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        for i, (missing, words) in enumerate(
            (
                ("StudyInstanceUID", "study instance uid"),
                ("SeriesInstanceUID", "series instance uid"),
                ("SOPInstanceUID", "sop instance uid"),
            )
        ):
            uid = f"{ROOT}.11.{i}"
            ds = make_dataset(uid)
            delattr(ds, missing)
            rsp = raw.c_store(1, CTImageStorage, uid, encode(ds))
            assert 0xC000 <= rsp.status <= 0xC0FF, (missing, hex(rsp.status))
            assert words in rsp.error_comment.lower(), (missing, rsp.error_comment)
            assert server.files() == []
        good = make_dataset(f"{ROOT}.11.9")
        assert raw.c_store(1, CTImageStorage, good.SOPInstanceUID, encode(good)).status == 0
        raw.release()
    assert [p.name for p in server.files()] == [f"{ROOT}.11.9.dcm"]


@pytest.mark.parametrize("mismatch", ["instance", "class"])
def test_command_and_data_set_disagree_a900(
    server_factory: ServerFactory, tmp_path: Path, mismatch: str
) -> None:
    """A data set whose SOP Instance (or Class) UID differs from the command's Affected one is
    refused in the A900 range with an Error Comment; nothing is written under either UID."""
    server = server_factory(["--naming", "flat"])
    command_uid = f"{ROOT}.12.1"
    ds = make_dataset(command_uid if mismatch == "class" else f"{ROOT}.12.2")
    if mismatch == "class":
        ds.SOPClassUID = MRImageStorage
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        rsp = raw.c_store(1, CTImageStorage, command_uid, encode(ds))
        assert 0xA900 <= rsp.status <= 0xA9FF, hex(rsp.status)
        assert rsp.error_comment
        assert rsp.affected_sop_instance_uid == command_uid
        raw.release()
    assert server.files() == []


EVIL_UIDS = [
    "1.2.3/../../x",
    "../../etc",
    "..",
    "1.2..3",
    "1.2.3\\..\\..\\x",
    "/tmp/abs",
    "1.2.3\x00/../x",
    "1.2.3.",
    ".1.2.3",
    "1.2.abc",
    "1." + "2" * 70,
]


@pytest.mark.parametrize("where", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_malicious_uid_refused_and_contained(
    server_factory: ServerFactory, tmp_path: Path, where: str
) -> None:
    """A path-like or otherwise invalid UID (slash, backslash, `..`, NUL, absolute path,
    empty component, letters, too long) in any of the three UIDs is refused (C000-C0FF,
    Error Comment), nothing is written in the store, nothing outside it changes."""
    jail = tmp_path / "jail"
    storage = jail / "a" / "b" / "store"
    (jail / "etc").mkdir(parents=True)
    (jail / "a" / "x").mkdir(parents=True)
    server = server_factory(["--naming", "hierarchical"], storage=storage)
    snapshot = {k: v for k, v in all_files(jail).items() if not k.startswith("a/b/store")}
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        for i, evil in enumerate(EVIL_UIDS):
            ds = make_dataset(f"{ROOT}.13.{i}")
            # A placeholder of the same length, swapped after encoding: pydicom would split
            # a backslash into several values.
            placeholder = "#" * len(evil)
            setattr(ds, where, placeholder)
            data = encode(ds).replace(placeholder.encode(), evil.encode())
            assert data.count(evil.encode()) == 1
            command_uid = evil if where == "SOPInstanceUID" else ds.SOPInstanceUID
            rsp = raw.c_store(1, CTImageStorage, command_uid, data)
            assert 0xC000 <= rsp.status <= 0xC0FF, (evil, hex(rsp.status))
            assert rsp.error_comment, evil
            assert server.files() == [], evil
        raw.release()
    assert server.proc.poll() is None
    assert server.files() == []
    after = {k: v for k, v in all_files(jail).items() if not k.startswith("a/b/store")}
    assert after == snapshot


# -- association limits and rejections -------------------------------------------------------


def test_max_assoc_rejects_the_third_transiently(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """--max-assoc 2: with two associations held open, a third gets A-ASSOCIATE-RJ 2/3/2;
    the two open ones still store, and once one is released a new one is accepted."""
    server = server_factory(["--max-assoc", "2"])
    paths = [part10(make_dataset(f"{ROOT}.14.{i}"), tmp_path) for i in range(3)]
    with (
        association(server.port, ae_title="HOLD1") as a1,
        association(server.port, ae_title="HOLD2") as a2,
    ):
        with RawAssociation.connect(server.port) as raw:
            with pytest.raises(AssociationRejected) as info:
                raw.associate(
                    "STORESCP", "THIRD", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])]
                )
            assert info.value.args[0] == (2, 3, 2)
        assert store(a1, paths[0]).Status == 0x0000
        assert store(a2, paths[1]).Status == 0x0000
    deadline = time.monotonic() + 10
    while True:
        try:
            with association(server.port, ae_title="LATER") as a3:
                assert store(a3, paths[2]).Status == 0x0000
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert len(server.files()) == 3
    assert server.stop() == 0
    assert "  Rejected Associations: " in server.log()
    rejected = int(server.log().split("  Rejected Associations: ")[1].split()[0])
    assert rejected >= 1


def test_idle_association_aborted_after_timeout(server_factory: ServerFactory) -> None:
    """--timeout 2: an idle association is aborted after about 2 s, while one that keeps
    talking (a C-ECHO every 0.5 s for 3 s) is not."""
    server = server_factory(["--timeout", "2"])
    with association(server.port, [(VERIFICATION, [ImplicitVRLittleEndian])]) as busy:
        ae = AE(ae_title="IDLE")
        ae.add_requested_context(VERIFICATION)
        idle = ae.associate("127.0.0.1", server.port, ae_title="STORESCP")
        assert idle.is_established
        start = time.monotonic()
        for _ in range(6):
            time.sleep(0.5)
            assert busy.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        while idle.is_alive() and time.monotonic() - start < 10:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        assert idle.is_aborted, "idle association not aborted"
        assert 1.5 <= elapsed <= 8, elapsed
        assert busy.is_established  # type: ignore[attr-defined]
        ae.shutdown()


def test_silent_connection_dropped_after_artim(server_factory: ServerFactory) -> None:
    """--timeout 2: a TCP connection that never sends an A-ASSOCIATE-RQ is closed after about
    2 s (the ARTIM timeout is capped by the idle timeout); the server keeps serving."""
    server = server_factory(["--timeout", "2"])
    with RawAssociation.connect(server.port) as silent:
        start = time.monotonic()
        tail = silent.wait_closed(10)
        elapsed = time.monotonic() - start
    assert 1.5 <= elapsed <= 8, elapsed
    assert tail == b"" or tail[0] == 0x07
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, VERIFICATION)])
        assert raw.c_echo(1).status == 0
        raw.release()


def test_called_ae_check(server_factory: ServerFactory) -> None:
    """--require-called-ae: a wrong called AE title is rejected 1/1/7; the right one is
    accepted. Without the option any called AE title is accepted."""
    strict = server_factory(["--require-called-ae"], ae_title="MY_PACS")
    ctx = [Context(1, VERIFICATION)]
    with RawAssociation.connect(strict.port) as raw:
        with pytest.raises(AssociationRejected) as info:
            raw.associate("OTHER_PACS", "RAWSCU", ctx)
        assert info.value.args[0] == (1, 1, 7)
    with RawAssociation.connect(strict.port) as raw:
        raw.associate("MY_PACS", "RAWSCU", ctx)
        assert raw.c_echo(1).status == 0
        raw.release()
    lax = server_factory(ae_title="MY_PACS")
    with RawAssociation.connect(lax.port) as raw:
        raw.associate("OTHER_PACS", "RAWSCU", ctx)
        raw.release()


def test_calling_ae_allow_list(server_factory: ServerFactory, tmp_path: Path) -> None:
    """--allow-calling: listed calling AE titles are accepted (with or without @host that
    matches), others and a listed one from another host are rejected 1/1/3 and counted."""
    server = server_factory(
        [
            "--allow-calling",
            "GOOD",
            "--allow-calling",
            "LOCALONLY@127.0.0.1",
            "--allow-calling",
            "ELSEWHERE@10.11.12.13",
        ]
    )
    ctx = [Context(1, VERIFICATION)]
    for calling in ("GOOD", "LOCALONLY"):
        with RawAssociation.connect(server.port) as raw:
            raw.associate("STORESCP", calling, ctx)
            assert raw.c_echo(1).status == 0
            raw.release()
    for calling in ("BAD", "ELSEWHERE"):
        with RawAssociation.connect(server.port) as raw:
            with pytest.raises(AssociationRejected) as info:
                raw.associate("STORESCP", calling, ctx)
            assert info.value.args[0] == (1, 1, 3), calling
    path = part10(make_dataset(f"{ROOT}.15.1"), tmp_path)
    assert storescu(server.port, path, args=["-aet", "BAD"]).returncode != 0
    assert storescu(server.port, path, args=["-aet", "GOOD"]).returncode == 0
    assert len(server.files()) == 1
    assert server.stop() == 0
    assert "  Rejected Associations: 3\n" in server.log()
    assert "  Total Associations:    3\n" in server.log()


# -- statistics on a signal ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_statistics_counters(
    server_factory: ServerFactory, tmp_path: Path, sig: signal.Signals
) -> None:
    """On SIGTERM/SIGINT/SIGHUP the server exits 0 after printing counters that match what
    was sent: associations, messages, images, exact data set bytes, stored, duplicates and
    failures."""
    server = server_factory()
    good = [
        part10(make_dataset(f"{ROOT}.16.{i}", pixel_bytes=300 * (i + 1)), tmp_path)
        for i in range(2)
    ]
    no_study = make_dataset(f"{ROOT}.16.9")
    del no_study.StudyInstanceUID
    bad = part10(no_study, tmp_path)
    sent = 0
    with association(
        server.port,
        [(CTImageStorage, [ExplicitVRLittleEndian]), (VERIFICATION, [ImplicitVRLittleEndian])],
    ) as assoc:
        assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
        for path in good:
            assert store(assoc, path).Status == 0x0000
            sent += len(data_set_bytes(path))
        assert store(assoc, good[0]).Status == 0x0111
        sent += len(data_set_bytes(good[0]))
        assert 0xC000 <= store(assoc, bad).Status <= 0xC0FF
        sent += len(data_set_bytes(bad))
    with association(server.port, ae_title="SECOND") as assoc:
        pass
    stored_size = sum(p.stat().st_size for p in server.files())
    assert server.stop(sig) == 0
    log = server.log()
    expected = {
        "Total Associations": "2",
        "Rejected Associations": "0",
        "Messages Processed": "5",
        "Images Received": "4",
        "Bytes Received": format_bytes(sent),
        "Instances Stored": "2",
        "Total Size": format_bytes(stored_size),
        "Duplicates": "1",
        "Failures": "1",
    }
    for label, value in expected.items():
        assert f"  {label + ':':<23}{value}\n" in log, (label, value, log[-1200:])
    assert "Uptime:" in log
    assert f"Received {sig.name}" in log


def test_bytes_received_is_exact_below_one_kib(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Bytes Received counts the data set bytes exactly (not an estimate): one small data
    set gives its exact length in bytes."""
    server = server_factory()
    ds = make_dataset(f"{ROOT}.17.1", pixel_bytes=2)
    data = encode(ds, implicit=True)
    assert len(data) < 1024
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, CTImageStorage, [ImplicitVRLittleEndian])])
        assert raw.c_store(1, CTImageStorage, ds.SOPInstanceUID, data, max_pdu=64).status == 0
        raw.release()
    assert server.stop() == 0
    assert f"  Bytes Received:        {len(data)} B\n" in server.log()


# -- restarts, storage failures, aborts and draining -----------------------------------------


def private_tmp_files(storage: Path) -> list[Path]:
    """Regular files in the private temporary area (temporaries of any run)."""
    tmp = storage / ".storescp" / "tmp"
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else []


def wait_for_log(
    server: RunningServer, text: str, timeout: float = 10.0, poll: float = 0.05
) -> str:
    """The server's log once it contains `text` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(poll)
    raise AssertionError(f"{text!r} not in the log after {timeout} s:\n{server.log()[-2000:]}")


@pytest.mark.parametrize("policy", ["reject", "replace", "ignore"])
def test_duplicates_found_across_layouts_after_restart(
    server_factory: ServerFactory, tmp_path: Path, policy: str
) -> None:
    """A SOP Instance UID stored with one layout is a duplicate for a later server on the same
    root with another layout: reject keeps the old file (0111), replace moves it (one file),
    ignore keeps it (0000)."""
    storage = tmp_path / "store"
    uid = f"{ROOT}.18.1"
    first = part10(make_dataset(uid, patient_name="Old^One"), tmp_path / "a")
    second = part10(make_dataset(uid, patient_name="New^Two"), tmp_path / "b")
    one = server_factory(["--naming", "hierarchical"], storage=storage)
    with association(one.port) as assoc:
        assert store(assoc, first).Status == 0x0000
    (old,) = one.files()
    assert one.stop() == 0
    two = server_factory(["--naming", "flat", "--duplicate", policy], storage=storage)
    with association(two.port) as assoc:
        status = store(assoc, second)
    flat = storage / f"{uid}.dcm"
    if policy == "reject":
        assert status.Status == 0x0111
        assert two.files() == [old]
        assert data_set_bytes(old) == data_set_bytes(first)
    elif policy == "ignore":
        assert status.Status == 0x0000
        assert two.files() == [old]
        assert data_set_bytes(old) == data_set_bytes(first)
    else:
        assert status.Status == 0x0000
        assert two.files() == [flat]
        assert data_set_bytes(flat) == data_set_bytes(second)


def test_storage_failure_a700_and_association_goes_on(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """When the final path cannot be created (a regular file sits where the study folder
    goes), the answer is A700-range with an Error Comment, no temporary file remains, the
    blocking file is untouched, and the same association then stores another study."""
    server = server_factory()
    blocked_study = f"{ROOT}.19.100"
    blocker = server.storage / blocked_study
    blocker.write_bytes(b"occupied")
    blocked = part10(make_dataset(f"{ROOT}.19.1", study_uid=blocked_study), tmp_path)
    fine = part10(make_dataset(f"{ROOT}.19.2", study_uid=f"{ROOT}.19.200"), tmp_path)
    with association(server.port) as assoc:
        status = store(assoc, blocked)
        assert 0xA700 <= status.Status <= 0xA7FF, hex(status.Status)
        assert str(status.get("ErrorComment", "")).strip()
        assert store(assoc, fine).Status == 0x0000
        # The failed instance is not a duplicate: once unblocked it can be stored.
        blocker.unlink()
        assert store(assoc, blocked).Status == 0x0000
    assert private_tmp_files(server.storage) == []
    assert sorted(p.name for p in server.files()) == [f"{ROOT}.19.1.dcm", f"{ROOT}.19.2.dcm"]
    assert server.stop() == 0
    assert "  Failures:              1\n" in server.log()


def _start_partial_store(
    port: int, uid: str, *, calling: str = "PARTIAL"
) -> tuple[RawAssociation, bytes]:
    """A raw association that sent a C-STORE-RQ and the first half of its data set."""
    ds = make_dataset(uid, pixel_bytes=200_000)
    data = encode(ds)
    raw = RawAssociation.connect(port)
    raw.associate("STORESCP", calling, [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
    for chunk in fragments(1, c_store_rq(1, CTImageStorage, uid), command=True, max_pdu=16384):
        raw.send(chunk)
    half = fragments(1, data, command=False, max_pdu=16384)
    for chunk in half[: len(half) // 2]:
        raw.send(chunk)
    return raw, data


@pytest.mark.parametrize("how", ["a-abort", "tcp-reset", "tcp-close"])
def test_abort_mid_transfer_leaves_nothing(
    server_factory: ServerFactory, tmp_path: Path, how: str
) -> None:
    """An association that ends half-way through a data set leaves no file and no
    temporary; the instance is not counted as stored and can be sent again afterwards."""
    server = server_factory()
    uid = f"{ROOT}.20.1"
    raw, data = _start_partial_store(server.port, uid)
    time.sleep(0.2)
    if how == "a-abort":
        raw.abort()
    else:
        if how == "tcp-reset":
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    wait_for_log(server, "Association aborted: PARTIAL")
    assert server.files() == []
    assert private_tmp_files(server.storage) == []
    with RawAssociation.connect(server.port) as again:
        again.associate("STORESCP", "RETRY", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        assert again.c_store(1, CTImageStorage, uid, data).status == 0x0000
        again.release()
    (stored,) = server.files()
    assert data_set_bytes(stored) == data
    assert server.stop() == 0
    log = server.log()
    assert "  Images Received:       1\n" in log
    assert "  Instances Stored:      1\n" in log


def test_sigterm_lets_in_flight_store_finish(server_factory: ServerFactory) -> None:
    """SIGTERM while a C-STORE is half-way: the transfer may finish and gets 0000, the file
    is complete, then the server exits 0."""
    server = server_factory()
    uid = f"{ROOT}.21.1"
    raw, data = _start_partial_store(server.port, uid)
    with raw:
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, "Received SIGTERM")
        rest = fragments(1, data, command=False, max_pdu=16384)
        for chunk in rest[len(rest) // 2 :]:
            raw.send(chunk)
        rsp = raw.read_command()
        assert rsp.status == 0x0000
    assert server.proc.wait(timeout=20) == 0
    (stored,) = server.files()
    assert data_set_bytes(stored) == data
    assert "  Instances Stored:      1\n" in server.log()


def _try_associate(port: int) -> str:
    """ "accepted" if an A-ASSOCIATE-AC came back, else how the attempt ended."""
    try:
        with RawAssociation.connect(port, timeout=3) as late:
            late.associate("STORESCP", "LATE", [Context(1, VERIFICATION)])
            return "accepted"
    except AssociationRejected as exc:
        return f"rejected {exc.args[0]}"
    except Aborted as exc:
        return f"aborted {exc.args[0]}"
    except OSError as exc:
        return type(exc).__name__


def test_no_new_association_once_stopping(server_factory: ServerFactory) -> None:
    """Once the signal has been handled (the notice is in the log) the server accepts no new
    association, even while an in-flight C-STORE keeps it draining."""
    server = server_factory()
    raw, _ = _start_partial_store(server.port, f"{ROOT}.24.1")
    with raw:
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, "Received SIGTERM", poll=0.002)
        outcomes = []
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            outcomes.append(_try_associate(server.port))
            time.sleep(0.01)
        assert "accepted" not in outcomes, outcomes[:5]
    assert server.proc.wait(timeout=20) == 0


def test_drain_timeout_aborts_unfinished_transfer(server_factory: ServerFactory) -> None:
    """--drain-timeout 1: a transfer that does not finish is aborted after about a second,
    its partial data discarded, and the server exits 0 with nothing stored."""
    server = server_factory(["--drain-timeout", "1"])
    raw, _ = _start_partial_store(server.port, f"{ROOT}.22.1")
    with raw:
        time.sleep(0.2)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 10
        tail = raw.wait_closed(5)
        assert tail == b"" or tail[0] == 0x07  # nothing more, or an A-ABORT
    assert server.files() == []
    assert private_tmp_files(server.storage) == []
    log = server.log()
    assert "  Images Received:       0\n" in log
    assert "  Instances Stored:      0\n" in log


def test_temporaries_of_a_killed_server_are_swept_at_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A server killed (SIGKILL) mid-transfer leaves no file under a final name, and the next
    server on the same root removes the dead run's temporaries at start."""
    storage = tmp_path / "store"
    one = server_factory(storage=storage)
    raw, _ = _start_partial_store(one.port, f"{ROOT}.23.1")
    with raw:
        time.sleep(0.3)
        tmp_root = storage / ".storescp" / "tmp"
        runs_before = {p.name for p in tmp_root.iterdir()} if tmp_root.is_dir() else set()
        one.proc.kill()
        one.proc.wait(timeout=10)
    assert one.files() == []
    two = server_factory(storage=storage)
    assert two.files() == []
    assert private_tmp_files(storage) == []
    if tmp_root.is_dir():
        assert not (runs_before & {p.name for p in tmp_root.iterdir()})
    assert two.stop() == 0
