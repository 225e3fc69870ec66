"""What the operator sees (storescp.console): formats and one line per event."""

from __future__ import annotations

import io
import os
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from storescp.config import ServerConfig
from storescp.console import Console, Stamp, format_bytes
from storescp.server import Statistics


def local_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch of a local time, as the console's clock gives them."""
    return int(moment.replace(microsecond=0).timestamp()) * 10**9 + moment.microsecond * 1000


NOW = local_ns(datetime(2024, 1, 2, 3, 4, 5, 678_900))
STAMP = "[2024-01-02 03:04:05.678] "


def make_event(kind: str, **fields: Any) -> Any:
    base: dict[str, Any] = {
        "kind": kind,
        "assoc_id": 1,
        "peer": "10.0.0.7:40000",
        "calling_ae": "MODALITY",
        "called_ae": "MY_PACS",
        "reason": "",
        "status": 0,
        "outcome": "",
        "error_comment": "",
        "modality": "CT",
        "patient_name": "DOE^JOHN",
        "study_description": "Head",
        "ack_token": 0,
    }
    base.update(fields)
    return SimpleNamespace(**base)


def make_console(*, quiet: bool = False) -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(out, err, quiet=quiet, clock=lambda: NOW), out, err


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KB"),
        (1536, "1.50 KB"),
        (5 * 1024**2, "5.00 MB"),
        (3 * 1024**3, "3.00 GB"),
        (2 * 1024**4, "2.00 TB"),
        (2048 * 1024**4, "2048.00 TB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_stamp_has_milliseconds_and_follows_the_clock_across_seconds() -> None:
    times = iter(
        [
            NOW,
            local_ns(datetime(2024, 1, 2, 3, 4, 5, 999_999)),
            local_ns(datetime(2024, 1, 2, 3, 4, 6, 1_000)),
            local_ns(datetime(2024, 1, 3, 3, 4, 5)),
        ]
    )
    stamp = Stamp(lambda: next(times))
    assert [stamp() for _ in range(4)] == [
        "2024-01-02 03:04:05.678",
        "2024-01-02 03:04:05.999",
        "2024-01-02 03:04:06.001",
        "2024-01-03 03:04:05.000",
    ]


EVENT_LINES = [
    (
        make_event("assoc_accepted"),
        "Association established from: MODALITY -> MY_PACS (10.0.0.7:40000)",
    ),
    (make_event("assoc_released"), "Association released: MODALITY (10.0.0.7:40000)"),
    (
        make_event("assoc_aborted", reason="peer sent A-ABORT"),
        "Association aborted: MODALITY (10.0.0.7:40000): peer sent A-ABORT",
    ),
    (
        make_event("assoc_rejected", reason="calling AE not allowed (1/1/3)"),
        "Association rejected: MODALITY -> MY_PACS (10.0.0.7:40000): "
        "calling AE not allowed (1/1/3)",
    ),
    (
        make_event("assoc_rejected", calling_ae="", called_ae="", reason="ARTIM timeout"),
        "Association rejected: (10.0.0.7:40000): ARTIM timeout",
    ),
    (make_event("echo"), "C-ECHO from MODALITY (10.0.0.7:40000)"),
    (
        make_event("store", outcome="stored"),
        "C-STORE from MODALITY: CT - DOE^JOHN (Head)",
    ),
    (
        make_event("store", outcome="stored", modality="", patient_name="", study_description=""),
        "C-STORE from MODALITY: ?? - Unknown",
    ),
    (
        make_event("store", outcome="replaced"),
        "C-STORE from MODALITY: CT - DOE^JOHN (Head) -> replaced",
    ),
    (
        make_event("store", outcome="ignored"),
        "C-STORE from MODALITY: CT - DOE^JOHN (Head) -> ignored",
    ),
    (
        make_event("store", outcome="duplicate", status=0x0111, error_comment="already stored"),
        "C-STORE from MODALITY: CT - DOE^JOHN (Head) -> duplicate (0x0111): already stored",
    ),
    (
        make_event("store", outcome="refused", status=0xC000, error_comment="bad UID"),
        "C-STORE from MODALITY: CT - DOE^JOHN (Head) -> refused (0xC000): bad UID",
    ),
]


@pytest.mark.parametrize(("event", "line"), EVENT_LINES)
def test_event_lines(event: Any, line: str) -> None:
    console, out, err = make_console()
    console.event(event)
    console.flush()
    assert out.getvalue() == STAMP + line + "\n"
    assert err.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("index_failed", [False, True])
def test_a_batch_is_written_as_its_events_one_by_one(quiet: bool, index_failed: bool) -> None:
    batch = [event for event, _line in EVENT_LINES] + [
        make_event("store", outcome="stored", ack_token=7),
        make_event("store", outcome="failed", status=0xA700, error_comment="disk full"),
        make_event("error", reason="accept failed", peer=""),
        make_event("store", outcome="stored", calling_ae="NO\nLINE"),
    ]
    one_by_one, batched = io.StringIO(), io.StringIO()
    console = Console(one_by_one, one_by_one, quiet=quiet, clock=lambda: NOW)
    for event in batch:
        console.event(event, index_failed=index_failed and event.ack_token > 0)
    console.flush()
    console = Console(batched, batched, quiet=quiet, clock=lambda: NOW)
    console.events(batch, index_failed=index_failed)
    console.flush()
    assert batched.getvalue() == one_by_one.getvalue()
    assert ("NO?LINE" in batched.getvalue()) is not quiet
    assert ("index not updated" in batched.getvalue()) is index_failed


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_wait_for_flush_and_go_out_in_one_write() -> None:
    out, err = CountingStream(), io.StringIO()
    console = Console(out, err, clock=lambda: NOW)
    for _ in range(3):
        console.event(make_event("store", outcome="stored"))
    assert out.getvalue() == ""
    console.flush()
    assert out.writes == 1
    assert len(out.getvalue().splitlines()) == 3
    console.flush()
    assert out.writes == 1


def test_an_error_follows_the_lines_queued_before_it() -> None:
    shared = io.StringIO()
    console = Console(shared, shared, clock=lambda: NOW)
    console.event(make_event("assoc_accepted"))
    console.event(make_event("store", outcome="failed", status=0xA700))
    console.event(make_event("assoc_released"))
    console.flush()
    assert [line.split("] ")[1][:20] for line in shared.getvalue().splitlines()] == [
        "Association establis",
        "Error: C-STORE from ",
        "Association released",
    ]


def test_failures_and_errors_go_to_stderr() -> None:
    console, out, err = make_console()
    console.event(make_event("store", outcome="failed", status=0xA700, error_comment="disk full"))
    console.event(make_event("error", reason="accept failed: too many open files", peer=""))
    console.event(make_event("store", outcome="stored", ack_token=3), index_failed=True)
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        STAMP + "Error: C-STORE from MODALITY: CT - DOE^JOHN (Head) -> failed (0xA700): disk full",
        STAMP + "Error: accept failed: too many open files",
        STAMP + "Error: C-STORE from MODALITY: CT - DOE^JOHN (Head) -> failed: index not updated",
    ]


