"""The Index: the one object the server and the tools use."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from storescp.index import maintenance, query
from storescp.index.checkpoint import Checkpointer
from storescp.index.layout import StorageLayout
from storescp.index.maintenance import Progress, RebuildReport, ReconcileReport, VerifyReport
from storescp.index.model import InstanceRecord, StoreEvent, utc_now_iso
from storescp.index.query import Filters, InstanceRow, SeriesRow, StudyRow, Totals
from storescp.index.schema import IndexOpenError, connect
from storescp.index.writer import RowWriter

_INDEXED_OUTCOMES = frozenset({"stored", "replaced"})


class StoreBusyError(RuntimeError):
    """A storescp process runs on the store, so rewriting the whole index is unsafe."""


class Index:
    """The SQLite index of one storage root.

    Several processes may share one index (and root): every write is one short
    BEGIN IMMEDIATE transaction, and a SOP Instance UID never gets a second row.
    Methods of one Index may be called from several threads; they run one at a time.
    Use `Index.open`, then `close` (or a `with` block).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        db_path: Path,
        storage_dir: Path | None,
        created: bool,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        """Wraps an open connection; use `Index.open` instead."""
        self._conn = conn
        self._checkpointer = checkpointer
        self._db_path = db_path
        self._writer = RowWriter(conn)
        self._storage_dir = storage_dir
        self._created = created
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        db_path: str | os.PathLike[str],
        storage_dir: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        durable: bool = True,
        busy_timeout: float = 30.0,
        background_checkpoints: bool = False,
    ) -> Index:
        """Opens (creating and migrating if needed) the index at `db_path`.

        Args:
            db_path: the SQLite file; its directory must exist.
            storage_dir: the storage root the index describes; remembered in the
                database, so later opens (the inspection tool) may omit it.
            create: create the database when missing (else that is an error).
            durable: every commit is fsync'd (synchronous=FULL). The server passes
                False (NORMAL): the core's journal, fsync'd before success, already
                brings back a commit lost to power loss at the next reconcile.
            busy_timeout: seconds a write waits for another process's transaction.
            background_checkpoints: commits never checkpoint the WAL; a thread of
                this Index does, from its own connection (see `checkpoint.py`). For
                the server, whose commits are on the path that answers C-STOREs.

        Raises:
            IndexOpenError: the database is missing (create=False), unreadable, not
                a storescp index, of a newer schema, or cannot use WAL mode.
        """
        conn, created = connect(
            Path(db_path), create=create, durable=durable, busy_timeout=busy_timeout
        )
        try:
            root = _remember_storage_dir(conn, storage_dir)
            checkpointer = None
            if background_checkpoints:
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                checkpointer = Checkpointer(Path(db_path))
        except sqlite3.Error as exc:
            conn.close()
            raise IndexOpenError(f"cannot use index database {str(db_path)!r}: {exc}") from exc
        return cls(conn, Path(db_path), root, created, checkpointer)

    @property
    def storage_dir(self) -> Path | None:
        """The storage root (given to `open`, or remembered), None if never given."""
        return self._storage_dir

    @property
    def created(self) -> bool:
        """Whether `open` created this database."""
        return self._created

    def record(self, events: Iterable[StoreEvent]) -> int:
        """Commits the rows of a batch of core events; returns how many rows were written.

        Only "store" events with outcome "stored" or "replaced" are indexed; the others
        are ignored. All rows of the batch and the journals' progress are committed in
        one transaction, durable when this returns: the caller may then let the core
        answer success. received_at is the time of this call.

        Raises:
            sqlite3.Error: nothing of the batch was committed.
        """
        received_at = utc_now_iso()
        records: list[InstanceRecord] = []
        progress: dict[str, int] = {}
        for event in events:
            if event.kind != "store" or event.outcome not in _INDEXED_OUTCOMES:
                continue
            records.append(_from_event(event, received_at))
            if event.journal:
                progress[event.journal] = max(progress.get(event.journal, 0), event.journal_offset)
        if records:
            with self._lock, self._writer.transaction():
                self._writer.upsert_instances(records)
                self._writer.save_progress(progress)
        return len(records)

    def reconcile(self, *, jobs: int | None = None) -> ReconcileReport:
        """Brings the rows in line with the files; call at start, before the core runs.

        Replays the journals of dead processes (not a scan of the tree); rebuilds the
        whole index when it was just created over a store that already holds instances.
        `jobs` is the process count of such a rebuild (default: CPU count).

        Raises:
            ValueError: no storage directory is known.
            FileNotFoundError: the storage directory does not exist.
            OSError, sqlite3.Error: the store or the database failed; what was done
                stays done, and the next reconciliation resumes.
        """
        with self._lock:
            return maintenance.reconcile(
                self._conn,
                self._writer,
                self._layout(),
                created=self._created,
                jobs=jobs or os.cpu_count() or 1,
            )

    def verify(self) -> VerifyReport:
        """Compares the rows with the files and the core's registry (reads only).

        Raises:
            ValueError: no storage directory is known.
            FileNotFoundError: the storage directory does not exist.
        """
        with self._lock:
            return maintenance.verify(self._conn, self._layout())

    def rebuild(
        self,
        jobs: int | None = None,
        progress: Progress | None = None,
        *,
        allow_live: bool = False,
    ) -> RebuildReport:
        """Replaces the index content with what the files say, in one transaction.

        Args:
            jobs: processes parsing headers (default: CPU count).
            progress: called with (files read, files in total) as it goes.
            allow_live: rebuild even though a storescp process runs on this store
                (rows it commits during the rebuild would be lost).

        Raises:
            ValueError: no storage directory is known.
            FileNotFoundError: the storage directory does not exist.
            StoreBusyError: a storescp process runs on this store (without allow_live).
        """
        layout = self._layout()
        live = layout.live_runs()
        if live and not allow_live:
            raise StoreBusyError(
                f"a storescp process is running on this store (run {live[0]}); stop it first"
            )
        with self._lock:
            return maintenance.rebuild(
                self._writer, layout, jobs=jobs or os.cpu_count() or 1, progress=progress
            )

    def studies(self, filters: Filters | None = None) -> list[StudyRow]:
        """Studies with instances matching `filters` (see `Filters`)."""
        with self._lock:
            return query.studies(self._conn, filters or Filters())

    def series(self, filters: Filters | None = None) -> list[SeriesRow]:
        """Series with instances matching `filters` (see `Filters`)."""
        with self._lock:
            return query.series(self._conn, filters or Filters())

    def instances(self, filters: Filters | None = None) -> list[InstanceRow]:
        """Instances matching `filters` (see `Filters`)."""
        with self._lock:
            return query.instances(self._conn, filters or Filters())

    def totals(self) -> Totals:
        """How many patients, studies, series, instances and bytes the index holds."""
        with self._lock:
            return query.totals(self._conn)

    def close(self) -> None:
        """Closes the database; the Index is unusable afterwards."""
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _layout(self) -> StorageLayout:
        if self._storage_dir is None:
            raise ValueError("no storage directory: pass storage_dir to Index.open")
        if not self._storage_dir.is_dir():
            # Never compare with (or rebuild from) nothing: a wrong path would wipe rows.
            raise FileNotFoundError(f"storage directory {self._storage_dir} does not exist")
        return StorageLayout(self._storage_dir, _database_files(self._db_path, self._storage_dir))


