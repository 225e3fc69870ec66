"""Hostile input on the wire (SPEC.md sections 3 and 6, README conformance): random bytes,
truncated and oversize PDUs, unknown PDU types, malformed A-ASSOCIATE-RQs, P-DATA out of
place, command and data fragments out of order or on the wrong context, data sets whose
element lengths overrun, unsupported DIMSE requests, and TCP resets or A-ABORTs at many byte
offsets of a valid transfer.

All against one real server process. After every scenario `Guard.check` proves the promise
of section 6: the server is alive and idle again (no connection, no temporary file), a
normal C-STORE succeeds, nothing stored changed, nothing partial is under a final name (every
new file is one the scenario allowed, equal to what was sent, and parses with dcmdump), and
nothing changed outside the storage dir."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, start_server
from dicom_raw import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    APPLICATION_CONTEXT,
    EXPLICIT_LE,
    IMPLICIT_LE,
    P_DATA_TF,
    TAG_AFFECTED_SOP_CLASS,
    TAG_AFFECTED_SOP_INSTANCE,
    TAG_COMMAND_FIELD,
    TAG_DATA_SET_TYPE,
    TAG_MESSAGE_ID,
    TAG_PRIORITY,
    VERIFICATION,
    Aborted,
    Context,
    abort_pdu,
    ae_field,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_set,
    data_set,
    element,
    parse_associate_ac,
    pdata_tf,
    pdu,
    pdv,
    release_rq,
    us,
)
from hostile_support import (
    CT,
    Guard,
    Reply,
    assert_ended,
    connect,
    establish,
    instance_bytes,
    new_uid,
    proc_status,
    read_reply,
    reset,
    send_prefix,
    transfer,
)

pytest.importorskip("storescp._core", reason="the Rust core is not built")

MR = "1.2.840.10008.5.1.4.1.1.4"
UNKNOWN_SOP = "1.2.826.0.1.3680043.9.7.55.777"

# A-ABORT reasons (PS3.8 9.3.8), as the README's conformance section assigns them.
UNRECOGNIZED_PDU = 1
UNEXPECTED_PDU = 2
UNEXPECTED_PARAMETER = 5
INVALID_VALUE = 6


# -- fixtures --------------------------------------------------------------------------------


class Shared:
    """The module's server; restarted on the same storage if a scenario killed it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: RunningServer = self.start()

    def start(self) -> RunningServer:
        return start_server(self.root, ["--max-assoc", "20"], storage=self.root / "store")

    def alive(self) -> RunningServer:
        if self.server.proc.poll() is not None:
            self.server = self.start()
        return self.server


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    holder = Shared(tmp_path_factory.mktemp("malformed"))
    yield holder
    server = holder.server
    if server.proc.poll() is None:
        try:
            server.stop(timeout=30)
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(timeout=10)


@pytest.fixture
def srv(shared: Shared) -> RunningServer:
    return shared.alive()


@pytest.fixture
def guard(shared: Shared, srv: RunningServer) -> Guard:
    """Armed before the scenario; the test calls `guard.check(...)` at its end."""
    return Guard.arm(srv, shared.root)


# -- helpers ---------------------------------------------------------------------------------


def raw_rq_body(
    *,
    version: int = 1,
    called: bytes | None = None,
    calling: bytes | None = None,
    items: bytes | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ body with the given parts (defaults: a valid CT request)."""
    fixed = struct.pack(">HH", version, 0)
    fixed += called if called is not None else ae_field("STORESCP")
    fixed += calling if calling is not None else ae_field("HOSTILE")
    fixed += bytes(32)
    if items is None:
        items = associate_rq("STORESCP", "HOSTILE", [Context(1, CT, [EXPLICIT_LE])])[74:]
    return fixed + items


def item(item_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A variable item (PS3.8 9.3.2); `length` overrides the encoded length."""
    return struct.pack(">BBH", item_type, 0, len(body) if length is None else length) + body


def user_info(max_pdu: int = 16384) -> bytes:
    return item(
        0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.7.99")
    )


def context_item(context_id: int, abstract: str, *syntaxes: str) -> bytes:
    sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, bytes([context_id, 0, 0, 0]) + sub)


def send_and_reply(port: int, data: bytes, *, half_close: bool = True) -> Reply:
    """Sends `data` on a fresh connection, optionally half-closes, returns the reply."""
    sock = connect(port)
    try:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_reply(sock, timeout=10)
    finally:
        sock.close()


def sent_on_association(port: int, data: bytes, *, half_close: bool = False) -> Reply:
    """Establishes a CT association, sends `data`, returns the reply."""
    raw = establish(port, [Context(1, CT, [EXPLICIT_LE]), Context(3, MR, [EXPLICIT_LE])])
    try:
        try:
            raw.send(data)
            if half_close:
                raw.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_reply(raw.sock, timeout=10)
    finally:
        raw.close()


# -- random bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("phase", ["before-association", "inside-association"])
def test_random_bytes(srv: RunningServer, guard: Guard, seed: int, phase: str) -> None:
    """Random bytes (random PDU types and lengths included) end only that connection:
    with a service-provider A-ABORT or a close, never a crash, a hang or a file."""
    rng = random.Random(seed)
    junk = rng.randbytes(rng.choice([1, 5, 6, 7, 100, 4096, 70000]))
    if seed % 2:
        # A plausible first byte to get past the type check into the length handling.
        junk = bytes([rng.choice([0x01, 0x04, 0x05, 0x07])]) + junk
    if phase == "before-association":
        reply = send_and_reply(srv.port, junk)
    else:
        reply = sent_on_association(srv.port, junk, half_close=True)
    assert_ended(reply)
    guard.check()


