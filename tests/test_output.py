"""A console stream whose reader stalls or goes away (storescp.output): bounded, never fatal."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO, TextIO

import pytest
from storescp.output import BACKLOG_LIMIT, Output

LINE = "[2024-01-02 03:04:05.678] C-STORE from MODALITY: CT - DOE^JOHN (Head)\n"


@pytest.fixture
def pipe() -> Iterator[tuple[BinaryIO, TextIO]]:
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    writer = os.fdopen(write_fd, "w")
    yield reader, writer
    reader.close()
    writer.close()


def read_all(reader: BinaryIO) -> bytes:
    os.set_blocking(reader.fileno(), False)
    chunks = []
    while (chunk := reader.read(1 << 16)) is not None and chunk:
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_unread_pipe_bounds_the_backlog_and_counts_the_dropped_lines(
    pipe: tuple[BinaryIO, TextIO],
) -> None:
    reader, writer = pipe
    output = Output(writer)
    batches = 3 * BACKLOG_LIMIT // len(LINE * 100)
    lines = batches * 100
    started = time.monotonic()
    for _ in range(batches):
        output.write(LINE * 100)
        output.push()
    assert time.monotonic() - started < 10  # never waited for the reader
    assert output.take_dropped() == 0  # not said while the reader is behind

    received = b""
    for _ in range(1000):  # the reader catches up, a pipe's buffer at a time
        chunk = read_all(reader)
        if not chunk:
            break
        received += chunk
        output.push()
    written = received.count(b"\n")
    assert 0 < written < lines
    assert len(received) <= BACKLOG_LIMIT + (1 << 20)  # the backlog and the pipe's buffer
    assert output.take_dropped() == lines - written
    assert output.take_dropped() == 0


def test_push_waits_up_to_its_timeout_for_a_slow_reader(pipe: tuple[BinaryIO, TextIO]) -> None:
    reader, writer = pipe
    output = Output(writer)
    text = LINE * (BACKLOG_LIMIT // len(LINE) // 2)
    output.write(text)
    received: list[bytes] = []

    def read_slowly() -> None:
        time.sleep(0.2)
        while chunk := reader.read1(1 << 16):
            received.append(chunk)

    thread = threading.Thread(target=read_slowly)
    thread.start()
    output.push(timeout=30)
    writer.close()
    thread.join(timeout=30)
    assert b"".join(received) == text.encode()
    assert output.failure is None


def test_a_reader_gone_fails_the_stream_once_without_raising(
    pipe: tuple[BinaryIO, TextIO],
) -> None:
    reader, writer = pipe
    output = Output(writer)
    reader.close()
    output.write(LINE)
    output.push()
    assert output.failure == "Broken pipe"
    output.write(LINE)
    output.push(timeout=1)
    assert output.failure == "Broken pipe"
    assert output.take_dropped() == 0


def test_a_stream_closed_at_start_is_failed_from_the_start() -> None:
    output = Output(None)  # sys.stdout when descriptor 1 was closed at start
    output.write(LINE)
    output.push(timeout=1)
    assert output.failure == "closed at start"
