"""Writing rows: transactions, instance upserts with cached parent ids, deletions.

Several processes may write one index (two receivers sharing a storage root). Every
write runs in a BEGIN IMMEDIATE transaction (the write lock is taken up front, so two
writers never deadlock upgrading read locks; SQLite's busy timeout makes the second
wait). Parent ids are cached per writer to spare upserts; a cached id stays valid
because parent rows are only deleted together with a bump of meta 'generation', which
every transaction checks first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from storescp.index.model import InstanceRecord
from storescp.index.schema import patient_key

# Ids of this many parents per level are kept; more and the cache starts over (a
# receiver sees a handful of studies at a time, not thousands).
_CACHE_LIMIT = 4096

# "DO UPDATE SET x = x" rather than DO NOTHING, so that RETURNING yields the id of an
# existing row too. Parent attributes are those of the first instance seen (cached ids
# skip the statement entirely, so updating here would only apply on cache misses).
_UPSERT_PATIENT = """
    INSERT INTO patient (patient_key, patient_id, patient_name) VALUES (?, ?, ?)
    ON CONFLICT (patient_key) DO UPDATE SET patient_key = patient_key RETURNING id"""
_UPSERT_STUDY = """
    INSERT INTO study (study_instance_uid, patient_ref, study_date, study_description)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (study_instance_uid) DO UPDATE SET study_instance_uid = study_instance_uid
    RETURNING id"""
_UPSERT_SERIES = """
    INSERT INTO series (series_instance_uid, study_ref, modality) VALUES (?, ?, ?)
    ON CONFLICT (series_instance_uid) DO UPDATE SET series_instance_uid = series_instance_uid
    RETURNING id"""
# OR REPLACE resolves both unique keys: the row of this SOP Instance UID (a duplicate
# or a replace) and any row claiming this path are replaced by the one row that
# describes the file now at `path`. Nothing references instance rows, so their ids
# may change.
_UPSERT_INSTANCE = """
    INSERT OR REPLACE INTO instance (sop_instance_uid, sop_class_uid, series_ref,
        transfer_syntax, path, file_size, calling_ae, received_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
_SAVE_PROGRESS = """
    INSERT INTO journal_progress (journal, "offset") VALUES (?, ?)
    ON CONFLICT (journal) DO UPDATE SET "offset" = max("offset", excluded."offset")"""
# Children before parents, so foreign keys hold at every statement.
_PRUNE = (
    "DELETE FROM series WHERE NOT EXISTS (SELECT 1 FROM instance WHERE series_ref = series.id)",
    "DELETE FROM study WHERE NOT EXISTS (SELECT 1 FROM series WHERE study_ref = study.id)",
    "DELETE FROM patient WHERE NOT EXISTS (SELECT 1 FROM study WHERE patient_ref = patient.id)",
)
_CLEAR = ("DELETE FROM instance", "DELETE FROM series", "DELETE FROM study", "DELETE FROM patient")


class RowWriter:
    """Writes rows through one connection. Not thread-safe: the caller serialises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        """Wraps `conn`, which must be in autocommit mode (isolation_level=None)."""
        self._conn = conn
        self._generation: object = None
        self._patients: dict[str, int] = {}
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed when the block ends, rolled back on error.

        Guarantees: either everything written in the block is committed (durably, per
        the connection's synchronous setting) or nothing is, and after a rollback no
        cached id refers to a row that was rolled back.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_generation()
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._forget_ids()
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def upsert_instances(self, records: Sequence[InstanceRecord]) -> None:
        """Writes one row per record (and its parents), in order: a later record for
        the same SOP Instance UID or path wins. Call inside `transaction`."""
        rows = [
            (
                r.sop_instance_uid,
                r.sop_class_uid,
                self._series_ref(r),
                r.transfer_syntax,
                r.path,
                r.file_size,
                r.calling_ae,
                r.received_at,
            )
            for r in records
        ]
        self._conn.executemany(_UPSERT_INSTANCE, rows)

    def save_progress(self, offsets: Mapping[str, int]) -> None:
        """Records that each journal is committed up to its offset (never moves back)."""
        self._conn.executemany(_SAVE_PROGRESS, offsets.items())

    def forget_journal(self, journal: str) -> None:
        """Deletes a journal's progress row (its file is being removed)."""
        self._conn.execute("DELETE FROM journal_progress WHERE journal = ?", (journal,))

    def delete_paths(self, paths: Iterable[str]) -> int:
        """Deletes the instance rows at these paths; returns how many existed."""
        cursor = self._conn.executemany(
            "DELETE FROM instance WHERE path = ?", ((p,) for p in paths)
        )
        return max(cursor.rowcount, 0)

    def prune_parents(self) -> None:
        """Deletes series, studies and patients left without instances."""
        deleted = sum(self._conn.execute(sql).rowcount for sql in _PRUNE)
        if deleted:
            self._bump_generation()

    def clear(self) -> None:
        """Deletes every patient, study, series and instance row (not journal progress)."""
        for sql in _CLEAR:
            self._conn.execute(sql)
        self._bump_generation()

    def _series_ref(self, r: InstanceRecord) -> int:
        ref = self._series.get(r.series_instance_uid)
        if ref is None:
            ref = self._upsert(
                _UPSERT_SERIES, (r.series_instance_uid, self._study_ref(r), r.modality)
            )
            _remember(self._series, r.series_instance_uid, ref)
        return ref

    def _study_ref(self, r: InstanceRecord) -> int:
        ref = self._studies.get(r.study_instance_uid)
        if ref is None:
            params = (r.study_instance_uid, self._patient_ref(r), r.study_date, r.study_description)
            ref = self._upsert(_UPSERT_STUDY, params)
            _remember(self._studies, r.study_instance_uid, ref)
        return ref

    def _patient_ref(self, r: InstanceRecord) -> int:
        key = patient_key(r.patient_id, r.patient_name)
        ref = self._patients.get(key)
        if ref is None:
            ref = self._upsert(_UPSERT_PATIENT, (key, r.patient_id, r.patient_name))
            _remember(self._patients, key, ref)
        return ref

    def _upsert(self, sql: str, params: tuple[str | int, ...]) -> int:
        return int(self._conn.execute(sql, params).fetchone()[0])

    def _check_generation(self) -> None:
        """Drops the cached ids when another writer deleted parent rows since."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        if row[0] != self._generation:
            self._forget_ids()
            self._generation = row[0]

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        self._forget_ids()
        # Our own cache is now empty, so it is in step with the new value.
        self._generation = self._conn.execute(
            "SELECT value FROM meta WHERE key = 'generation'"
        ).fetchone()[0]

    def _forget_ids(self) -> None:
        self._patients.clear()
        self._studies.clear()
        self._series.clear()
        self._generation = None


def _remember(cache: dict[str, int], key: str, ref: int) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = ref