# -- truncated PDUs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    ["rq-header-only", "rq-half-body", "rq-all-but-one", "three-bytes"],
)
def test_truncated_associate_rq_then_close(srv: RunningServer, guard: Guard, cut: str) -> None:
    """An A-ASSOCIATE-RQ cut short, then the connection closed: the server notices the
    close (no ARTIM wait) and is idle again at once."""
    rq = associate_rq("STORESCP", "HOSTILE", [Context(1, CT, [EXPLICIT_LE])])
    data = {
        "rq-header-only": rq[:6],
        "rq-half-body": rq[: len(rq) // 2],
        "rq-all-but-one": rq[:-1],
        "three-bytes": rq[:3],
    }[cut]
    started = time.monotonic()
    reply = send_and_reply(srv.port, data)
    assert_ended(reply)
    assert time.monotonic() - started < 5, "a closed peer must not wait for ARTIM"
    guard.check()


@pytest.mark.parametrize(
    "cut", ["pdata-header-only", "pdata-half-body", "release-half", "abort-header-only"]
)
def test_truncated_pdu_inside_association_then_close(
    srv: RunningServer, guard: Guard, cut: str
) -> None:
    """Inside an association (a C-STORE in progress), a PDU cut short then a close:
    the association ends, the instance is not stored, no temporary file remains."""
    uid = new_uid()
    data = instance_bytes(uid, pixel_bytes=8000)
    lead = pdata_tf(1, c_store_rq(1, CT, uid), command=True) + pdata_tf(
        1, data[:1000], command=False, last=False
    )
    rest = pdata_tf(1, data[1000:], command=False, last=True)
    tail = {
        "pdata-header-only": rest[:6],
        "pdata-half-body": rest[: len(rest) // 2],
        "release-half": release_rq()[:5],
        "abort-header-only": abort_pdu()[:6],
    }[cut]
    reply = sent_on_association(srv.port, lead + tail, half_close=True)
    assert_ended(reply)
    guard.check()


# -- absurd lengths, without allocating ----------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "pdu_type", "length", "reasons"),
    [
        ("before-association", 0x01, 0xFFFFFFFF, [INVALID_VALUE]),
        ("before-association", 0x01, 0x7FFFFFFF, [INVALID_VALUE]),
        ("before-association", 0x04, 0xFFFFFFFF, [UNEXPECTED_PDU, INVALID_VALUE]),
        ("inside-association", 0x04, 0xFFFFFFFF, [INVALID_VALUE]),
        ("inside-association", 0x04, 262144 + 1, [INVALID_VALUE]),
        ("inside-association", 0x05, 0xFFFFFFFF, [INVALID_VALUE]),
        ("inside-association", 0x07, 0xFFFFFFFF, [INVALID_VALUE]),
    ],
)
def test_absurd_length_aborted_without_allocating(
    srv: RunningServer, guard: Guard, where: str, pdu_type: int, length: int, reasons: list[int]
) -> None:
    """A PDU announcing an absurd length (4 GiB, 2 GiB, one byte over the advertised
    maximum) is answered with A-ABORT (service provider, reason 6 as the README says, or
    2 for a P-DATA before any association) or a close, logged as an aborted association,
    and the server's memory does not grow by the announced size (VmRSS before/after)."""
    before = proc_status(srv.proc.pid)["VmRSS"]
    header = struct.pack(">BBI", pdu_type, 0, length)
    body = bytes(range(256)) * 256  # 64 KiB of the announced body
    if where == "before-association":
        reply = send_and_reply(srv.port, header + body, half_close=False)
    else:
        reply = sent_on_association(srv.port, header + body)
    assert_ended(reply, abort_reasons=reasons)
    after = proc_status(srv.proc.pid)["VmRSS"]
    assert after - before < 8 * 1024, f"RSS grew {after - before} kB on a length {length:#x}"
    guard.wait_log("Association aborted")
    guard.check()


def test_announced_body_never_sent_costs_nothing(srv: RunningServer, guard: Guard) -> None:
    """Fifteen associations each announce a maximal P-DATA (256 KiB) and send only its
    header: the server's RSS stays flat (buffers grow only as bytes arrive), and closing
    them ends each association."""
    before = proc_status(srv.proc.pid)["VmRSS"]
    raws = []
    try:
        for _ in range(15):
            raw = establish(srv.port)
            raws.append(raw)
            raw.send(struct.pack(">BBI", P_DATA_TF, 0, 262144) + bytes(12))
        time.sleep(0.5)
        during = proc_status(srv.proc.pid)["VmRSS"]
        assert during - before < 16 * 1024, f"RSS grew {during - before} kB"
    finally:
        for raw in raws:
            raw.close()
    guard.check()


# -- unknown and unexpected PDU types ----------------------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0xFF, 0x10, 0x80])
@pytest.mark.parametrize("phase", ["before-association", "inside-association"])
def test_unknown_pdu_type(srv: RunningServer, guard: Guard, pdu_type: int, phase: str) -> None:
    """An unknown PDU type gets A-ABORT (service provider, reason 1 unrecognized PDU) or a
    close, before or inside an association."""
    data = pdu(pdu_type, bytes(4))
    if phase == "before-association":
        reply = send_and_reply(srv.port, data, half_close=False)
    else:
        reply = sent_on_association(srv.port, data)
    assert_ended(reply, abort_reasons=[UNRECOGNIZED_PDU])
    guard.check()


@pytest.mark.parametrize(
    "name",
    ["p-data", "release-rq", "release-rp", "abort", "associate-ac", "associate-rj"],
)
def test_unexpected_pdu_before_association(srv: RunningServer, guard: Guard, name: str) -> None:
    """A PDU other than A-ASSOCIATE-RQ as the first PDU: A-ABORT (reason 2 unexpected PDU)
    or a close; an A-ABORT from the peer simply ends the connection."""
    data = {
        "p-data": pdata_tf(1, c_echo_rq(1), command=True),
        "release-rq": release_rq(),
        "release-rp": pdu(A_RELEASE_RP, bytes(4)),
        "abort": abort_pdu(),
        "associate-ac": pdu(A_ASSOCIATE_AC, bytes(68)),
        "associate-rj": pdu(A_ASSOCIATE_RJ, bytes([0, 1, 1, 1])),
    }[name]
    reply = send_and_reply(srv.port, data, half_close=False)
    assert_ended(reply, abort_reasons=[UNEXPECTED_PDU])
    guard.check()


@pytest.mark.parametrize("name", ["second-associate-rq", "associate-ac", "release-rp"])
def test_unexpected_pdu_inside_association(srv: RunningServer, guard: Guard, name: str) -> None:
    """A second A-ASSOCIATE-RQ (or an AC, or a release reply) inside an association gets
    A-ABORT (reason 2 unexpected PDU) or a close; only that association ends."""
    data = {
        "second-associate-rq": associate_rq("STORESCP", "HOSTILE", [Context(1, CT)]),
        "associate-ac": pdu(A_ASSOCIATE_AC, bytes(68)),
        "release-rp": pdu(A_RELEASE_RP, bytes(4)),
    }[name]
    reply = sent_on_association(srv.port, data)
    assert_ended(reply, abort_reasons=[UNEXPECTED_PDU])
    guard.check()


# -- malformed A-ASSOCIATE-RQ --------------------------------------------------------------------


BAD_ITEMS = {
    "app-context-overruns": item(0x10, APPLICATION_CONTEXT.encode(), length=0xFFFF),
    "context-item-too-short": item(0x10, APPLICATION_CONTEXT.encode())
    + item(0x20, bytes([1, 0]))
    + user_info(),
    "abstract-syntax-overruns": item(0x10, APPLICATION_CONTEXT.encode())
    + item(0x20, bytes([1, 0, 0, 0]) + item(0x30, CT.encode(), length=200))
    + user_info(),
    "context-length-past-pdu": item(0x10, APPLICATION_CONTEXT.encode())
    + item(0x20, bytes([1, 0, 0, 0]) + item(0x30, CT.encode()), length=0x7000)
    + user_info(),
    "user-info-overruns": item(0x10, APPLICATION_CONTEXT.encode())
    + context_item(1, CT, EXPLICIT_LE)
    + item(0x50, item(0x51, struct.pack(">I", 16384)), length=0xFFFF),
    "max-length-sub-item-short": item(0x10, APPLICATION_CONTEXT.encode())
    + context_item(1, CT, EXPLICIT_LE)
    + item(0x50, item(0x51, b"\x00\x40")),
    "item-header-cut": item(0x10, APPLICATION_CONTEXT.encode())
    + context_item(1, CT, EXPLICIT_LE)
    + user_info()
    + b"\x20\x00",
    "no-application-context": context_item(1, CT, EXPLICIT_LE) + user_info(),
    "no-user-information": item(0x10, APPLICATION_CONTEXT.encode())
    + context_item(1, CT, EXPLICIT_LE),
    "two-application-contexts": item(0x10, APPLICATION_CONTEXT.encode()) * 2
    + context_item(1, CT, EXPLICIT_LE)
    + user_info(),
}


@pytest.mark.parametrize("name", sorted(BAD_ITEMS))
def test_associate_rq_bad_items(srv: RunningServer, guard: Guard, name: str) -> None:
    """An A-ASSOCIATE-RQ whose item lengths overrun, are too short, or whose mandatory
    items are missing or doubled: A-ABORT (service provider; 6 invalid parameter value
    for lengths, 5 for a doubled item, per the README) or an A-ASSOCIATE-RJ, or a close;
    never an A-ASSOCIATE-AC."""
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(items=BAD_ITEMS[name])))
    assert A_ASSOCIATE_AC not in reply.types()
    if reply.reject is None:
        assert_ended(reply, abort_reasons=[UNEXPECTED_PARAMETER, INVALID_VALUE])
    else:
        assert reply.reject[0] in (1, 2), reply.reject
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()


