"""The SQLite index (storescp.index): schema, record, reconcile, verify, rebuild, queries."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from index_support import (
    STUDY,
    FakeEvent,
    dead_run_lock,
    event,
    journal_line,
    journal_path,
    link_registry,
    live_run,
    lock_path,
    registry_link,
    store_file,
    write_journal,
)
from storescp.index import SCHEMA_VERSION, Filters, Index, IndexOpenError, StoreBusyError
from storescp.index.checkpoint import Checkpointer
from storescp.index.layout import PRIVATE_DIR, StorageLayout, read_journal

RUN = "4242-1700000000000000000"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "index.db"


@pytest.fixture
def index(db: Path, root: Path) -> Iterator[Index]:
    """An index that existed before this start (reconcile replays, never rebuilds)."""
    Index.open(db, root).close()
    with Index.open(db, root) as opened:
        yield opened


def rows(db: Path) -> list[tuple[str, str]]:
    """(sop_instance_uid, path) of every instance row, read with a separate connection."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT sop_instance_uid, path FROM instance ORDER BY sop_instance_uid"
        ).fetchall()


def progress(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute('SELECT journal, "offset" FROM journal_progress'))


def in_study(sop: str, study: str, **fields: object) -> FakeEvent:
    """An event in its own study (and series)."""
    return event(sop, study_instance_uid=study, series_instance_uid=study + ".1", **fields)


# --- opening -------------------------------------------------------------------------


def test_open_creates_versioned_schema_in_wal_mode(db: Path, root: Path) -> None:
    with Index.open(db, root) as index:
        assert index.created
        assert index.storage_dir == root
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    assert {"patient", "study", "series", "instance", "journal_progress"} <= tables
    with Index.open(db) as again:
        assert not again.created
        assert again.storage_dir == root  # remembered


