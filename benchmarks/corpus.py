#!/usr/bin/env python3
"""Deterministic corpus generator for the storescp throughput benchmarks.

Writes valid DICOM Part 10 files (PS3.10 7.1: 128-byte preamble, ``DICM``, group 0002 in
explicit VR little endian, then the data set in the file's transfer syntax):

- ``tiny``: ~2-5 KB objects, alternating a CT image with a 32x32 16-bit matrix and a Basic
  Text SR with no pixels.
- ``small``: 512x512 16-bit CT images (~525 KB uncompressed).
- ``large``: multi-frame grayscale word secondary capture, 200 frames of 512x512 16-bit
  (~105 MB uncompressed).

Transfer syntaxes: ``explicit`` (1.2.840.10008.1.2.1), ``implicit`` (1.2.840.10008.1.2),
``rle`` (RLE Lossless, 1.2.840.10008.1.2.5, encapsulated per PS3.5 A.4 and annex G) or
``mixed`` (cycling explicit, implicit, rle by instance number). Objects without pixel data
(SR) are written in explicit VR little endian when ``rle`` is asked for.

Guarantees: the same arguments produce byte-identical files (for one pydicom version);
every UID is ``2.25.<decimal of 120 bits of SHA-256>`` of a label that includes the kind,
syntax, grouping and index, so corpora of different kinds, syntaxes or groupings never
share a UID. Grouping ``grouped`` (the default) puts 100 instances in a series and 10 series
in a study (one patient per study); ``single`` gives every instance a study and a series of
its own, as structured reports, key objects and radiographs usually come. Pixel data is
a synthetic phantom (a disc with noise in the low bits) cycled over four variants, so RLE
compresses it roughly as it compresses real CT. Needs pydicom only (no numpy).

Usage::

    python3 benchmarks/corpus.py OUTDIR --kind tiny --count 5000 --syntax mixed [--grouping single]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders.base import RLELosslessEncoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
)

#: Bumped whenever the output of a given set of arguments changes.
CORPUS_VERSION = 1

IMPLEMENTATION_CLASS_UID = UID("2.25.302125316436587213096447393212367463227")
IMPLEMENTATION_VERSION_NAME = "STORESCP_BENCH"

SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
}
MIXED_CYCLE = ("explicit", "implicit", "rle")


@dataclass(frozen=True)
class Grouping:
    """How many instances go to a series, and series to a study."""

    per_series: int
    series_per_study: int


GROUPINGS: dict[str, Grouping] = {"grouped": Grouping(100, 10), "single": Grouping(1, 1)}
PIXEL_VARIANTS = 4
LARGE_FRAMES = 200

_FIRST_NAMES = ("ANNA", "BORIS", "CLARA", "DAVID", "EVA", "FELIX", "GRETA", "HUGO")
_LAST_NAMES = ("MUSTER", "SCHMIDT", "NOVAK", "ROSSI", "DUBOIS", "JANSEN", "LINDQVIST")
_REPORT_WORDS = [
    "no",
    "acute",
    "findings",
    "lungs",
    "clear",
    "heart",
    "size",
    "normal",
    "small",
    "nodule",
    "right",
    "upper",
    "lobe",
    "stable",
    "compared",
    "to",
    "prior",
    "follow",
    "up",
    "recommended",
    "in",
    "twelve",
    "months",
    "mediastinum",
    "unremarkable",
    "pleural",
    "effusion",
    "absent",
    "osseous",
    "structures",
    "intact",
]
_STUDY_DESCRIPTIONS = ("CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS", "CT HEAD", "CT SPINE")


def uid_for(label: str) -> UID:
    """Return a deterministic UID under the 2.25 root (PS3.5 B.2) for ``label``."""
    digest = hashlib.sha256(f"storescp-bench/{label}".encode()).digest()
    return UID("2.25." + str(int.from_bytes(digest[:15], "big")))


def syntax_for(syntax: str, index: int) -> str:
    """Return the concrete syntax name (explicit/implicit/rle) for instance ``index``."""
    if syntax == "mixed":
        return MIXED_CYCLE[index % len(MIXED_CYCLE)]
    return syntax


_frame_cache: dict[tuple[int, int, int], bytes] = {}
_rle_cache: dict[tuple[int, int, int], bytes] = {}


def phantom_frame(rows: int, columns: int, variant: int) -> bytes:
    """A 16-bit little-endian frame: a body disc (~HU 40) with 6 bits of noise, air outside.

    Stored values use rescale intercept -1024, so 1064 is HU 40 and 24 is HU -1000.
    """
    key = (rows, columns, variant)
    cached = _frame_cache.get(key)
    if cached is not None:
        return cached
    rng = random.Random(f"pixels/{rows}x{columns}/{variant}")
    noise = rng.randbytes(rows * columns)
    cy = rows / 2.0
    cx = columns / 2.0 + variant
    radius2 = (min(rows, columns) * 0.42) ** 2
    values = array("H", bytes(2 * rows * columns))
    i = 0
    for y in range(rows):
        dy2 = (y - cy) ** 2
        for x in range(columns):
            n = noise[i] & 0x3F
            if (x - cx) ** 2 + dy2 < radius2:
                values[i] = 1040 + n
            else:
                values[i] = 24 + (n & 0x07)
            i += 1
    if sys.byteorder != "little":
        values.byteswap()
    frame = values.tobytes()
    _frame_cache[key] = frame
    return frame


def rle_frame(rows: int, columns: int, variant: int) -> bytes:
    """The RLE Lossless encoding (PS3.5 G.3) of :func:`phantom_frame`, cached."""
    key = (rows, columns, variant)
    cached = _rle_cache.get(key)
    if cached is None:
        cached = RLELosslessEncoder.encode(
            phantom_frame(rows, columns, variant),
            rows=rows,
            columns=columns,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=16,
            pixel_representation=0,
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
        _rle_cache[key] = cached
    return cached


def _patient_study(kind: str, syntax: str, index: int, grouping: Grouping) -> dict[str, str]:
    """Attributes shared by all instances of one study."""
    study = index // (grouping.per_series * grouping.series_per_study)
    series = index // grouping.per_series
    first = _FIRST_NAMES[study % len(_FIRST_NAMES)]
    last = _LAST_NAMES[(study // len(_FIRST_NAMES)) % len(_LAST_NAMES)]
    return {
        "PatientName": f"{last}^{first}^^^",
        "PatientID": f"BENCH{study:06d}",
        "PatientBirthDate": f"19{40 + study % 60:02d}0{1 + study % 9}15",
        "PatientSex": "F" if study % 2 else "M",
        "StudyInstanceUID": uid_for(f"{kind}/{syntax}/study/{study}"),
        "SeriesInstanceUID": uid_for(f"{kind}/{syntax}/series/{series}"),
        "FrameOfReferenceUID": uid_for(f"{kind}/{syntax}/for/{series}"),
        "StudyDate": f"2024{1 + study % 12:02d}{1 + study % 28:02d}",
        "StudyTime": f"{8 + study % 10:02d}{study % 60:02d}00",
        "StudyID": str(study + 1),
        "AccessionNumber": f"ACC{study:07d}",
        "StudyDescription": _STUDY_DESCRIPTIONS[study % len(_STUDY_DESCRIPTIONS)],
        "SeriesNumber": str(series % grouping.series_per_study + 1),
        "InstanceNumber": str(index % grouping.per_series + 1),
    }


def _base_dataset(sop_class: UID, sop_instance: UID, attrs: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = attrs["StudyDate"]
    ds.SeriesDate = attrs["StudyDate"]
    ds.ContentDate = attrs["StudyDate"]
    ds.StudyTime = attrs["StudyTime"]
    ds.SeriesTime = attrs["StudyTime"]
    ds.ContentTime = attrs["StudyTime"]
    ds.AccessionNumber = attrs["AccessionNumber"]
    ds.Manufacturer = "STORESCP BENCH"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = "REFERRER^ROBIN"
    ds.StudyDescription = attrs["StudyDescription"]
    ds.PatientName = attrs["PatientName"]
    ds.PatientID = attrs["PatientID"]
    ds.PatientBirthDate = attrs["PatientBirthDate"]
    ds.PatientSex = attrs["PatientSex"]
    ds.StudyInstanceUID = attrs["StudyInstanceUID"]
    ds.SeriesInstanceUID = attrs["SeriesInstanceUID"]
    ds.StudyID = attrs["StudyID"]
    ds.SeriesNumber = attrs["SeriesNumber"]
    ds.InstanceNumber = attrs["InstanceNumber"]
    return ds


def _set_pixels(
    ds: Dataset, rows: int, columns: int, frames: int, variant: int, syntax: str
) -> None:
    """Image pixel module (PS3.3 C.7.6.3) plus Pixel Data, native or RLE encapsulated."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = str(frames)
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = "40"
    order = [(variant + f) % PIXEL_VARIANTS for f in range(frames)]
    if syntax == "rle":
        ds.PixelData = encapsulate([rle_frame(rows, columns, v) for v in order])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = b"".join(phantom_frame(rows, columns, v) for v in order)
        ds["PixelData"].VR = "OW"


