"""WAL checkpoints on a thread of their own, off the path that answers C-STOREs.

In WAL mode SQLite copies the log back into the database ("checkpoint") from within the
commit that makes the log pass 1,000 pages, and with synchronous=NORMAL that checkpoint
fsyncs both files. The server's commits run while senders wait for their C-STORE-RSP, so
every 150-odd batches all associations would stall behind two device flushes. Here the
committing connection never checkpoints; a `Checkpointer` runs PASSIVE checkpoints from
its own connection instead, which never block writers (SQLite: a checkpoint runs
concurrently with readers and writers).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Final

# How often the log is copied back. At the server's highest commit rates the log grows
# by a few MB in that time; a checkpoint with nothing to copy costs a few microseconds.
INTERVAL_SECONDS: Final = 0.5


class Checkpointer:
    """Runs PASSIVE checkpoints of one database every `interval` seconds until closed.

    A checkpoint that fails (the database busy or gone) is retried at the next interval;
    the last connection to close checkpoints whatever is left.
    """

    def __init__(self, db_path: Path, *, interval: float = INTERVAL_SECONDS) -> None:
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="storescp-index-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                # sqlite3 releases the GIL while SQLite copies and fsyncs.
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                continue

    def close(self) -> None:
        """Stops the thread (waiting for a checkpoint under way) and closes its connection."""
        self._stop.set()
        self._thread.join()
        self._conn.close()