def test_associate_rq_shorter_than_fixed_part(srv: RunningServer, guard: Guard) -> None:
    """An A-ASSOCIATE-RQ of 10 bytes (the fixed part is 68): A-ABORT reason 6 or close."""
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body()[:10]))
    assert_ended(reply, abort_reasons=[INVALID_VALUE])
    guard.check()


def test_zero_presentation_contexts(srv: RunningServer, guard: Guard) -> None:
    """An A-ASSOCIATE-RQ without any presentation context item is refused (A-ABORT,
    A-ASSOCIATE-RJ or close), never accepted."""
    body = raw_rq_body(items=item(0x10, APPLICATION_CONTEXT.encode()) + user_info())
    reply = send_and_reply(srv.port, pdu(0x01, body))
    assert A_ASSOCIATE_AC not in reply.types()
    assert_ended(reply, allow_reject=reply.reject)
    guard.check()


def test_128_presentation_contexts_all_answered(srv: RunningServer, guard: Guard) -> None:
    """128 contexts (every odd ID) mixing CT, MR and an unknown class: the AC answers each
    one, accepting CT and MR and refusing the unknown class with result 3; a C-STORE on
    the last CT context works."""
    contexts = []
    for i in range(128):
        cid = 2 * i + 1
        abstract = [CT, MR, UNKNOWN_SOP][i % 3]
        contexts.append(Context(cid, abstract, [EXPLICIT_LE, IMPLICIT_LE]))
    raw = establish(srv.port, contexts)
    try:
        ac = raw.ac
        assert ac is not None
        assert sorted(ac.results) == [c.context_id for c in contexts]
        for ctx in contexts:
            result = ac.results[ctx.context_id][0]
            assert result == (3 if ctx.abstract_syntax == UNKNOWN_SOP else 0), ctx
        last_ct = max(c.context_id for c in contexts if c.abstract_syntax == CT)
        uid = new_uid()
        data = instance_bytes(uid)
        assert raw.c_store(last_ct, CT, uid, data).status == 0
        raw.release()
    finally:
        raw.close()
    guard.check(allowed={uid: data}, required=[uid])


