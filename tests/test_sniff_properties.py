"""Property-based tests (hypothesis) of the header sniffer and the file naming.

- Naming: `storescp._core.relative_path` on arbitrary text never yields an unsafe path;
  it raises ValueError or returns a relative path of digits and dots in the documented
  layout, and valid UIDs always give exactly that layout.
- Sniffer against pydicom: data sets generated with pydicom (random patient names, IDs,
  UIDs, dates, descriptions; optional sequences and private elements before the UIDs) are
  written by pydicom in each transfer syntax (implicit VR LE, explicit VR LE, explicit VR
  BE, deflated explicit VR LE), sent as a C-STORE to an in-process core server fragmented
  at a random P-DATA size, and the values the core reports for the stored instance must
  be exactly the generated ones, at exactly the path `relative_path` gives.

The Rust side has the same properties with its own data set generator in
rust/tests/properties.rs; coverage-guided fuzzing is in fuzz/ (see fuzz/README.md).
"""

from __future__ import annotations

import datetime
import itertools
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from dicom_raw import Context, RawAssociation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from storescp import _core

NAMINGS = ("hierarchical", "date", "flat")
COMPONENTS = {"hierarchical": 3, "date": 5, "flat": 1}
TODAY = "19991231"

# -- naming ---------------------------------------------------------------------------------

# Text built from what matters for path safety, plus anything at all.
hostile_text = st.one_of(
    st.text(),
    st.text(alphabet="0123456789./\\\0 ", max_size=80),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "\\",
            "\0",
            "../1.2",
            "1.2/../3",
            "1.2\\..\\3",
            "/1.2",
            "1.2\0.3",
            "1..2",
            ".1",
            "1.",
            " ",
            "1.2\0",
            "1.2 ",
            "1." * 32 + "1",
            "1" * 65,
        ]
    ),
)

valid_uid = st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,6}){0,8}\Z")
# UIDs as PS3.5 9.1 writes them (no leading zero in a component), for pydicom data sets.
dicom_uid = st.from_regex(r"\A(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,8}\Z")
# DA values (YYYYMMDD) of real dates, years 0001-9999.
da_dates = st.dates().map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}")


def model_uid(value: str) -> str | None:
    """The documented UID rule, written independently: without its trailing NUL/space
    padding, 1-64 characters of digits and dots with no empty component."""
    trimmed = value.rstrip("\0 ")
    ok = (
        0 < len(trimmed) <= 64
        and all(c in "0123456789." for c in trimmed)
        and all(trimmed.split("."))
    )
    return trimmed if ok else None


def assert_safe(path: str, naming: str) -> None:
    assert path and not path.startswith("/"), path
    assert "\\" not in path and "\0" not in path, path
    assert path.endswith(".dcm"), path
    parts = path.split("/")
    assert len(parts) == COMPONENTS[naming], path
    for part in parts:
        assert part not in ("", ".", ".."), path
        assert set(part) <= set("0123456789.dcm"), path
    assert Path(path).parts == tuple(parts)
    assert not Path(path).is_absolute()


@settings(max_examples=200, deadline=None)
@given(
    naming=st.sampled_from(NAMINGS),
    study=hostile_text,
    series=hostile_text,
    sop=hostile_text,
    study_date=hostile_text,
    today=hostile_text,
)
def test_relative_path_is_never_unsafe(
    naming: str, study: str, series: str, sop: str, study_date: str, today: str
) -> None:
    valid = all(model_uid(v) is not None for v in (study, series, sop))
    try:
        path = _core.relative_path(naming, study, series, sop, study_date, today)
    except ValueError as exc:
        assert not valid, f"refused valid UIDs: {exc}"
        message = str(exc)
        assert all(" " <= c <= "~" and c != "\\" for c in message), message
        return
    assert valid, f"accepted invalid UIDs as {path!r}"
    assert_safe(path, naming)


