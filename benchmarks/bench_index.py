#!/usr/bin/env python3
"""Micro benchmark of `Index.record`: rows committed per second, by batch size.

Each run records `--instances` new instances (4 series, as 4 associations would send)
in batches of the given size into a fresh index on the real disk (not tmpfs), one
durable transaction per batch, and reports the median rows/s of `--runs` runs for
synchronous=FULL (fsync on, the default) and NORMAL (the operator turned fsync off).

Usage::

    python3 benchmarks/bench_index.py                     # batches 1, 16, 64, 256
    python3 benchmarks/bench_index.py --batches 64 --instances 20000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from storescp.index import Index  # noqa: E402

STUDY = "1.2.826.0.1.3680043.9.7.1"


@dataclass(frozen=True)
class Event:
    """The store event fields the index reads (see storescp.index.StoreEvent)."""

    sop_instance_uid: str
    series_instance_uid: str
    path: str
    journal_offset: int
    kind: str = "store"
    outcome: str = "stored"
    calling_ae: str = "LOADGEN"
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.7"
    study_instance_uid: str = STUDY
    patient_id: str = "BENCH-1"
    patient_name: str = "Bench^Patient"
    modality: str = "OT"
    study_date: str = "20240102"
    study_description: str = "Index benchmark"
    transfer_syntax: str = "1.2.840.10008.1.2.1"
    file_size: int = 1234
    journal: str = "1-1.log"


def events(n: int) -> list[Event]:
    made = []
    for i in range(n):
        series = f"{STUDY}.{i % 4}"
        sop = f"{series}.{i}"
        made.append(Event(sop, series, f"{STUDY}/{series}/{sop}.dcm", 60 * (i + 1)))
    return made


def run(workdir: Path, batch: int, instances: int, fsync: bool) -> float:
    """Rows per second for one fresh index."""
    db = workdir / f"bench-{batch}-{fsync}-{time.monotonic_ns()}.db"
    todo = events(instances)
    with Index.open(db, workdir, durable=fsync) as index:
        start = time.perf_counter()
        for i in range(0, len(todo), batch):
            index.record(todo[i : i + batch])
        elapsed = time.perf_counter() - start
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return instances / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,64,256", help="comma-separated sizes")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print("| batch | FULL rows/s | NORMAL rows/s |")
    print("|------:|------------:|--------------:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for batch in map(int, args.batches.split(",")):
            full, normal = (
                statistics.median(
                    run(Path(tmp), batch, args.instances, fsync) for _ in range(args.runs)
                )
                for fsync in (True, False)
            )
            print(f"| {batch} | {full:,.0f} | {normal:,.0f} |")


if __name__ == "__main__":
    main()