def test_200_presentation_contexts(srv: RunningServer, guard: Guard) -> None:
    """200 presentation contexts (more than the 128 odd IDs, so IDs repeat): accepted,
    rejected or aborted, but the server stays bounded and serves others."""
    items = item(0x10, APPLICATION_CONTEXT.encode())
    for i in range(200):
        items += context_item((2 * i + 1) & 0xFF, CT if i % 2 else MR, EXPLICIT_LE)
    items += user_info()
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(items=items)))
    if reply.pdus and reply.pdus[0][0] == A_ASSOCIATE_AC:
        ac = parse_associate_ac(reply.pdus[0][1])
        assert ac.results, "an AC with no context answered"
    else:
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()


def test_many_transfer_syntaxes_in_one_context(srv: RunningServer, guard: Guard) -> None:
    """One context proposing 1500 transfer syntaxes (unknown ones, explicit VR little
    endian last; the item nearly 64 KiB): accepted with explicit VR LE, or refused;
    a store on it works when accepted."""
    syntaxes = [f"1.2.826.0.1.3680043.9.7.55.5.{i}" for i in range(1500)] + [EXPLICIT_LE]
    body = raw_rq_body(
        items=item(0x10, APPLICATION_CONTEXT.encode())
        + item(
            0x20,
            bytes([1, 0, 0, 0])
            + item(0x30, CT.encode())
            + b"".join(item(0x40, s.encode()) for s in syntaxes),
        )
        + user_info()
    )
    reply = send_and_reply(srv.port, pdu(0x01, body))
    if reply.pdus and reply.pdus[0][0] == A_ASSOCIATE_AC:
        ac = parse_associate_ac(reply.pdus[0][1])
        assert ac.results[1] == (0, EXPLICIT_LE)
    else:
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()


def test_context_item_over_65535_bytes(srv: RunningServer, guard: Guard) -> None:
    """A presentation context whose sub-items add up to more than an item length can say
    (the item length wraps): refused with A-ABORT or RJ or closed, never mis-parsed into
    an acceptance of garbage."""
    sub = item(0x30, CT.encode()) + b"".join(
        item(0x40, f"1.2.826.0.1.3680043.9.7.55.6.{i}".encode()) for i in range(2500)
    )
    ctx = struct.pack(">BBH", 0x20, 0, (len(sub) + 4) & 0xFFFF) + bytes([1, 0, 0, 0]) + sub
    body = raw_rq_body(items=item(0x10, APPLICATION_CONTEXT.encode()) + ctx + user_info())
    reply = send_and_reply(srv.port, pdu(0x01, body))
    if reply.pdus and reply.pdus[0][0] == A_ASSOCIATE_AC:
        ac = parse_associate_ac(reply.pdus[0][1])
        assert all(result != 0 for result, _ in ac.results.values()), ac.results
        # The peer would now have to speak on a context it never proposed; just leave.
    else:
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()


@pytest.mark.parametrize(
    ("called", "calling"),
    [
        (
            ae_field("STORESCP").replace(b"STORESCP", b"SIXTEEN_CHARS_AE"),
            ae_field("ABCDEFGHIJKLMNOP"),
        ),
        (bytes(16), bytes(16)),
        (b" " * 16, b" " * 16),
        (b"STORE\x1b[2J\r\nSCP  ", b"\xff\xfe\x00\x01" * 4),
    ],
    ids=["sixteen-chars", "all-nul", "all-spaces", "control-and-high-bytes"],
)
def test_odd_ae_title_fields(
    srv: RunningServer, guard: Guard, called: bytes, calling: bytes
) -> None:
    """Odd AE title fields (16 characters exactly, all NUL, all spaces, control and
    non-ASCII bytes): accepted or rejected, and the log gets at most one line per event
    (no injected line breaks or terminal escapes)."""
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(called=called, calling=calling)))
    if reply.types()[:1] != [A_ASSOCIATE_AC]:
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()
    log = guard.server.log()
    assert "\x1b" not in log, "a terminal escape from an AE title reached the log"
    for line in log.splitlines():
        assert not line.startswith("SCP"), f"an AE title broke a log line: {line!r}"


def test_ae_title_longer_than_sixteen_shifts_the_request(srv: RunningServer, guard: Guard) -> None:
    """A 20-character calling AE written as-is shifts the request by 4 bytes: the extra
    characters land in the reserved field (which PS3.8 says is not tested) and 4 zero
    bytes become an empty item of unknown type (ignored). Accepted, the AC then echoes
    the 16 characters that fit, or refused; never a crash."""
    body = raw_rq_body(calling=b"TWENTY_CHARACTERS_AE")
    reply = send_and_reply(srv.port, pdu(0x01, body))
    if reply.types()[:1] == [A_ASSOCIATE_AC]:
        ac = parse_associate_ac(reply.pdus[0][1])
        assert ac.calling_ae == "TWENTY_CHARACTER"
    else:
        assert_ended(reply, allow_reject=reply.reject)
    guard.check()


