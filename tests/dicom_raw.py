"""A tiny, self-contained DICOM upper-layer client for tests (PS3.8 PDUs, PS3.7 commands).

Only the standard library is used. Everything is built by hand so that tests can send what
a well-behaved library never would: a C-STORE whose command and data set disagree, UIDs with
slashes or `..`, truncated or oversize PDUs, unknown PDU types, data on contexts that were
not accepted, and so on.

Building blocks (all return `bytes`):

- `element(tag, value, vr=..., explicit=..., little=...)`: one data element; `data_set(...)`
  concatenates them in tag order.
- `command_set(fields)`: a DIMSE command set (always implicit VR little endian, with its
  group length); `c_store_rq(...)`, `c_echo_rq(...)` build the usual ones.
- `associate_rq(...)`, `pdata_tf(...)`, `release_rq()`, `release_rp()`, `abort_pdu(...)`,
  `pdu(type, body)`: whole PDUs.

Parsing: `read_pdu(sock)` returns one `(type, body)`; `parse_associate_ac`,
`parse_associate_rj`, `parse_abort`, `parse_pdata` and `parse_command_set` decode them.

`RawAssociation` puts it together: connect, negotiate, send C-STOREs / C-ECHOs (command and
data set fragmented to the peer's maximum PDU length unless told otherwise), read responses,
release or abort. Every read has a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7.99"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# Command fields (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000

# Command set tags.
TAG_GROUP_LENGTH = 0x00000000
TAG_AFFECTED_SOP_CLASS = 0x00000002
TAG_COMMAND_FIELD = 0x00000100
TAG_MESSAGE_ID = 0x00000110
TAG_MESSAGE_ID_RESPONDED = 0x00000120
TAG_PRIORITY = 0x00000700
TAG_DATA_SET_TYPE = 0x00000800
TAG_STATUS = 0x00000900
TAG_ERROR_COMMENT = 0x00000902
TAG_AFFECTED_SOP_INSTANCE = 0x00001000

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_UID_VRS = frozenset({"UI"})


def pad(value: bytes, vr: str = "UI") -> bytes:
    """Pads a value to even length: NUL for UIDs and binary VRs, space for text."""
    if len(value) % 2 == 0:
        return value
    filler = b"\0" if vr in _UID_VRS or vr in _LONG_VRS - {"UC", "UR", "UT"} else b" "
    return value + filler


def element(
    tag: int,
    value: bytes | str,
    vr: str = "UI",
    *,
    explicit: bool = False,
    little: bool = True,
    length: int | None = None,
) -> bytes:
    """One data element. `value` is padded to even length; `length` overrides the encoded
    length (to forge elements whose length overruns the data)."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    raw = pad(raw, vr)
    size = len(raw) if length is None else length
    order = "<" if little else ">"
    header = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return header + struct.pack(order + "I", size) + raw
    if vr in _LONG_VRS:
        return header + vr.encode() + b"\0\0" + struct.pack(order + "I", size) + raw
    return header + vr.encode() + struct.pack(order + "H", size) + raw


def data_set(
    elements: Mapping[int, tuple[str, bytes | str]], *, explicit: bool = False, little: bool = True
) -> bytes:
    """A data set from {tag: (vr, value)}, written in ascending tag order."""
    return b"".join(
        element(tag, value, vr, explicit=explicit, little=little)
        for tag, (vr, value) in sorted(elements.items())
    )


def us(value: int) -> bytes:
    """An unsigned short, little endian (command sets are always little endian)."""
    return struct.pack("<H", value)