def test_quiet_hides_successes_only() -> None:
    console, out, _err = make_console(quiet=True)
    console.event(make_event("store", outcome="stored"))
    console.event(make_event("store", outcome="replaced"))
    console.event(make_event("echo"))
    console.flush()
    assert out.getvalue() == ""
    console.event(make_event("store", outcome="duplicate", status=0x0111))
    console.event(make_event("assoc_released"))
    console.flush()
    assert len(out.getvalue().splitlines()) == 2


def test_peer_text_cannot_forge_lines() -> None:
    console, out, _err = make_console()
    console.event(
        make_event(
            "store",
            outcome="stored",
            patient_name="EVIL\n[2024-01-01 00:00:00.000] fake\x1b[2J",
            study_description="  padded \0",
        )
    )
    console.flush()
    (line,) = out.getvalue().splitlines()
    assert "EVIL?[2024-01-01 00:00:00.000] fake?[2J" in line
    assert line.endswith("(padded)")


def test_config_block() -> None:
    console, out, _err = make_console()
    config = ServerConfig(ae_title="MY_PACS", storage_dir="/data", idle_timeout=0)
    console.config_block(config, 204)
    console.flush()
    text = out.getvalue()
    assert "Starting Storage SCP..." in text
    assert "  AE Title:           MY_PACS\n" in text
    assert "  Port:               11112\n" in text
    assert "  Storage Directory:  /data\n" in text
    assert "  Index Database:     (none)\n" in text
    assert "  Idle Timeout:       disabled\n" in text
    assert "  Accepted Classes:   All standard storage classes (204)\n" in text
    assert "  Fsync:              on\n" in text

    console, out, _err = make_console()
    limited = ServerConfig(
        ae_title="MY_PACS", storage_dir="/data", accepted_sop_classes=("1.2.3",), index_db="i.db"
    )
    console.config_block(limited, 1)
    console.flush()
    assert "  Accepted Classes:   1 SOP class(es)\n" in out.getvalue()
    assert "  Index Database:     i.db\n" in out.getvalue()


def test_running_box_and_statistics() -> None:
    console, out, _err = make_console()
    console.running_box(11112, "/data")
    assert "  Storage SCP is running on port 11112\n" in out.getvalue()
    stats = Statistics(
        associations=3,
        rejected_associations=1,
        messages=7,
        images_received=5,
        bytes_received=2048,
        uptime=61.9,
        instances_stored=4,
        stored_bytes=1536,
        duplicates=1,
        failures=0,
    )
    console.statistics(stats)
    text = out.getvalue()
    for row in (
        "  Total Associations:    3",
        "  Rejected Associations: 1",
        "  Messages Processed:    7",
        "  Images Received:       5",
        "  Bytes Received:        2.00 KB",
        "  Uptime:                61 seconds",
        "  Instances Stored:      4",
        "  Total Size:            1.50 KB",
        "  Duplicates:            1",
        "  Failures:              0",
    ):
        assert row + "\n" in text
    assert text.index("Server Statistics") < text.index("Storage Statistics")


def test_a_failed_stdout_is_said_once_on_stderr() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with os.fdopen(write_fd, "w") as out:
        err = io.StringIO()
        console = Console(out, err, clock=lambda: NOW)
        for _ in range(3):
            console.event(make_event("store", outcome="stored"))
            console.flush()
        assert err.getvalue() == (
            STAMP + "Error: standard output failed (Broken pipe); "
            "log lines are no longer written to it\n"
        )


def test_lines_dropped_while_stdout_was_not_read_are_counted_there() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "w") as out:
        console = Console(out, io.StringIO(), clock=lambda: NOW)
        lines = 30_000  # ~2 MB: more than the pipe and the backlog hold
        for _ in range(lines // 1000):
            for _ in range(1000):
                console.event(make_event("store", outcome="stored"))
            console.flush()
        received = b""
        for _ in range(1000):  # the reader catches up, a pipe's buffer at a time
            chunk = reader.read(1 << 16) or b""
            if not chunk:
                break
            received += chunk
            console.flush()
        text = received.decode()
        written = text.count("C-STORE from")
        assert 0 < written < lines
        assert text.endswith(
            f"{STAMP}{lines - written} log line(s) dropped: standard output was not being read\n"
        )
