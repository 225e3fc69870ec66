"""The index's SQLite schema, its migrations, and how a connection is opened.

Tables (since version 1):
    patient(id, patient_key UNIQUE, patient_id, patient_name)
    study(id, study_instance_uid UNIQUE, patient_ref -> patient, study_date, study_description)
    series(id, series_instance_uid UNIQUE, study_ref -> study, modality)
    instance(id, sop_instance_uid UNIQUE, sop_class_uid, series_ref -> series,
             transfer_syntax, path UNIQUE, file_size, calling_ae, received_at)
    journal_progress(journal PRIMARY KEY, offset): the core journal bytes committed here
    meta(key PRIMARY KEY, value): 'generation' (bumped when parent rows are deleted, so
        writers drop their cached ids) and 'storage_dir' (the root the paths are under)
    view instance_full: one row per instance with every level's attributes, for ad-hoc SQL

Indexes (version 2): every UNIQUE column, each foreign key, patient id and name, study
date, series modality, instance calling AE: the columns the inspection tool filters and
joins on. Version 1 also indexed instance.received_at, which no query uses; every
instance row paid for it.

The version is `PRAGMA user_version`; `MIGRATIONS[n]` brings version n to n + 1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path


class IndexOpenError(Exception):
    """The index database cannot be used; the message says why (for the operator)."""


def patient_key(patient_id: str, patient_name: str) -> str:
    """The identity of a patient row.

    Patient ID (0010,0020) is type 2 and may be empty. A non-empty ID identifies the
    patient whatever the name's spelling. With an empty ID the name is the identity, so
    anonymous instances of differently named patients stay apart, and all instances with
    neither ID nor name share one "unknown patient" row. The prefixes keep the two key
    spaces from colliding (an ID that happens to equal someone's name).
    """
    return f"id:{patient_id}" if patient_id else f"name:{patient_name}"


_V1 = (
    """CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID""",
    """INSERT INTO meta (key, value) VALUES ('generation', 0)""",
    """CREATE TABLE patient (
        id INTEGER PRIMARY KEY,
        patient_key TEXT NOT NULL UNIQUE,
        patient_id TEXT NOT NULL,
        -- NOCASE: names match case-insensitively, and LIKE can then use the index.
        patient_name TEXT NOT NULL COLLATE NOCASE)""",
    """CREATE INDEX patient_id_idx ON patient (patient_id)""",
    """CREATE INDEX patient_name_idx ON patient (patient_name)""",
    """CREATE TABLE study (
        id INTEGER PRIMARY KEY,
        study_instance_uid TEXT NOT NULL UNIQUE,
        patient_ref INTEGER NOT NULL REFERENCES patient (id),
        study_date TEXT NOT NULL,
        study_description TEXT NOT NULL)""",
    """CREATE INDEX study_patient_idx ON study (patient_ref)""",
    """CREATE INDEX study_date_idx ON study (study_date)""",
    """CREATE TABLE series (
        id INTEGER PRIMARY KEY,
        series_instance_uid TEXT NOT NULL UNIQUE,
        study_ref INTEGER NOT NULL REFERENCES study (id),
        modality TEXT NOT NULL)""",
    """CREATE INDEX series_study_idx ON series (study_ref)""",
    """CREATE INDEX series_modality_idx ON series (modality)""",
    """CREATE TABLE instance (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        sop_class_uid TEXT NOT NULL,
        series_ref INTEGER NOT NULL REFERENCES series (id),
        transfer_syntax TEXT NOT NULL,
        path TEXT NOT NULL UNIQUE,
        file_size INTEGER NOT NULL,
        calling_ae TEXT NOT NULL,
        received_at TEXT NOT NULL)""",
    """CREATE INDEX instance_series_idx ON instance (series_ref)""",
    """CREATE INDEX instance_calling_ae_idx ON instance (calling_ae)""",
    """CREATE INDEX instance_received_at_idx ON instance (received_at)""",
    """CREATE TABLE journal_progress (
        journal TEXT PRIMARY KEY,
        "offset" INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE VIEW instance_full AS
        SELECT p.patient_id, p.patient_name, st.study_instance_uid, st.study_date,
               st.study_description, se.series_instance_uid, se.modality,
               i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path,
               i.file_size, i.calling_ae, i.received_at
        FROM instance i
        JOIN series se ON se.id = i.series_ref
        JOIN study st ON st.id = se.study_ref
        JOIN patient p ON p.id = st.patient_ref""",
)


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    """Creates the version 1 schema in an empty database."""
    for statement in _V1:
        conn.execute(statement)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    """Drops the index on instance.received_at: no query reads it."""
    conn.execute("DROP INDEX instance_received_at_idx")


Migration = Callable[[sqlite3.Connection], None]

# Append-only: a released migration is never edited, a schema change is a new entry.
MIGRATIONS: tuple[Migration, ...] = (_migrate_to_1, _migrate_to_2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(
    db_path: Path, *, create: bool, durable: bool, busy_timeout: float
) -> tuple[sqlite3.Connection, bool]:
    """Opens the database in WAL mode and brings its schema to `SCHEMA_VERSION`.

    Returns the connection (autocommit mode: callers issue BEGIN/COMMIT themselves)
    and whether this call created the schema.

    Raises:
        IndexOpenError: missing file (with create=False), not a database, another
            application's database, a schema newer than this program, or no WAL.
    """
    if not create and not db_path.is_file():
        raise IndexOpenError(f"index database {str(db_path)!r} does not exist")
    try:
        conn = sqlite3.connect(
            db_path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise IndexOpenError(f"cannot open index database {str(db_path)!r}: {exc}") from exc
    try:
        _configure(conn, durable=durable)
        created = _migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise IndexOpenError(f"cannot use index database {str(db_path)!r}: {exc}") from exc
    except IndexOpenError:
        conn.close()
        raise
    return conn, created


def _configure(conn: sqlite3.Connection, *, durable: bool) -> None:
    """Sets the per-connection pragmas (WAL is persistent, the others are not)."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise IndexOpenError(f"the database cannot use WAL mode (journal_mode is {mode})")
    # A commit happens before the core tells the sender "success". With fsync on, the
    # core has already made its journal line durable (store.rs), so a commit lost to
    # power loss is replayed from the journal at the next start: NORMAL (no fsync per
    # commit) is enough for the server. The inspection tool's own writes (rebuild) ask
    # for FULL through `durable`.
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")


def _migrate(conn: sqlite3.Connection) -> bool:
    """Applies the pending migrations in one transaction; True when it created the schema.

    BEGIN IMMEDIATE takes the write lock before reading the version, so two processes
    opening a new database at once do not both run the migrations.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise IndexOpenError(
                f"index schema version {version} is newer than this program's "
                f"({SCHEMA_VERSION}); upgrade storescp"
            )
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
            raise IndexOpenError("the database holds other tables: not a storescp index")
        for migration in MIGRATIONS[version:]:
            migration(conn)
        # PRAGMA takes no parameters; SCHEMA_VERSION is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version == 0
