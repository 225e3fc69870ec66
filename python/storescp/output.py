"""One stream of the console (stdout or stderr), written so that its reader cannot stop the server.

The operator attaches a terminal, a file or a pipe into another program. A pipe that nobody
reads fills after 64 KB, and a write to it then blocks; a reader that exits makes every later
write fail. Neither may stall or end the storing of instances: text waits in a bounded
backlog and is written only as far as the reader takes it without blocking. Lines that do
not fit are dropped and counted, and a stream that failed is given up.
"""

from __future__ import annotations

import io
import os
import select
import time
from typing import Final, TextIO

# What a pipe that polls writable takes without blocking (PIPE_BUF, a page).
_CHUNK: Final = 4096
# Text kept for a reader that is behind; past it, lines are dropped.
BACKLOG_LIMIT: Final = 1 << 20


class Output:
    """A stream's bounded backlog, written without blocking longer than asked.

    A stream without a file descriptor (`io.StringIO` in tests) is written at once.

    Attributes:
        failure: Why writing failed (``"Broken pipe"``); nothing is written after that.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None else io.StringIO()
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._backlog = bytearray()
        self._dropped = 0
        self._pushing = False
        # Python's sys.stdout is None when the process started with descriptor 1 closed.
        self.failure: str | None = None if stream is not None else "closed at start"
        try:
            self._stream.flush()  # what was written through the stream itself goes first
            self._fd: int | None = self._stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            self._fd = None
        self._poll = select.poll()
        if self._fd is not None:
            self._poll.register(self._fd, select.POLLOUT)

    def write(self, text: str) -> None:
        """Add `text` (whole lines) to the backlog, or count its lines as dropped."""
        if self.failure is not None:
            return
        if self._fd is None:
            try:
                self._stream.write(text)
            except OSError as exc:
                self._fail(exc)
            return
        data = text.encode(self._encoding, "replace")
        if len(self._backlog) + len(data) > BACKLOG_LIMIT:
            self._dropped += text.count("\n")
            return
        self._backlog += data

    def push(self, timeout: float = 0.0) -> None:
        """Write the backlog as far as the reader takes it, waiting up to `timeout` seconds."""
        if self._fd is None:
            if self.failure is None:
                self._flush_stream()
            return
        if self._pushing:
            # A signal handler's flush while the main thread is in `_push`: that push, or
            # the next, writes what the handler added; a second writer would repeat or lose
            # bytes.
            return
        self._pushing = True
        try:
            self._push(self._fd, timeout)
        finally:
            self._pushing = False

    def _push(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._backlog and self.failure is None:
            wait_ms = max(0, round((deadline - time.monotonic()) * 1000))
            if not self._poll.poll(wait_ms):
                return
            try:
                written = os.write(fd, self._backlog[:_CHUNK])
            except BlockingIOError:  # a descriptor someone else made non-blocking
                return
            except OSError as exc:
                self._fail(exc)
                return
            del self._backlog[:written]

    def take_dropped(self) -> int:
        """Lines dropped so far, once the reader has caught up (else 0); resets the count."""
        if self._backlog or self.failure is not None:
            return 0
        dropped, self._dropped = self._dropped, 0
        return dropped

    def _flush_stream(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failure = exc.strerror or str(exc)
        self._backlog.clear()