@pytest.mark.parametrize("version", [0x0000, 0x0002, 0x8000, 0xFFFE])
def test_wrong_protocol_version_rejected_1_2_2(
    srv: RunningServer, guard: Guard, version: int
) -> None:
    """A protocol version without bit 0 is rejected with A-ASSOCIATE-RJ 1/2/2
    (permanent, service-provider ACSE, protocol version not supported)."""
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(version=version)), half_close=False)
    assert reply.reject == (1, 2, 2), reply.types()
    assert_ended(reply, allow_reject=(1, 2, 2), allow_close=False)
    guard.check()


def test_protocol_version_with_bit_0_and_more_accepted(srv: RunningServer, guard: Guard) -> None:
    """Protocol version 0x0003 (bit 0 set, other bits unknown) is version 1 as far as
    this SCP is concerned: accepted (PS3.8 9.3.2)."""
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(version=3)))
    assert reply.types()[:1] == [A_ASSOCIATE_AC]
    guard.check()


@pytest.mark.parametrize("context_name", ["1.2.3.4", "1.2.840.10008.3.1.1.2", "", "x" * 64])
def test_bad_application_context_rejected_1_1_2(
    srv: RunningServer, guard: Guard, context_name: str
) -> None:
    """An unknown application context name gets A-ASSOCIATE-RJ 1/1/2 (permanent,
    service-user, application context name not supported)."""
    items = item(0x10, context_name.encode()) + context_item(1, CT, EXPLICIT_LE) + user_info()
    reply = send_and_reply(srv.port, pdu(0x01, raw_rq_body(items=items)), half_close=False)
    assert reply.reject == (1, 1, 2), reply.types()
    assert_ended(reply, allow_reject=(1, 1, 2), allow_close=False)
    guard.check()


# -- P-DATA out of place ---------------------------------------------------------------------------


@pytest.mark.parametrize("context_id", [3, 5, 0, 2, 255])
def test_pdata_on_context_not_accepted(srv: RunningServer, guard: Guard, context_id: int) -> None:
    """A command on a context that was refused (3: unknown class), never proposed (5, 255)
    or impossible (0, 2): A-ABORT (service provider, reason 6) or close."""
    raw = establish(
        srv.port, [Context(1, CT, [EXPLICIT_LE]), Context(3, UNKNOWN_SOP, [EXPLICIT_LE])]
    )
    try:
        assert raw.ac is not None and not raw.ac.accepted(3)
        uid = new_uid()
        raw.send(pdata_tf(context_id, c_store_rq(1, CT, uid), command=True))
        raw.send(pdata_tf(context_id, instance_bytes(uid), command=False))
        reply = read_reply(raw.sock)
    finally:
        raw.close()
    assert_ended(reply, abort_reasons=[INVALID_VALUE])
    guard.check()


def test_data_fragment_before_any_command(srv: RunningServer, guard: Guard) -> None:
    """A data set fragment with no command before it: A-ABORT (reason 5 unexpected
    parameter per the README, or 6) or close; nothing stored."""
    uid = new_uid()
    reply = sent_on_association(srv.port, pdata_tf(1, instance_bytes(uid), command=False))
    assert_ended(reply, abort_reasons=[UNEXPECTED_PARAMETER, INVALID_VALUE])
    guard.check()


def test_data_fragment_before_command_is_complete(srv: RunningServer, guard: Guard) -> None:
    """Data set bytes after a command fragment not marked last: aborted, nothing stored."""
    uid = new_uid()
    command = c_store_rq(1, CT, uid)
    data = pdata_tf(1, command[:20], command=True, last=False) + pdata_tf(
        1, instance_bytes(uid), command=False
    )
    reply = sent_on_association(srv.port, data)
    assert_ended(reply, abort_reasons=[UNEXPECTED_PARAMETER, INVALID_VALUE])
    guard.check()


def test_command_fragment_inside_data_set(srv: RunningServer, guard: Guard) -> None:
    """A new command while a data set is still arriving: aborted, the partial instance is
    discarded."""
    uid = new_uid()
    data = instance_bytes(uid, pixel_bytes=4000)
    stream = (
        pdata_tf(1, c_store_rq(1, CT, uid), command=True)
        + pdata_tf(1, data[:500], command=False, last=False)
        + pdata_tf(1, c_echo_rq(2), command=True)
    )
    reply = sent_on_association(srv.port, stream)
    assert_ended(reply, abort_reasons=[UNEXPECTED_PARAMETER, INVALID_VALUE])
    guard.check()


@pytest.mark.parametrize("how", ["data-on-other-context", "command-split-over-contexts"])
def test_fragments_with_the_wrong_context(srv: RunningServer, guard: Guard, how: str) -> None:
    """Fragments of one message on two accepted contexts (CT 1 and MR 3): aborted
    (reason 5 or 6) or closed, nothing stored."""
    uid = new_uid()
    command = c_store_rq(1, CT, uid)
    data = instance_bytes(uid, pixel_bytes=4000)
    if how == "data-on-other-context":
        stream = (
            pdata_tf(1, command, command=True)
            + pdata_tf(1, data[:400], command=False, last=False)
            + pdata_tf(3, data[400:], command=False, last=True)
        )
    else:
        stream = pdata_tf(1, command[:30], command=True, last=False) + pdata_tf(
            3, command[30:], command=True, last=True
        )
    reply = sent_on_association(srv.port, stream)
    assert_ended(reply, abort_reasons=[UNEXPECTED_PARAMETER, INVALID_VALUE])
    guard.check()