def _from_event(event: StoreEvent, received_at: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=event.sop_instance_uid,
        sop_class_uid=event.sop_class_uid,
        study_instance_uid=event.study_instance_uid,
        series_instance_uid=event.series_instance_uid,
        patient_id=event.patient_id,
        patient_name=event.patient_name,
        study_date=event.study_date,
        study_description=event.study_description,
        modality=event.modality,
        transfer_syntax=event.transfer_syntax,
        path=event.path,
        file_size=event.file_size,
        calling_ae=event.calling_ae,
        received_at=received_at,
    )


def _database_files(db_path: Path, root: Path) -> frozenset[str]:
    """The database's files as paths relative to the root, when it is kept inside it."""
    try:
        relpath = db_path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # not under the root
        return frozenset()
    return frozenset(relpath + suffix for suffix in ("", "-wal", "-shm", "-journal"))


def _remember_storage_dir(
    conn: sqlite3.Connection, storage_dir: str | os.PathLike[str] | None
) -> Path | None:
    """Stores the given root in meta (absolute), or returns the remembered one."""
    if storage_dir is None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'storage_dir'").fetchone()
        return Path(row[0]) if row else None
    root = Path(storage_dir).absolute()
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('storage_dir', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE value != excluded.value",
        (str(root),),
    )
    return root