def test_open_refuses_unusable_databases(tmp_path: Path) -> None:
    with pytest.raises(IndexOpenError, match="does not exist"):
        Index.open(tmp_path / "missing.db", create=False)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexOpenError):
        Index.open(garbage)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(IndexOpenError, match="not a storescp index"):
        Index.open(foreign)
    newer = tmp_path / "newer.db"
    Index.open(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(IndexOpenError, match="newer"):
        Index.open(newer)
    with pytest.raises(IndexOpenError):
        Index.open(tmp_path / "no-such-dir" / "index.db")


def test_open_migrates_a_version_1_index(db: Path, root: Path) -> None:
    with Index.open(db, root) as index:
        index.record([event("1.2.3")])
    with sqlite3.connect(db) as conn:
        # What version 1 looked like: its extra index, and its version number.
        conn.execute("CREATE INDEX instance_received_at_idx ON instance (received_at)")
        conn.execute("PRAGMA user_version = 1")
    with Index.open(db, root) as index:
        assert not index.created
        index.record([event("1.2.4")])
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
    assert "instance_received_at_idx" not in indexes
    assert "instance_calling_ae_idx" in indexes
    assert [sop for sop, _ in rows(db)] == ["1.2.3", "1.2.4"]


# --- record --------------------------------------------------------------------------


def test_record_is_one_row_per_instance_and_idempotent(index: Index, db: Path) -> None:
    batch = [
        event("1.2.3.1", file_size=100),
        event("1.2.3.2", file_size=200),
        event("1.2.3.3", series_instance_uid=STUDY + ".2", modality="MR", file_size=300),
    ]
    assert index.record(batch) == 3
    assert index.record(batch) == 3
    assert [r[0] for r in rows(db)] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    totals = index.totals()
    assert (totals.patients, totals.studies, totals.series, totals.instances) == (1, 1, 2, 3)
    assert totals.bytes == 600


def test_record_ignores_other_outcomes_and_kinds(index: Index, db: Path) -> None:
    batch = [
        event(f"1.2.4.{i}", outcome=o)
        for i, o in enumerate(["duplicate", "ignored", "refused", "failed"])
    ]
    batch.append(FakeEvent(kind="assoc_accepted"))
    batch.append(FakeEvent(kind="echo"))
    assert index.record(batch) == 0
    assert index.record([]) == 0
    assert rows(db) == []


def test_replace_moves_the_row_to_the_new_path(index: Index, db: Path) -> None:
    index.record([event("1.2.5.1", path="2024/01/02/9/1.2.5.1.dcm", file_size=10)])
    replaced = event(
        "1.2.5.1",
        outcome="replaced",
        path="2024/03/04/9/1.2.5.1.dcm",
        replaced_path="2024/01/02/9/1.2.5.1.dcm",
        file_size=20,
    )
    index.record([replaced])
    assert rows(db) == [("1.2.5.1", "2024/03/04/9/1.2.5.1.dcm")]
    assert index.totals().bytes == 20


def test_record_saves_the_highest_journal_offset_per_journal(index: Index, db: Path) -> None:
    index.record(
        [
            event("1.2.6.1", journal="a.log", journal_offset=50),
            event("1.2.6.2", journal="a.log", journal_offset=120),
            event("1.2.6.3", journal="b.log", journal_offset=70),
            event("1.2.6.4", outcome="duplicate", journal="b.log", journal_offset=999),
        ]
    )
    assert progress(db) == {"a.log": 120, "b.log": 70}
    index.record([event("1.2.6.1", journal="a.log", journal_offset=60)])  # never moves back
    assert progress(db)["a.log"] == 120


def test_patients_without_id_are_told_apart_by_name(index: Index) -> None:
    index.record(
        [
            in_study("1.2.7.1", "1.7.1", patient_id="", patient_name="Anon^A"),
            in_study("1.2.7.2", "1.7.2", patient_id="", patient_name="Anon^B"),
            in_study("1.2.7.3", "1.7.3", patient_id="", patient_name="Anon^A"),
            in_study("1.2.7.4", "1.7.4", patient_id="Anon^A", patient_name="X"),
        ]
    )
    assert index.totals().patients == 3


def test_two_indexes_on_one_database_never_duplicate_a_sop_instance(db: Path, root: Path) -> None:
    uids = [f"1.2.8.{i}" for i in range(40)]
    errors: list[BaseException] = []

    def writer(series: str) -> None:
        try:
            with Index.open(db, root) as index:
                for round_ in range(10):
                    outcome = "stored" if round_ == 0 else "replaced"
                    index.record(
                        [event(u, series_instance_uid=series, outcome=outcome) for u in uids]
                    )
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    Index.open(db, root).close()  # the schema exists before the race
    threads = [threading.Thread(target=writer, args=(f"1.9.{n}",)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r[0] for r in rows(db)] == sorted(uids)


def test_cached_ids_survive_another_writer_deleting_parents(db: Path, root: Path) -> None:
    with Index.open(db, root) as first, Index.open(db, root) as second:
        first.record([event("1.2.9.1")])  # caches the series id
        second.rebuild()  # the store is empty: every row and parent goes
        first.record([event("1.2.9.2")])  # a stale id would break the foreign key
        assert [r[0] for r in rows(db)] == ["1.2.9.2"]
        assert first.totals().series == 1


# --- reconcile -----------------------------------------------------------------------


def test_reconcile_replays_a_dead_journal(index: Index, root: Path, db: Path) -> None:
    present = store_file(root, event("1.2.10.1", calling_ae="MODALITY1"))
    absent = event("1.2.10.2")  # journal line written, killed before the rename
    index.record([event("1.2.10.2")])  # a row pointing at it (stale, must go)
    write_journal(
        root,
        RUN,
        [
            journal_line("stored", "1.2.10.1", present.path),
            journal_line("stored", "1.2.10.2", absent.path),
        ],
    )
    dead_run_lock(root, RUN)

    report = index.reconcile()

    assert (report.journals_replayed, report.rows_added, report.rows_removed) == (1, 1, 1)
    assert rows(db) == [("1.2.10.1", present.path)]
    row = index.instances()[0]
    assert row.calling_ae == "MODALITY1"
    assert row.file_size == present.file_size
    assert row.transfer_syntax == present.transfer_syntax
    assert row.patient_name == "Doe^Jane"
    assert row.received_at.endswith("Z")
    assert not journal_path(root, RUN).exists()
    assert not lock_path(root, RUN).exists()
    assert index.totals().series == 1  # the stale row's parents were pruned with it
    assert "1 journal replayed" in str(report)


def test_reconcile_without_a_lock_file_treats_the_run_as_dead(
    index: Index, root: Path, db: Path
) -> None:
    ev = store_file(root, event("1.2.11.1"))
    write_journal(root, RUN, [journal_line("stored", ev.sop_instance_uid, ev.path)])
    assert index.reconcile().journals_replayed == 1
    assert rows(db) == [(ev.sop_instance_uid, ev.path)]


def test_reconcile_leaves_a_live_journal_alone(index: Index, root: Path, db: Path) -> None:
    ev = store_file(root, event("1.2.12.1"))
    write_journal(root, RUN, [journal_line("stored", ev.sop_instance_uid, ev.path)])
    with live_run(root, RUN):
        report = index.reconcile()
    assert (report.journals_replayed, report.journals_live) == (0, 1)
    assert rows(db) == []
    assert journal_path(root, RUN).exists()
    assert lock_path(root, RUN).exists()


def test_reconcile_starts_after_the_committed_offset(index: Index, root: Path, db: Path) -> None:
    first = event("1.2.13.1", journal=f"{RUN}.log")
    second = store_file(root, event("1.2.13.2"))
    offsets = write_journal(
        root,
        RUN,
        [
            journal_line("stored", "1.2.13.1", first.path),
            journal_line("stored", "1.2.13.2", second.path),
        ],
    )
    # The first line is committed; its file is gone since (outside tampering). A replay
    # from offset 0 would delete its row, a replay from the committed offset must not.
    index.record([replace(first, journal_offset=offsets[0])])
    dead_run_lock(root, RUN)
    report = index.reconcile()
    assert (report.rows_added, report.rows_removed) == (1, 0)
    assert [r[0] for r in rows(db)] == ["1.2.13.1", "1.2.13.2"]
    assert progress(db) == {}


def test_reconcile_follows_a_replace_to_the_new_path(index: Index, root: Path, db: Path) -> None:
    old = "2024/01/02/9/1.2.14.1.dcm"
    new = store_file(root, event("1.2.14.1", path="2024/05/06/9/1.2.14.1.dcm"))
    index.record([event("1.2.14.1", path=old)])  # committed before the replace
    write_journal(root, RUN, [journal_line("replaced", "1.2.14.1", new.path, old)])
    dead_run_lock(root, RUN)
    report = index.reconcile()
    assert rows(db) == [("1.2.14.1", new.path)]
    assert (report.rows_updated, report.rows_removed) == (1, 0)


def test_reconcile_ignores_a_torn_last_line(index: Index, root: Path, db: Path) -> None:
    ev = store_file(root, event("1.2.15.1"))
    write_journal(
        root,
        RUN,
        [journal_line("stored", ev.sop_instance_uid, ev.path), "stored\t1.2.15.2\t1.2/1.2.15"],
    )
    report = index.reconcile()
    assert report.journals_replayed == 1
    assert rows(db) == [(ev.sop_instance_uid, ev.path)]


def test_reconcile_stops_at_the_preallocated_zeros(index: Index, root: Path, db: Path) -> None:
    """The core preallocates its journal with zeros: a torn line then zeros end it."""
    ev = store_file(root, event("1.2.15.3"))
    write_journal(root, RUN, [journal_line("stored", ev.sop_instance_uid, ev.path), "stor"])
    with journal_path(root, RUN).open("ab") as f:
        f.write(bytes(64 * 1024))
    report = index.reconcile()
    assert report.journals_replayed == 1
    assert rows(db) == [(ev.sop_instance_uid, ev.path)]


def test_read_journal_skips_overlong_damage_and_ends_at_the_first_nul(root: Path) -> None:
    good = [journal_line("stored", f"1.2.15.{k}", f"1.2/1.2.15.{k}.dcm") for k in range(3)]
    write_journal(root, RUN, [good[0], "x" * 10_000 + "\n", good[1], "\0" * 5000, good[2]])
    lines = list(read_journal(journal_path(root, RUN), 0))
    assert [line.sop_instance_uid for line in lines] == ["1.2.15.0", "1.2.15.1"]


def test_reconcile_skips_journal_paths_outside_the_store(index: Index, root: Path) -> None:
    outside = root.parent / "outside.dcm"
    store_file(root.parent, event("1.2.16.1", path="outside.dcm"), register=False)
    write_journal(root, RUN, [journal_line("stored", "1.2.16.1", "../outside.dcm")])
    assert index.reconcile().rows_added == 0
    assert outside.exists()


def test_reconcile_reports_unreadable_files_and_keeps_going(
    index: Index, root: Path, db: Path
) -> None:
    broken = root / "1.2/1.2.1/1.2.17.1.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not dicom")
    good = store_file(root, event("1.2.17.2"))
    write_journal(
        root,
        RUN,
        [
            journal_line("stored", "1.2.17.1", "1.2/1.2.1/1.2.17.1.dcm"),
            journal_line("stored", "1.2.17.2", good.path),
        ],
    )
    report = index.reconcile()
    assert report.unreadable == ("1.2/1.2.1/1.2.17.1.dcm",)
    assert rows(db) == [("1.2.17.2", good.path)]


def test_a_new_index_over_a_full_store_is_rebuilt(db: Path, root: Path) -> None:
    stored = [store_file(root, event(f"1.2.18.{i}")) for i in range(3)]
    with Index.open(db, root) as index:
        report = index.reconcile()
        assert report.rebuild is not None and report.rebuild.rows == 3
        assert index.verify().ok
    with Index.open(db, root) as index:  # not new any more: no second rebuild
        assert index.reconcile().rebuild is None
    assert len(rows(db)) == len(stored)


def test_a_long_journal_is_replayed_in_chunks(index: Index, root: Path, db: Path) -> None:
    stored = [store_file(root, event(f"1.2.26.{i}")) for i in range(300)]
    write_journal(root, RUN, [journal_line("stored", e.sop_instance_uid, e.path) for e in stored])
    report = index.reconcile()
    assert (report.rows_added, report.rows_updated) == (300, 0)
    assert len(rows(db)) == 300


def test_a_rebuild_at_start_removes_dead_journals_unread(db: Path, root: Path) -> None:
    ev = store_file(root, event("1.2.27.1"))
    write_journal(root, RUN, [journal_line("stored", ev.sop_instance_uid, ev.path)])
    with live_run(root, "1-1"):
        write_journal(root, "1-1", [journal_line("stored", "1.2.27.2", "x/y/1.2.27.2.dcm")])
        with Index.open(db, root) as index:
            report = index.reconcile()
    assert report.rebuild is not None
    assert (report.journals_replayed, report.journals_live, report.rows_added) == (1, 1, 0)
    assert not journal_path(root, RUN).exists()
    assert journal_path(root, "1-1").exists()
    assert rows(db) == [(ev.sop_instance_uid, ev.path)]


def test_a_new_index_over_an_empty_store_is_not_rebuilt(index: Index) -> None:
    assert index.reconcile().rebuild is None


# --- verify --------------------------------------------------------------------------


def test_layout_reads_registry_links_in_folders_and_flat_ones(root: Path) -> None:
    """The registry as the core writes it (`sop/<xx>/<uid>`) and as an older version
    left it (`sop/<uid>`, moved into folders when the server next starts)."""
    link_registry(root, "1.2.20.1", "a/1.dcm")
    flat = root / PRIVATE_DIR / "sop" / "1.2.20.2"
    flat.symlink_to("b/2.dcm")
    (root / PRIVATE_DIR / "sop" / "stray-file").write_text("not a link")
    layout = StorageLayout(root)
    assert layout.registry() == {"1.2.20.1": "a/1.dcm", "1.2.20.2": "b/2.dcm"}
    assert layout.has_registry_entries()
    assert not StorageLayout(root / "empty").has_registry_entries()


def test_layout_reads_registry_links_through_folder_links(root: Path) -> None:
    """A registry link may name the file's folder link (rust/src/registry.rs): the file
    is `<folder>/<uid>.dcm`, `.` being the root; one whose folder link is gone names
    nothing."""
    folders = root / PRIVATE_DIR / "folder" / "0a"
    folders.mkdir(parents=True)
    (folders / "1").symlink_to("a/b")
    (folders / "2").symlink_to(".")
    link_registry(root, "1.2.21.1", f"{PRIVATE_DIR}/folder/0a/1")
    link_registry(root, "1.2.21.2", f"{PRIVATE_DIR}/folder/0a/1")
    link_registry(root, "1.2.21.3", f"{PRIVATE_DIR}/folder/0a/2")
    link_registry(root, "1.2.21.4", f"{PRIVATE_DIR}/folder/0a/3")
    assert StorageLayout(root).registry() == {
        "1.2.21.1": "a/b/1.2.21.1.dcm",
        "1.2.21.2": "a/b/1.2.21.2.dcm",
        "1.2.21.3": "1.2.21.3.dcm",
    }


def test_layout_reads_registry_entries_naming_folders(root: Path) -> None:
    """An entry made as a hard link of its folder's link names the folder itself (a
    folder never ends with `.dcm`, a file's path always does): the file is
    `<folder>/<uid>.dcm`, `.` being the root."""
    folders = root / PRIVATE_DIR / "folder" / "0b"
    folders.mkdir(parents=True)
    (folders / "1").symlink_to("a/b")
    (folders / "2").symlink_to(".")
    for uid, folder_link in [("1.2.22.1", "1"), ("1.2.22.2", "1"), ("1.2.22.3", "2")]:
        entry = registry_link(root, uid)
        entry.parent.mkdir(parents=True, exist_ok=True)
        os.link(folders / folder_link, entry, follow_symlinks=False)
    link_registry(root, "1.2.22.4", "a/c/1.2.22.4.dcm")
    assert StorageLayout(root).registry() == {
        "1.2.22.1": "a/b/1.2.22.1.dcm",
        "1.2.22.2": "a/b/1.2.22.2.dcm",
        "1.2.22.3": "1.2.22.3.dcm",
        "1.2.22.4": "a/c/1.2.22.4.dcm",
    }


def test_verify_finds_every_kind_of_disagreement(index: Index, root: Path) -> None:
    good = store_file(root, event("1.2.19.1"))
    unindexed = store_file(root, event("1.2.19.2"))
    resized = store_file(root, event("1.2.19.3"))
    moved = store_file(root, event("1.2.19.4"))
    index.record([good, resized, moved, event("1.2.19.5")])  # 1.2.19.5 has no file
    assert not index.verify().ok
    with (root / resized.path).open("ab") as f:
        f.write(b"\0\0")
    link_registry(root, moved.sop_instance_uid, good.path)

    report = index.verify()

    assert not report.ok
    assert report.rows_without_files == (event("1.2.19.5").path,)
    assert report.files_without_rows == (unindexed.path,)
    assert report.size_mismatches == (resized.path,)
    mismatches = {
        m.sop_instance_uid: (m.registry_path, m.row_path) for m in report.registry_mismatches
    }
    assert mismatches == {
        "1.2.19.2": (unindexed.path, None),
        "1.2.19.4": (good.path, moved.path),
    }
    assert "INCONSISTENT" in str(report)


def test_verify_passes_on_an_agreeing_store_holding_the_database(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ev = store_file(root, event("1.2.20.1"))
    with Index.open(root / "index.db", root) as index:  # the database inside the store
        index.record([ev])
        report = index.verify()
    assert report.ok, report
    assert (report.rows, report.files) == (1, 1)


# --- rebuild -------------------------------------------------------------------------


def test_rebuild_restores_the_index_from_the_files(index: Index, root: Path, db: Path) -> None:
    stored = [store_file(root, event(f"1.2.21.{i}", calling_ae="CT1")) for i in range(3)]
    index.record([event("1.2.21.99")])  # a row without a file
    (root / "notes.txt").write_text("not an instance")
    progress_calls: list[tuple[int, int]] = []

    report = index.rebuild(
        jobs=1, progress=lambda done, total: progress_calls.append((done, total))
    )

    assert (report.files, report.rows) == (4, 3)
    assert [p for p, _ in report.unreadable] == ["notes.txt"]
    assert progress_calls[-1] == (4, 4)
    assert rows(db) == sorted((s.sop_instance_uid, s.path) for s in stored)
    assert {r.calling_ae for r in index.instances()} == {"CT1"}


def test_rebuild_in_parallel_reads_every_file(index: Index, root: Path) -> None:
    for i in range(300):  # more than one chunk, so a process pool is used
        store_file(root, event(f"1.2.22.{i}", series_instance_uid=f"1.2.22.{i % 3}"))
    report = index.rebuild(jobs=2)
    assert (report.files, report.rows, report.unreadable) == (300, 300, ())
    assert index.totals().series == 3
    assert index.verify().ok


def test_rebuild_keeps_the_registered_copy_of_a_duplicated_instance(
    index: Index, root: Path, db: Path
) -> None:
    ev = store_file(root, event("1.2.23.1"))
    copy = root / "copies" / "1.2.23.1.dcm"
    copy.parent.mkdir()
    shutil.copy(root / ev.path, copy)
    report = index.rebuild(jobs=1)
    assert report.duplicates == ("copies/1.2.23.1.dcm",)
    assert rows(db) == [("1.2.23.1", ev.path)]


def test_rebuild_refuses_while_storescp_runs_on_the_store(index: Index, root: Path) -> None:
    store_file(root, event("1.2.24.1"))
    with live_run(root, RUN):
        with pytest.raises(StoreBusyError):
            index.rebuild()
        assert index.rebuild(allow_live=True).rows == 1


def test_storage_operations_need_a_storage_dir(db: Path, tmp_path: Path) -> None:
    with Index.open(db) as index, pytest.raises(ValueError, match="storage"):
        index.verify()
    with Index.open(db, tmp_path / "nowhere") as index:
        index.record([event("1.2.28.1")])
        with pytest.raises(FileNotFoundError):
            index.rebuild()  # would otherwise empty the index
        assert index.totals().instances == 1


# --- queries -------------------------------------------------------------------------


@pytest.fixture
def populated(index: Index) -> Index:
    index.record(
        [
            event(
                "1.3.1",
                patient_id="P1",
                patient_name="Smith^John",
                study_instance_uid="1.3.10",
                series_instance_uid="1.3.10.1",
                modality="CT",
                study_date="20240110",
                calling_ae="CTSCAN",
                file_size=1000,
            ),
            event(
                "1.3.2",
                patient_id="P1",
                patient_name="Smith^John",
                study_instance_uid="1.3.10",
                series_instance_uid="1.3.10.2",
                modality="SR",
                study_date="20240110",
                calling_ae="CTSCAN",
                file_size=10,
            ),
            event(
                "1.3.3",
                patient_id="P2_X",
                patient_name="Smyth^Ann",
                study_instance_uid="1.3.20",
                series_instance_uid="1.3.20.1",
                modality="MR",
                study_date="20240220",
                calling_ae="MRSCAN",
                file_size=2000,
            ),
            event(
                "1.3.4",
                patient_id="P3",
                patient_name="Jones",
                study_instance_uid="1.3.30",
                series_instance_uid="1.3.30.1",
                modality="CT",
                study_date="",
                calling_ae="CTSCAN",
                file_size=3000,
            ),
        ]
    )
    return index


def study_uids(index: Index, **filters: object) -> list[str]:
    return [s.study_instance_uid for s in index.studies(Filters(**filters))]  # type: ignore[arg-type]


def test_studies_aggregate_their_series_and_instances(populated: Index) -> None:
    first = populated.studies(Filters(study_uid="1.3.10"))[0]
    assert (first.modalities, first.series, first.instances, first.bytes) == ("CT,SR", 2, 2, 1010)
    assert first.patient_name == "Smith^John"
    assert study_uids(populated) == ["1.3.20", "1.3.10", "1.3.30"]  # newest date first


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"patient_id": "P1"}, ["1.3.10"]),
        ({"patient_id": "P*"}, ["1.3.20", "1.3.10", "1.3.30"]),
        ({"patient_id": "P?"}, ["1.3.10", "1.3.30"]),
        ({"patient_id": "p1"}, []),  # IDs are case-sensitive
        ({"patient_name": "sm?th^*"}, ["1.3.20", "1.3.10"]),
        ({"patient_name": "JONES"}, ["1.3.30"]),
        ({"patient_name": "%"}, []),  # SQL wildcards are literal
        ({"patient_id": "P2_*"}, ["1.3.20"]),
        ({"modality": "MR"}, ["1.3.20"]),
        ({"date_from": "20240201"}, ["1.3.20"]),
        ({"date_to": "20240131"}, ["1.3.10"]),
        ({"date_from": "20240101", "date_to": "20241231"}, ["1.3.20", "1.3.10"]),
        ({"calling_ae": "CTSCAN"}, ["1.3.10", "1.3.30"]),
        ({"series_uid": "1.3.10.2"}, ["1.3.10"]),
        ({"limit": 1}, ["1.3.20"]),
    ],
)
def test_study_filters(populated: Index, filters: dict[str, object], expected: list[str]) -> None:
    assert study_uids(populated, **filters) == expected