def command_set(fields: Mapping[int, bytes | str]) -> bytes:
    """A command set (implicit VR little endian) with its (0000,0000) group length.

    `fields` maps tags to already encoded values (use `us()` for US) or strings (UIDs, AE
    titles, text), which are padded as UIDs when the tag is a UID tag, else with spaces."""
    uid_tags = {TAG_AFFECTED_SOP_CLASS, TAG_AFFECTED_SOP_INSTANCE}
    body = b""
    for tag in sorted(fields):
        if tag == TAG_GROUP_LENGTH:
            continue
        value = fields[tag]
        vr = "UI" if tag in uid_tags else ("US" if isinstance(value, bytes) else "LO")
        body += element(tag, value, vr)
    return element(TAG_GROUP_LENGTH, struct.pack("<I", len(body)), "UL") + body


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    priority: int = 0,
    extra: Mapping[int, bytes | str] | None = None,
) -> bytes:
    """A C-STORE-RQ command set announcing a data set."""
    fields: dict[int, bytes | str] = {
        TAG_AFFECTED_SOP_CLASS: sop_class_uid,
        TAG_COMMAND_FIELD: us(C_STORE_RQ),
        TAG_MESSAGE_ID: us(message_id),
        TAG_PRIORITY: us(priority),
        TAG_DATA_SET_TYPE: us(DATA_SET_PRESENT),
        TAG_AFFECTED_SOP_INSTANCE: sop_instance_uid,
    }
    fields.update(extra or {})
    return command_set(fields)


def c_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set."""
    return command_set(
        {
            TAG_AFFECTED_SOP_CLASS: VERIFICATION,
            TAG_COMMAND_FIELD: us(C_ECHO_RQ),
            TAG_MESSAGE_ID: us(message_id),
            TAG_DATA_SET_TYPE: us(NO_DATA_SET),
        }
    )


def parse_command_set(raw: bytes) -> dict[int, bytes]:
    """{tag: raw value} of an implicit VR little endian command set (padding kept)."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(raw):
        group, elem, size = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        fields[(group << 16) | elem] = raw[offset : offset + size]
        offset += size
    return fields


def text(value: bytes) -> str:
    """A string value with its NUL/space padding removed."""
    return value.decode("ascii", errors="replace").rstrip("\0 ")


# -- PDUs ------------------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU header and body; `length` overrides the encoded PDU length."""
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def ae_field(title: str) -> bytes:
    """A 16-byte space-padded AE title field."""
    return title.encode("ascii")[:16].ljust(16, b" ")


