"""The Python API of the server: start the core, drain its events, index, log, stop.

A `StorageSCP` owns one `_core.Server`. The core does the networking and the writing on its
own threads; Python runs a single event loop (`serve_forever`) that receives the core's facts
in batches, commits them to the index in one transaction per batch, acknowledges them so the
core can answer success, and logs them.

Example::

    config = ServerConfig(ae_title="MY_PACS", storage_dir="./received", port=0)
    with StorageSCP(config) as scp:
        scp.run_in_thread()
        print("listening on", scp.port)
        ...
    # leaving the block stops the server, drains it, and closes the index
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final

from storescp import policy
from storescp.config import ServerConfig
from storescp.console import Console

if TYPE_CHECKING:
    from storescp import _core
    from storescp.index import Index

# How long one wait for events lasts: short enough for signals to land promptly (their
# handlers run between two waits) and for a stop to be noticed.
_POLL_SECONDS: Final = 0.2
# How far the log on stdout may lag behind the events it reports. One flush per batch would
# cost a write(2) per C-STORE or two on a busy receiver; waiting this long costs none.
_LOG_LAG_SECONDS: Final = 0.05
DEFAULT_DRAIN_SECONDS: Final = 10.0


class StartError(RuntimeError):
    """The server could not start; ``str(error)`` is one line naming the cause."""


@dataclass(frozen=True)
class Statistics:
    """Counters kept while running (never a rescan of the storage tree).

    Attributes:
        associations: Associations accepted.
        rejected_associations: Associations rejected (A-ASSOCIATE-RJ).
        messages: DIMSE requests processed.
        images_received: C-STOREs whose data set arrived whole, whatever their outcome.
        bytes_received: Data set bytes of those C-STOREs.
        uptime: Seconds from start to the end of the event loop (or to now while running).
        instances_stored: Files written, replacements included.
        stored_bytes: Size of those files.
        duplicates: C-STOREs of an already stored SOP Instance UID.
        failures: C-STOREs answered with a failure status.
    """

    associations: int
    rejected_associations: int
    messages: int
    images_received: int
    bytes_received: int
    uptime: float
    instances_stored: int
    stored_bytes: int
    duplicates: int
    failures: int

    @classmethod
    def from_counters(cls, counters: Mapping[str, int], uptime: float) -> Statistics:
        """Build from the core's `Server.stats()` dictionary and an uptime in seconds."""
        return cls(
            associations=counters["associations"],
            rejected_associations=counters["rejected_associations"],
            messages=counters["messages"],
            images_received=counters["images_received"],
            bytes_received=counters["bytes_received"],
            uptime=uptime,
            instances_stored=counters["instances_stored"],
            stored_bytes=counters["stored_bytes"],
            duplicates=counters["duplicates"],
            failures=counters["failures"],
        )


