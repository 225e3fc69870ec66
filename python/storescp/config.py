"""Server configuration and the validation of every option.

`ServerConfig` is the single, immutable description of a server: the CLI builds one from its
arguments, the Python API takes one directly, and both get the same checks because the
dataclass validates itself. Every check raises `ConfigError` whose message is the exact text
the CLI prints after ``Error: `` (SPEC.md section 1).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Final, Literal

Naming = Literal["hierarchical", "date", "flat"]
DuplicatePolicy = Literal["reject", "replace", "ignore"]

NAMING_SCHEMES: Final[tuple[Naming, ...]] = ("hierarchical", "date", "flat")
DUPLICATE_POLICIES: Final[tuple[DuplicatePolicy, ...]] = ("reject", "replace", "ignore")

AE_TITLE_MAX: Final = 16
MAX_ASSOC_LIMIT: Final = 10_000
# Keeps every timeout representable by the core's Duration arithmetic (about 11.5 days).
TIMEOUT_LIMIT: Final = 1_000_000.0
# PS3.8 9.3.1: the receive maximum we advertise. The floor keeps a P-DATA-TF able to carry a
# command set; the ceiling bounds the one buffer the core allocates per association.
MAX_PDU_MIN: Final = 4096
MAX_PDU_MAX: Final = 16 * 1024 * 1024
DEFAULT_MAX_PDU: Final = 262_144
DEFAULT_PORT: Final = 11112

# PS3.5 9.1: a UID is at most 64 characters of digit components separated by dots.
_UID_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX: Final = 64


class ConfigError(ValueError):
    """An invalid option; ``str(error)`` is the message the CLI prints after ``Error: ``."""


def is_valid_uid(text: str) -> bool:
    """Tell whether `text` is a well-formed UID.

    Returns:
        True when `text` is 1..64 characters of non-empty digit components separated by single
        dots (no leading or trailing dot). No padding is tolerated.
    """
    return len(text) <= _UID_MAX and _UID_RE.fullmatch(text) is not None


def parse_port(text: str) -> int:
    """Parse the `port` argument of the CLI.

    Returns:
        The port, guaranteed to be in 1..65535.

    Raises:
        ConfigError: "Invalid port number 'x'" when `text` is not an integer, "Port must be
            between 1 and 65535" when it is out of range.
    """
    try:
        port = int(text.strip(), 10)
    except ValueError:
        raise ConfigError(f"Invalid port number '{text}'") from None
    if not 1 <= port <= 65535:
        raise ConfigError("Port must be between 1 and 65535")
    return port


def validate_ae_title(title: str, what: str = "AE title") -> str:
    """Check an AE title against PS3.5 6.2 (AE value representation).

    Leading and trailing spaces are not significant in an AE title, so they are removed.

    Args:
        title: The title as typed.
        what: How the message names the value (e.g. "calling AE title").

    Returns:
        The title without leading and trailing spaces: 1..16 printable ASCII characters, no
        backslash.

    Raises:
        ConfigError: Naming the reason (empty, too long, or the offending character).
    """
    stripped = title.strip(" ")
    if not stripped:
        raise ConfigError(f"{what} must not be empty")
    if len(stripped) > AE_TITLE_MAX:
        raise ConfigError(f"{what} exceeds {AE_TITLE_MAX} characters")
    for char in stripped:
        if char == "\\":
            raise ConfigError(f"{what} must not contain a backslash")
        if not " " <= char <= "~":
            raise ConfigError(
                f"{what} contains an invalid character {char!r} (only printable ASCII is allowed)"
            )
    return stripped


def parse_naming(text: str) -> Naming:
    """Parse ``--naming``.

    Raises:
        ConfigError: "Unknown naming scheme 'x' (expected hierarchical, date or flat)".
    """
    for scheme in NAMING_SCHEMES:
        if text == scheme:
            return scheme
    raise ConfigError(f"Unknown naming scheme '{text}' (expected hierarchical, date or flat)")


def parse_duplicate(text: str) -> DuplicatePolicy:
    """Parse ``--duplicate``.

    Raises:
        ConfigError: "Unknown duplicate policy 'x' (expected reject, replace or ignore)".
    """
    for policy in DUPLICATE_POLICIES:
        if text == policy:
            return policy
    raise ConfigError(f"Unknown duplicate policy '{text}' (expected reject, replace or ignore)")


def parse_max_assoc(text: str) -> int:
    """Parse ``--max-assoc``.

    Returns:
        An integer in 1..MAX_ASSOC_LIMIT.

    Raises:
        ConfigError: "Invalid max-assoc value 'x'", "max-assoc must be positive" or
            "max-assoc must be at most 10000".
    """
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ConfigError(f"Invalid max-assoc value '{text}'") from None
    check_max_assoc(value)
    return value


def check_max_assoc(value: int) -> None:
    """Raise `ConfigError` unless 1 <= `value` <= MAX_ASSOC_LIMIT."""
    if value < 1:
        raise ConfigError("max-assoc must be positive")
    if value > MAX_ASSOC_LIMIT:
        raise ConfigError(f"max-assoc must be at most {MAX_ASSOC_LIMIT}")


def parse_seconds(text: str, option: str) -> float:
    """Parse a duration option given in seconds (``--timeout``, ``--artim-timeout``).

    Fractions are allowed (``0.5``). Whether 0 is allowed is the caller's business.

    Returns:
        A finite number of seconds in 0..TIMEOUT_LIMIT.

    Raises:
        ConfigError: "Invalid timeout value 'x'", "timeout cannot be negative" or
            "timeout must be at most 1000000 seconds" (with `option` as the name).
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"Invalid {option} value '{text}'") from None
    check_seconds(value, option)
    return value


