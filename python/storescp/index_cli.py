"""`storescp-index`: inspect, verify and rebuild a storescp index.

    storescp-index --db PATH [--storage-dir DIR] COMMAND [OPTIONS]
    python -m storescp.index --db PATH ...          (same tool)

Commands: studies, series, instances (with filters), totals, verify, rebuild. Output is
an aligned table, or JSON with --json. Exit status: 0 success, 1 any error (bad
arguments included, unlike click's default of 2) or, for verify, inconsistencies.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from storescp.index import (
    Filters,
    Index,
    IndexOpenError,
    InstanceRow,
    SeriesRow,
    StoreBusyError,
    StudyRow,
    VerifyReport,
)
from storescp.index.query import is_dicom_date

F = TypeVar("F", bound=Callable[..., Any])


class _UsageError(click.UsageError):
    """A usage error exiting with status 1 (click's own default is 2)."""

    exit_code = 1


class _Group(click.Group):
    """A group whose usage errors exit with status 1, as the product's other tools do."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        # Subcommands parse their arguments in here.
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from None


@dataclass(frozen=True)
class _Settings:
    db_path: Path
    storage_dir: Path | None


def _open(ctx: click.Context, *, create: bool = False, need_storage: bool = False) -> Index:
    """Opens the index for a command (closed when the command ends)."""
    settings: _Settings = ctx.obj
    try:
        index = Index.open(settings.db_path, settings.storage_dir, create=create)
    except IndexOpenError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.call_on_close(index.close)
    if need_storage and index.storage_dir is None:
        raise click.UsageError("--storage-dir is required (the index does not name one yet)")
    return index


def _database_errors(command: F) -> F:
    """Turns database and file-system failures into a one-line error and status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (sqlite3.Error, OSError, StoreBusyError) as exc:
            raise click.ClickException(str(exc)) from exc

    return cast(F, wrapper)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The index database (SQLite), as given to storescp --index-db.",
)
@click.option(
    "--storage-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The storage root; default: the one the index remembers.",
)
@click.pass_context
def cli(ctx: click.Context, db_path: Path, storage_dir: Path | None) -> None:
    """Inspect, verify and rebuild the index of a storescp storage directory."""
    ctx.obj = _Settings(db_path, storage_dir)


