"""The machine's bounds of each scenario, measured between its rounds (``harness.py --bounds``).

The ceilings of ``storescp-loadgen ceilings`` drift with this virtual disk's phases by 2-3x
within an hour, so a bound measured half an hour after the runs may say little about them.
With ``--bounds`` the ceilings that bound a scenario are measured after each of its rounds,
on the same disk a minute from the servers' runs, and reported next to them: what each
allows against dcmtk (bound / dcmtk, run k against run k) and what share of it each of our
servers reaches (server / bound). A target ratio above what the bound allows cannot be met
on this machine in that run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medians import median_range


@dataclass(frozen=True)
class Bound:
    """One ceiling (a ``ceilings --only`` key) as a bound of a scenario's metric."""

    key: str
    #: True: bounds a server that makes every instance durable (fsync on); False: one that
    #: does not (dcmtk, ``--no-fsync``).
    durable: bool
    #: Turns the ceiling's unit into the scenario's metric (files/s of 512 KB into MB/s).
    factor: float = 1.0


#: What bounds each scenario, as RESULTS.md argues it: tiny instances by the stored
#: exchanges (fsync off) and by durable 4 KB files (fsync on); small ones with fsync on by
#: durable 512 KB files, with no network and as exchanges received and stored durably
#: (in MB/s: the corpus's instances are smaller, so per byte these bounds are if anything
#: generous); large ones by the device's sequential writes.
BOUNDS: dict[str, tuple[Bound, ...]] = {
    "tiny1": (Bound("stored_round_trips_x1_per_s", False), Bound("durable_4k_per_s", True)),
    "tiny4": (Bound("stored_round_trips_x4_per_s", False), Bound("durable_4k_x4_per_s", True)),
    "small4": (
        Bound("durable_512k_x4_per_s", True, 512 * 1024 / 1e6),
        Bound("durable_stored_round_trips_512k_x4_per_s", True, 512 * 1024 / 1e6),
    ),
    "large1": (Bound("write_fdatasync_mb_s", True), Bound("direct_write_mb_s", True)),
}


@dataclass
class BoundResult:
    scenario: str
    run: int
    key: str
    label: str
    value: float  # in the scenario's metric


class Run(Protocol):
    """What the summary needs of a server's run (harness.RunResult)."""

    scenario: str
    server: str
    run: int
    ok: bool


def measure(
    loadgen: Path, scenario: str, run: int, workdir: Path, scale: float
) -> list[BoundResult]:
    """Measures the bounds of ``scenario`` once; the files stay in ``workdir`` for the
    caller's removal with the runs' (a deletion now would slow the next runs' creates)."""
    bounds = BOUNDS.get(scenario, ())
    if not bounds:
        return []
    argv = [str(loadgen), "ceilings", "--dir", str(workdir), "--scale", str(scale)]
    only = ",".join(b.key for b in bounds)
    done = subprocess.run(
        [*argv, "--only", only, "--no-cleanup", "--json"],
        capture_output=True,
        timeout=600,
        check=True,
    )
    measured: dict[str, Any] = json.loads(done.stdout)
    labels: dict[str, str] = measured["labels"]
    return [
        BoundResult(scenario, run, b.key, labels[b.key], float(measured[b.key]) * b.factor)
        for b in bounds
    ]


def summarize(
    scenario: str,
    metric: str,
    measured: list[BoundResult],
    runs: Sequence[Run],
    durable: dict[str, bool],
) -> dict[str, dict[str, Any]]:
    """The bounds of ``scenario``: key -> {label, durable, value, allows (bound / dcmtk),
    share: {server: server / bound}}, each (median, min, max) over the runs, run k against
    run k (in ``metric``, the scenario's). ``durable`` maps each server to whether it makes
    instances durable; a server is set against the bounds of its own kind only."""
    summary: dict[str, dict[str, Any]] = {}
    for bound in BOUNDS.get(scenario, ()):
        values: list[float] = []
        allows: list[float] = []
        share: dict[str, list[float]] = {}
        for result in measured:
            if result.scenario != scenario or result.key != bound.key:
                continue
            values.append(result.value)
            for r in runs:
                if r.scenario != scenario or r.run != result.run or not r.ok:
                    continue
                ours = float(getattr(r, metric))
                if r.server == "dcmtk" and ours > 0:
                    allows.append(result.value / ours)
                if durable.get(r.server) == bound.durable and result.value > 0:
                    share.setdefault(r.server, []).append(ours / result.value)
        if values:
            summary[bound.key] = {
                "label": next(m.label for m in measured if m.key == bound.key),
                "durable": bound.durable,
                "value": median_range(values),
                "allows": median_range(allows),
                "share": {server: median_range(v) for server, v in share.items()},
            }
    return summary


def markdown(summary: dict[str, Any], unit: str, titles: dict[str, str]) -> list[str]:
    """The lines under a scenario's table: each bound, what it allows, each server's share."""
    if not summary:
        return []
    lines = [
        "| bound, measured after each round | value med (min-max) | allows vs dcmtk med"
        " (min-max) | share of it reached |",
        "|---|---|---|---|",
    ]
    for entry in summary.values():
        value, allows = entry["value"], entry["allows"]
        shares = ", ".join(
            f"{titles.get(server, server)} {share[0]:.0%}"
            for server, share in entry["share"].items()
        )
        kind = "fsync on" if entry["durable"] else "fsync off"
        spread = f"{value[1]:,.0f}-{value[2]:,.0f}"
        lines.append(
            f"| {entry['label']} ({kind}) | {value[0]:,.0f} {unit} ({spread})"
            f" | {allows[0]:.2f}x ({allows[1]:.2f}-{allows[2]:.2f}) | {shares or '-'} |"
        )
    return [*lines, ""]
