"""Micro benchmarks (pytest-benchmark) of the per-instance hot paths of the Rust core, on
bytes in memory: PDU framing, the PDV walk that splits command and data set fragments, the
data set sniff, and the file meta header build. Each runs the code an association runs
(`storescp._core.frame_pdus`, `split_p_data`, `sniff_data_set`, `encode_file_meta`), and
each checks its result, so `--benchmark-disable` makes them a quick correctness run (the
test suite does that; see scripts/test.sh).

Inputs are the first instance of the benchmark corpora (`corpus.py`): a tiny 32x32 CT
(~3 KB) and a small 512x512 CT (~525 KB) in explicit VR little endian, and the small one in
RLE Lossless (~280 KB, encapsulated: the sniff walks its fragment items), sent as dcmtk's
`storescu` sends them, in P-DATA-TF PDUs of at most 16 KB.

Usage::

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-columns=min,median,ops
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pytest_benchmark.fixture import BenchmarkFixture

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' raw DICOM encoders

import corpus  # noqa: E402
from dicom_raw import c_store_rq, fragments  # noqa: E402
from storescp import _core as core  # noqa: E402

MAX_PDU = 16384
# PS3.8 9.3.5: a PDU's variable field holds one PDV item: 4 (length) + 1 (context ID)
# + 1 (message control header) + the fragment.
FRAGMENT = MAX_PDU - 6
CONTEXT_ID = 1


@dataclass(frozen=True)
class Instance:
    name: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    data_set: bytes


def load(kind: str, syntax: str = "explicit") -> Instance:
    """The first instance of a corpus, its data set encoded as it is sent."""
    _, ds, transfer_syntax = next(corpus.instances(kind, 1, syntax))
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    write_dataset(out, ds)
    return Instance(
        kind,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(transfer_syntax),
        out.getvalue(),
    )


@dataclass(frozen=True)
class Message:
    instance: Instance
    command: bytes
    stream: bytes
    pdus: int


def message(kind: str, syntax: str = "explicit") -> Message:
    """The PDUs of one C-STORE: the command, then the data set in 16 KB PDUs."""
    instance = load(kind, syntax)
    command = c_store_rq(1, instance.sop_class_uid, instance.sop_instance_uid)
    pdus = fragments(CONTEXT_ID, command, command=True, max_pdu=MAX_PDU)
    pdus += fragments(CONTEXT_ID, instance.data_set, command=False, max_pdu=MAX_PDU)
    return Message(instance, command, b"".join(pdus), len(pdus))


@pytest.fixture(scope="module", params=["tiny", "small", "small-rle"])
def sent(request: pytest.FixtureRequest) -> Message:
    kind, _, syntax = str(request.param).partition("-")
    return message(kind, syntax or "explicit")


def test_frame_pdus(benchmark: BenchmarkFixture, sent: Message) -> None:
    """Every PDU of the message framed and its header checked."""
    assert benchmark(core.frame_pdus, sent.stream, MAX_PDU) == sent.pdus


def test_split_p_data(benchmark: BenchmarkFixture, sent: Message) -> None:
    """The command set joined, the data set fragments counted without a copy."""
    command, count, size = benchmark(core.split_p_data, sent.stream)
    assert command == sent.command
    assert (count, size) == (sent.pdus - 1, len(sent.instance.data_set))


def test_sniff_data_set(benchmark: BenchmarkFixture, sent: Message) -> None:
    """The UIDs that name the file, found in the data set fed one fragment at a time, its
    framing walked to the end."""
    instance = sent.instance
    found = dict(
        benchmark(core.sniff_data_set, instance.data_set, instance.transfer_syntax, FRAGMENT)
    )
    assert found["SOPClassUID"] == instance.sop_class_uid
    assert found["SOPInstanceUID"] == instance.sop_instance_uid
    assert found["StudyInstanceUID"] == instance.study_instance_uid
    assert found["SeriesInstanceUID"] == instance.series_instance_uid


def test_encode_file_meta(benchmark: BenchmarkFixture) -> None:
    """The Part 10 header of a stored file, as pydicom reads it back."""
    instance = load("tiny")
    header = benchmark(
        core.encode_file_meta,
        instance.sop_class_uid,
        instance.sop_instance_uid,
        ExplicitVRLittleEndian,
        "STORESCU",
    )
    meta = dcmread(DicomBytesIO(header)).file_meta
    assert meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "STORESCU"


def test_framing_refuses_what_the_reader_refuses() -> None:
    """A PDU over the limit or cut short is an error, as on an association."""
    stream = message("tiny").stream
    with pytest.raises(ValueError, match="exceeds the maximum"):
        core.frame_pdus(stream, 1024)
    with pytest.raises(ValueError, match="truncated"):
        core.frame_pdus(stream[:-1], MAX_PDU)
