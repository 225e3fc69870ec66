"""`storescp-index`: tables, JSON, verify and rebuild, exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from index_support import event, store_file
from storescp.index import Index
from storescp.index_cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def db(tmp_path: Path, root: Path) -> Path:
    """An index of two studies whose files are all in place."""
    path = tmp_path / "index.db"
    stored = [
        store_file(
            root,
            event(
                "1.4.1",
                patient_id="P1",
                patient_name="Smith^John",
                study_instance_uid="1.4.10",
                series_instance_uid="1.4.10.1",
                modality="CT",
                study_date="20240110",
                calling_ae="CTSCAN",
            ),
        ),
        store_file(
            root,
            event(
                "1.4.2",
                patient_id="P1",
                patient_name="Smith^John",
                study_instance_uid="1.4.10",
                series_instance_uid="1.4.10.1",
                modality="CT",
                study_date="20240110",
                calling_ae="CTSCAN",
            ),
        ),
        store_file(
            root,
            event(
                "1.4.3",
                patient_id="P2",
                patient_name="Jones^Ann",
                study_instance_uid="1.4.20",
                series_instance_uid="1.4.20.1",
                modality="MR",
                study_date="20240220",
                calling_ae="MRSCAN",
            ),
        ),
    ]
    with Index.open(path, root) as index:
        index.record(stored)
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_studies_table_is_aligned(db: Path) -> None:
    result = invoke("--db", str(db), "studies")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("PATIENT ID  PATIENT NAME  DATE      MODALITIES")
    assert len(lines) == 3
    assert lines[1].split()[:4] == ["P2", "Jones^Ann", "20240220", "MR"]
    # every column starts where its header does
    column = lines[0].index("DESCRIPTION")
    assert all(line[column - 2 : column] == "  " for line in lines)
    assert all(line == line.rstrip() for line in lines)


def test_studies_json_with_filters(db: Path) -> None:
    result = invoke("--db", str(db), "studies", "--patient-name", "smith*", "--json")
    assert result.exit_code == 0, result.output
    studies = json.loads(result.output)
    assert [(s["study_instance_uid"], s["instances"], s["series"]) for s in studies] == [
        ("1.4.10", 2, 1)
    ]


def test_series_and_instances(db: Path) -> None:
    series = json.loads(invoke("--db", str(db), "series", "--modality", "MR", "--json").output)
    assert [s["series_instance_uid"] for s in series] == ["1.4.20.1"]
    result = invoke("--db", str(db), "instances", "--calling-ae", "CTSCAN", "--limit", "1")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["MODALITY", "CALLING"]
    assert len(lines) == 2 and "1.4.10/1.4.10.1/1.4.1.dcm" in lines[1]
    dated = json.loads(
        invoke("--db", str(db), "instances", "--date-from", "20240201", "--json").output
    )
    assert [i["sop_instance_uid"] for i in dated] == ["1.4.3"]


def test_totals(db: Path) -> None:
    table = invoke("--db", str(db), "totals")
    assert table.exit_code == 0
    assert "instances  3" in table.output
    totals = json.loads(invoke("--db", str(db), "totals", "--json").output)
    assert {k: totals[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": 2,
        "studies": 2,
        "series": 2,
        "instances": 3,
    }
    assert totals["bytes"] > 0


def test_verify_exit_status_follows_the_verdict(db: Path, root: Path) -> None:
    ok = invoke("--db", str(db), "verify")  # the storage dir is remembered by the index
    assert ok.exit_code == 0, ok.output
    assert "consistent" in ok.output
    (root / "1.4.20/1.4.20.1/1.4.3.dcm").unlink()
    bad = invoke("--db", str(db), "--storage-dir", str(root), "verify", "--json")
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["ok"] is False
    assert report["rows_without_files"] == ["1.4.20/1.4.20.1/1.4.3.dcm"]
    table = invoke("--db", str(db), "verify")
    assert table.exit_code == 1
    assert "row without file: 1.4.20/1.4.20.1/1.4.3.dcm" in table.output


def test_rebuild_creates_an_index_from_the_files(tmp_path: Path, root: Path, db: Path) -> None:
    fresh = tmp_path / "fresh.db"
    result = invoke("--db", str(fresh), "--storage-dir", str(root), "rebuild", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("index rebuilt: 3 files, 3 rows")
    assert invoke("--db", str(fresh), "verify").exit_code == 0


def test_rebuild_progress_and_json(tmp_path: Path, root: Path, db: Path) -> None:
    fresh = tmp_path / "fresh.db"
    args = ["--db", str(fresh), "--storage-dir", str(root), "rebuild", "--jobs", "1"]
    result = CliRunner().invoke(cli, [*args, "--progress", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 3
    assert "reading headers: 3/3 (100%)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["studies"], "Missing option '--db'"),
        (["--db", "{db}", "studies", "--bogus"], "No such option"),
        (["--db", "{db}", "nosuchcommand"], "No such command"),
        (["--db", "{db}", "studies", "--date-from", "2024-01-01"], "YYYYMMDD"),
        (["--db", "{db}", "studies", "--limit", "0"], "--limit"),
        (["--db", "{missing}", "totals"], "does not exist"),
        (["--db", "{garbage}", "totals"], "cannot"),
        (["--db", "{bare}", "verify"], "--storage-dir is required"),
        (["--db", "{db}", "--storage-dir", "{missing}", "rebuild"], "does not exist"),
    ],
)
def test_errors_exit_1(tmp_path: Path, db: Path, args: list[str], message: str) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"garbage" * 1000)
    bare = tmp_path / "bare.db"
    Index.open(bare).close()
    paths = {"db": db, "missing": tmp_path / "missing.db", "garbage": garbage, "bare": bare}
    result = invoke(*(a.format(**paths) for a in args))
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_runs_as_a_module(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    for module in ("storescp.index", "storescp.index_cli"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--db", str(db), "totals", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["instances"] == 3
    usage = subprocess.run(
        [sys.executable, "-m", "storescp.index", "--db", str(db), "studies", "--nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert usage.returncode == 1