def test_series_and_instances_queries(populated: Index) -> None:
    series = populated.series(Filters(patient_id="P1"))
    assert [(s.series_instance_uid, s.modality, s.instances) for s in series] == [
        ("1.3.10.1", "CT", 1),
        ("1.3.10.2", "SR", 1),
    ]
    found = populated.instances(Filters(modality="CT", calling_ae="CTSCAN"))
    assert [i.sop_instance_uid for i in found] == ["1.3.1", "1.3.4"]
    assert found[0].to_dict()["file_size"] == 1000


@pytest.mark.parametrize(
    "bad", [{"date_from": "2024-01-01"}, {"date_to": "20241301"}, {"limit": 0}]
)
def test_filters_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Filters(**bad)  # type: ignore[arg-type]


def test_index_rows_never_leave_the_root(index: Index, root: Path) -> None:
    ev = store_file(root, event("1.2.25.1"))
    index.record([ev])
    assert all(not os.path.isabs(r.path) and ".." not in r.path for r in index.instances())


def test_read_journal_resumes_after_a_hole(root: Path) -> None:
    """A journal the core recreated (the private area was removed under it) goes on at
    its offsets, after a hole; preallocated zeros after the lines still end it."""
    path = journal_path(root, RUN)
    path.parent.mkdir(parents=True)
    lines = [journal_line("stored", f"1.2.17.{k}", f"1.2/1.2.17.{k}.dcm") for k in range(2)]
    with path.open("wb") as f:
        f.seek(10_000)  # a hole over two blocks, then zeros before the first line
        f.write("".join(lines).encode())
        f.write(bytes(8192))
        f.write(journal_line("stored", "1.2.17.9", "1.2/1.2.17.9.dcm").encode())
    read = [line.sop_instance_uid for line in read_journal(path, 0)]
    assert read == ["1.2.17.0", "1.2.17.1"]


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "storescp-index-checkpoint"]


def test_the_checkpointer_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    db = tmp_path / "wal.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE t (payload BLOB)")
    writer.executemany("INSERT INTO t VALUES (?)", [(os.urandom(1000),) for _ in range(2000)])
    # Nothing has checkpointed: the rows are in the log only.
    assert db.stat().st_size < 64 * 1024
    checkpointer = Checkpointer(db, interval=0.05)
    try:
        for _ in range(200):
            if db.stat().st_size > 1_000_000:
                break
            time.sleep(0.05)
        assert db.stat().st_size > 1_000_000
    finally:
        checkpointer.close()
        writer.close()
    assert not checkpoint_threads()


def test_an_index_with_background_checkpoints_runs_its_thread_until_closed(
    db: Path, root: Path
) -> None:
    with Index.open(db, root, background_checkpoints=True) as index:
        assert len(checkpoint_threads()) == 1
        assert index.record([event("1.2.3.1"), event("1.2.3.2")]) == 2
    assert not checkpoint_threads()
    assert [r[0] for r in rows(db)] == ["1.2.3.1", "1.2.3.2"]
