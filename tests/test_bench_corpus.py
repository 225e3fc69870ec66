"""The benchmark corpus generator (benchmarks/corpus.py): how instances are grouped into
series and studies, and that groupings never share a UID."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import corpus


def folders(grouping: str, count: int) -> list[tuple[str, str, str]]:
    """(study, series, instance) UIDs of the first `count` tiny instances."""
    return [
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for _, ds, _ in corpus.instances("tiny", count, "mixed", grouping)
    ]


def test_grouped_instances_fill_series_of_100_and_studies_of_10_series() -> None:
    uids = folders("grouped", 101)
    assert len({series for _, series, _ in uids[:100]}) == 1
    assert uids[100][1] != uids[99][1]
    assert uids[100][0] == uids[99][0], "the 11th series starts only at instance 1000"


def test_single_gives_every_instance_a_study_and_series_of_its_own() -> None:
    uids = folders("single", 20)
    assert len({study for study, _, _ in uids}) == 20
    assert len({series for _, series, _ in uids}) == 20
    grouped = folders("grouped", 20)
    shared = {u for row in uids for u in row} & {u for row in grouped for u in row}
    assert not shared, "a single corpus sent after a grouped one would be duplicates"


def test_corpora_are_deterministic() -> None:
    assert folders("single", 3) == folders("single", 3)