class StorageSCP:
    """A DICOM Storage SCP: the core's listener plus the Python event loop.

    Lifecycle: `start()` (binds), `serve_forever()` (runs until stopped), `stop()` (from any
    thread or a signal handler), then `stats()`. `run_in_thread()` runs the loop in a daemon
    thread; the context manager starts on entry and stops, drains and waits on exit.

    Args:
        config: The validated configuration.
        console: Where logs go; by default stdout/stderr, quiet as `config.quiet` says.
    """

    def __init__(self, config: ServerConfig, console: Console | None = None) -> None:
        self.config = config
        self._console = console if console is not None else Console(quiet=config.quiet)
        self._server: _core.Server | None = None
        self._index: Index | None = None
        self._started_at = 0.0
        self._ended_at: float | None = None
        # Re-entrant: a signal handler calling stop() may interrupt the main thread while it
        # holds the lock inside stop() or start().
        self._lock = threading.RLock()
        self._stop_drain: float | None = None
        self._loop_started = False
        self._loop_done = threading.Event()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> int:
        """Prepare the storage directory and the index, then bind and start accepting.

        In order: the storage directory is created if missing and checked writable;
        temporary files of dead processes are removed; with an index, it is opened and
        reconciled with the files; the core is configured and bound.

        Returns:
            The bound TCP port (useful with port 0).

        Raises:
            StartError: Storage directory unusable, index unopenable, or the address cannot
                be bound; nothing is left running.
            RuntimeError: When called twice.
        """
        with self._lock:
            try:
                return self._start()
            finally:
                # The lines start queued reach the operator, also when it failed.
                self._console.flush()

    def _start(self) -> int:
        if self._server is not None:
            raise RuntimeError("StorageSCP.start() was already called")
        storage_dir = self.config.storage_dir
        if _prepare_storage_dir(storage_dir):
            self._console.print(f"Created storage directory: {storage_dir}")
        # Imported here so that argument errors and storage-dir errors are reported
        # without loading the extension.
        from storescp import _core

        try:
            removed = _core.sweep_temporaries(storage_dir)
        except OSError as exc:
            raise StartError(
                f"cannot remove temporary files in {storage_dir}: {_reason(exc)}"
            ) from exc
        if removed:
            self._console.log(f"Removed {removed} temporary file(s) left by a stopped run")
        self._index = self._open_index()
        try:
            self._server = self._start_core()
        except BaseException:
            self._close_index()
            raise
        self._started_at = time.monotonic()
        if self._stop_drain is not None:
            # stop() was called (a signal) while starting: honour it now.
            self._server.shutdown(self._stop_drain)
        return self._server.port

    def _open_index(self) -> Index | None:
        db_path = self.config.index_db
        if db_path is None:
            return None
        # Imported only when an index is asked for: sqlite3 and the schema code stay unloaded
        # otherwise.
        from storescp.index import Index, IndexOpenError

        try:
            # The core fsyncs its journal before success: the index need not fsync too.
            index = Index.open(
                db_path,
                self.config.storage_dir,
                durable=False,
                background_checkpoints=True,
            )
        except IndexOpenError as exc:
            raise StartError(f"cannot open index database {db_path}: {exc}") from exc
        try:
            report = index.reconcile()
        except Exception as exc:
            index.close()
            raise StartError(f"cannot reconcile index database {db_path}: {exc}") from exc
        self._console.log(f"Index {db_path}: {report}")
        return index

    def _start_core(self) -> _core.Server:
        from storescp import _core

        server = _core.Server(self._core_config())
        try:
            server.start()
        except OSError as exc:
            if exc.filename:
                raise StartError(
                    f"storage directory {exc.filename} is unusable: {_reason(exc)}"
                ) from exc
            where = _host_port(self.config.bind, self.config.port)
            raise StartError(f"cannot listen on {where}: {_reason(exc)}") from exc
        return server

    def _core_config(self) -> _core.CoreConfig:
        """The one flat configuration the core gets: every policy decided here, as data."""
        from storescp import _core

        config = self.config
        try:
            return _core.CoreConfig(
                ae_title=config.ae_title,
                storage_dir=config.storage_dir,
                bind=config.bind,
                port=config.port,
                naming=config.naming,
                duplicate=config.duplicate,
                accepted_sop_classes=list(policy.accepted_sop_classes(config.accepted_sop_classes)),
                transfer_syntaxes=list(policy.TRANSFER_SYNTAXES),
                max_assoc=config.max_assoc,
                idle_timeout=config.idle_timeout,
                artim_timeout=config.effective_artim_timeout,
                max_pdu=config.max_pdu,
                fsync=config.fsync,
                called_ae_check=config.require_called_ae,
                allowed_calling=list(config.allowed_calling),
                journal=self._index is not None,
                # Quiet and unindexed: successful C-STOREs concern nobody in Python.
                report_stored=not config.quiet or self._index is not None,
            )
        except ValueError as exc:  # ServerConfig checks more than the core: a bug if reached
            raise StartError(f"the core refused the configuration: {exc}") from exc

    # -- run ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: Before `start()`.
        """
        return self._require_server().port

    def serve_forever(self) -> None:
        """Run the event loop until the server is stopped and every event is handled.

        Each batch of events is recorded in the index (one transaction), acknowledged to the
        core (which only then answers success to the waiting C-STOREs), and logged. If the
        index fails, the batch is acknowledged as failed, the error is logged, and the loop
        goes on. On return the index is closed and the uptime frozen.

        If the loop itself is interrupted (an exception, e.g. KeyboardInterrupt), the core is
        shut down without drain, since nobody would acknowledge its C-STOREs any more, and
        the exception propagates.

        Raises:
            RuntimeError: Before `start()`, or when a loop is already running.
        """
        server = self._require_server()
        with self._lock:
            if self._loop_started:
                raise RuntimeError("serve_forever() already ran or is running")
            self._loop_started = True
        drained = False
        unflushed_since: float | None = None  # when the oldest unflushed batch was logged
        try:
            while (batch := server.next_events(_wait(unflushed_since))) is not None:
                if batch:
                    self._handle(server, batch)
                    if unflushed_since is None:
                        unflushed_since = time.monotonic()
                if unflushed_since is not None and (
                    not batch or time.monotonic() - unflushed_since >= _LOG_LAG_SECONDS
                ):
                    self._console.flush()
                    unflushed_since = None
            drained = True
        finally:
            if not drained:
                server.shutdown(0.0)
            self._ended_at = time.monotonic()
            self._close_index()
            self._console.flush()
            self._loop_done.set()

    def _handle(self, server: _core.Server, batch: Sequence[_core.Event]) -> None:
        index_failed = not self._record(batch)
        token = max(event.ack_token for event in batch)
        if token > 0:
            server.ack(token, ok=not index_failed)
        self._console.events(batch, index_failed=index_failed)

    def _record(self, batch: Sequence[_core.Event]) -> bool:
        """Commit the batch's C-STOREs to the index; False when that failed."""
        if self._index is None or not any(event.kind == "store" for event in batch):
            return True
        try:
            self._index.record(batch)
        except Exception as exc:  # whatever broke, the server goes on and the peer is told
            self._console.error(f"index update failed: {exc}")
            return False
        return True

    def run_in_thread(self) -> threading.Thread:
        """Start the server if needed and run `serve_forever()` in a daemon thread.

        Returns:
            The started thread; it ends once the server is stopped and drained.
        """
        if self._server is None:
            self.start()
        thread = threading.Thread(target=self.serve_forever, name="storescp-events", daemon=True)
        thread.start()
        return thread

    # -- stop --------------------------------------------------------------------------------

    def stop(self, drain_timeout: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Ask the server to stop; returns at once, so it may be called from a signal handler.

        The core stops accepting, lets in-flight C-STOREs finish within `drain_timeout`
        seconds, then aborts what remains; `serve_forever()` keeps acknowledging the draining
        C-STOREs and returns once the last events are handled. Calls after the first are
        ignored; a call before `start()` has finished makes the server stop as soon as it has
        started.
        """
        with self._lock:
            if self._stop_drain is not None:
                return
            self._stop_drain = drain_timeout
            if self._server is not None:
                self._server.shutdown(drain_timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for `serve_forever()` to return.

        Returns:
            True if it returned, False if `timeout` seconds passed first.
        """
        return self._loop_done.wait(timeout)

    def close(self, drain_timeout: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Stop, drain, and wait until the event loop has finished and the index is closed.

        If no event loop ever ran, the remaining events are handled here.
        """
        if self._server is None:
            self._close_index()
            return
        self.stop(drain_timeout)
        with self._lock:
            run_here = not self._loop_started
        if run_here:
            self.serve_forever()
        else:
            self._loop_done.wait()

    def __enter__(self) -> StorageSCP:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- report ------------------------------------------------------------------------------

    def stats(self) -> Statistics:
        """The counters of the core and the uptime.

        Raises:
            RuntimeError: Before `start()`.
        """
        server = self._require_server()
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        return Statistics.from_counters(server.stats(), end - self._started_at)

    def _require_server(self) -> _core.Server:
        if self._server is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._server

    def _close_index(self) -> None:
        index, self._index = self._index, None
        if index is not None:
            index.close()


def _wait(unflushed_since: float | None) -> float:
    """How long the event loop may wait for the next batch before the log is due."""
    if unflushed_since is None:
        return _POLL_SECONDS
    return max(0.0, unflushed_since + _LOG_LAG_SECONDS - time.monotonic())


def _prepare_storage_dir(path: str) -> bool:
    """Create `path` if missing and prove it writable.

    Returns:
        True when the directory was created.

    Raises:
        StartError: Not a directory, not creatable, or not writable.
    """
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise StartError(f"storage directory {path} exists and is not a directory") from None
    except OSError as exc:
        raise StartError(f"cannot create storage directory {path}: {_reason(exc)}") from exc
    # Permission bits do not tell the whole story (read-only mounts, ACLs, root): try it.
    try:
        handle, probe = tempfile.mkstemp(prefix=".storescp-probe-", dir=path)
    except OSError as exc:
        raise StartError(f"storage directory {path} is not writable: {_reason(exc)}") from exc
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return not existed


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
