"""Read-only queries: studies, series and instances matching filters, and totals."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Filters:
    """What to match; None matches everything.

    patient_id and patient_name accept the DICOM wildcards '*' (any run of characters)
    and '?' (one character); the ID matches case-sensitively, the name does not.
    Modality and calling AE match exactly, study_uid and series_uid too.
    date_from and date_to (YYYYMMDD, inclusive) bound the Study Date; with either
    given, studies without a date are left out. limit caps the number of results.

    Raises:
        ValueError: a date that is not a valid YYYYMMDD, or a limit below 1.
    """

    patient_id: str | None = None
    patient_name: str | None = None
    modality: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    calling_ae: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not is_dicom_date(value):
                raise ValueError(f"{name} must be a date as YYYYMMDD, not {value!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, not {self.limit}")


def is_dicom_date(text: str) -> bool:
    """Whether `text` is a valid calendar date written YYYYMMDD (DICOM DA)."""
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class StudyRow:
    """A study, with counts over its instances that match the filters."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    study_date: str
    study_description: str
    modalities: str
    series: int
    instances: int
    bytes: int
    last_received_at: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class SeriesRow:
    """A series, with counts over its instances that match the filters."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    study_date: str
    series_instance_uid: str
    modality: str
    instances: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class InstanceRow:
    """An instance with the attributes of its series, study and patient."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    study_date: str
    series_instance_uid: str
    modality: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    file_size: int
    calling_ae: str
    received_at: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Totals:
    """How much the index holds."""

    patients: int
    studies: int
    series: int
    instances: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


_FROM = """
    FROM instance i
    JOIN series se ON se.id = i.series_ref
    JOIN study st ON st.id = se.study_ref
    JOIN patient p ON p.id = st.patient_ref"""

# Result columns are named after the row dataclass fields they fill.
_STUDIES = f"""
    SELECT p.patient_id, p.patient_name, st.study_instance_uid, st.study_date,
           st.study_description, group_concat(DISTINCT se.modality) AS modalities,
           count(DISTINCT se.id) AS series, count(*) AS instances,
           coalesce(sum(i.file_size), 0) AS bytes, max(i.received_at) AS last_received_at
    {_FROM} {{where}}
    GROUP BY st.id
    ORDER BY st.study_date DESC, p.patient_name, st.study_instance_uid {{limit}}"""

_SERIES = f"""
    SELECT p.patient_id, p.patient_name, st.study_instance_uid, st.study_date,
           se.series_instance_uid, se.modality, count(*) AS instances,
           coalesce(sum(i.file_size), 0) AS bytes
    {_FROM} {{where}}
    GROUP BY se.id
    ORDER BY st.study_date DESC, st.study_instance_uid, se.series_instance_uid {{limit}}"""

_INSTANCES = f"""
    SELECT p.patient_id, p.patient_name, st.study_instance_uid, st.study_date,
           se.series_instance_uid, se.modality, i.sop_instance_uid, i.sop_class_uid,
           i.transfer_syntax, i.path, i.file_size, i.calling_ae, i.received_at
    {_FROM} {{where}}
    ORDER BY st.study_date DESC, st.study_instance_uid, se.series_instance_uid, i.path
    {{limit}}"""


def studies(conn: sqlite3.Connection, filters: Filters) -> list[StudyRow]:
    """Studies with at least one matching instance, newest study date first."""
    return [
        StudyRow(**{**row, "modalities": _sorted_set(row["modalities"])})
        for row in _run(conn, _STUDIES, filters)
    ]


def series(conn: sqlite3.Connection, filters: Filters) -> list[SeriesRow]:
    """Series with at least one matching instance, newest study date first."""
    return [SeriesRow(**row) for row in _run(conn, _SERIES, filters)]


def instances(conn: sqlite3.Connection, filters: Filters) -> list[InstanceRow]:
    """Matching instances, newest study date first, then by path."""
    return [InstanceRow(**row) for row in _run(conn, _INSTANCES, filters)]


def totals(conn: sqlite3.Connection) -> Totals:
    """Counts of every level and the bytes of all instances."""
    row = conn.execute(
        """SELECT (SELECT count(*) FROM patient), (SELECT count(*) FROM study),
                  (SELECT count(*) FROM series), count(*), coalesce(sum(file_size), 0)
           FROM instance"""
    ).fetchone()
    return Totals(*row)


def _sorted_set(concatenated: str | None) -> str:
    """'MR,CT' -> 'CT,MR': group_concat's order is unspecified."""
    return ",".join(sorted(filter(None, (concatenated or "").split(","))))


def _run(conn: sqlite3.Connection, template: str, filters: Filters) -> list[dict[str, Any]]:
    """Rows as dicts keyed by result column name."""
    where, params = _where(filters)
    limit = "" if filters.limit is None else f"LIMIT {int(filters.limit)}"
    cursor = conn.execute(template.format(where=where, limit=limit), params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _where(f: Filters) -> tuple[str, list[str]]:
    """The WHERE clause for the filters (values bound as parameters, never inlined)."""
    conditions: list[tuple[str, str]] = []
    if f.patient_id is not None:
        conditions.append(_pattern("p.patient_id", f.patient_id, case_sensitive=True))
    if f.patient_name is not None:
        conditions.append(_pattern("p.patient_name", f.patient_name, case_sensitive=False))
    if f.modality is not None:
        conditions.append(("se.modality = ?", f.modality))
    if f.date_from is not None:
        conditions.append(("st.study_date >= ? AND st.study_date != ''", f.date_from))
    if f.date_to is not None:
        conditions.append(("st.study_date <= ? AND st.study_date != ''", f.date_to))
    if f.calling_ae is not None:
        conditions.append(("i.calling_ae = ?", f.calling_ae))
    if f.study_uid is not None:
        conditions.append(("st.study_instance_uid = ?", f.study_uid))
    if f.series_uid is not None:
        conditions.append(("se.series_instance_uid = ?", f.series_uid))
    if not conditions:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in conditions), [v for _, v in conditions]


def _pattern(column: str, pattern: str, *, case_sensitive: bool) -> tuple[str, str]:
    """Equality without wildcards (uses the index as is); GLOB or LIKE with them.

    GLOB is case-sensitive and LIKE (ASCII) is not, which is what IDs and names want.
    Patient names compare with NOCASE, so their equality is case-insensitive too.
    """
    if "*" not in pattern and "?" not in pattern:
        return f"{column} = ?", pattern
    if case_sensitive:
        # GLOB's only other special is a [set]; brackets are matched as themselves.
        return f"{column} GLOB ?", "".join(f"[{c}]" if c in "[]" else c for c in pattern)
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{column} LIKE ? ESCAPE '\\'", escaped.replace("*", "%").replace("?", "_")
