"""Plain data shared by the index modules: the store-event shape and one instance row."""

from __future__ import annotations

import datetime as dt
import functools
import time
from dataclasses import dataclass
from typing import Protocol


class StoreEvent(Protocol):
    """The attributes of `storescp._core.Event` that the index reads.

    A Protocol rather than the core class, so that tests and tools can record plain
    objects (the core's Event cannot be constructed from Python).
    """

    @property
    def kind(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def calling_ae(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def study_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def modality(self) -> str: ...
    @property
    def study_date(self) -> str: ...
    @property
    def study_description(self) -> str: ...
    @property
    def transfer_syntax(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def journal(self) -> str: ...
    @property
    def journal_offset(self) -> int: ...


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Everything one instance row and its parents hold, whatever the source.

    Built from a store event (record), or from a file header (reconcile, rebuild).
    `path` is relative to the storage root with '/' separators; `received_at` is
    ISO-8601 UTC (see `utc_iso`).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    modality: str
    transfer_syntax: str
    path: str
    file_size: int
    calling_ae: str
    received_at: str


def utc_iso(moment: dt.datetime) -> str:
    """Formats an aware datetime as ISO-8601 UTC with microseconds and a 'Z' suffix.

    One fixed width format, so that received_at sorts and compares as text.
    """
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now_iso() -> str:
    """The current time as `utc_iso` text (called once per committed batch, so cheap)."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_utc_seconds(seconds)}.{micros:06d}Z"


@functools.lru_cache(maxsize=2)
def _utc_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def utc_iso_from_timestamp(seconds: float) -> str:
    """A POSIX timestamp (e.g. a file's mtime) as `utc_iso` text."""
    return utc_iso(dt.datetime.fromtimestamp(seconds, dt.UTC))
