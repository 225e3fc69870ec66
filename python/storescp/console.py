"""Everything the operator sees: banner, configuration, log lines and statistics.

Log lines go to `out` (stdout by default), errors to `err` (stderr). Lines for `out` are queued
and written together by `flush()`, which the event loop calls when it runs out of events and
at least every 50 ms while they keep coming, so a tail of the log is never more than that
behind. Errors are written at once. Neither stream's reader can stall or stop the server
(`storescp.output`): the console says once when a stream failed, and how many lines it
dropped while nobody read them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, TextIO

from storescp.output import Output

if TYPE_CHECKING:
    from storescp._core import Event
    from storescp.config import ServerConfig
    from storescp.server import Statistics

BANNER: Final = r"""
  ____ _____ ___  ____  _____   ____   ____ ____
 / ___|_   _/ _ \|  _ \| ____| / ___| / ___|  _ \
 \___ \ | || | | | |_) |  _|   \___ \| |   | |_) |
  ___) || || |_| |  _ <| |___   ___) | |___|  __/
 |____/ |_| \___/|_| \_\_____| |____/ \____|_|

           DICOM Image Receiver Server
"""

RULE: Final = "=" * 49
_LABEL_WIDTH: Final = 20
_SUCCESS_OUTCOMES: Final = frozenset({"stored", "replaced", "ignored"})


def format_bytes(count: int) -> str:
    """Format a byte count as the example does: ``512 B``, ``1.50 KB`` ... ``2.00 TB``."""
    units = ("B", "KB", "MB", "GB", "TB")
    size = float(count)
    unit = 0
    while size >= 1024.0 and unit < len(units) - 1:
        size /= 1024.0
        unit += 1
    return f"{count} B" if unit == 0 else f"{size:.2f} {units[unit]}"


class Stamp:
    """Formats the clock's local time as ``YYYY-MM-DD HH:MM:SS.mmm`` for each log line.

    The text is made once per millisecond, and its part up to the second once per second: a
    busy receiver logs tens of lines a millisecond, and formatting a time costs more than
    the rest of a line.

    Args:
        clock: Nanoseconds since the epoch (tests pass a fixed one).
    """

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._millisecond = -1
        self._text = ""
        self._second = -1
        self._second_text = ""

    def __call__(self) -> str:
        millisecond = self._clock() // 1_000_000
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second, milliseconds = divmod(millisecond, 1000)
            if second != self._second:
                self._second = second
                self._second_text = time.strftime("%Y-%m-%d %H:%M:%S.", time.localtime(second))
            self._text = f"{self._second_text}{milliseconds:03d}"
        return self._text


def _clean(text: str) -> str:
    """Make peer-supplied text safe for one log line: drop DICOM padding, mask control chars.

    A patient name containing a newline or an escape sequence must not forge log lines or
    drive the operator's terminal.
    """
    stripped = text.strip(" \0")
    if stripped.isprintable():  # the usual case, checked at C speed
        return stripped
    return "".join(c if c.isprintable() else "?" for c in stripped)


def _peer_ae(calling_ae: str, peer: str) -> str:
    calling = _clean(calling_ae)
    if not peer:
        return calling or "(unknown)"
    return f"{calling} ({peer})" if calling else f"({peer})"


def _store_line(event: Event) -> str:
    line = (
        f"C-STORE from {_clean(event.calling_ae)}: {_clean(event.modality) or '??'} - "
        f"{_clean(event.patient_name) or 'Unknown'}"
    )
    description = _clean(event.study_description)
    return f"{line} ({description})" if description else line


def _seconds(value: float) -> str:
    return "disabled" if value == 0 else f"{value:g} seconds"


class Console:
    """Writes the operator's view of the server.

    Args:
        out: Stream for the banner, configuration, log lines and statistics.
        err: Stream for errors.
        quiet: Omit the lines of successful C-STOREs and C-ECHOs; failures, refusals,
            duplicates and association lines are still written.
        clock: Nanoseconds since the epoch, stamped on each line in local time (tests pass
            a fixed one).
    """

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        quiet: bool = False,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._out = Output(out if out is not None else sys.stdout)
        self._err = Output(err if err is not None else sys.stderr)
        self._reported_failures: set[str] = set()
        self._quiet = quiet
        self._stamp = Stamp(clock)
        # Lines for `out` wait here until `flush()`, which writes them at once: one write(2)
        # per flush, whatever the stream's own buffering (PYTHONUNBUFFERED would make it one
        # per line, thousands a second on a busy receiver).
        self._pending: list[str] = []

    def print(self, text: str = "") -> None:
        """Queue `text` and a newline for the output stream, unstamped."""
        self._pending.append(text + "\n")

    def log(self, message: str) -> None:
        """Queue one time-stamped line for the output stream."""
        self._pending.append(f"[{self._stamp()}] {message}\n")

    def error(self, message: str) -> None:
        """Write one time-stamped ``Error: ...`` line to the error stream, after the queue.

        The queued lines go first so that, on a terminal or in one file, the lines keep the
        order of the events.
        """
        self._write_pending()
        self._out.push()
        self._err.write(f"[{self._stamp()}] Error: {message}\n")
        self._err.push()

    def flush(self, timeout: float = 0.0) -> None:
        """Write the queued lines, waiting up to `timeout` seconds for a reader that is behind.

        The event loop never waits; the last flush before exit waits a few seconds.
        """
        self._write_pending()
        self._out.push(timeout)
        self._err.push(timeout)
        self._report(self._out, "standard output", self.error)
        self._report(self._err, "standard error", self.log)

    def _write_pending(self) -> None:
        # Swapped in one statement: a signal handler that queues a line meanwhile (cli.py)
        # adds it either to the lines written now or to the next flush's.
        pending, self._pending = self._pending, []
        if pending:
            self._out.write("".join(pending))

    def _report(self, output: Output, name: str, say: Callable[[str], None]) -> None:
        """Say what became of `output`'s lines: that it failed (once, with `say`, on the
        other stream), or, once its reader has caught up, how many it dropped."""
        if output.failure is not None:
            if name not in self._reported_failures:
                self._reported_failures.add(name)
                say(f"{name} failed ({output.failure}); log lines are no longer written to it")
            return
        dropped = output.take_dropped()
        if dropped:
            line = f"[{self._stamp()}] {dropped} log line(s) dropped: {name} was not being read\n"
            output.write(line)
            output.push()

    def banner(self) -> None:
        """Write the ASCII-art banner."""
        self.print(BANNER)

    def config_block(self, config: ServerConfig, accepted_count: int) -> None:
        """Write the "Starting Storage SCP..." block with the effective configuration.

        Args:
            config: The configuration about to be started.
            accepted_count: Number of storage SOP classes accepted (Verification excluded).
        """
        if config.accepted_sop_classes is None:
            accepted = f"All standard storage classes ({accepted_count})"
        else:
            accepted = f"{accepted_count} SOP class(es)"
        rows = (
            ("AE Title", config.ae_title),
            ("Port", str(config.port)),
            ("Bind Address", config.bind),
            ("Storage Directory", config.storage_dir),
            ("Index Database", config.index_db or "(none)"),
            ("Naming", config.naming),
            ("Duplicates", config.duplicate),
            ("Max Associations", str(config.max_assoc)),
            ("Idle Timeout", _seconds(config.idle_timeout)),
            ("Max PDU Size", f"{config.max_pdu} bytes"),
            ("Accepted Classes", accepted),
            ("Called AE Check", "on" if config.require_called_ae else "off"),
            ("Allowed Calling", ", ".join(config.allowed_calling) or "(all)"),
            ("Fsync", "on" if config.fsync else "off"),
        )
        self.print("\nStarting Storage SCP...")
        for label, value in rows:
            self.print(f"  {label + ':':<{_LABEL_WIDTH}}{value}")
        self.print()

    def running_box(self, port: int, storage_dir: str) -> None:
        """Write the "Storage SCP is running on port N" box."""
        self.print(RULE)
        self.print(f"  Storage SCP is running on port {port}")
        self.print(f"  Storage: {storage_dir}")
        self.print("  Press Ctrl+C to stop")
        self.print(RULE)
        self.print()
        self.flush()

    def statistics(self, stats: Statistics) -> None:
        """Write the final statistics block."""
        server_rows = (
            ("Total Associations", str(stats.associations)),
            ("Rejected Associations", str(stats.rejected_associations)),
            ("Messages Processed", str(stats.messages)),
            ("Images Received", str(stats.images_received)),
            ("Bytes Received", format_bytes(stats.bytes_received)),
            ("Uptime", f"{int(stats.uptime)} seconds"),
        )
        storage_rows = (
            ("Instances Stored", str(stats.instances_stored)),
            ("Total Size", format_bytes(stats.stored_bytes)),
            ("Duplicates", str(stats.duplicates)),
            ("Failures", str(stats.failures)),
        )
        self.print()
        self._section("Server Statistics", server_rows)
        self._section("Storage Statistics", storage_rows)
        self.print(RULE)
        self.flush()

    def _section(self, title: str, rows: tuple[tuple[str, str], ...]) -> None:
        self.print(RULE)
        self.print(f"  {title}")
        self.print(RULE)
        for label, value in rows:
            self.print(f"  {label + ':':<{_LABEL_WIDTH + 3}}{value}")

    def events(self, batch: Iterable[Event], *, index_failed: bool = False) -> None:
        """Write the lines of a batch of core events, in order.

        Args:
            batch: The events, as the core reported them.
            index_failed: The batch's index commit failed: its C-STOREs (those with an
                ack token) were answered with a failure, and their lines say so.
        """
        stamp, quiet = self._stamp, self._quiet
        for event in batch:
            # The usual event, a C-STORE stored, is formatted here without further calls:
            # thousands a second on a busy receiver.
            if (
                event.kind == "store"
                and event.outcome == "stored"
                and not (index_failed and event.ack_token > 0)
            ):
                if not quiet:
                    # Not a cached `self._pending`: `error()` and a signal handler's flush
                    # swap the list.
                    self._pending.append(f"[{stamp()}] {_store_line(event)}\n")
            else:
                self.event(event, index_failed=index_failed and event.ack_token > 0)

    def event(self, event: Event, *, index_failed: bool = False) -> None:
        """Write the line of one core event.

        Args:
            event: The event.
            index_failed: The event is a C-STORE whose index row could not be committed; the
                core then answered a failure, and the line says so.
        """
        kind = event.kind
        if kind == "store":
            self._store(event, index_failed)
            return
        who = _peer_ae(event.calling_ae, event.peer)
        if kind == "assoc_accepted":
            self.log(
                f"Association established from: {_clean(event.calling_ae)} -> "
                f"{_clean(event.called_ae)} ({event.peer})"
            )
        elif kind == "assoc_released":
            self.log(f"Association released: {who}")
        elif kind == "assoc_aborted":
            self.log(f"Association aborted: {who}: {_clean(event.reason)}")
        elif kind == "assoc_rejected":
            self.log(f"Association rejected: {self._rejected_who(event)}: {_clean(event.reason)}")
        elif kind == "echo":
            if not self._quiet:
                self.log(f"C-ECHO from {who}")
        else:
            self.error(f"{_clean(event.reason)} ({who})" if event.peer else _clean(event.reason))

    @staticmethod
    def _rejected_who(event: Event) -> str:
        if event.calling_ae or event.called_ae:
            return f"{_clean(event.calling_ae)} -> {_clean(event.called_ae)} ({event.peer})"
        return f"({event.peer})"

    def _store(self, event: Event, index_failed: bool) -> None:
        outcome = event.outcome
        if outcome in _SUCCESS_OUTCOMES and not index_failed:
            # Once per instance: a quiet receiver formats nothing.
            if not self._quiet:
                line = _store_line(event)
                self.log(line if outcome == "stored" else f"{line} -> {outcome}")
            return
        line = _store_line(event)
        if index_failed:
            self.error(f"{line} -> failed: index not updated")
        elif outcome == "failed":
            self.error(f"{line} -> {self._outcome(event)}")
        else:
            self.log(f"{line} -> {self._outcome(event)}")

    @staticmethod
    def _outcome(event: Event) -> str:
        text = f"{event.outcome} (0x{event.status:04X})"
        comment = _clean(event.error_comment)
        return f"{text}: {comment}" if comment else text