def check_seconds(value: float, option: str) -> None:
    """Raise `ConfigError` unless `value` is a finite number of seconds in 0..TIMEOUT_LIMIT."""
    if math.isnan(value):
        raise ConfigError(f"Invalid {option} value '{value}'")
    if value < 0:
        raise ConfigError(f"{option} cannot be negative")
    if value > TIMEOUT_LIMIT:
        raise ConfigError(f"{option} must be at most {TIMEOUT_LIMIT:.0f} seconds")


def parse_max_pdu(text: str) -> int:
    """Parse ``--max-pdu`` (bytes).

    Returns:
        An integer in MAX_PDU_MIN..MAX_PDU_MAX.

    Raises:
        ConfigError: "Invalid max-pdu value 'x'" or "max-pdu must be between 4096 and
            16777216".
    """
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ConfigError(f"Invalid max-pdu value '{text}'") from None
    check_max_pdu(value)
    return value


def check_max_pdu(value: int) -> None:
    """Raise `ConfigError` unless MAX_PDU_MIN <= `value` <= MAX_PDU_MAX."""
    if not MAX_PDU_MIN <= value <= MAX_PDU_MAX:
        raise ConfigError(f"max-pdu must be between {MAX_PDU_MIN} and {MAX_PDU_MAX}")


