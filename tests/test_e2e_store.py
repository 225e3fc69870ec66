"""End to end: real peers (dcmtk storescu/echoscu, pynetdicom) store into a real server
process, and the files on disk are checked byte for byte (SPEC.md sections 3 and 4)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pydicom.config
import pytest
from conftest import (
    DCMDUMP,
    STORESCU,
    RunningServer,
    data_set_bytes,
    echoscu,
    make_dataset,
    start_server,
    storescu,
    write_part10,
)
from dicom_raw import VERIFICATION, Context, RawAssociation
from index_support import registry_link
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode
from storescp.index import Index
from storescp.index.layout import StorageLayout

pytest.importorskip("storescp._core", reason="the Rust core is not built")

ServerFactory = Callable[..., RunningServer]

IMPLEMENTATION_CLASS_UID = "2.25.170282023813347804915073355187678686180"
ROOT = "1.2.826.0.1.3680043.9.7.20"
ENCAPSULATED = {JPEGBaseline8Bit, JPEG2000Lossless, JPEG2000, JPEGLosslessSV1, RLELossless}


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lenient_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets pydicom write data sets with made-up (not real codestream) pixel data."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)


def rle_frame(pixels: bytes) -> bytes:
    """One RLE Lossless frame (PS3.5 G): header with one segment of literal runs."""
    segment = b""
    for i in range(0, len(pixels), 128):
        run = pixels[i : i + 128]
        segment += bytes([len(run) - 1]) + run
    if len(segment) % 2:
        segment += b"\0"
    return struct.pack("<16I", 1, 64, *([0] * 14)) + segment


def encapsulated_dataset(sop_uid: str, transfer_syntax: str, frames: int = 2) -> Dataset:
    """An 8-bit image whose Pixel Data is encapsulated (fragments need not be real codestreams:
    the server stores pixels as received)."""
    ds = make_dataset(sop_uid)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.Rows = 4
    ds.Columns = 4
    ds.NumberOfFrames = frames
    if transfer_syntax == RLELossless:
        items = [rle_frame(bytes((f * 16 + i) & 0xFF for i in range(16))) for f in range(frames)]
    else:
        items = [b"\xff\xd8" + bytes([f]) * (31 + f) + b"\xff\xd9" for f in range(frames)]
    ds.PixelData = encapsulate(items)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def dataset_for(sop_uid: str, transfer_syntax: str, **kwargs: object) -> Dataset:
    """A data set fit for `transfer_syntax` (encapsulated pixels for compressed ones)."""
    if transfer_syntax in ENCAPSULATED:
        return encapsulated_dataset(sop_uid, transfer_syntax)
    return make_dataset(sop_uid, **kwargs)  # type: ignore[arg-type]


def dcmdump_ok(path: Path) -> str:
    """dcmdump's output for `path`, asserting it parses the whole file."""
    result = subprocess.run(
        [DCMDUMP, "-M", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "E:" not in result.stderr, result.stderr
    return result.stdout


def assert_part10(
    stored: Path,
    *,
    sent: bytes,
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    calling_ae: str,
) -> None:
    """The stored file is a valid Part 10 file with our meta and exactly `sent` after it."""
    raw = stored.read_bytes()
    assert len(raw) > 132 and raw[128:132] == b"DICM"
    dump = dcmdump_ok(stored)
    assert "(0002,0010)" in dump
    meta = read_file_meta_info(stored)
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == sop_class_uid
    assert meta.MediaStorageSOPInstanceUID == sop_instance_uid
    assert meta.TransferSyntaxUID == transfer_syntax
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert str(meta.get("ImplementationVersionName", "")).strip()
    assert meta.SourceApplicationEntityTitle.strip() == calling_ae
    got = data_set_bytes(stored)
    assert len(got) == len(sent)
    assert got == sent


def hierarchical_path(server: RunningServer, ds: Dataset) -> Path:
    return server.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


@contextmanager
def association(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    ae_title: str = "PYSCU",
    called: str = "STORESCP",
    handlers: Sequence[tuple[object, Callable[..., object]]] = (),
) -> Iterator[object]:
    """A pynetdicom association (asserted established), released or aborted at exit."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 10
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=list(handlers))
    assert assoc.is_established, "association not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


@pytest.fixture
def send_files_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are in the file (no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One default server for the tests of this module that use distinct UIDs; it must
    still be alive and stop cleanly at the end."""
    server = start_server(tmp_path_factory.mktemp("shared"))
    try:
        yield server
        assert server.proc.poll() is None, "the shared server died"
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


# -- dcmtk storescu --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transfer_syntax", "options"),
    [
        pytest.param(ImplicitVRLittleEndian, ["-xi"], id="implicit-le"),
        pytest.param(ExplicitVRLittleEndian, ["-xe"], id="explicit-le"),
        pytest.param(ExplicitVRBigEndian, ["-xb"], id="explicit-be"),
        pytest.param(DeflatedExplicitVRLittleEndian, ["-xd"], id="deflated"),
        pytest.param(JPEGBaseline8Bit, ["-xy"], id="jpeg-baseline"),
        pytest.param(JPEG2000Lossless, ["-xv"], id="jpeg2000-lossless"),
        pytest.param(RLELossless, ["-xr"], id="rle"),
        pytest.param(ExplicitVRLittleEndian, ["--max-send-pdu", "4096"], id="max-send-pdu-4096"),
        pytest.param(ExplicitVRLittleEndian, [], id="storescu-default"),
    ],
)
def test_storescu_stores_bit_exact(
    shared_server: RunningServer, tmp_path: Path, transfer_syntax: str, options: list[str]
) -> None:
    """Each transfer syntax storescu negotiates is stored as a Part 10 file in that syntax,
    with our file meta and the data set exactly as sent."""
    uid = f"{ROOT}.1.{zlib.crc32(repr((transfer_syntax, options)).encode())}"
    ds = dataset_for(uid, transfer_syntax, pixel_bytes=8192)
    source = write_part10(ds, tmp_path / "in" / "a.dcm", transfer_syntax)
    server = shared_server
    result = storescu(server.port, source, args=["-v", "-aet", "MODALITY1", *options], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr
    stored = hierarchical_path(server, ds)
    assert [p for p in server.files() if p.name == stored.name] == [stored]
    assert_part10(
        stored,
        sent=data_set_bytes(source),
        transfer_syntax=transfer_syntax,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=uid,
        calling_ae="MODALITY1",
    )
    # The duplicate registry: a link in the UID's folder naming the stored file by its
    # path (the first instance of its folder) or its folder (a hard link of the
    # folder's link).
    relpath = stored.relative_to(server.storage).as_posix()
    assert StorageLayout(server.storage).registry()[uid] == relpath
    target = os.readlink(registry_link(server.storage, uid))
    assert target in (relpath, PurePosixPath(relpath).parent.as_posix()), target


def test_storescu_scans_a_directory_tree(server: RunningServer, tmp_path: Path) -> None:
    """`storescu +sd +r DIR` sends every file of a nested tree in one association; each is
    stored under its own study/series with its bytes intact."""
    sources: list[tuple[Path, Dataset]] = []
    for i in range(6):
        sop_class, modality = (
            (CTImageStorage, "CT"),
            (MRImageStorage, "MR"),
            (SecondaryCaptureImageStorage, "OT"),
        )[i % 3]
        ds = make_dataset(
            f"{ROOT}.2.{i}",
            study_uid=f"{ROOT}.2.100.{i % 2}",
            series_uid=f"{ROOT}.2.200.{i % 3}",
            sop_class_uid=sop_class,
            modality=modality,
            pixel_bytes=256 * (i + 1),
        )
        path = write_part10(ds, tmp_path / "in" / f"d{i % 2}" / f"s{i}" / f"f{i}.dcm")
        sources.append((path, ds))
    result = storescu(server.port, tmp_path / "in", args=["-v", "+sd", "+r", "-xe"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 6
    assert sorted(server.files()) == sorted(hierarchical_path(server, ds) for _, ds in sources)
    for path, ds in sources:
        assert_part10(
            hierarchical_path(server, ds),
            sent=data_set_bytes(path),
            transfer_syntax=ExplicitVRLittleEndian,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            calling_ae="STORESCU",
        )


# linux/fs.h: the inode flags ioctl (_IOR('f', 1, long)) and the "top directory" flag.
FS_IOC_GETFLAGS = 0x80086601
FS_TOPDIR_FL = 0x00020000


def inode_flags(path: Path) -> int | None:
    """The inode flags of `path` (as `lsattr` shows them), None where the filesystem
    keeps none (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        answer = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return None
    finally:
        os.close(fd)
    flags: int = struct.unpack_from("=i", answer)[0]
    return flags


def test_each_run_is_born_in_a_folder_ext4_spreads(server: RunningServer, tmp_path: Path) -> None:
    """The folder of the runs' temporary folders carries ext4's top-directory flag (so a
    run's new inodes are allocated away from files deleted lately), wherever the
    filesystem keeps inode flags; an instance stored meanwhile is under its final name,
    and nothing of it is left in the run's folder (but a study's folders made ahead)."""
    ds = make_dataset(f"{ROOT}.31.1", pixel_bytes=1024)
    source = write_part10(ds, tmp_path / "in" / "a.dcm")
    result = storescu(server.port, source)
    assert result.returncode == 0, result.stderr
    assert data_set_bytes(hierarchical_path(server, ds)) == data_set_bytes(source)
    tmp = server.storage / ".storescp" / "tmp"
    flags = inode_flags(tmp)
    if flags is not None:
        assert flags & FS_TOPDIR_FL, f"{tmp} has flags {flags:#x}"
    (run,) = tmp.iterdir()
    left = [p.name for p in run.iterdir() if not (p.is_dir() and p.name.endswith(".folder"))]
    assert left == []


# A sender without TCP_NODELAY holds back each write until the one before is acknowledged;
# a delayed ACK (40 ms at least on Linux) once per message would make these 60 take 2.4 s.
NAGLE_MESSAGES = 60
NAGLE_BOUND_S = NAGLE_MESSAGES * 0.040 / 2


def nagle_sources(tmp_path: Path) -> list[tuple[Path, Dataset]]:
    sources = []
    for i in range(NAGLE_MESSAGES):
        ds = make_dataset(f"{ROOT}.21.{i}", pixel_bytes=2048)
        sources.append((write_part10(ds, tmp_path / "in" / f"n{i:02}.dcm"), ds))
    return sources


def assert_registry_of_one_series(
    server: RunningServer, sources: list[tuple[Path, Dataset]]
) -> None:
    """`sources`, one series stored in order: its first instance's registry entry holds
    the path; the others are hard links of the folder's link, naming the folder with no
    inode of their own; every entry resolves to its file."""
    registry = StorageLayout(server.storage).registry()
    entries = []
    for _, ds in sources:
        stored = hierarchical_path(server, ds).relative_to(server.storage).as_posix()
        assert registry[ds.SOPInstanceUID] == stored
        entries.append(registry_link(server.storage, ds.SOPInstanceUID))
    first, *others = entries
    first_file = hierarchical_path(server, sources[0][1]).relative_to(server.storage)
    assert os.readlink(first) == first_file.as_posix()
    assert first.lstat().st_nlink == 1
    assert {os.readlink(e) for e in others} == {first_file.parent.as_posix()}
    # One inode: the folder link's, with a name per entry besides its own.
    assert len({e.lstat().st_ino for e in others}) == 1
    assert others[0].lstat().st_nlink == len(others) + 1


def test_storescu_with_nagle_on_is_not_held_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """dcmtk's storescu as Debian builds it leaves Nagle's algorithm on unless TCP_NODELAY
    is in its environment, and writes each PDV in two writes (header, then value). The
    server acknowledges the pieces of a message at once, so the next write is not held
    back for a delayed ACK."""
    server = server_factory(["--no-fsync"])
    sources = nagle_sources(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    started = time.monotonic()
    result = subprocess.run(
        [STORESCU, "-xe", "127.0.0.1", str(server.port), *(str(p) for p, _ in sources)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert sorted(server.files()) == sorted(hierarchical_path(server, ds) for _, ds in sources)
    assert elapsed < NAGLE_BOUND_S, f"{NAGLE_MESSAGES} instances took {elapsed:.2f} s"
    assert_registry_of_one_series(server, sources)


def test_raw_sender_writing_each_pdu_apart_is_not_held_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A sender with Nagle's algorithm on that sends the command PDU and the data set PDU
    in separate writes, as many do, is not held back a delayed ACK per message."""
    server = server_factory(["--no-fsync"])
    sources = nagle_sources(tmp_path)
    with RawAssociation.connect(server.port) as raw:
        assert not raw.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        raw.associate("STORESCP", "NAGLE", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        started = time.monotonic()
        for path, ds in sources:
            rsp = raw.c_store(1, CTImageStorage, ds.SOPInstanceUID, data_set_bytes(path))
            assert rsp.status == 0
        elapsed = time.monotonic() - started
        raw.release()
    assert sorted(server.files()) == sorted(hierarchical_path(server, ds) for _, ds in sources)
    assert elapsed < NAGLE_BOUND_S, f"{NAGLE_MESSAGES} instances took {elapsed:.2f} s"
    assert_registry_of_one_series(server, sources)


@pytest.fixture(scope="session")
def big_multiframe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A multi-frame CT of more than 50 MiB, made once per session."""
    uid = f"{ROOT}.3.1"
    ds = make_dataset(uid, pixel_bytes=2)
    ds.Rows = 512
    ds.Columns = 512
    ds.NumberOfFrames = 101
    size = 512 * 512 * 2 * 101
    ds.PixelData = random.Random(7).randbytes(size)
    path = write_part10(ds, tmp_path_factory.mktemp("big") / "big.dcm")
    assert path.stat().st_size > 50 * 1024 * 1024
    return path, ds


def test_storescu_sends_a_multiframe_over_50_mib(
    server_factory: ServerFactory, big_multiframe: tuple[Path, Dataset]
) -> None:
    """A > 50 MiB instance arrives whole: same data set hash, file meta intact."""
    source, ds = big_multiframe
    server = server_factory(["--no-fsync"])
    result = storescu(server.port, source, args=["-xe", "-aet", "BIGSENDER"], timeout=120)
    assert result.returncode == 0, result.stderr
    stored = hierarchical_path(server, ds)
    assert server.files() == [stored]
    assert (
        hashlib.sha256(data_set_bytes(stored)).hexdigest()
        == hashlib.sha256(data_set_bytes(source)).hexdigest()
    )
    meta = read_file_meta_info(stored)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.SourceApplicationEntityTitle.strip() == "BIGSENDER"


# -- pynetdicom ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEG2000,
        RLELossless,
    ],
    ids=lambda ts: ts.name,
)
@pytest.mark.usefixtures("send_files_raw")
def test_pynetdicom_stores_each_transfer_syntax(
    shared_server: RunningServer, tmp_path: Path, transfer_syntax: str
) -> None:
    """pynetdicom proposing exactly one transfer syntax: the file carries it, the data set
    bytes are the ones pynetdicom put on the wire."""
    uid = f"{ROOT}.4.{ENCODINGS.index(transfer_syntax)}"
    ds = dataset_for(uid, transfer_syntax, pixel_bytes=4096)
    source = write_part10(ds, tmp_path / "in" / "p.dcm", transfer_syntax)
    server = shared_server
    with association(server.port, [(CTImageStorage, [transfer_syntax])]) as assoc:
        status = assoc.send_c_store(source)  # type: ignore[attr-defined]
        assert status.Status == 0x0000
    assert_part10(
        hierarchical_path(server, ds),
        sent=data_set_bytes(source),
        transfer_syntax=transfer_syntax,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=uid,
        calling_ae="PYSCU",
    )


ENCODINGS = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000,
    RLELossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
]


@pytest.mark.parametrize("order", ["compressed-first", "uncompressed-first", "unknown-first"])
@pytest.mark.usefixtures("send_files_raw")
def test_pynetdicom_many_transfer_syntaxes_in_one_context(
    shared_server: RunningServer, tmp_path: Path, order: str
) -> None:
    """One context proposing many syntaxes (an unknown one included) is accepted with one of
    the proposed known syntaxes; an instance encoded in it is stored in it, bit-exact."""
    syntaxes = [
        JPEG2000Lossless,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    if order == "uncompressed-first":
        syntaxes.reverse()
    elif order == "unknown-first":
        syntaxes.insert(0, "1.2.826.0.1.3680043.9.7.20.999")
    server = shared_server
    with association(server.port, [(CTImageStorage, syntaxes)]) as assoc:
        (context,) = assoc.accepted_contexts  # type: ignore[attr-defined]
        chosen = context.transfer_syntax[0]
        assert chosen in syntaxes[1:] if order == "unknown-first" else chosen in syntaxes
        uid = f"{ROOT}.5.{['compressed-first', 'uncompressed-first', 'unknown-first'].index(order)}"
        ds = dataset_for(uid, chosen)
        source = write_part10(ds, tmp_path / "in" / "m.dcm", chosen)
        assert assoc.send_c_store(source).Status == 0x0000  # type: ignore[attr-defined]
    assert_part10(
        hierarchical_path(server, ds),
        sent=data_set_bytes(source),
        transfer_syntax=chosen,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=uid,
        calling_ae="PYSCU",
    )


def test_negotiation_results_per_context(server_factory: ServerFactory) -> None:
    """Context results: an unknown abstract syntax gets 3, only unknown transfer syntaxes
    get 4, the rest are accepted with a proposed syntax."""
    server = server_factory(["--accept", "CT"])
    bogus_ts = "1.2.826.0.1.3680043.9.7.20.998"
    with RawAssociation.connect(server.port) as raw:
        ac = raw.associate(
            "STORESCP",
            "RAWSCU",
            [
                Context(1, CTImageStorage, [ExplicitVRLittleEndian]),
                Context(3, MRImageStorage, [ExplicitVRLittleEndian]),  # not accepted: CT only
                Context(5, CTImageStorage, [bogus_ts]),
                Context(7, "1.2.826.0.1.3680043.9.7.20.997", [ImplicitVRLittleEndian]),
                Context(9, VERIFICATION, [ImplicitVRLittleEndian]),
                Context(11, CTImageStorage, [bogus_ts, ImplicitVRLittleEndian]),
            ],
        )
        assert ac.results[1] == (0, ExplicitVRLittleEndian)
        assert ac.results[3][0] == 3
        assert ac.results[5][0] == 4
        assert ac.results[7][0] == 3
        assert ac.results[9] == (0, ImplicitVRLittleEndian)
        assert ac.results[11] == (0, ImplicitVRLittleEndian)
        assert ac.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        raw.release()


# -- C-ECHO ----------------------------------------------------------------------------------


def test_echoscu(server: RunningServer) -> None:
    """dcmtk echoscu gets a successful C-ECHO, and the server logs it."""
    result = echoscu(server.port, ["-v", "-aet", "ECHOER", "-aec", "STORESCP"])
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr
    assert server.stop() == 0
    assert "C-ECHO from ECHOER" in server.log()


def test_pynetdicom_echo_echoes_message_id(server: RunningServer) -> None:
    """C-ECHO-RSP carries status 0000 and the request's Message ID, for several IDs on one
    association (pynetdicom and a raw peer)."""
    seen: list[tuple[int, int]] = []

    def on_recv(event: evt.Event) -> None:
        cs = event.message.command_set  # type: ignore[attr-defined]
        seen.append((int(cs.MessageIDBeingRespondedTo), int(cs.Status)))

    with association(
        server.port,
        [(VERIFICATION, [ImplicitVRLittleEndian])],
        handlers=[(evt.EVT_DIMSE_RECV, on_recv)],
    ) as assoc:
        for mid in (1, 4242, 65535):
            assert assoc.send_c_echo(msg_id=mid).Status == 0x0000  # type: ignore[attr-defined]
    assert seen == [(1, 0), (4242, 0), (65535, 0)]

    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "RAWSCU", [Context(1, VERIFICATION)])
        for mid in (0, 7, 31337):
            rsp = raw.c_echo(1, mid)
            assert (rsp.command_field, rsp.message_id_responded, rsp.status) == (0x8030, mid, 0)
        raw.release()


@pytest.mark.usefixtures("send_files_raw")
def test_max_pdu_option_is_advertised_and_large_data_sets_still_arrive(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """--max-pdu 4096: the A-ASSOCIATE-AC advertises 4096, and a 300 KB data set sent in
    PDUs of that size by storescu and pynetdicom is stored intact."""
    server = server_factory(["--max-pdu", "4096"])
    with RawAssociation.connect(server.port) as raw:
        ac = raw.associate("STORESCP", "RAWSCU", [Context(1, VERIFICATION)])
        assert ac.max_pdu == 4096
        raw.release()
    first = make_dataset(f"{ROOT}.7.1", pixel_bytes=300_000)
    second = make_dataset(f"{ROOT}.7.2", pixel_bytes=300_000)
    a = write_part10(first, tmp_path / "in" / "a.dcm")
    b = write_part10(second, tmp_path / "in" / "b.dcm")
    result = storescu(server.port, a, args=["-xe"])
    assert result.returncode == 0, result.stderr
    with association(server.port, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_store(b).Status == 0x0000  # type: ignore[attr-defined]
    for ds, source in ((first, a), (second, b)):
        assert data_set_bytes(hierarchical_path(server, ds)) == data_set_bytes(source)


def test_c_store_with_priority_and_move_originator(server: RunningServer) -> None:
    """Optional C-STORE-RQ fields (high priority, Move Originator AE title and Message ID)
    are accepted; the response answers the request's Message ID and SOP Instance UID."""
    ds = make_dataset(f"{ROOT}.8.1")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    seen: list[tuple[int, str]] = []

    def on_recv(event: evt.Event) -> None:
        cs = event.message.command_set  # type: ignore[attr-defined]
        seen.append((int(cs.MessageIDBeingRespondedTo), str(cs.AffectedSOPInstanceUID)))

    with association(
        server.port,
        [(CTImageStorage, [ImplicitVRLittleEndian])],
        handlers=[(evt.EVT_DIMSE_RECV, on_recv)],
    ) as assoc:
        status = assoc.send_c_store(  # type: ignore[attr-defined]
            ds, msg_id=777, priority=1, originator_aet="MOVER", originator_id=12
        )
        assert status.Status == 0x0000
    assert seen == [(777, ds.SOPInstanceUID)]
    stored = hierarchical_path(server, ds)
    assert data_set_bytes(stored) == encode(ds, True, True, False)


# -- the index ---------------------------------------------------------------------------------


def _explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_index_rows_whatever_the_journal_line(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The core writes an instance's journal line while its data set arrives once the
    attributes after (0020,000E) show that the name is settled, and at commit otherwise
    (a data set ending at (0020,000E)); a replace into another date folder names both
    paths. Either way every stored file gets its row, and a restart (which replays the
    journal) changes nothing."""
    db = tmp_path / "index.db"
    args = ["--index-db", str(db), "--naming", "date", "--duplicate", "replace"]
    server = server_factory(args)
    full = make_dataset(f"{ROOT}.9.1")
    short = make_dataset(f"{ROOT}.9.2")
    for keyword in [e.keyword for e in short if e.tag > 0x0020000E]:
        delattr(short, keyword)
    moved = make_dataset(f"{ROOT}.9.1", study_date="20250303")
    with RawAssociation.connect(server.port) as raw:
        raw.associate("STORESCP", "INDEXED", [Context(1, CTImageStorage, [ExplicitVRLittleEndian])])
        for ds in (full, short, moved):
            assert raw.c_store(1, CTImageStorage, ds.SOPInstanceUID, _explicit_le(ds)).status == 0
        raw.release()
    assert server.stop() == 0
    study = full.StudyInstanceUID
    expected = {
        f"{ROOT}.9.1": f"2025/03/03/{study}/{ROOT}.9.1.dcm",
        f"{ROOT}.9.2": f"2024/01/02/{study}/{ROOT}.9.2.dcm",
    }
    assert not (server.storage / f"2024/01/02/{study}/{ROOT}.9.1.dcm").exists()
    for _ in range(2):
        with Index.open(db) as index:
            rows = {row.sop_instance_uid: row.path for row in index.instances()}
            report = index.verify()
        assert rows == expected
        assert report.ok, report
        restarted = server_factory(args, storage=server.storage)
        assert restarted.stop() == 0
