"""The harness's bounds (benchmarks/bounds.py): how a measured ceiling becomes a bound of a
scenario, what it allows against dcmtk, and which servers are set against it."""

from __future__ import annotations

import json
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bounds

DURABLE = {"dcmtk": False, "storescp": True, "storescp-nofsync": False}


@dataclass
class Run:
    scenario: str
    server: str
    run: int
    ok: bool
    images_per_s: float = 0.0
    mb_per_s: float = 0.0


def bound(scenario: str, run: int, key: str, value: float) -> bounds.BoundResult:
    return bounds.BoundResult(scenario, run, key, f"label of {key}", value)


def test_each_server_is_set_against_the_bounds_of_its_kind() -> None:
    runs = [
        Run("tiny4", "dcmtk", 0, True, images_per_s=5000),
        Run("tiny4", "storescp", 0, True, images_per_s=3000),
        Run("tiny4", "storescp-nofsync", 0, True, images_per_s=15000),
    ]
    measured = [
        bound("tiny4", 0, "stored_round_trips_x4_per_s", 20000),
        bound("tiny4", 0, "durable_4k_x4_per_s", 4000),
    ]
    summary = bounds.summarize("tiny4", "images_per_s", measured, runs, DURABLE)
    volatile = summary["stored_round_trips_x4_per_s"]
    assert volatile["allows"][0] == pytest.approx(4.0)
    assert volatile["durable"] is False
    assert set(volatile["share"]) == {"dcmtk", "storescp-nofsync"}
    assert volatile["share"]["storescp-nofsync"][0] == pytest.approx(0.75)
    durable = summary["durable_4k_x4_per_s"]
    assert durable["allows"][0] == pytest.approx(0.8)
    assert set(durable["share"]) == {"storescp"}
    assert durable["share"]["storescp"][0] == pytest.approx(0.75)


def test_runs_are_paired_by_round_and_failed_runs_left_out() -> None:
    runs = [
        Run("small4", "dcmtk", 0, True, mb_per_s=600),
        Run("small4", "dcmtk", 1, True, mb_per_s=300),
        Run("small4", "storescp", 0, True, mb_per_s=450),
        Run("small4", "storescp", 1, False, mb_per_s=1),
    ]
    key = "durable_512k_x4_per_s"
    measured = [bound("small4", 0, key, 900), bound("small4", 1, key, 600)]
    entry = bounds.summarize("small4", "mb_per_s", measured, runs, DURABLE)[key]
    assert entry["value"] == (750, 600, 900)
    # Round 0: 900 / 600, round 1: 600 / 300; the median of 1.5 and 2.0.
    assert entry["allows"] == (pytest.approx(1.75), pytest.approx(1.5), pytest.approx(2.0))
    assert entry["share"]["storescp"] == (0.5, 0.5, 0.5)


def test_a_scenario_without_bounds_has_none() -> None:
    runs = [Run("large4", "dcmtk", 0, True, mb_per_s=900)]
    assert bounds.summarize("large4", "mb_per_s", [], runs, DURABLE) == {}
    assert bounds.markdown({}, "MB/s", {}) == []


def test_markdown_names_the_bound_its_kind_and_the_shares() -> None:
    runs = [
        Run("tiny1", "dcmtk", 0, True, images_per_s=5000),
        Run("tiny1", "storescp", 0, True, images_per_s=1500),
    ]
    measured = [bound("tiny1", 0, "durable_4k_per_s", 2000)]
    summary = bounds.summarize("tiny1", "images_per_s", measured, runs, DURABLE)
    lines = bounds.markdown(summary, "img/s", {"storescp": "storescp (fsync on)"})
    row = next(line for line in lines if "durable_4k_per_s" in line)
    assert "(fsync on)" in row
    assert "2,000 img/s" in row
    assert "0.40x" in row
    assert "storescp (fsync on) 75%" in row


def test_measure_asks_for_the_scenarios_ceilings_and_converts_them(tmp_path: Path) -> None:
    """A stand-in for storescp-loadgen records its arguments and answers as it does."""
    argv_file = tmp_path / "argv.json"
    answer = {
        "durable_512k_x4_per_s": 1000.0,
        "durable_stored_round_trips_512k_x4_per_s": 500.0,
        "scale": 0.5,
        "labels": {
            "durable_512k_x4_per_s": "durable 512 KB files/s, 4 writers",
            "durable_stored_round_trips_512k_x4_per_s": "exchanges",
        },
    }
    fake = tmp_path / "loadgen"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"print(json.dumps({answer!r}))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    found = bounds.measure(fake, "small4", 2, tmp_path / "work", 0.5)
    argv = json.loads(argv_file.read_text())
    assert argv[0] == "ceilings"
    assert argv[argv.index("--only") + 1] == (
        "durable_512k_x4_per_s,durable_stored_round_trips_512k_x4_per_s"
    )
    assert argv[argv.index("--scale") + 1] == "0.5"
    assert "--no-cleanup" in argv and "--json" in argv
    assert [(b.key, b.run) for b in found] == [
        ("durable_512k_x4_per_s", 2),
        ("durable_stored_round_trips_512k_x4_per_s", 2),
    ]
    # Files of 512 KB per second, as MB/s.
    assert found[0].value == pytest.approx(1000 * 512 * 1024 / 1e6)
    assert bounds.measure(fake, "large4", 0, tmp_path / "work", 1.0) == []