def validate_bind(address: str) -> str:
    """Check ``--bind``: an IPv4 or IPv6 literal (``0.0.0.0``, ``::``, ``127.0.0.1``).

    Host names are refused on purpose: a listener bound to whatever a resolver returned is
    a surprise in a server that peers reach by address.

    Returns:
        The canonical text of the address (IPv6 compressed, no brackets).

    Raises:
        ConfigError: "Invalid bind address 'x' (expected an IPv4 or IPv6 address)".
    """
    try:
        return str(ipaddress.ip_address(address.strip().removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ConfigError(
            f"Invalid bind address '{address}' (expected an IPv4 or IPv6 address)"
        ) from None


def parse_allowed_calling(entry: str) -> str:
    """Check one ``--allow-calling`` entry: ``AE`` or ``AE@HOST`` where HOST is an IP address.

    The last ``@`` separates the host, so an AE title containing ``@`` must be followed by a
    host.

    Returns:
        The entry normalized: AE title without padding spaces, host as canonical IP text.

    Raises:
        ConfigError: The AE title's reason, or "Invalid host 'x' in --allow-calling 'AE@x'
            (expected an IP address)".
    """
    title, sep, host = entry.rpartition("@")
    if not sep:
        return validate_ae_title(entry, "calling AE title")
    try:
        address = str(ipaddress.ip_address(host.strip().removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ConfigError(
            f"Invalid host '{host}' in --allow-calling '{entry}' (expected an IP address)"
        ) from None
    return f"{validate_ae_title(title, 'calling AE title')}@{address}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs, validated on construction.

    Attributes:
        ae_title: This server's AE title (1..16 characters, PS3.5 AE); padding spaces are
            removed.
        storage_dir: Root of the store; created at start if missing.
        port: TCP port; 0 asks the system for a free one (the API and tests; the CLI demands
            1..65535).
        bind: IP address to listen on; ``0.0.0.0`` for all IPv4 interfaces, ``::`` for IPv6.
        index_db: Path of the SQLite index, or None for no index.
        accepted_sop_classes: Storage SOP Class UIDs to accept, or None for every standard
            Storage SOP Class (see `storescp.policy`). Verification is always accepted and
            must not be listed.
        naming: File layout under `storage_dir`.
        duplicate: What to do with a SOP Instance UID that is already stored.
        max_assoc: Concurrent associations; one more is rejected (2/3/2).
        idle_timeout: Seconds an association may stay idle before it is aborted; 0 disables.
        artim_timeout: Seconds a new connection has to send its A-ASSOCIATE-RQ (capped by a
            shorter non-zero `idle_timeout`).
        max_pdu: Maximum PDU length advertised and accepted, in bytes.
        fsync: Make each file and its directory durable before answering success.
        require_called_ae: Reject (1/1/7) an association whose called AE is not `ae_title`.
        allowed_calling: Calling AE titles allowed (``AE`` or ``AE@IP``); empty allows all.
        quiet: Do not log successful C-STOREs and C-ECHOs.

    Raises:
        ConfigError: From construction, when any field is invalid.
    """

    ae_title: str
    storage_dir: str
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    index_db: str | None = None
    accepted_sop_classes: tuple[str, ...] | None = None
    naming: Naming = "hierarchical"
    duplicate: DuplicatePolicy = "reject"
    max_assoc: int = 10
    idle_timeout: float = 300.0
    artim_timeout: float = 30.0
    max_pdu: int = DEFAULT_MAX_PDU
    fsync: bool = True
    require_called_ae: bool = False
    allowed_calling: tuple[str, ...] = ()
    quiet: bool = False

    def __post_init__(self) -> None:
        # The dataclass is frozen; normalized values are written once, here, before anyone
        # can observe the instance.
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title))
        object.__setattr__(self, "bind", validate_bind(self.bind))
        object.__setattr__(
            self, "allowed_calling", tuple(parse_allowed_calling(e) for e in self.allowed_calling)
        )
        if self.accepted_sop_classes is not None:
            object.__setattr__(self, "accepted_sop_classes", tuple(self.accepted_sop_classes))
        self._check()

    def _check(self) -> None:
        if not self.storage_dir:
            raise ConfigError("--storage-dir is required")
        if self.index_db is not None and not self.index_db:
            raise ConfigError("--index-db must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError("Port must be between 0 and 65535")
        parse_naming(self.naming)
        parse_duplicate(self.duplicate)
        check_max_assoc(self.max_assoc)
        check_seconds(self.idle_timeout, "timeout")
        check_seconds(self.artim_timeout, "artim-timeout")
        if self.artim_timeout == 0:
            raise ConfigError("artim-timeout must be positive")
        check_max_pdu(self.max_pdu)
        self._check_sop_classes()

    def _check_sop_classes(self) -> None:
        if self.accepted_sop_classes is None:
            return
        if not self.accepted_sop_classes:
            raise ConfigError("--accept selects no storage SOP class")
        for uid in self.accepted_sop_classes:
            if not is_valid_uid(uid):
                raise ConfigError(f"Invalid SOP Class UID '{uid}'")

    @property
    def effective_artim_timeout(self) -> float:
        """Seconds a new connection has to send its A-ASSOCIATE-RQ.

        SPEC.md section 3: the ARTIM timeout, or the idle timeout when that is shorter and
        enabled.
        """
        if self.idle_timeout > 0:
            return min(self.artim_timeout, self.idle_timeout)
        return self.artim_timeout
