"""Helpers for the index tests: a storage root laid out as the core lays it out.

Files are real Part 10 files made with pydicom; the registry links, journals and run
locks are written the way rust/src/store.rs writes them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from conftest import make_dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

PRIVATE = ".storescp"
STUDY = "1.2.826.0.1.3680043.9.7.1"


@dataclass(frozen=True)
class FakeEvent:
    """A stand-in for `storescp._core.Event` (which Python cannot construct)."""

    kind: str = "store"
    outcome: str = "stored"
    assoc_id: int = 1
    peer: str = "127.0.0.1:40000"
    calling_ae: str = "SENDER"
    called_ae: str = "STORESCP"
    reason: str = ""
    status: int = 0
    error_comment: str = ""
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2"
    sop_instance_uid: str = ""
    study_instance_uid: str = STUDY
    series_instance_uid: str = STUDY + ".1"
    patient_id: str = "PID-1"
    patient_name: str = "Doe^Jane"
    modality: str = "CT"
    study_date: str = "20240102"
    study_description: str = "Test study"
    transfer_syntax: str = ExplicitVRLittleEndian
    path: str = ""
    replaced_path: str = ""
    file_size: int = 0
    data_set_bytes: int = 0
    journal: str = ""
    journal_offset: int = 0
    ack_token: int = 0


def hierarchical(event: FakeEvent) -> str:
    """The core's `hierarchical` relative path for an event's UIDs."""
    return f"{event.study_instance_uid}/{event.series_instance_uid}/{event.sop_instance_uid}.dcm"


def event(sop: str, **fields: object) -> FakeEvent:
    """An event for SOP Instance UID `sop`, at its hierarchical path unless `path` given."""
    made = replace(FakeEvent(sop_instance_uid=sop), **fields)  # type: ignore[arg-type]
    return made if made.path else replace(made, path=hierarchical(made))


def store_file(root: Path, ev: FakeEvent, *, register: bool = True) -> FakeEvent:
    """Writes the instance an event describes at `root/ev.path` (as the core would:
    file meta with the transfer syntax and Source AE = calling AE), links it in the
    registry, and returns the event with its real file size."""
    ds = make_dataset(
        ev.sop_instance_uid,
        study_uid=ev.study_instance_uid,
        series_uid=ev.series_instance_uid,
        sop_class_uid=ev.sop_class_uid,
        modality=ev.modality,
        patient_name=ev.patient_name,
        patient_id=ev.patient_id,
        study_date=ev.study_date or None,
    )
    ds.StudyDescription = ev.study_description
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ev.transfer_syntax)
    meta.SourceApplicationEntityTitle = ev.calling_ae
    ds.file_meta = meta
    path = root / ev.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if register:
        link_registry(root, ev.sop_instance_uid, ev.path)
    return replace(ev, file_size=path.stat().st_size)


def registry_link(root: Path, sop: str) -> Path:
    """Where the core keeps the registry link of `sop`: `sop/<xx>/<uid>`, `xx` the
    UID's FNV-1a hash modulo 256 in hex (rust/src/store.rs, `registry_link`)."""
    digest = 0xCBF29CE484222325
    for byte in sop.encode("ascii"):
        digest = ((digest ^ byte) * 0x100000001B3) % 2**64
    return root / PRIVATE / "sop" / f"{digest % 256:02x}" / sop


def link_registry(root: Path, sop: str, relpath: str) -> None:
    """Points the core's registry entry for `sop` at `relpath`."""
    link = registry_link(root, sop)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(relpath)


def journal_line(op: str, sop: str, relpath: str, replaced: str = "") -> str:
    """One line in the core's journal format."""
    return f"{op}\t{sop}\t{relpath}\t{replaced}\n"


def write_journal(root: Path, run_id: str, lines: Sequence[str]) -> list[int]:
    """Appends lines to `run_id`'s journal; returns the offset after each line."""
    path = root / PRIVATE / "journal" / f"{run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = []
    with path.open("ab") as f:
        for line in lines:
            f.write(line.encode())
            offsets.append(f.tell())
    return offsets


def journal_path(root: Path, run_id: str) -> Path:
    return root / PRIVATE / "journal" / f"{run_id}.log"


def lock_path(root: Path, run_id: str) -> Path:
    return root / PRIVATE / "run" / f"{run_id}.lock"


def dead_run_lock(root: Path, run_id: str) -> Path:
    """A run lock file nobody holds (its process died)."""
    path = lock_path(root, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@contextmanager
def live_run(root: Path, run_id: str) -> Iterator[Path]:
    """Holds `run_id`'s lock as a running storescp process does."""
    path = dead_run_lock(root, run_id)
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)
