"""Access control and path safety of a real server (SPEC.md sections 3 and 4, README
conformance): --require-called-ae (A-ASSOCIATE-RJ 1/1/7), --allow-calling AE and AE@IP
(RJ 1/1/3), --bind (the server answers on that address only), and UIDs or Study Dates
crafted to escape the storage dir (`..`, `/`, `\\`, NUL, letters, 65 characters, empty)
under each naming scheme: refused with a C000-range status and an Error Comment, or (for a
bad Study Date with `date` naming) stored under the reception date; never written outside
the storage dir, no directory created for a refused instance. After each scenario
`Guard.check` proves SPEC.md section 6 (a normal C-STORE works, nothing stored changed,
nothing partial under a final name, nothing changed outside the storage dir)."""

from __future__ import annotations

import glob
import os
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import RunningServer, start_server
from dicom_raw import (
    EXPLICIT_LE,
    AssociationRejected,
    Context,
    RawAssociation,
    c_store_rq,
    data_set,
)
from hostile_support import (
    CT,
    UID_ROOT,
    Guard,
    connect,
    instance_bytes,
    launch,
    new_uid,
    store_ok,
)

pytest.importorskip("storescp._core", reason="the Rust core is not built")

ServerFactory = Callable[..., RunningServer]


def associate_outcome(
    port: int, called: str, calling: str, host: str = "127.0.0.1"
) -> tuple[int, int, int] | str:
    """ "accepted" (then released), or the (result, source, reason) of the rejection."""
    with RawAssociation.connect(port, host=host, timeout=10) as raw:
        try:
            raw.associate(called, calling, [Context(1, CT, [EXPLICIT_LE])])
        except AssociationRejected as e:
            result, source, reason = e.args[0]
            return (result, source, reason)
        raw.release()
        return "accepted"


# -- called AE title ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def called_check(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("called")
    server = start_server(root, ["--require-called-ae"], storage=root / "store")
    yield server, root
    server.stop()


@pytest.mark.parametrize(
    "called", ["WRONG", "STORESCPX", "STORESC", "storescp", "STORE SCP", "ANY-SCP"]
)
def test_require_called_ae_rejects_1_1_7(
    called_check: tuple[RunningServer, Path], called: str
) -> None:
    """With --require-called-ae, a called AE title other than ours (also a longer one that
    starts with it, a prefix of it, another case) gets A-ASSOCIATE-RJ 1/1/7 (permanent,
    service-user, called AE title not recognized)."""
    server, root = called_check
    guard = Guard.arm(server, root)
    assert associate_outcome(server.port, called, "CALLER") == (1, 1, 7)
    guard.wait_log("Association rejected")
    guard.check()


def test_require_called_ae_accepts_ours(called_check: tuple[RunningServer, Path]) -> None:
    """With --require-called-ae, our own AE title is accepted and a C-STORE works."""
    server, root = called_check
    guard = Guard.arm(server, root)
    assert associate_outcome(server.port, "STORESCP", "CALLER") == "accepted"
    uid, data = store_ok(server.port, called="STORESCP")
    guard.check(allowed={uid: data}, required=[uid])