@settings(max_examples=200, deadline=None)
@given(
    naming=st.sampled_from(NAMINGS),
    uids=st.tuples(valid_uid, valid_uid, valid_uid),
    pads=st.tuples(*[st.sampled_from(["", "\0", " ", "\0 \0"])] * 3),
    study_date=st.one_of(
        da_dates,
        st.sampled_from(["", "20230230", "2024022", "00000101", "abcdefgh"]),
    ),
)
def test_relative_path_layout_for_valid_uids(
    naming: str, uids: tuple[str, str, str], pads: tuple[str, str, str], study_date: str
) -> None:
    study, series, sop = uids
    p_study, p_series, p_sop = (uid + pad for uid, pad in zip(uids, pads, strict=True))
    path = _core.relative_path(naming, p_study, p_series, p_sop, study_date, TODAY)
    date_ok = len(study_date) == 8 and study_date.isdigit() and _is_date(study_date)
    day = study_date if date_ok else TODAY
    expected = {
        "hierarchical": f"{study}/{series}/{sop}.dcm",
        "flat": f"{sop}.dcm",
        "date": f"{day[:4]}/{day[4:6]}/{day[6:]}/{study}/{sop}.dcm",
    }[naming]
    assert path == expected
    assert_safe(path, naming)


def _is_date(yyyymmdd: str) -> bool:
    try:
        datetime.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))
    except ValueError:
        return False
    return True


def test_unknown_naming_is_refused() -> None:
    with pytest.raises(ValueError):
        _core.relative_path("tree", "1.2", "1.3", "1.4", "", TODAY)


# -- the sniffer against pydicom, end to end through the core -------------------------------

TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)


