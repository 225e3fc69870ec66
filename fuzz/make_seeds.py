"""Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/.

Run from the repository root with the project's virtualenv (pydicom writes the data sets):

    .venv/bin/python fuzz/make_seeds.py

The PDUs and command sets are built by hand here (PS3.8 section 9.3, PS3.7 annex E) as
dcmtk and pynetdicom send them; the data sets are written by pydicom in the four encodings
the sniffer reads. The output is deterministic: re-running it rewrites the same files.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

ROOT = Path(__file__).resolve().parent / "corpus"

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"

# -- PDUs --------------------------------------------------------------------------------


def item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def ae(title: str) -> bytes:
    return title.encode()[:16].ljust(16, b" ")


def user_information(max_pdu: int, *, extras: bool) -> bytes:
    sub = item(0x51, struct.pack(">I", max_pdu))
    sub += item(0x52, b"1.2.276.0.7230010.3.0.3.6.8")
    if extras:
        sub += item(0x53, struct.pack(">HH", 5, 5))
        role_uid = CT.encode()
        sub += item(0x54, struct.pack(">H", len(role_uid)) + role_uid + b"\x01\x00")
    sub += item(0x55, b"OFFIS_DCMTK_368")
    if extras:
        sub += item(0x56, struct.pack(">H", len(CT)) + CT.encode() + b"\x01\x00\x01\x00")
        sub += item(0x57, struct.pack(">H", len(CT)) + CT.encode() + b"\x00\x04" + b"1.2\x00")
        sub += item(
            0x58, b"\x02\x01" + struct.pack(">H", 4) + b"user" + struct.pack(">H", 4) + b"pass"
        )
    return item(0x50, sub)


def associate_rq_body(
    called: str,
    calling: str,
    contexts: list[tuple[int, str, list[str]]],
    *,
    max_pdu: int = 16384,
    application_context: str = APPLICATION_CONTEXT,
    extras: bool = False,
) -> bytes:
    body = struct.pack(">HH", 1, 0) + ae(called) + ae(calling) + bytes(32)
    body += item(0x10, application_context.encode())
    for cid, abstract, transfers in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, t.encode()) for t in transfers)
        body += item(0x20, bytes([cid, 0, 0, 0]) + sub)
    return body + user_information(max_pdu, extras=extras)


def associate_ac_body(results: list[tuple[int, int, str]]) -> bytes:
    body = struct.pack(">HH", 1, 0) + ae("ANY-SCP") + ae("ECHOSCU") + bytes(32)
    body += item(0x10, APPLICATION_CONTEXT.encode())
    for cid, result, transfer in results:
        body += item(0x21, bytes([cid, 0, result, 0]) + item(0x40, transfer.encode()))
    return body + user_information(16384, extras=False)


def pdv(cid: int, data: bytes, *, command: bool, last: bool) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">IBB", len(data) + 2, cid, control) + data


def fragments(cid: int, data: bytes, *, command: bool, room: int) -> bytes:
    """P-DATA-TF PDUs of at most `room` data bytes each."""
    chunks = [data[i : i + room] for i in range(0, len(data), room)] or [b""]
    return b"".join(
        pdu(4, pdv(cid, c, command=command, last=i == len(chunks) - 1))
        for i, c in enumerate(chunks)
    )


# -- Command sets (implicit VR little endian, PS3.7 E.1) ----------------------------------


def element(tag: int, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command(fields: dict[int, bytes | str | int]) -> bytes:
    body = b""
    for tag in sorted(fields):
        value = fields[tag]
        if isinstance(value, int):
            body += element(tag, struct.pack("<H", value))
        elif isinstance(value, str):
            body += element(tag, value.encode(), b"\0" if tag in (0x0002, 0x1000) else b" ")
        else:
            body += element(tag, value)
    return element(0, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int) -> bytes:
    return command({0x0002: VERIFICATION, 0x0100: 0x0030, 0x0110: message_id, 0x0800: 0x0101})


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    return command(
        {
            0x0002: sop_class,
            0x0100: 0x0001,
            0x0110: message_id,
            0x0700: 0,
            0x0800: 0x0000,
            0x1000: sop_instance,
        }
    )


# -- Data sets ------------------------------------------------------------------------------


def sample_dataset(n: int, *, undefined: bool) -> Dataset:
    """A small CT-like data set with a nested sequence (holding decoy UIDs) and a private
    block before the UIDs, and a few elements after them."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{n}.1"
    ds.StudyDate = "20240229"
    ds.Modality = "CT"
    ds.StudyDescription = "Head^Neck fuzz seed"
    inner = Dataset()
    inner.ReferencedSOPClassUID = MR
    inner.ReferencedSOPInstanceUID = "9.9.9.9"
    deeper = Dataset()
    deeper.SeriesInstanceUID = "9.8.7"
    inner.ReferencedSeriesSequence = Sequence([deeper])
    ds.ReferencedStudySequence = Sequence([inner, Dataset()])
    ds.add_new(0x00090010, "LO", "FUZZ PRIVATE")
    ds.add_new(0x00091001, "LO", "private value")
    ds.PatientName = "Doe^Jane^^Dr"
    ds.PatientID = f"PID{n:04d}"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.{n}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{n}.2"
    ds.InstanceNumber = n
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.PixelData = bytes(4)
    if undefined:
        ds["ReferencedStudySequence"].is_undefined_length = True
        inner["ReferencedSeriesSequence"].is_undefined_length = True
        for d in (inner, deeper):
            d.is_undefined_length_sequence_item = True
    return ds


