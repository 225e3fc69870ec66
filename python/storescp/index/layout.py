"""What the index reads from the storage root: files, the core's registry and journals.

The core's private area is `ROOT/.storescp/` (see rust/src/store.rs and registry.rs):
`sop/<xx>/<uid>` symlinks naming the stored file (`xx` one of 256 folders; a root the
server has not opened since an older version may still hold flat `sop/<uid>` links),
by its folder's relative path (`.` for the root; the file is then `<folder>/<uid>.dcm`;
such an entry is a hard link of the folder link below), by the file's relative path
(which, unlike a folder, ends with `.dcm`), or by the folder link
`.storescp/folder/<xx>/<token>` of its folder (a symlink to the folder's relative path),
`run/<runid>.lock` held with flock by each live process, and `journal/<runid>.log` lines
"op TAB sop_uid TAB relpath TAB replaced_relpath LF" appended before each file is renamed
into place.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storescp.index.model import InstanceRecord, utc_iso_from_timestamp

PRIVATE_DIR = ".storescp"

# How a registry target naming a folder link starts (no stored path starts with a dot).
_FOLDER_LINKS = f"{PRIVATE_DIR}/folder/"

# Only what a row needs; pydicom then skips parsing every other element.
_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "Modality",
    "StudyDate",
    "StudyDescription",
]


@dataclass(frozen=True, slots=True)
class JournalLine:
    """One complete journal line: op is "stored" or "replaced"; paths are relative."""

    op: str
    sop_instance_uid: str
    path: str
    replaced_path: str


@dataclass(frozen=True)
class StorageLayout:
    """The storage root and the parts of the core's private area the index reads.

    `ignored` holds relative paths that are not stored instances although they sit in
    the tree (the index database and its companions, when kept under the root).
    """

    root: Path
    ignored: frozenset[str] = frozenset()

    @property
    def journal_dir(self) -> Path:
        """Where the core's journals are."""
        return self.root / PRIVATE_DIR / "journal"

    def file(self, relpath: str) -> Path:
        """The absolute path of a stored file."""
        return self.root / relpath

    def registry(self) -> dict[str, str]:
        """SOP Instance UID -> relative path, for every registry link (dangling included,
        but not one whose folder link is missing)."""
        entries: dict[str, str] = {}
        folders: dict[str, str | None] = {}  # folder link -> its folder, read once
        for entry in self._registry_links():
            with suppress(OSError):  # vanished meanwhile
                target = os.readlink(entry.path)
                if target.endswith(".dcm"):
                    entries[entry.name] = target
                    continue
                folder: str | None = target
                if target.startswith(_FOLDER_LINKS):
                    if target not in folders:
                        folders[target] = _readlink_or_none(self.root / target)
                    folder = folders[target]
                if folder is not None:
                    name = f"{entry.name}.dcm"
                    entries[entry.name] = name if folder == "." else f"{folder}/{name}"
        return entries

    def has_registry_entries(self) -> bool:
        """Whether the core has ever stored an instance under this root."""
        return any(True for _ in self._registry_links())

    def _registry_links(self) -> Iterator[os.DirEntry[str]]:
        """The registry's links: in its folders, and flat ones of an older version."""
        for entry in _scandir(self.root / PRIVATE_DIR / "sop"):
            if entry.is_symlink():
                yield entry
            elif entry.is_dir(follow_symlinks=False):
                yield from (e for e in _scandir(Path(entry.path)) if e.is_symlink())

    def walk_files(self) -> Iterator[str]:
        """Relative paths ('/'-separated) of every regular file in the store.

        Entries whose name starts with '.' are skipped at every level: the core's
        private area and temporary files are hidden, and stored names never start
        with a dot (they are UIDs and dates).
        """
        stack = [self.root]
        while stack:
            directory = stack.pop()
            for entry in _scandir(directory):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    relpath = Path(entry.path).relative_to(self.root).as_posix()
                    if relpath not in self.ignored:
                        yield relpath

    def journal_names(self) -> list[str]:
        """File names of the journals present, sorted (oldest run first)."""
        return sorted(e.name for e in _scandir(self.journal_dir) if e.name.endswith(".log"))

    def live_runs(self) -> list[str]:
        """Run ids of the storescp processes running on this store now."""
        live = []
        for entry in _scandir(self.root / PRIVATE_DIR / "run"):
            if not entry.name.endswith(".lock"):
                continue
            try:
                fd = os.open(entry.path, os.O_WRONLY)
            except FileNotFoundError:  # removed meanwhile: that run is gone
                continue
            try:
                if not _try_lock(fd):
                    live.append(entry.name.removesuffix(".lock"))
            finally:
                os.close(fd)  # releases a probe lock taken on a dead run's file
        return sorted(live)

    @contextmanager
    def claim_if_dead(self, journal: str) -> Iterator[bool]:
        """Yields whether the process that wrote `journal` is gone.

        While the block runs with True, this process holds the dead run's lock, so the
        run cannot be mistaken for alive by anyone else; the lock file is removed at the
        end of such a block. A run without a lock file is gone (the core removes lock
        files of dead runs when it sweeps temporaries).
        """
        run_id = journal.removesuffix(".log")
        lock_path = self.root / PRIVATE_DIR / "run" / f"{run_id}.lock"
        try:
            fd = os.open(lock_path, os.O_WRONLY)
        except FileNotFoundError:
            yield True
            return
        try:
            if not _try_lock(fd):
                yield False
                return
            yield True
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _readlink_or_none(link: Path) -> str | None:
    """The target of `link`, or None when it cannot be read (missing, not a link)."""
    try:
        return os.readlink(link)
    except OSError:
        return None


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of a directory; none when it does not exist (nothing stored yet)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def is_safe_relpath(relpath: str) -> bool:
    """Whether a path read from a journal stays inside the store, outside the private area.

    Journals are ours, but a damaged one must not make the index touch other files.
    """
    parts = PurePosixPath(relpath).parts
    return (
        bool(parts)
        and not relpath.startswith("/")
        and ".." not in parts
        and not any(p.startswith(".") for p in parts)
    )