def make_ct(
    kind: str,
    syntax_label: str,
    index: int,
    rows: int,
    columns: int,
    syntax: str,
    grouping: Grouping,
) -> Dataset:
    """A single-frame CT Image Storage instance (PS3.3 A.3)."""
    attrs = _patient_study(kind, syntax_label, index, grouping)
    sop = uid_for(f"{kind}/{syntax_label}/instance/{index}")
    ds = _base_dataset(CTImageStorage, sop, attrs)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesDescription = "AXIAL 1.0 STANDARD"
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = attrs["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.SliceThickness = "1.0"
    ds.PatientPosition = "HFS"
    position = index % grouping.per_series
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-position:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{-position:.1f}"
    ds.PixelSpacing = [f"{500.0 / rows:.6g}", f"{500.0 / columns:.6g}"]
    ds.AcquisitionNumber = "1"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    _set_pixels(ds, rows, columns, 1, index % PIXEL_VARIANTS, syntax)
    return ds


def make_multiframe(
    kind: str, syntax_label: str, index: int, frames: int, syntax: str, grouping: Grouping
) -> Dataset:
    """A Multi-frame Grayscale Word SC Image (PS3.3 A.8.3) of ``frames`` 512x512 frames."""
    attrs = _patient_study(kind, syntax_label, index, grouping)
    sop = uid_for(f"{kind}/{syntax_label}/instance/{index}")
    ds = _base_dataset(MultiFrameGrayscaleWordSecondaryCaptureImageStorage, sop, attrs)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = "MULTIFRAME 512x512x16"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    _set_pixels(ds, 512, 512, frames, index % PIXEL_VARIANTS, syntax)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_sr(kind: str, syntax_label: str, index: int, grouping: Grouping) -> Dataset:
    """A Basic Text SR instance (PS3.3 A.35.1) with a few TEXT items, no pixels."""
    attrs = _patient_study(kind, syntax_label, index, grouping)
    sop = uid_for(f"{kind}/{syntax_label}/instance/{index}")
    ds = _base_dataset(BasicTextSRStorage, sop, attrs)
    ds.Modality = "SR"
    ds.SeriesDescription = "REPORT"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    rng = random.Random(f"sr/{kind}/{syntax_label}/{index}")
    words = _REPORT_WORDS
    items = []
    for title, code in (
        ("Findings", "121071"),
        ("Impression", "121073"),
        ("Recommendation", "121075"),
    ):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code(code, "DCM", title)])
        item.TextValue = " ".join(rng.choice(words) for _ in range(60 + rng.randrange(100)))
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = "BENCHGEN"
    return meta


