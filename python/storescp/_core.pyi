"""Typed surface of the Rust core (rust/src/lib.rs). Checked by mypy.stubtest."""

from typing import Final

IMPLEMENTATION_CLASS_UID: Final[str]
IMPLEMENTATION_VERSION_NAME: Final[str]
MAX_PDU_LENGTH: Final[int]

class CoreConfig:
    """Everything the core needs, decided once by Python at start.

    naming: "hierarchical" | "date" | "flat".
    duplicate: "reject" | "replace" | "ignore".
    accepted_sop_classes: abstract syntaxes accepted besides Verification.
    transfer_syntaxes: transfer syntaxes accepted; within one presentation context the
        first one the requestor proposes that is in this list is chosen (data sets are
        stored as received, so the sender's preference wins).
    idle_timeout: seconds, 0 disables. artim_timeout: seconds until the A-ASSOCIATE-RQ.
    called_ae_check: reject (1/1/7) an association whose called AE is not ae_title.
    allowed_calling: calling AE titles allowed, each optionally "AE@host"; empty allows all.
    journal: write the store journal and wait for ack() before answering success
        (set when an index is in use).
    report_stored: queue an event for every successful C-STORE; when False only
        failures, duplicates and association events are reported (nothing logs them).
    """

    def __init__(
        self,
        *,
        ae_title: str,
        storage_dir: str,
        bind: str = "0.0.0.0",
        port: int = 11112,
        naming: str = "hierarchical",
        duplicate: str = "reject",
        accepted_sop_classes: list[str],
        transfer_syntaxes: list[str],
        max_assoc: int = 10,
        idle_timeout: float = 300.0,
        artim_timeout: float = 30.0,
        max_pdu: int = 262144,
        fsync: bool = True,
        called_ae_check: bool = False,
        allowed_calling: list[str] | None = None,
        journal: bool = False,
        report_stored: bool = True,
    ) -> None: ...

class Event:
    """One fact reported by the core. `kind` says which fields are meaningful.

    kinds: "assoc_accepted", "assoc_rejected", "assoc_released", "assoc_aborted",
    "echo", "store", "error".
    For "store", `outcome` is one of "stored", "replaced", "duplicate", "ignored",
    "refused", "failed"; `status` is the DIMSE status sent (or about to be sent);
    `ack_token` is non-zero when the core waits for ack() before answering;
    `journal_offset` is then a watermark of `journal`: every line before it belongs to
    an event queued earlier (or to a commit that was abandoned).
    """

    kind: str
    assoc_id: int
    peer: str
    calling_ae: str
    called_ae: str
    reason: str
    status: int
    outcome: str
    error_comment: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    modality: str
    study_date: str
    study_description: str
    transfer_syntax: str
    path: str
    replaced_path: str
    file_size: int
    data_set_bytes: int
    journal: str
    journal_offset: int
    ack_token: int

class Server:
    def __init__(self, config: CoreConfig) -> None: ...
    def start(self) -> int:
        """Bind and start accepting; returns the bound port.

        Raises OSError(errno, strerror, filename): filename is the storage directory when
        that could not be prepared, absent when the address could not be bound.
        """
    @property
    def port(self) -> int: ...
    def next_events(self, timeout: float, max_events: int = 4096) -> list[Event] | None:
        """Wait up to timeout for events (GIL released). None once stopped and drained."""
    def ack(self, upto_token: int, ok: bool = True) -> None:
        """Acknowledge every store event with ack_token <= upto_token (index committed)."""
    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting; in-flight C-STOREs may finish within drain_timeout, then abort.

        Returns at once (safe from a signal handler); next_events() ends with None.
        """
    def stats(self) -> dict[str, int]:
        """Counters: associations, rejected_associations, messages, images_received,
        bytes_received, instances_stored, stored_bytes, duplicates, failures."""

def relative_path(
    naming: str, study_uid: str, series_uid: str, sop_uid: str, study_date: str, today: str
) -> str:
    """The file's path under the storage root (validating every UID); raises ValueError."""

def sweep_temporaries(storage_dir: str) -> int:
    """Remove temporary files of dead processes under storage_dir; returns how many."""

# The per-instance hot paths on bytes, for the micro benchmarks (benchmarks/test_micro.py).

def frame_pdus(stream: bytes, max_pdu: int) -> int:
    """Frame every PDU of stream as an association's reader does; returns how many.
    Raises ValueError for an invalid header or a truncated last PDU."""

def split_p_data(stream: bytes) -> tuple[bytes, int, int]:
    """Walk the PDV items of every P-DATA-TF of stream: (command set, data set fragments,
    data set bytes). Raises ValueError for malformed items."""

def sniff_data_set(data_set: bytes, transfer_syntax: str, fragment: int) -> list[tuple[str, str]]:
    """The attributes an association finds in data_set, fed fragment bytes at a time and
    its element framing walked to the end, as (keyword, value). Raises ValueError when it
    cannot be parsed or does not end after a whole element."""

def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """The preamble, "DICM" and group 0002 written in front of a stored data set."""