def encode_dataset(ds: Dataset, encoding: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = encoding != "big"
    fp.is_implicit_VR = encoding == "implicit"
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if encoding == "deflated":
        z = zlib.compressobj(6, zlib.DEFLATED, -15)
        raw = z.compress(raw) + z.flush()
    return raw


ENCODING_SELECTOR = {"implicit": 0, "explicit": 1, "big": 2, "deflated": 3}
TRANSFER_SYNTAX = {"implicit": IMPLICIT, "explicit": EXPLICIT, "big": BIG, "deflated": DEFLATED}
# Presentation context per encoding in the reassembly target (storescp_fuzz::reassembly).
REASSEMBLY_CONTEXT = {"implicit": 1, "explicit": 3, "big": 5, "deflated": 7}


def main() -> None:
    seeds: dict[str, dict[str, bytes]] = {
        t: {} for t in ("pdu", "association", "dimse", "sniff", "reassembly")
    }

    echo_rq = associate_rq_body("ANY-SCP", "ECHOSCU", [(1, VERIFICATION, [IMPLICIT])])
    store_rq = associate_rq_body(
        "STORESCP",
        "MODALITY",
        [
            (1, CT, [IMPLICIT, EXPLICIT, BIG]),
            (3, MR, [DEFLATED, EXPLICIT]),
            (5, "1.2.840.10008.5.1.4.1.1.7", [JPEG_LOSSLESS]),
            (7, VERIFICATION, [IMPLICIT]),
        ],
        max_pdu=0,
        extras=True,
    )
    bad_context = associate_rq_body(
        "STORESCP", "CT1", [(1, CT, [IMPLICIT])], application_context="1.2.3"
    )
    ac = associate_ac_body([(1, 0, IMPLICIT), (3, 3, ""), (5, 4, IMPLICIT)])
    echo_cmd = c_echo_rq(1)
    store_cmd = c_store_rq(7, CT, "1.2.826.0.1.3680043.8.498.1.1")

    seeds["association"] = {
        "echoscu-rq": echo_rq,
        "storescu-rq": store_rq,
        "bad-app-context-rq": bad_context,
    }
    seeds["pdu"] = {
        "echoscu-rq": pdu(1, echo_rq),
        "storescu-rq": pdu(1, store_rq),
        "ac": pdu(2, ac),
        "rj": pdu(3, bytes([0, 1, 1, 7])),
        "release-rq": pdu(5, bytes(4)),
        "abort": pdu(7, bytes([0, 0, 2, 6])),
        "pdata-echo": pdu(4, pdv(1, echo_cmd, command=True, last=True)),
        "pdata-two-pdvs": pdu(
            4,
            pdv(1, store_cmd[:40], command=True, last=False)
            + pdv(1, store_cmd[40:], command=True, last=True),
        ),
    }
    seeds["dimse"] = {
        "c-echo-rq": echo_cmd,
        "c-store-rq": store_cmd,
        "c-find-rq": command(
            {
                0x0002: "1.2.840.10008.5.1.4.1.2.1.1",
                0x0100: 0x0020,
                0x0110: 3,
                0x0700: 0,
                0x0800: 0x0001,
            }
        ),
        "c-store-rq-move-originator": command(
            {
                0x0002: CT,
                0x0100: 0x0001,
                0x0110: 9,
                0x0700: 2,
                0x0800: 0,
                0x1000: "1.2.3.4",
                0x1030: "MOVESCU",
                0x1031: 4,
            }
        ),
        "c-store-rsp-comment": command(
            {
                0x0002: CT,
                0x0100: 0x8001,
                0x0120: 7,
                0x0800: 0x0101,
                0x0900: 0xA700,
                0x0902: "Out of resources: disk full",
                0x1000: "1.2.3.4",
            }
        ),
    }

    for n, encoding in enumerate(ENCODING_SELECTOR, start=1):
        for undefined in (False, True):
            ds = sample_dataset(n, undefined=undefined)
            raw = encode_dataset(ds, encoding)
            name = f"{encoding}-{'undefined' if undefined else 'defined'}"
            # Selector byte, four chunk sizes (1-256 each, cycled), the data set.
            seeds["sniff"][name] = bytes([ENCODING_SELECTOR[encoding], 0, 16, 255, 3]) + raw
            cid = REASSEMBLY_CONTEXT[encoding]
            cmd = c_store_rq(n, CT if cid in (1, 3) else MR, str(ds.SOPInstanceUID))
            stream = (
                pdu(4, pdv(9, echo_cmd, command=True, last=True))
                + fragments(cid, cmd, command=True, room=50)
                + fragments(cid, raw, command=False, room=200 if undefined else 4000)
                + pdu(5, bytes(4))
            )
            # First byte: the peer's maximum PDU length (here 64 + 7).
            seeds["reassembly"][name] = bytes([64]) + stream

    for target, files in seeds.items():
        folder = ROOT / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / f"seed-{name}").write_bytes(data)
    total = sum(len(d) for files in seeds.values() for d in files.values())
    count = sum(len(files) for files in seeds.values())
    print(f"wrote {count} seeds, {total} bytes, under {ROOT}")


if __name__ == "__main__":
    main()