def test_called_ae_not_checked_by_default(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Without --require-called-ae (the documented default) any called AE title is
    accepted."""
    server = server_factory()
    guard = Guard.arm(server, tmp_path)
    assert associate_outcome(server.port, "WHATEVER", "CALLER") == "accepted"
    guard.check()


# -- calling AE allow-list --------------------------------------------------------------------


@pytest.fixture(scope="module")
def allow_list(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("allow")
    extra = [
        "--allow-calling",
        "GOODAE",
        "--allow-calling",
        "LOCALAE@127.0.0.1",
        "--allow-calling",
        "REMOTEAE@10.0.0.1",  # configuration only: nothing is ever sent there
        "--allow-calling",
        "CANARY",
    ]
    server = start_server(root, extra, storage=root / "store")
    yield server, root
    server.stop()


@pytest.mark.parametrize("calling", ["GOODAE", "LOCALAE", "CANARY"])
def test_allowed_calling_ae_accepted(allow_list: tuple[RunningServer, Path], calling: str) -> None:
    """A calling AE on the allow-list (plain, or bound to 127.0.0.1 and coming from
    there) is accepted."""
    server, root = allow_list
    guard = Guard.arm(server, root)
    assert associate_outcome(server.port, "STORESCP", calling) == "accepted"
    guard.check()


@pytest.mark.parametrize(
    "calling", ["REMOTEAE", "BADAE", "GOODAEX", "GOODA", "goodae", "LOCALAE@127.0.0.1", "ANY"]
)
def test_other_calling_ae_rejected_1_1_3(
    allow_list: tuple[RunningServer, Path], calling: str
) -> None:
    """A calling AE not on the allow-list, or on it but bound to another host (REMOTEAE
    only from 10.0.0.1, we come from 127.0.0.1), or merely sharing a prefix or differing
    in case, gets A-ASSOCIATE-RJ 1/1/3 (permanent, service-user, calling AE title not
    recognized)."""
    server, root = allow_list
    guard = Guard.arm(server, root)
    assert associate_outcome(server.port, "STORESCP", calling[:16]) == (1, 1, 3)
    guard.wait_log("Association rejected")
    guard.check()


# -- bind address -----------------------------------------------------------------------------


def refused(host: str, port: int) -> bool:
    """True when nothing accepts a TCP connection at host:port."""
    try:
        connect(port, host, timeout=2).close()
    except OSError:
        return True
    return False


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_bind_address(tmp_path: Path, host: str) -> None:
    """--bind HOST: a C-STORE to HOST works, and the port is closed on the other loopback
    address (127.0.0.1 vs 127.0.0.2, or IPv4 when bound to ::1)."""
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    server = launch(tmp_path, [], host=host)
    try:
        guard = Guard.arm(server, tmp_path, host=host)
        uid, data = store_ok(server.port, host=host)
        other = {"127.0.0.1": "127.0.0.2", "127.0.0.2": "127.0.0.1", "::1": "127.0.0.1"}[host]
        assert refused(other, server.port), f"bound to {host}, yet {other} answers"
        guard.check(allowed={uid: data}, required=[uid])
    finally:
        server.stop()


# -- path safety ------------------------------------------------------------------------------


ESCAPE = f"storescp-escape-{os.getpid()}"

BAD_UIDS: dict[str, bytes] = {
    "dotdot": b"..",
    "dot": b".",
    "traversal": f"../../../../../../../../tmp/{ESCAPE}".encode(),
    "traversal-digits": b"1.2/../../../../../../../../tmp/" + ESCAPE.encode(),
    "embedded-dotdot": b"1.2..3",
    "slash": b"1.2/3",
    "absolute": b"/tmp/" + ESCAPE.encode(),
    "backslash": b"1.2\\3",
    "backslash-traversal": b"..\\..\\..\\" + ESCAPE.encode(),
    "nul": b"1.2\x003",
    "letters": b"1.2.abc",
    "65-chars": b"1." + b"2" * 63,
    "empty": b"",
    "spaces": b"    ",
    "leading-dot": b".1.2",
    "trailing-dot": b"1.2.",
    "non-ascii": b"1.2.\xef\xbc\x93",  # a fullwidth digit three in UTF-8
    "newline": b"1.2\n3",
}

SCHEMES = ["hierarchical", "date", "flat"]


@pytest.fixture(scope="module")
def schemes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[RunningServer, Path]]]:
    """One server per naming scheme, each with its own root and storage dir."""
    servers: dict[str, tuple[RunningServer, Path]] = {}
    try:
        for scheme in SCHEMES:
            root = tmp_path_factory.mktemp(scheme)
            server = start_server(root, ["--naming", scheme], storage=root / "store")
            store_ok(server.port)  # the canary's folders exist from now on
            servers[scheme] = (server, root)
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


def folders(storage: Path) -> set[str]:
    """Every directory under the storage dir, the private area excluded."""
    return {
        str(p.relative_to(storage))
        for p in storage.rglob("*")
        if p.is_dir() and ".storescp" not in p.relative_to(storage).parts
    }


def escaped() -> list[str]:
    """Anything named after ESCAPE where the traversals above would land: /tmp (every
    `../` chain here climbs to the root first) and the filesystem root."""
    return glob.glob(f"/tmp/{ESCAPE}*") + glob.glob(f"/{ESCAPE}*")


def crafted(
    sop: bytes, study: bytes, series: bytes, study_date: bytes | None = b"20240102"
) -> bytes:
    """An explicit VR little endian CT data set with the given raw values."""
    elements: dict[int, tuple[str, bytes | str]] = {
        0x00080016: ("UI", CT),
        0x00080018: ("UI", sop),
        0x00080060: ("CS", "CT"),
        0x00100010: ("PN", "Path^Safety"),
        0x00100020: ("LO", "PID-PATH"),
        0x0020000D: ("UI", study),
        0x0020000E: ("UI", series),
    }
    if study_date is not None:
        elements[0x00080020] = ("DA", study_date)
    return data_set(elements, explicit=True)


def send_crafted(port: int, sop: bytes, data: bytes) -> tuple[int, str]:
    """(status, Error Comment) of a C-STORE whose command names `sop` too."""
    with RawAssociation.connect(port, timeout=15) as raw:
        raw.associate("STORESCP", "PATHS", [Context(1, CT, [EXPLICIT_LE])])
        command = c_store_rq(1, CT, "X")
        # The command's Affected SOP Instance UID, byte for byte (may hold NUL, `/`...).
        padded = sop + (b"\0" if len(sop) % 2 else b"")
        tail = command.rindex(b"X\0")
        fixed = command[: tail - 4] + len(padded).to_bytes(4, "little") + padded
        body = fixed[12:]
        command = fixed[:8] + len(body).to_bytes(4, "little") + body
        raw.send_message(1, command, data)
        rsp = raw.read_command()
        raw.release()
    return rsp.status, rsp.error_comment


@pytest.mark.parametrize("name", sorted(BAD_UIDS))
@pytest.mark.parametrize("attribute", ["study", "series", "sop"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_uid_refused_c000(
    schemes: dict[str, tuple[RunningServer, Path]], scheme: str, attribute: str, name: str
) -> None:
    """A Study, Series or SOP Instance UID with `..`, `/`, `\\`, NUL, letters, 65
    characters, nothing, a newline or non-ASCII, under each naming scheme (flat included:
    UIDs are validated whatever the layout): C000-range with an Error Comment, no file,
    no new directory, nothing written outside the storage dir."""
    server, root = schemes[scheme]
    guard = Guard.arm(server, root)
    before = folders(server.storage)
    good = new_uid("40")
    study = f"{UID_ROOT}.41".encode()
    values = {"sop": good.encode(), "study": study, "series": study + b".1"}
    values[attribute] = BAD_UIDS[name]
    data = crafted(values["sop"], values["study"], values["series"])
    status, comment = send_crafted(server.port, values["sop"], data)
    assert 0xC000 <= status <= 0xCFFF, f"status {status:#06x} ({comment!r})"
    assert comment, "a C000 refusal without an Error Comment"
    assert folders(server.storage) == before, "a directory was created for a refused instance"
    assert not escaped(), f"written outside the storage dir: {escaped()}"
    guard.check()


def test_64_character_uid_is_valid(schemes: dict[str, tuple[RunningServer, Path]]) -> None:
    """The boundary: a 64-character SOP Instance UID is stored (flat naming: the file is
    named after it)."""
    server, root = schemes["flat"]
    guard = Guard.arm(server, root)
    uid = (UID_ROOT + ".64." + "1" * 64)[:64]
    data = instance_bytes(uid)
    status, comment = send_crafted(server.port, uid.encode(), data)
    assert status == 0, comment
    (new,) = [p for p in guard.check(allowed={uid: data}, required=[uid]) if uid in p.name]
    assert new == server.storage / f"{uid}.dcm"


BAD_DATES: dict[str, bytes | None] = {
    "traversal": b"../../..",
    "slashes": b"2024/01/01",
    "backslashes": b"..\\..\\..",
    "absolute": b"/tmp/" + ESCAPE.encode()[:10],
    "nul": b"2024\x000101",
    "letters": b"YYYYMMDD",
    "month-13": b"20241301",
    "seven-digits": b"2024010",
    "nine-digits": b"202401011",
    "empty": b"",
    "spaces": b"        ",
    "absent": None,
}


@pytest.mark.parametrize("name", sorted(BAD_DATES))
def test_bad_study_date_with_date_naming(
    schemes: dict[str, tuple[RunningServer, Path]], name: str
) -> None:
    """With `date` naming, a Study Date like "../../..", "2024/01/01", with a NUL,
    letters, a month 13, the wrong length, empty or absent: refused with C000 and an
    Error Comment, or stored under the reception date (YYYY/MM/DD of today); never
    elsewhere, never outside the storage dir."""
    server, root = schemes["date"]
    guard = Guard.arm(server, root)
    uid = new_uid("42")
    study = f"{UID_ROOT}.43"
    data = crafted(uid.encode(), study.encode(), f"{study}.1".encode(), BAD_DATES[name])
    before = datetime.now()
    status, comment = send_crafted(server.port, uid.encode(), data)
    after = datetime.now()
    assert not escaped(), f"written outside the storage dir: {escaped()}"
    if status == 0:
        new = [p for p in guard.check(allowed={uid: data}, required=[uid]) if uid in p.name]
        days = {d.strftime("%Y/%m/%d") for d in (before, after)}
        expected = {server.storage / day / study / f"{uid}.dcm" for day in days}
        assert new and new[0] in expected, f"stored as {new}, expected one of {expected}"
    else:
        assert 0xC000 <= status <= 0xCFFF, f"status {status:#06x} ({comment!r})"
        assert comment
        guard.check()


def test_valid_study_date_names_the_folder(
    schemes: dict[str, tuple[RunningServer, Path]],
) -> None:
    """The control: with `date` naming a valid Study Date 20240102 gives 2024/01/02."""
    server, root = schemes["date"]
    guard = Guard.arm(server, root)
    uid = new_uid("44")
    study = f"{UID_ROOT}.45"
    data = crafted(uid.encode(), study.encode(), f"{study}.1".encode(), b"20240102")
    assert send_crafted(server.port, uid.encode(), data) == (0, "")
    new = [p for p in guard.check(allowed={uid: data}, required=[uid]) if uid in p.name]
    assert new == [server.storage / "2024" / "01" / "02" / study / f"{uid}.dcm"]