@pytest.mark.parametrize(
    "name", ["pdv-length-0", "pdv-length-1", "pdv-overruns-pdu", "pdv-header-cut", "empty-pdata"]
)
def test_malformed_pdv_items(srv: RunningServer, guard: Guard, name: str) -> None:
    """P-DATA-TF bodies whose PDV items are malformed (item length 0 or 1, past the PDU,
    a header cut short, no item at all): A-ABORT reason 6 (or close), nothing stored;
    an empty P-DATA-TF may also be ignored (then the association is released)."""
    uid = new_uid()
    good = pdv(1, c_store_rq(1, CT, uid), command=True, last=True)
    body = {
        "pdv-length-0": struct.pack(">I", 0),
        "pdv-length-1": struct.pack(">IB", 1, 1),
        "pdv-overruns-pdu": struct.pack(">I", 5000) + good[4:],
        "pdv-header-cut": good + b"\x00\x00",
        "empty-pdata": b"",
    }[name]
    raw = establish(srv.port)
    try:
        raw.send(pdu(P_DATA_TF, body))
        if name == "empty-pdata":
            raw.sock.settimeout(1.0)
            try:
                first = raw.read()
            except TimeoutError:
                raw.sock.settimeout(10)
                raw.release()  # ignored: the association is still usable
                first = None
            if first is not None:
                assert first[0] == A_ABORT
        else:
            assert_ended(read_reply(raw.sock), abort_reasons=[INVALID_VALUE])
    finally:
        raw.close()
    guard.check()


# -- command sets ---------------------------------------------------------------------------------


def test_command_split_weirdly_still_works(srv: RunningServer, guard: Guard) -> None:
    """Legal but odd fragmentation (PS3.8 annex E): the command set in 1-byte PDVs, with
    empty PDVs, several PDVs per PDU and its group length split across PDUs; the data set
    in fragments of 1, 2, 3 ... bytes. The C-STORE succeeds and the file equals the data
    set sent."""
    uid = new_uid()
    command = c_store_rq(7, CT, uid)
    data = instance_bytes(uid, pixel_bytes=300)
    pdvs = [pdv(1, b"", command=True, last=False)]
    pdvs += [pdv(1, command[i : i + 1], command=True, last=False) for i in range(len(command) - 1)]
    pdvs.append(pdv(1, command[-1:], command=True, last=True))
    stream = b""
    for i in range(0, len(pdvs), 7):  # 7 PDVs per PDU
        stream += pdu(P_DATA_TF, b"".join(pdvs[i : i + 7]))
    pieces = []
    pos, size = 0, 1
    while pos < len(data):
        pieces.append(data[pos : pos + size])
        pos += size
        size += 1
    for i, piece in enumerate(pieces):
        stream += pdata_tf(1, piece, command=False, last=i == len(pieces) - 1)
    raw = establish(srv.port)
    try:
        raw.send(stream)
        rsp = raw.read_command()
        assert rsp.status == 0, rsp.error_comment
        assert rsp.message_id_responded == 7
        raw.release()
    finally:
        raw.close()
    guard.check(allowed={uid: data}, required=[uid])


@pytest.mark.parametrize(
    "name",
    [
        "truncated-element",
        "group-length-lies",
        "length-overruns",
        "garbage",
        "no-command-field",
        "huge-element-length",
    ],
)
def test_malformed_command_set(srv: RunningServer, guard: Guard, name: str) -> None:
    """Command sets that cannot be parsed (cut in an element, lying group length, an
    element length past the end, garbage, no Command Field, a 4 GiB element length):
    a failure response, or A-ABORT (reason 6) / close; never a crash, nothing stored."""
    uid = new_uid()
    good = c_store_rq(1, CT, uid)
    command = {
        "truncated-element": good[:-3],
        "group-length-lies": element(0, struct.pack("<I", 9999), "UL") + good[12:],
        "length-overruns": good + struct.pack("<HHI", 0, 0x0902, 400) + b"AB",
        "garbage": bytes(range(7, 250)),
        "no-command-field": command_set(
            {
                TAG_AFFECTED_SOP_CLASS: CT,
                TAG_MESSAGE_ID: us(1),
                TAG_PRIORITY: us(0),
                TAG_DATA_SET_TYPE: us(0),
                TAG_AFFECTED_SOP_INSTANCE: uid,
            }
        ),
        "huge-element-length": good + struct.pack("<HHI", 0, 0x0902, 0xFFFFFFFF),
    }[name]
    raw = establish(srv.port)
    try:
        raw.send(pdata_tf(1, command, command=True))
        raw.send(pdata_tf(1, instance_bytes(uid), command=False))
        raw.sock.shutdown(socket.SHUT_WR)
        reply = read_reply(raw.sock)
    finally:
        raw.close()
    allowed: dict[str, bytes | str] = {}
    if name == "group-length-lies":
        # Parsers may ignore (0000,0000): then this is a valid C-STORE.
        allowed[uid] = instance_bytes(uid)
    if reply.closed:
        if reply.pdus and reply.pdus[0][0] == P_DATA_TF:
            reply = Reply(reply.pdus[1:], reply.closed, reply.trailing)
        assert_ended(reply, abort_reasons=[INVALID_VALUE, UNEXPECTED_PARAMETER])
    else:
        assert reply.pdus and reply.pdus[0][0] == P_DATA_TF, reply.types()
    guard.check(allowed=allowed)


