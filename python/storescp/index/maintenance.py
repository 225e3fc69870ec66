"""Bringing the index and the files into agreement: reconcile, verify, rebuild.

The files are the truth; the index describes them. Reconciliation replays the journals
of dead processes (cheap, done at every start), verification compares everything
(read-only), and a rebuild re-reads every file header (after damage, or to create an
index for an existing store).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from storescp.index.layout import ChunkResult, StorageLayout, read_chunk, read_journal
from storescp.index.model import InstanceRecord
from storescp.index.writer import RowWriter

Progress = Callable[[int, int], None]
"""Called with (files read so far, files in total) as a rebuild proceeds."""

# Files per unit of work in a rebuild: large enough to amortise pickling and process
# hops (a header takes ~0.1 ms to parse), small enough for a smooth progress bar.
_CHUNK = 128


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild found and wrote.

    Attributes:
        files: regular files found in the store (outside hidden names).
        rows: instance rows now in the index.
        unreadable: (path, reason) of files that are not readable DICOM instances.
        duplicates: paths skipped because another file holds the same SOP Instance
            UID (the registry's choice wins, else the newest file).
    """

    files: int
    rows: int
    unreadable: tuple[tuple[str, str], ...] = ()
    duplicates: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"index rebuilt: {_plural(self.files, 'file')}, {_plural(self.rows, 'row')}, "
            f"{len(self.unreadable)} unreadable, "
            f"{_plural(len(self.duplicates), 'duplicate')} skipped"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class ReconcileReport:
    """What reconciliation at start did.

    Attributes:
        journals_replayed: journals of dead processes replayed and removed.
        journals_live: journals left alone because their process is running.
        rows_added, rows_updated, rows_removed: instance rows changed by the replay.
        unreadable: paths named by a journal whose file exists but cannot be parsed
            (their rows, if any, are left as they were).
        rebuild: the full rebuild done because the index was new but the store was not.
    """

    journals_replayed: int = 0
    journals_live: int = 0
    rows_added: int = 0
    rows_updated: int = 0
    rows_removed: int = 0
    unreadable: tuple[str, ...] = ()
    rebuild: RebuildReport | None = None

    def __str__(self) -> str:
        text = (
            f"index reconciled: {_plural(self.journals_replayed, 'journal')} replayed, "
            f"{self.journals_live} live left alone; rows {self.rows_added} added, "
            f"{self.rows_updated} updated, {self.rows_removed} removed"
        )
        if self.unreadable:
            text += f", {len(self.unreadable)} unreadable"
        if self.rebuild is not None:
            text = f"{self.rebuild}; {text}"
        return text


@dataclass(frozen=True)
class RegistryMismatch:
    """A SOP Instance UID on which the core's registry and the index disagree.

    `registry_path` is None when no live registry link exists (a dangling link counts
    as none, as it does for the core); `row_path` is None when the index has no row.
    """

    sop_instance_uid: str
    registry_path: str | None
    row_path: str | None