@dataclass
class Context:
    """A proposed presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: Sequence[str] = (IMPLICIT_LE,)


def associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Iterable[Context],
    *,
    max_pdu: int = 16384,
    application_context: str = APPLICATION_CONTEXT,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (protocol version 1)."""
    body = struct.pack(">HH", 1, 0) + ae_field(called_ae) + ae_field(calling_ae) + bytes(32)
    body += _item(0x10, application_context.encode())
    for ctx in contexts:
        sub = _item(0x30, ctx.abstract_syntax.encode())
        sub += b"".join(_item(0x40, ts.encode()) for ts in ctx.transfer_syntaxes)
        body += _item(0x20, bytes([ctx.context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, implementation_class_uid.encode())
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def pdv(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    """One presentation data value item (length, context id, control header, data)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def pdata_tf(context_id: int, data: bytes, *, command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF PDU carrying one PDV."""
    return pdu(P_DATA_TF, pdv(context_id, data, command=command, last=last))


def fragments(context_id: int, data: bytes, *, command: bool, max_pdu: int) -> list[bytes]:
    """`data` as P-DATA-TF PDUs whose length fits `max_pdu` (0: unlimited)."""
    room = len(data) if max_pdu == 0 else max(1, max_pdu - 6)
    chunks = [data[i : i + room] for i in range(0, len(data), room)] or [b""]
    return [
        pdata_tf(context_id, chunk, command=command, last=i == len(chunks) - 1)
        for i, chunk in enumerate(chunks)
    ]


def release_rq() -> bytes:
    """An A-RELEASE-RQ PDU."""
    return pdu(A_RELEASE_RQ, bytes(4))


def release_rp() -> bytes:
    """An A-RELEASE-RP PDU."""
    return pdu(A_RELEASE_RP, bytes(4))


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT PDU."""
    return pdu(A_ABORT, bytes([0, 0, source, reason]))


# -- Reading and parsing ---------------------------------------------------------------------


class PeerClosed(ConnectionError):
    """The peer closed the connection before a whole PDU arrived."""


def recv_exact(sock: socket.socket, count: int) -> bytes:
    """Exactly `count` bytes (the socket's timeout applies to each read)."""
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(min(count - len(out), 1 << 20))
        if not chunk:
            raise PeerClosed(f"connection closed after {len(out)} of {count} bytes")
        out += chunk
    return bytes(out)


def read_pdu(sock: socket.socket, max_length: int = 64 << 20) -> tuple[int, bytes]:
    """One PDU as (type, body)."""
    pdu_type, _, length = struct.unpack(">BBI", recv_exact(sock, 6))
    if length > max_length:
        raise ValueError(f"PDU length {length} over {max_length}")
    return pdu_type, recv_exact(sock, length)


@dataclass
class AssociateAC:
    """The parts of an A-ASSOCIATE-AC tests look at."""

    called_ae: str
    calling_ae: str
    results: dict[int, tuple[int, str]]  # context id -> (result, transfer syntax)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""

    def accepted(self, context_id: int) -> bool:
        return self.results.get(context_id, (-1, ""))[0] == 0


def _items(raw: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + 4 <= len(raw):
        item_type, _, size = struct.unpack_from(">BBH", raw, offset)
        out.append((item_type, raw[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    return out


def parse_associate_ac(body: bytes) -> AssociateAC:
    """Decodes an A-ASSOCIATE-AC body."""
    ac = AssociateAC(
        called_ae=body[4:20].decode("ascii").strip(),
        calling_ae=body[20:36].decode("ascii").strip(),
        results={},
    )
    for item_type, item in _items(body[68:]):
        if item_type == 0x21:
            ts = ""
            for sub_type, sub in _items(item[4:]):
                if sub_type == 0x40:
                    ts = sub.decode("ascii").rstrip("\0 ")
            ac.results[item[0]] = (item[2], ts)
        elif item_type == 0x50:
            for sub_type, sub in _items(item):
                if sub_type == 0x51:
                    ac.max_pdu = struct.unpack(">I", sub)[0]
                elif sub_type == 0x52:
                    ac.implementation_class_uid = sub.decode("ascii").rstrip("\0 ")
                elif sub_type == 0x55:
                    ac.implementation_version_name = sub.decode("ascii").rstrip("\0 ")
    return ac


def parse_associate_rj(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ body."""
    return body[1], body[2], body[3]


def parse_abort(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body."""
    return body[2], body[3]


def parse_pdata(body: bytes) -> list[tuple[int, int, bytes]]:
    """The PDVs of a P-DATA-TF body as (context id, control header, data)."""
    out = []
    offset = 0
    while offset + 6 <= len(body):
        (size,) = struct.unpack_from(">I", body, offset)
        out.append((body[offset + 4], body[offset + 5], body[offset + 6 : offset + 4 + size]))
        offset += 4 + size
    return out


# -- A client --------------------------------------------------------------------------------


class AssociationRejected(Exception):
    """The peer answered A-ASSOCIATE-RJ; `args[0]` is (result, source, reason)."""


class Aborted(Exception):
    """The peer sent A-ABORT; `args[0]` is (source, reason)."""


@dataclass
class RawAssociation:
    """A hand-driven association over a plain socket.

    Usage::

        with RawAssociation.connect(port) as raw:
            ac = raw.associate("STORESCP", "RAW", [Context(1, CT, [EXPLICIT_LE])])
            rsp = raw.c_store(1, CT, uid, dataset_bytes)
            assert rsp.status == 0
            raw.release()
    """

    sock: socket.socket
    timeout: float = 10.0
    ac: AssociateAC | None = None
    peer_max_pdu: int = 0
    _message_id: int = field(default=0)

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawAssociation:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        return cls(sock, timeout)

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        """Sends raw bytes."""
        self.sock.sendall(data)

    def read(self) -> tuple[int, bytes]:
        """One PDU from the peer."""
        return read_pdu(self.sock)

    def associate(
        self,
        called_ae: str,
        calling_ae: str,
        contexts: Iterable[Context],
        *,
        max_pdu: int = 16384,
        application_context: str = APPLICATION_CONTEXT,
    ) -> AssociateAC:
        """Negotiates; raises AssociationRejected or Aborted when refused."""
        self.send(
            associate_rq(
                called_ae,
                calling_ae,
                list(contexts),
                max_pdu=max_pdu,
                application_context=application_context,
            )
        )
        pdu_type, body = self.read()
        if pdu_type == A_ASSOCIATE_RJ:
            raise AssociationRejected(parse_associate_rj(body))
        if pdu_type == A_ABORT:
            raise Aborted(parse_abort(body))
        if pdu_type != A_ASSOCIATE_AC:
            raise AssertionError(f"unexpected PDU type {pdu_type:#x} to A-ASSOCIATE-RQ")
        self.ac = parse_associate_ac(body)
        self.peer_max_pdu = self.ac.max_pdu
        return self.ac

    def send_message(
        self,
        context_id: int,
        command: bytes,
        data: bytes | None = None,
        *,
        max_pdu: int | None = None,
    ) -> None:
        """Sends a command set and an optional data set, fragmented to `max_pdu`
        (default: the peer's maximum)."""
        limit = self.peer_max_pdu if max_pdu is None else max_pdu
        for chunk in fragments(context_id, command, command=True, max_pdu=limit):
            self.send(chunk)
        if data is not None:
            for chunk in fragments(context_id, data, command=False, max_pdu=limit):
                self.send(chunk)

    def read_command(self) -> Response:
        """Reads P-DATA-TF PDUs until a whole command set arrived."""
        buf = b""
        context_id = 0
        while True:
            pdu_type, body = self.read()
            if pdu_type == A_ABORT:
                raise Aborted(parse_abort(body))
            if pdu_type != P_DATA_TF:
                raise AssertionError(f"unexpected PDU type {pdu_type:#x} awaiting a response")
            for context_id, control, value in parse_pdata(body):
                buf += value
                if control & 0x01 and control & 0x02:
                    return Response(context_id, parse_command_set(buf))

    def next_message_id(self) -> int:
        self._message_id = (self._message_id + 1) & 0xFFFF
        return self._message_id

    def c_store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        data: bytes,
        *,
        message_id: int | None = None,
        max_pdu: int | None = None,
    ) -> Response:
        """Sends a C-STORE-RQ with `data` as the data set and returns the response."""
        mid = self.next_message_id() if message_id is None else message_id
        self.send_message(
            context_id, c_store_rq(mid, sop_class_uid, sop_instance_uid), data, max_pdu=max_pdu
        )
        return self.read_command()

    def c_echo(self, context_id: int, message_id: int | None = None) -> Response:
        """Sends a C-ECHO-RQ and returns the response."""
        mid = self.next_message_id() if message_id is None else message_id
        self.send_message(context_id, c_echo_rq(mid))
        return self.read_command()

    def release(self) -> None:
        """A-RELEASE-RQ, then waits for A-RELEASE-RP."""
        self.send(release_rq())
        pdu_type, _ = self.read()
        if pdu_type != A_RELEASE_RP:
            raise AssertionError(f"unexpected PDU type {pdu_type:#x} to A-RELEASE-RQ")

    def abort(self) -> None:
        """Sends A-ABORT (service-user) and closes."""
        try:
            self.send(abort_pdu())
        finally:
            self.close()

    def wait_closed(self, timeout: float) -> bytes:
        """Reads until the peer closes the connection (or `timeout`); returns what came."""
        self.sock.settimeout(timeout)
        out = bytearray()
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return bytes(out)
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out)
        finally:
            self.sock.settimeout(self.timeout)


@dataclass
class Response:
    """A DIMSE response command set."""

    context_id: int
    fields: dict[int, bytes]

    def _us(self, tag: int) -> int:
        return int(struct.unpack("<H", self.fields[tag][:2])[0])

    @property
    def status(self) -> int:
        return self._us(TAG_STATUS)

    @property
    def command_field(self) -> int:
        return self._us(TAG_COMMAND_FIELD)

    @property
    def message_id_responded(self) -> int:
        return self._us(TAG_MESSAGE_ID_RESPONDED)

    @property
    def error_comment(self) -> str:
        return text(self.fields.get(TAG_ERROR_COMMENT, b""))

    @property
    def affected_sop_instance_uid(self) -> str:
        return text(self.fields.get(TAG_AFFECTED_SOP_INSTANCE, b""))