@dataclass
class CoreServer:
    server: _core.Server
    port: int
    storage: Path

    def store_event(self, sop_instance_uid: str, timeout: float = 10.0) -> _core.Event:
        """The "store" event of the instance, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.server.next_events(0.5)
            assert batch is not None, "server stopped"
            for event in batch:
                if event.kind == "store" and event.sop_instance_uid == sop_instance_uid:
                    return event
        raise AssertionError(f"no store event for {sop_instance_uid}")


@pytest.fixture(scope="module")
def core_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreServer]:
    storage = tmp_path_factory.mktemp("sniff-store")
    config = _core.CoreConfig(
        ae_title="STORESCP",
        storage_dir=str(storage),
        bind="127.0.0.1",
        port=free_port(),
        accepted_sop_classes=[str(CTImageStorage)],
        transfer_syntaxes=[str(ts) for ts in TRANSFER_SYNTAXES],
        duplicate="replace",
        fsync=False,
    )
    server = _core.Server(config)
    port = server.start()
    try:
        yield CoreServer(server, port, storage)
    finally:
        server.shutdown(2.0)
        while server.next_events(0.5) is not None:
            pass


# Values a pydicom user could write. Text is ASCII or, under ISO_IR 192, any printable
# character; no leading/trailing spaces (DICOM makes them insignificant), no backslash
# (the value delimiter).
def _text(max_size: int, alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=1, max_size=max_size).filter(
        lambda s: s == s.strip(" ") and "\\" not in s
    )


ascii_text = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
any_text = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp"))
name_component = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12
)


@st.composite
def generated(draw: st.DrawFn) -> tuple[Dataset, dict[str, str]]:
    """A pydicom data set and the values the sniffer must report for it."""
    utf8 = draw(st.booleans())
    text = any_text if utf8 else ascii_text
    values = {
        "sop_instance_uid": draw(dicom_uid),
        "study_instance_uid": draw(dicom_uid),
        "series_instance_uid": draw(dicom_uid),
        "study_date": draw(st.one_of(da_dates, st.just(""))),
        "modality": draw(st.sampled_from(["CT", "MR", "OT", "US", ""])),
        "study_description": draw(st.one_of(_text(64, text), st.just(""))),
        "patient_id": draw(st.one_of(_text(64, ascii_text), st.just(""))),
        # No "=" in a UTF-8 name: pydicom drops trailing empty component groups ("A=" is
        # written as "A"), so the value written would not be the value drawn.
        "patient_name": draw(
            st.lists(name_component, min_size=1, max_size=4).map("^".join)
            if not utf8
            else _text(60, text).filter(lambda s: "=" not in s)
        ),
    }
    ds = Dataset()
    if utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = values["sop_instance_uid"]
    if values["study_date"]:
        ds.StudyDate = values["study_date"]
    ds.AccessionNumber = draw(st.text(alphabet="0123456789", max_size=16))
    if values["modality"]:
        ds.Modality = values["modality"]
    if values["study_description"]:
        ds.StudyDescription = values["study_description"]
    if draw(st.booleans()):
        # A sequence before the UIDs, holding decoys of the wanted attributes.
        undefined = draw(st.booleans())
        items = []
        for _ in range(draw(st.integers(0, 3))):
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = draw(dicom_uid)
            if draw(st.booleans()):
                inner = Dataset()
                inner.SeriesInstanceUID = draw(dicom_uid)
                inner.PatientName = "Decoy^Nested"
                item.ReferencedSeriesSequence = Sequence([inner])
                item["ReferencedSeriesSequence"].is_undefined_length = undefined
                inner.is_undefined_length_sequence_item = undefined
            item.is_undefined_length_sequence_item = undefined
            items.append(item)
        ds.ReferencedStudySequence = Sequence(items)
        ds["ReferencedStudySequence"].is_undefined_length = undefined
    if draw(st.booleans()):
        ds.add_new(0x00090010, "LO", "PROPERTY TEST")
        ds.add_new(0x00091001, "OB", draw(st.binary(max_size=64)).ljust(2, b"\0"))
    ds.PatientName = values["patient_name"]
    if values["patient_id"]:
        ds.PatientID = values["patient_id"]
    ds.StudyInstanceUID = values["study_instance_uid"]
    ds.SeriesInstanceUID = values["series_instance_uid"]
    if draw(st.booleans()):
        ds.InstanceNumber = draw(st.integers(0, 99999))
        ds.Rows = 1
        ds.Columns = 2
        ds.BitsAllocated = 8
        ds.PixelData = b"\0\0"
    return ds, values


def dataset_bytes(ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set as pydicom writes it in `transfer_syntax` (no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        z = zlib.compressobj(6, zlib.DEFLATED, -15)
        raw = z.compress(raw) + z.flush()
    return raw


_instance_counter = itertools.count(1)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    case=generated(),
    transfer_syntax=st.sampled_from(TRANSFER_SYNTAXES),
    fragment=st.one_of(st.integers(7, 64), st.integers(65, 4096), st.just(0)),
)
def test_sniffer_reports_what_pydicom_wrote(
    core_server: CoreServer,
    case: tuple[Dataset, dict[str, str]],
    transfer_syntax: str,
    fragment: int,
) -> None:
    ds, values = case
    # Hypothesis replays and shrinks examples: a fresh SOP Instance UID per send keeps
    # each store separate (and the UID valid: a numeric component is appended).
    sop_instance_uid = f"{values['sop_instance_uid']}.{next(_instance_counter)}"[:64].rstrip(".")
    ds.SOPInstanceUID = sop_instance_uid
    data = dataset_bytes(ds, transfer_syntax)
    with RawAssociation.connect(core_server.port) as raw:
        raw.associate("STORESCP", "HYPOTHESIS", [Context(1, CTImageStorage, [transfer_syntax])])
        # `fragment` is the P-DATA-TF length used for the data set: 0 sends it whole.
        rsp = raw.c_store(1, CTImageStorage, sop_instance_uid, data, max_pdu=fragment)
        raw.release()
    event = core_server.store_event(sop_instance_uid)
    assert rsp.status == 0, (hex(rsp.status), event.error_comment)
    assert event.outcome in ("stored", "replaced"), event.outcome
    assert event.transfer_syntax == transfer_syntax
    expected = {**values, "sop_instance_uid": sop_instance_uid}
    got = {key: getattr(event, key) for key in expected}
    assert got == expected
    path = _core.relative_path(
        "hierarchical",
        values["study_instance_uid"],
        values["series_instance_uid"],
        sop_instance_uid,
        values["study_date"],
        TODAY,
    )
    assert event.path == path
    stored = dcmread(core_server.storage / path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.SOPInstanceUID == sop_instance_uid
    assert str(stored.PatientName) == values["patient_name"]