@dataclass(frozen=True)
class VerifyReport:
    """Differences between the index and the store; empty tuples mean they agree.

    Attributes:
        rows, files: how many instance rows and stored files were compared.
        rows_without_files: row paths with no file.
        files_without_rows: file paths no row describes.
        size_mismatches: row paths whose file has another size than the row says.
        registry_mismatches: see RegistryMismatch.
    """

    rows: int
    files: int
    rows_without_files: tuple[str, ...] = ()
    files_without_rows: tuple[str, ...] = ()
    size_mismatches: tuple[str, ...] = ()
    registry_mismatches: tuple[RegistryMismatch, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Whether the index and the store agree."""
        return not (
            self.rows_without_files
            or self.files_without_rows
            or self.size_mismatches
            or self.registry_mismatches
        )

    def __str__(self) -> str:
        verdict = "consistent" if self.ok else "INCONSISTENT"
        return (
            f"index {verdict}: {_plural(self.rows, 'row')}, {_plural(self.files, 'file')}; "
            f"{len(self.rows_without_files)} rows without files, "
            f"{len(self.files_without_rows)} files without rows, "
            f"{len(self.size_mismatches)} size mismatches, "
            f"{len(self.registry_mismatches)} registry mismatches"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"ok": self.ok, **asdict(self)}


def rebuild(
    writer: RowWriter, layout: StorageLayout, *, jobs: int, progress: Progress | None
) -> RebuildReport:
    """Replaces the index content with rows read from every file of the store.

    Headers are parsed in `jobs` processes; the rows are replaced in one transaction,
    so a reader sees the old index or the new one, never a mix. Journal progress is
    kept: replaying a journal later is harmless.
    """
    relpaths = sorted(layout.walk_files())
    read = _read_all(layout.root, relpaths, jobs, progress)
    records, duplicates = _one_per_sop(read.records, layout.registry())
    with writer.transaction():
        writer.clear()
        writer.upsert_instances(records)
    return RebuildReport(
        files=len(relpaths),
        rows=len(records),
        unreadable=tuple(read.unreadable),
        duplicates=tuple(duplicates),
    )


def _read_all(
    root: Path, relpaths: Sequence[str], jobs: int, progress: Progress | None
) -> ChunkResult:
    total = ChunkResult([], [])
    done = 0
    for result in _read_chunks(root, relpaths, jobs):
        total.records.extend(result.records)
        total.unreadable.extend(result.unreadable)
        done += len(result.records) + len(result.unreadable)
        if progress is not None:
            progress(done, len(relpaths))
    return total


def _read_chunks(root: Path, relpaths: Sequence[str], jobs: int) -> Iterator[ChunkResult]:
    chunks = [relpaths[i : i + _CHUNK] for i in range(0, len(relpaths), _CHUNK)]
    if jobs <= 1 or len(chunks) <= 1:
        # Not worth starting processes for a single chunk.
        yield from map(read_chunk, repeat(root), chunks)
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(chunks))) as pool:
        yield from pool.map(read_chunk, repeat(root), chunks)


def _one_per_sop(
    records: Sequence[InstanceRecord], registry: dict[str, str]
) -> tuple[list[InstanceRecord], list[str]]:
    """Keeps one file per SOP Instance UID: the registry's, else the newest.

    Two files with one UID only arise from outside copies; the core keeps one.
    """
    chosen: dict[str, InstanceRecord] = {}
    for record in records:
        other = chosen.get(record.sop_instance_uid)
        if other is None or _better(record, other, registry.get(record.sop_instance_uid)):
            chosen[record.sop_instance_uid] = record
    kept = set(chosen.values())
    return [r for r in records if r in kept], [r.path for r in records if r not in kept]


def _better(record: InstanceRecord, other: InstanceRecord, registered: str | None) -> bool:
    if registered in (record.path, other.path):
        return record.path == registered
    return record.received_at > other.received_at


def reconcile(
    conn: sqlite3.Connection,
    writer: RowWriter,
    layout: StorageLayout,
    *,
    created: bool,
    jobs: int,
) -> ReconcileReport:
    """Makes the rows agree with the files after any crash, without a full scan.

    Each journal whose process is gone is replayed past the offset committed for it,
    then removed with its lock file and progress row; journals of live processes are
    left alone. A new index over a store that already holds instances is rebuilt from
    the files instead, and the dead journals are then removed unread. Replaying is
    idempotent, so a crash during reconciliation is repaired by the next one.
    """
    journals = layout.journal_names()
    replay = _Replay(conn, writer, layout)
    with ExitStack() as claims:
        # Claimed (their owners proven dead) before any rebuild walks the tree, so
        # every file those runs renamed into place is seen by the walk.
        dead = [j for j in journals if claims.enter_context(layout.claim_if_dead(j))]
        rebuilt = None
        if created and layout.has_registry_entries():
            rebuilt = rebuild(writer, layout, jobs=jobs, progress=None)
        for journal in dead:
            if rebuilt is None:
                replay.journal(journal)
            (layout.journal_dir / journal).unlink(missing_ok=True)
    return ReconcileReport(
        journals_replayed=len(dead),
        journals_live=len(journals) - len(dead),
        rows_added=replay.added,
        rows_updated=replay.updated,
        rows_removed=replay.removed,
        unreadable=tuple(replay.unreadable),
        rebuild=rebuilt,
    )


class _Replay:
    """Replays journals into the index, counting the rows it changes."""

    def __init__(self, conn: sqlite3.Connection, writer: RowWriter, layout: StorageLayout) -> None:
        self._conn = conn
        self._writer = writer
        self._layout = layout
        self.added = self.updated = self.removed = 0
        self.unreadable: list[str] = []

    def journal(self, journal: str) -> None:
        """Makes the rows of every path the journal names (past its progress) match
        the files, then forgets the journal's progress.

        Whatever the line's operation, the file now at a path is the truth: present,
        its header becomes the row; absent (replaced, or never renamed into place), no
        row may point there. Headers are read outside the write transactions, so other
        writers of the index are not held up by file I/O, and a chunk at a time, so
        memory stays bounded.
        """
        row = self._conn.execute(
            'SELECT "offset" FROM journal_progress WHERE journal = ?', (journal,)
        ).fetchone()
        paths: dict[str, None] = {}  # an ordered set: each path once, where last named
        for line in read_journal(self._layout.journal_dir / journal, row[0] if row else 0):
            for path in (line.path, line.replaced_path):
                if path:
                    paths.pop(path, None)
                    paths[path] = None
        ordered = list(paths)
        for i in range(0, len(ordered), _CHUNK):
            self._paths(ordered[i : i + _CHUNK])
        with self._writer.transaction():
            self._writer.forget_journal(journal)
            self._writer.prune_parents()

    def _paths(self, paths: Sequence[str]) -> None:
        present: list[str] = []
        absent: list[str] = []
        for path in paths:
            (present if self._layout.file(path).is_file() else absent).append(path)
        read = read_chunk(self._layout.root, present)
        self.unreadable.extend(path for path, _ in read.unreadable)
        with self._writer.transaction():
            known = self._known_sops(read.records)
            self.added += sum(r.sop_instance_uid not in known for r in read.records)
            self.updated += sum(r.sop_instance_uid in known for r in read.records)
            self._writer.upsert_instances(read.records)
            self.removed += self._writer.delete_paths(absent)

    def _known_sops(self, records: Sequence[InstanceRecord]) -> set[str]:
        sql = "SELECT 1 FROM instance WHERE sop_instance_uid = ?"
        return {
            r.sop_instance_uid
            for r in records
            if self._conn.execute(sql, (r.sop_instance_uid,)).fetchone() is not None
        }


def verify(conn: sqlite3.Connection, layout: StorageLayout) -> VerifyReport:
    """Compares rows, files and the core's registry; reads only.

    Exact on a quiet store; while a server runs, instances between rename and commit
    show up as files without rows.
    """
    files = set(layout.walk_files())
    rows = conn.execute("SELECT sop_instance_uid, path, file_size FROM instance").fetchall()
    row_paths = {path for _, path, _ in rows}
    missing = sorted(path for path in row_paths if path not in files)
    resized = sorted(
        path for _, path, size in rows if path in files and _size(layout, path) != size
    )
    return VerifyReport(
        rows=len(rows),
        files=len(files),
        rows_without_files=tuple(missing),
        files_without_rows=tuple(sorted(files - row_paths)),
        size_mismatches=tuple(resized),
        registry_mismatches=_registry_mismatches(layout, {s: p for s, p, _ in rows}, files),
    )


def _size(layout: StorageLayout, path: str) -> int | None:
    try:
        return os.stat(layout.file(path)).st_size
    except FileNotFoundError:
        return None


def _registry_mismatches(
    layout: StorageLayout, row_paths: dict[str, str], files: set[str]
) -> tuple[RegistryMismatch, ...]:
    """Registry links (to existing files) and rows that do not name the same path.

    A row whose file is gone is already a row without a file, and is not repeated here.
    """
    registry = {sop: path for sop, path in layout.registry().items() if path in files}
    rows = {sop: path for sop, path in row_paths.items() if path in files}
    return tuple(
        RegistryMismatch(sop, registry.get(sop), rows.get(sop))
        for sop in sorted(registry.keys() | rows.keys())
        if registry.get(sop) != rows.get(sop)
    )