def instances(
    kind: str, count: int, syntax: str, grouping: str = "grouped"
) -> Iterator[tuple[str, Dataset, UID]]:
    """Yield (file name, data set, transfer syntax) for each instance of the corpus."""
    groups = GROUPINGS[grouping]
    # The UIDs' labels name a grouping other than the first, which keeps its corpora as
    # they were.
    label = kind if grouping == "grouped" else f"{kind}-{grouping}"
    for index in range(count):
        concrete = syntax_for(syntax, index)
        if kind == "tiny":
            if index % 2:
                ds = make_sr(label, syntax, index, groups)
                if concrete == "rle":
                    concrete = "explicit"
            else:
                ds = make_ct(label, syntax, index, 32, 32, concrete, groups)
        elif kind == "small":
            ds = make_ct(label, syntax, index, 512, 512, concrete, groups)
        else:
            ds = make_multiframe(label, syntax, index, LARGE_FRAMES, concrete, groups)
        yield f"{kind}_{index:06d}.dcm", ds, SYNTAXES[concrete]


def write_corpus(
    outdir: Path, kind: str, count: int, syntax: str, grouping: str = "grouped"
) -> int:
    """Write the corpus to ``outdir``; returns the total number of bytes written.

    Writes ``outdir/corpus.json`` last, so its presence with matching parameters means the
    corpus is complete (the harness relies on that to reuse a corpus).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = outdir / "corpus.json"
    if stamp.exists():
        stamp.unlink()
    total = 0
    for name, ds, transfer_syntax in instances(kind, count, syntax, grouping):
        ds.file_meta = _file_meta(ds, transfer_syntax)
        path = outdir / name
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    params = {
        "version": CORPUS_VERSION,
        "kind": kind,
        "count": count,
        "syntax": syntax,
        "grouping": grouping,
        "bytes": total,
    }
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--kind", choices=("tiny", "small", "large"), required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--syntax", choices=(*SYNTAXES, "mixed"), default="explicit")
    parser.add_argument("--grouping", choices=tuple(GROUPINGS), default="grouped")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    total = write_corpus(args.outdir, args.kind, args.count, args.syntax, args.grouping)
    what = f"{args.count} {args.kind} instances ({args.syntax}, {args.grouping})"
    print(f"wrote {what}, {total} bytes: {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