UNSUPPORTED = {
    "c-find": (0x0020, "1.2.840.10008.5.1.4.1.2.2.1", True),
    "c-move": (0x0021, "1.2.840.10008.5.1.4.1.2.2.2", True),
    "c-get": (0x0010, "1.2.840.10008.5.1.4.1.2.2.3", True),
    "c-cancel": (0x0FFF, "", False),
    "n-create": (0x0140, "1.2.840.10008.3.1.2.3.3", True),
    "n-action": (0x0130, "1.2.840.10008.1.20.1", True),
    "n-get": (0x0110, "1.2.840.10008.3.1.2.3.3", False),
    "unknown-0x0abc": (0x0ABC, CT, False),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_dimse_request(srv: RunningServer, guard: Guard, name: str) -> None:
    """C-FIND, C-MOVE, C-GET, C-CANCEL, N-CREATE, N-ACTION, N-GET and an unknown command
    field, with or without a data set: answered with status 0211 (the response's command
    field the request's | 0x8000, the Message ID echoed, an Error Comment) and the
    association goes on (a C-ECHO works after it); or A-ABORT. Never a crash."""
    field, sop_class, with_data = UNSUPPORTED[name]
    fields: dict[int, bytes | str] = {
        TAG_COMMAND_FIELD: us(field),
        TAG_MESSAGE_ID: us(41),
        TAG_DATA_SET_TYPE: us(0x0000 if with_data else 0x0101),
    }
    if sop_class:
        fields[TAG_AFFECTED_SOP_CLASS] = sop_class
    if name == "c-move":
        fields[0x00000600] = "SOMEWHERE"
    identifier = data_set({0x00080052: ("CS", "STUDY"), 0x0020000D: ("UI", "")}, explicit=True)
    raw = establish(
        srv.port, [Context(1, CT, [EXPLICIT_LE]), Context(3, VERIFICATION, [IMPLICIT_LE])]
    )
    try:
        raw.send_message(1, command_set(fields), identifier if with_data else None)
        try:
            rsp = raw.read_command()
        except Aborted as e:  # an A-ABORT is allowed
            assert e.args[0][0] == 2
        else:
            assert rsp.status == 0x0211, f"status {rsp.status:#06x}"
            assert rsp.command_field == field | 0x8000
            assert rsp.message_id_responded == 41
            assert rsp.error_comment
            echo = raw.c_echo(3)
            assert echo.status == 0
            raw.release()
    finally:
        raw.close()
    guard.check()


def test_c_store_without_data_set_refused(srv: RunningServer, guard: Guard) -> None:
    """A C-STORE-RQ announcing no data set gets a failure status with an Error Comment
    (or an abort); nothing is stored."""
    uid = new_uid()
    command = c_store_rq(1, CT, uid, extra={TAG_DATA_SET_TYPE: us(0x0101)})
    raw = establish(srv.port)
    try:
        raw.send_message(1, command)
        rsp = raw.read_command()
        assert rsp.status != 0 and rsp.error_comment
        raw.release()
    finally:
        raw.close()
    guard.check()


# -- data sets that lie -------------------------------------------------------------------------


def overrun_data_sets(uid: str) -> dict[str, bytes]:
    """Data sets (explicit VR LE) with an element length past the end, at several places."""
    study = "1.2.826.0.1.3680043.9.7.55.902"
    head = data_set({0x00080016: ("UI", CT), 0x00080018: ("UI", uid)}, explicit=True)
    uids = data_set({0x0020000D: ("UI", study), 0x0020000E: ("UI", study + ".1")}, explicit=True)
    middle = data_set(
        {0x00080060: ("CS", "CT"), 0x00100010: ("PN", "Over^Run"), 0x00100020: ("LO", "P")},
        explicit=True,
    )
    return {
        "before-uids-short-vr": head
        + element(0x00100010, b"Over^Run", "PN", explicit=True, length=0xFFF0)
        + uids,
        "before-uids-long-vr": head
        + element(0x00091010, b"\x01\x02", "OB", explicit=True, length=0x7FFFFFF0)
        + uids,
        "before-uids-implicit-like": head
        + struct.pack("<HH", 0x0010, 0x0010)
        + b"\xff\xff\xff\xff"
        + uids,
        "after-uids-in-pixel-data": head
        + middle
        + uids
        + element(0x7FE00010, bytes(64), "OB", explicit=True, length=1_000_000),
        "after-uids-text": head
        + middle
        + uids
        + element(0x00321060, b"Requested", "LO", explicit=True, length=3000),
        "sequence-never-closed": head
        + middle
        + uids
        + element(0x00400275, b"", "SQ", explicit=True, length=0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + element(0x00401001, b"RP1", "SH", explicit=True),
        "item-length-overruns": head
        + middle
        + uids
        + element(0x00400275, b"", "SQ", explicit=True, length=0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 5000)
        + element(0x00401001, b"RP1", "SH", explicit=True),
    }


@pytest.mark.parametrize(
    "name",
    [
        "before-uids-short-vr",
        "before-uids-long-vr",
        "before-uids-implicit-like",
        "after-uids-in-pixel-data",
        "after-uids-text",
        "sequence-never-closed",
        "item-length-overruns",
    ],
)
def test_data_set_element_length_overruns(srv: RunningServer, guard: Guard, name: str) -> None:
    """A C-STORE whose data set has an element (or item) length running past the end of
    the data set: a C000-range status with an Error Comment, or an abort; either way
    nothing is stored (a stored file would not parse: a partial instance under a final
    name)."""
    uid = new_uid()
    data = overrun_data_sets(uid)[name]
    raw = establish(srv.port)
    try:
        try:
            rsp = raw.c_store(1, CT, uid, data)
        except Aborted as e:
            assert e.args[0][0] == 2
        else:
            assert 0xC000 <= rsp.status <= 0xCFFF, (
                f"status {rsp.status:#06x} ({rsp.error_comment!r}) for a data set whose "
                "element length overruns its end"
            )
            assert rsp.error_comment
            raw.release()
    finally:
        raw.close()
    guard.check()


@pytest.mark.parametrize(
    "cut", ["after-sop-class", "inside-element-header", "inside-study-uid-value", "empty"]
)
def test_data_set_truncated_before_uids(srv: RunningServer, guard: Guard, cut: str) -> None:
    """A data set that ends before its Study/Series UIDs (cleanly, inside an element
    header, inside the Study UID value, or with no byte at all): C000-range with an
    Error Comment; nothing stored; the association goes on."""
    uid = new_uid()
    full = instance_bytes(uid)
    study_tag = struct.pack("<HH", 0x0020, 0x000D)
    at = full.index(study_tag)
    data = {
        "after-sop-class": data_set(
            {0x00080016: ("UI", CT), 0x00080018: ("UI", uid)}, explicit=True
        ),
        "inside-element-header": full[: at + 5],
        "inside-study-uid-value": full[: at + 12],
        "empty": b"",
    }[cut]
    raw = establish(
        srv.port, [Context(1, CT, [EXPLICIT_LE]), Context(3, VERIFICATION, [IMPLICIT_LE])]
    )
    try:
        rsp = raw.c_store(1, CT, uid, data)
        assert 0xC000 <= rsp.status <= 0xCFFF, f"status {rsp.status:#06x}"
        assert rsp.error_comment
        assert raw.c_echo(3).status == 0
        raw.release()
    finally:
        raw.close()
    guard.check()


def test_release_in_the_middle_of_a_data_set(srv: RunningServer, guard: Guard) -> None:
    """A-RELEASE-RQ while a data set is half sent: the server answers (A-RELEASE-RP or
    A-ABORT) and closes; the partial instance is discarded."""
    uid = new_uid()
    data = instance_bytes(uid, pixel_bytes=8000)
    stream = (
        pdata_tf(1, c_store_rq(1, CT, uid), command=True)
        + pdata_tf(1, data[:3000], command=False, last=False)
        + release_rq()
    )
    raw = establish(srv.port)
    try:
        raw.send(stream)
        reply = read_reply(raw.sock)
    finally:
        raw.close()
    assert reply.closed
    assert reply.types()[:1] in ([A_RELEASE_RP], [A_ABORT], []), reply.types()
    guard.check()


def test_other_association_unaffected_by_garbage(srv: RunningServer, guard: Guard) -> None:
    """While one association is in the middle of a C-STORE, others send garbage, absurd
    lengths and resets; the first one then completes with success."""
    uid = new_uid()
    data = instance_bytes(uid, pixel_bytes=20000)
    good = establish(srv.port)
    try:
        good.send(pdata_tf(1, c_store_rq(1, CT, uid), command=True))
        good.send(pdata_tf(1, data[:5000], command=False, last=False))
        for junk in (b"\xff" * 100, struct.pack(">BBI", 4, 0, 0xFFFFFFFF), b"\x01\x00\x00"):
            send_and_reply(srv.port, junk)
        bad = establish(srv.port)
        bad.send(pdata_tf(1, b"\x00" * 50, command=True))
        reset(bad.sock)
        good.send(pdata_tf(1, data[5000:], command=False, last=True))
        rsp = good.read_command()
        assert rsp.status == 0, rsp.error_comment
        good.release()
    finally:
        good.close()
    guard.check(allowed={uid: data}, required=[uid])


# -- resets and aborts at every stage of a transfer ------------------------------------------


MARKS = list(transfer(uid="1.2.3").marks)


@pytest.mark.parametrize("mark", MARKS)
def test_tcp_reset_at_offset(srv: RunningServer, guard: Guard, mark: str) -> None:
    """A TCP reset (SO_LINGER 0) after the named byte offset of a valid C-STORE transfer
    (inside the A-ASSOCIATE-RQ, inside the command, inside the data set, between
    fragments, just before and inside the last fragment, all sent): the server survives,
    no temporary file remains, and the instance is stored only when it arrived whole."""
    xfer = transfer()
    sock = send_prefix(srv.port, xfer, xfer.marks[mark])
    time.sleep(0.05)
    reset(sock)
    allowed = {xfer.uid: xfer.data} if mark == "all-sent" else {}
    guard.check(allowed=allowed)


@pytest.mark.parametrize("mark", [m for m in MARKS if m != "start"])
def test_a_abort_at_offset(srv: RunningServer, guard: Guard, mark: str) -> None:
    """An A-ABORT (service user) after the named byte offset of a valid C-STORE transfer,
    then a normal close. Between PDUs it is an abort; inside a PDU its bytes are part of
    that PDU and the close cuts it short. Either way: no temporary file, no final file
    unless the instance arrived whole."""
    xfer = transfer()
    sock = send_prefix(srv.port, xfer, xfer.marks[mark])
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(abort_pdu(0, 0))
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock, timeout=10)
    finally:
        sock.close()
    assert reply.closed, "server kept the connection after an A-ABORT and a close"
    allowed: dict[str, bytes | str] = {}
    if mark == "all-sent":
        allowed[xfer.uid] = xfer.data
    elif mark == "last-byte-missing":
        # The A-ABORT's first byte (0x07) completes the last PDU: a whole data set.
        allowed[xfer.uid] = xfer.data[:-1] + b"\x07"
    guard.check(allowed=allowed)
