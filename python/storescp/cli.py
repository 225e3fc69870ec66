"""The ``storescp`` / ``store_scp`` command line (SPEC.md sections 1 and 2).

Every invalid argument, whether click finds it (unknown option, missing value) or our
validation does, ends with one ``Error: ...`` line on stderr and exit status 1; click's own
status for usage errors (2) never escapes `main`.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import textwrap
from collections.abc import Sequence
from types import FrameType
from typing import Final, NoReturn

import click

from storescp import policy
from storescp.config import (
    DEFAULT_MAX_PDU,
    MAX_ASSOC_LIMIT,
    MAX_PDU_MAX,
    MAX_PDU_MIN,
    ConfigError,
    ServerConfig,
    parse_allowed_calling,
    parse_duplicate,
    parse_max_assoc,
    parse_max_pdu,
    parse_naming,
    parse_port,
    parse_seconds,
    validate_ae_title,
    validate_bind,
)
from storescp.console import Console
from storescp.server import DEFAULT_DRAIN_SECONDS, StartError, StorageSCP

_NEGATIVE_NUMBER: Final = re.compile(r"-[0-9]+")
_SIGNALS: Final = ("SIGINT", "SIGTERM", "SIGHUP")
# How long the statistics may wait for a reader of the log that is behind before exiting.
_EXIT_FLUSH_SECONDS: Final = 5.0

_HELP: Final = """
Storage SCP - DICOM Image Receiver

Usage: {prog} <port> <ae_title> --storage-dir <path> [options]

Arguments:
  port            Port number to listen on, 1..65535 (typically 104 or 11112)
  ae_title        Application Entity Title for this server (max 16 chars)

Required Options:
  --storage-dir <path>    Directory to store received DICOM files (created if missing)

Optional Options:
  --index-db <path>       SQLite database indexing the stored instances (optional)
  --accept <modalities>   Comma-separated list of accepted modalities and/or
                          SOP Class UIDs
{modalities}
  --naming <scheme>       File naming scheme: hierarchical (default),
                          date, flat
  --duplicate <policy>    Duplicate handling: reject (default), replace, ignore
  --max-assoc <n>         Maximum concurrent associations (default: 10, at most {max_assoc})
  --timeout <sec>         Idle timeout in seconds (default: 300, 0 disables)
  --bind <address>        IP address to listen on (default: 0.0.0.0; :: for IPv6)
  --max-pdu <bytes>       Maximum PDU length received (default: {max_pdu},
                          {pdu_min}..{pdu_max})
  --artim-timeout <sec>   Seconds a new connection has to request an association
                          (default: 30, or --timeout when that is shorter)
  --drain-timeout <sec>   Seconds in-flight transfers get to finish when stopping
                          (default: 10)
  --require-called-ae     Reject associations whose called AE title is not <ae_title>
  --allow-calling <ae>[@<ip>]
                          Accept only this calling AE title (from this IP address);
                          repeatable (default: every calling AE title)
  --no-fsync              Do not fsync files and directories before answering success
  --quiet                 Do not log successful C-STORE and C-ECHO requests
  -h, --help              Show this help message

Examples:
  {prog} 11112 MY_PACS --storage-dir ./received
  {prog} 11112 MY_PACS --storage-dir ./received --index-db ./pacs.db
  {prog} 11112 MY_PACS --storage-dir ./archive --accept "CT,MR"

Notes:
  - Press Ctrl+C to stop the server gracefully (SIGINT, SIGTERM and SIGHUP too):
    in-flight transfers finish, then the statistics are printed
  - Files are stored as StudyUID/SeriesUID/SOPUID.dcm (hierarchical),
    YYYY/MM/DD/StudyUID/SOPUID.dcm (date) or SOPUID.dcm (flat)
  - Without --accept, all standard storage SOP classes are accepted;
    Verification (C-ECHO) is always accepted

Exit Codes:
  0  Normal termination (including after a signal)
  1  Error - Failed to start server or invalid arguments
"""


def help_text(prog: str) -> str:
    """The usage text printed by ``--help``, in the shape of the example's."""
    names = textwrap.fill(
        "(" + ", ".join(policy.MODALITY_SOP_CLASSES) + ")",
        width=76,
        initial_indent=" " * 26,
        subsequent_indent=" " * 26,
        break_on_hyphens=False,
    )
    return _HELP.format(
        prog=prog,
        modalities=names,
        max_assoc=MAX_ASSOC_LIMIT,
        max_pdu=DEFAULT_MAX_PDU,
        pdu_min=MAX_PDU_MIN,
        pdu_max=MAX_PDU_MAX,
    )


def _show_help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        click.echo(help_text(ctx.info_name or "storescp"), nl=False)
        ctx.exit(0)