# A line names an operation, a SOP Instance UID (64 characters at most) and two paths
# of three UIDs each: a few hundred bytes. Anything longer is damage.
_MAX_LINE = 4096


def read_journal(path: Path, start: int) -> Iterator[JournalLine]:
    """The complete, well-formed lines of a journal from byte offset `start`, streamed
    (a journal covers a whole run and may be large; only its tail is read).

    A last line without its newline is skipped: the core writes a line before
    renaming its file, so a torn line means that file never reached its final name.
    With fsync on the core preallocates its journal with zeros: the first NUL ends it,
    unless it starts a hole (the core recreated a journal removed under it, and its
    lines go on at their offsets): reading then resumes after the hole.
    Malformed lines (damage) are skipped too; their files are found by `verify`. Memory
    stays bounded whatever the file holds: no line is read past `_MAX_LINE` bytes.
    """
    with path.open("rb") as f:
        f.seek(start)
        while raw := f.readline(_MAX_LINE):
            if b"\0" in raw:
                nul = f.tell() - len(raw) + raw.index(b"\0")
                after_hole = _data_after(f.fileno(), nul)
                if after_hole is None:
                    return
                f.seek(after_hole)
                continue
            if not raw.endswith(b"\n"):
                if len(raw) < _MAX_LINE:
                    return
                # Longer than any line the core writes: damage. Skip to the next line.
                while (rest := f.readline(_MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                continue
            line = _parse_line(raw[:-1])
            if line is not None:
                yield line


def _data_after(fd: int, offset: int) -> int | None:
    """Where lines resume past the zeros at `offset`, if they do: after a hole (when the
    journal was recreated, its lines go on at their offsets) at the first non-NUL byte of
    the block where data resumes. None when that block holds only zeros: the
    preallocated end, which is never read further than one block."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: no data past offset
        return None
    size = os.fstat(fd).st_blksize
    block = os.pread(fd, size - data % size, data)
    zeros = len(block) - len(block.lstrip(b"\0"))
    return data + zeros if zeros < len(block) else None


def _parse_line(raw: bytes) -> JournalLine | None:
    try:
        fields = raw.decode("utf-8").split("\t")
    except UnicodeDecodeError:
        return None
    if len(fields) != 4 or fields[0] not in ("stored", "replaced"):
        return None
    op, sop_uid, relpath, replaced = fields
    if not sop_uid or not is_safe_relpath(relpath):
        return None
    if replaced and not is_safe_relpath(replaced):
        replaced = ""
    return JournalLine(op, sop_uid, relpath, replaced)


def read_instance(root: Path, relpath: str) -> InstanceRecord:
    """Reads a stored file's header into a record.

    The transfer syntax and the calling AE come from the file meta (the core writes the
    negotiated syntax and Source AE = calling AE); received_at is the file's mtime,
    the moment it was renamed into place.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file has no SOP Instance UID.
        Exception: whatever pydicom raises on a file it cannot parse
            (InvalidDicomError for one that is not DICOM at all).
    """
    # Imported at the first file read: a server whose index matches its files never loads
    # pydicom (~20 MB resident).
    from pydicom import dcmread

    path = root / relpath
    stat = path.stat()
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    meta = ds.file_meta
    sop_uid = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", ""))
    if not sop_uid:
        raise ValueError(f"{relpath}: no SOP Instance UID")
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        sop_class_uid=str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        study_date=str(ds.get("StudyDate", "")),
        study_description=str(ds.get("StudyDescription", "")),
        modality=str(ds.get("Modality", "")),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
        path=relpath,
        file_size=stat.st_size,
        calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
        received_at=utc_iso_from_timestamp(stat.st_mtime),
    )


@dataclass(frozen=True)
class ChunkResult:
    """What a worker made of a chunk of files: records, and the paths it could not read."""

    records: list[InstanceRecord]
    unreadable: list[tuple[str, str]]


def read_chunk(root: Path, relpaths: Sequence[str]) -> ChunkResult:
    """Reads many headers (a unit of work for a process pool; picklable in and out)."""
    records: list[InstanceRecord] = []
    unreadable: list[tuple[str, str]] = []
    for relpath in relpaths:
        try:
            records.append(read_instance(root, relpath))
        # A damaged file must not stop a rebuild; pydicom raises many exception types
        # on corrupt input, so it is reported instead, whatever went wrong.
        except Exception as exc:
            unreadable.append((relpath, f"{type(exc).__name__}: {exc}"))
    return ChunkResult(records, unreadable)