def _check_date(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not is_dicom_date(value):
        raise click.BadParameter(f"{value!r} is not a date as YYYYMMDD", param=param)
    return value


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _filter_options(command: F) -> F:
    """The filters shared by studies, series and instances."""
    options = [
        click.option("--patient-id", help="Patient ID; * and ? are wildcards."),
        click.option("--patient-name", help="Patient name (any case); * and ? are wildcards."),
        click.option("--modality", help="Modality, e.g. CT."),
        click.option("--date-from", callback=_check_date, help="Study date from (YYYYMMDD)."),
        click.option("--date-to", callback=_check_date, help="Study date to (YYYYMMDD)."),
        click.option("--calling-ae", help="AE title of the sender."),
        click.option("--study", "study_uid", help="Study Instance UID."),
        click.option("--series", "series_uid", help="Series Instance UID."),
        click.option("--limit", type=click.IntRange(min=1), help="At most this many results."),
        _json_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _filters(options: dict[str, Any]) -> Filters:
    return Filters(**{k: v for k, v in options.items() if k != "as_json"})


@cli.command()
@_filter_options
@click.pass_context
@_database_errors
def studies(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """List studies (counts cover the matching instances)."""
    rows = _open(ctx).studies(_filters(options))
    _print_rows(rows, _STUDY_COLUMNS, as_json)


@cli.command()
@_filter_options
@click.pass_context
@_database_errors
def series(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """List series (counts cover the matching instances)."""
    rows = _open(ctx).series(_filters(options))
    _print_rows(rows, _SERIES_COLUMNS, as_json)


@cli.command()
@_filter_options
@click.pass_context
@_database_errors
def instances(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """List instances."""
    rows = _open(ctx).instances(_filters(options))
    _print_rows(rows, _INSTANCE_COLUMNS, as_json)


@cli.command()
@_json_option
@click.pass_context
@_database_errors
def totals(ctx: click.Context, as_json: bool) -> None:
    """Count patients, studies, series, instances and bytes."""
    result = _open(ctx).totals().to_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    result["size"] = _human_size(result["bytes"])
    width = max(map(len, result))
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@_json_option
@click.pass_context
@_database_errors
def verify(ctx: click.Context, as_json: bool) -> None:
    """Compare the index with the files.

    Also compares it with the core's registry of stored instances. Exits 1 if anything
    disagrees.
    """
    report = _open(ctx, need_storage=True).verify()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_verify(report)
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.option("--jobs", type=click.IntRange(min=1), help="Parsing processes [CPU count].")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress on stderr [when stderr is a terminal].",
)
@click.option("--force", is_flag=True, help="Rebuild even while storescp runs on the store.")
@_json_option
@click.pass_context
@_database_errors
def rebuild(
    ctx: click.Context, jobs: int | None, progress: bool | None, force: bool, as_json: bool
) -> None:
    """Re-create the index from the files.

    Creates the database if needed, and replaces its content in one transaction.
    """
    index = _open(ctx, create=True, need_storage=True)
    show = sys.stderr.isatty() if progress is None else progress
    printer = _ProgressPrinter() if show else None
    report = index.rebuild(jobs, printer, allow_live=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(str(report))
    for path, reason in report.unreadable:
        click.echo(f"unreadable: {path}: {reason}")
    for path in report.duplicates:
        click.echo(f"duplicate skipped: {path}")


class _ProgressPrinter:
    """Rebuild progress on stderr: redrawn in place on a terminal, else a line per 10%."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last_time = 0.0
        self._last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        text = f"reading headers: {done}/{total} ({100 * done // max(total, 1)}%)"
        finished = done >= total
        if self._tty:
            # Redrawing more often than 10 times a second only costs time.
            now = time.monotonic()
            if finished or now - self._last_time >= 0.1:
                self._last_time = now
                click.echo("\r" + text, err=True, nl=finished)
            return
        tenth = done * 10 // max(total, 1)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            click.echo(text, err=True)


Row = StudyRow | SeriesRow | InstanceRow
Column = tuple[str, Callable[[Any], object], bool]  # header, value, right-aligned

_STUDY_COLUMNS: list[Column] = [
    ("PATIENT ID", lambda r: r.patient_id, False),
    ("PATIENT NAME", lambda r: r.patient_name, False),
    ("DATE", lambda r: r.study_date, False),
    ("MODALITIES", lambda r: r.modalities, False),
    ("SERIES", lambda r: r.series, True),
    ("INSTANCES", lambda r: r.instances, True),
    ("SIZE", lambda r: _human_size(r.bytes), True),
    ("DESCRIPTION", lambda r: r.study_description, False),
    ("STUDY UID", lambda r: r.study_instance_uid, False),
]
_SERIES_COLUMNS: list[Column] = [
    ("PATIENT ID", lambda r: r.patient_id, False),
    ("DATE", lambda r: r.study_date, False),
    ("MODALITY", lambda r: r.modality, False),
    ("INSTANCES", lambda r: r.instances, True),
    ("SIZE", lambda r: _human_size(r.bytes), True),
    ("STUDY UID", lambda r: r.study_instance_uid, False),
    ("SERIES UID", lambda r: r.series_instance_uid, False),
]
_INSTANCE_COLUMNS: list[Column] = [
    ("MODALITY", lambda r: r.modality, False),
    ("CALLING AE", lambda r: r.calling_ae, False),
    ("RECEIVED", lambda r: r.received_at, False),
    ("SIZE", lambda r: _human_size(r.file_size), True),
    ("SOP INSTANCE UID", lambda r: r.sop_instance_uid, False),
    ("PATH", lambda r: r.path, False),
]


def _print_rows(rows: Sequence[Row], columns: Sequence[Column], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    cells = [[str(value(r)) for _, value, _ in columns] for r in rows]
    click.echo(_table([header for header, _, _ in columns], cells, [c[2] for c in columns]))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Aligned columns separated by two spaces; no trailing blanks."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _human_size(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal; bytes below 1 KiB)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _print_verify(report: VerifyReport) -> None:
    click.echo(str(report))
    for path in report.rows_without_files:
        click.echo(f"row without file: {path}")
    for path in report.files_without_rows:
        click.echo(f"file without row: {path}")
    for path in report.size_mismatches:
        click.echo(f"size differs: {path}")
    for m in report.registry_mismatches:
        click.echo(
            f"registry mismatch: {m.sop_instance_uid}: registry {m.registry_path or '-'},"
            f" index {m.row_path or '-'}"
        )


def main() -> None:
    """Entry point of `storescp-index` and `python -m storescp.index`."""
    cli()


if __name__ == "__main__":
    main()