@click.command(add_help_option=False)
@click.argument("port", metavar="PORT")
@click.argument("ae_title", metavar="AE_TITLE")
@click.option("--storage-dir")
@click.option("--index-db")
@click.option("--accept")
@click.option("--naming", default="hierarchical")
@click.option("--duplicate", default="reject")
@click.option("--max-assoc", default="10")
@click.option("--timeout", default="300")
@click.option("--bind", default="0.0.0.0")
@click.option("--max-pdu", default=str(DEFAULT_MAX_PDU))
@click.option("--artim-timeout", default="30")
@click.option("--drain-timeout", default=f"{DEFAULT_DRAIN_SECONDS:g}")
@click.option("--require-called-ae", is_flag=True)
@click.option("--allow-calling", multiple=True)
@click.option("--fsync/--no-fsync", default=True)
@click.option("--quiet", is_flag=True)
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=_show_help)
def command(
    port: str,
    ae_title: str,
    storage_dir: str | None,
    index_db: str | None,
    accept: str | None,
    naming: str,
    duplicate: str,
    max_assoc: str,
    timeout: str,
    bind: str,
    max_pdu: str,
    artim_timeout: str,
    drain_timeout: str,
    require_called_ae: bool,
    allow_calling: tuple[str, ...],
    fsync: bool,
    quiet: bool,
) -> int:
    """Run a DICOM Storage SCP (see ``--help``)."""
    # Checked in the example's order so that the first error reported is the same.
    parsed_port = parse_port(port)
    title = validate_ae_title(ae_title)
    accepted = policy.parse_accept(accept) if accept is not None else None
    parsed_naming = parse_naming(naming)
    parsed_duplicate = parse_duplicate(duplicate)
    parsed_max_assoc = parse_max_assoc(max_assoc)
    idle_timeout = parse_seconds(timeout, "timeout")
    address = validate_bind(bind)
    parsed_max_pdu = parse_max_pdu(max_pdu)
    artim = parse_seconds(artim_timeout, "artim-timeout")
    drain = parse_seconds(drain_timeout, "drain-timeout")
    allowed = tuple(parse_allowed_calling(entry) for entry in allow_calling)
    if not storage_dir:
        raise ConfigError("--storage-dir is required")
    config = ServerConfig(
        ae_title=title,
        storage_dir=storage_dir,
        port=parsed_port,
        bind=address,
        index_db=index_db,
        accepted_sop_classes=accepted,
        naming=parsed_naming,
        duplicate=parsed_duplicate,
        max_assoc=parsed_max_assoc,
        idle_timeout=idle_timeout,
        artim_timeout=artim,
        max_pdu=parsed_max_pdu,
        fsync=fsync,
        require_called_ae=require_called_ae,
        allowed_calling=allowed,
        quiet=quiet,
    )
    return run(config, drain)


def run(config: ServerConfig, drain_timeout: float) -> int:
    """Run a server in the foreground until a signal stops it.

    Prints the banner, the configuration and the running box, serves, and prints the
    statistics once the server has drained.

    Returns:
        0 after a normal stop (signals included).

    Raises:
        StartError: When the server cannot start.
    """
    out = Console(quiet=config.quiet)
    accepted = policy.accepted_sop_classes(config.accepted_sop_classes)
    out.banner()
    out.config_block(config, len(accepted))
    out.flush()
    scp = StorageSCP(config, out)
    _install_signal_handlers(scp, out, drain_timeout)
    port = scp.start()
    out.running_box(port, config.storage_dir)
    scp.serve_forever()
    out.statistics(scp.stats())
    out.print("\nStorage SCP terminated")
    out.flush(timeout=_EXIT_FLUSH_SECONDS)
    return 0


def _install_signal_handlers(scp: StorageSCP, console: Console, drain_timeout: float) -> None:
    """Make SIGINT, SIGTERM and SIGHUP stop the server gracefully (SPEC.md section 2)."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        scp.stop(drain_timeout)
        # A signal that lands while the main thread is inside a write to the same stream
        # makes this nested write raise; the notice is then lost, never the stop.
        with contextlib.suppress(RuntimeError):
            console.print(f"\nReceived {signal.Signals(signum).name}, shutting down...")
            console.flush()

    for name in _SIGNALS:
        number = getattr(signal, name, None)  # SIGHUP does not exist on Windows
        if number is not None:
            signal.signal(number, handle)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``storescp``, ``store_scp`` and ``python -m storescp``; exits.

    Exit status 0 after a normal run or ``--help``; 1 with one ``Error: ...`` line on stderr
    for an invalid argument or a failure to start.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=args, standalone_mode=False)
    except click.NoSuchOption as exc:
        # click takes a negative port ("-1") for an option; say what the user meant.
        if args and exc.option_name == args[0] and _NEGATIVE_NUMBER.fullmatch(args[0]):
            _fail("Port must be between 1 and 65535")
        _fail(exc.format_message())
    except click.ClickException as exc:
        _fail(exc.format_message())
    except click.Abort:
        # Ctrl+C before the signal handlers were installed: nothing was started.
        _fail("interrupted")
    except (ConfigError, StartError) as exc:
        _fail(str(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> NoReturn:
    if sys.stdout is not None:  # None when the process started with descriptor 1 closed
        sys.stdout.flush()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)
