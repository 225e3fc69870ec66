"""Validation of every option (storescp.config), with the messages of SPEC.md section 1."""

from __future__ import annotations

import dataclasses

import pytest
from storescp.config import (
    ConfigError,
    ServerConfig,
    is_valid_uid,
    parse_allowed_calling,
    parse_duplicate,
    parse_max_assoc,
    parse_max_pdu,
    parse_naming,
    parse_port,
    parse_seconds,
    validate_ae_title,
    validate_bind,
)


@pytest.mark.parametrize(
    ("text", "port"), [("1", 1), ("104", 104), ("65535", 65535), (" 11112 ", 11112)]
)
def test_port_accepts_1_to_65535(text: str, port: int) -> None:
    assert parse_port(text) == port


@pytest.mark.parametrize("text", ["0", "65536", "-1", "100000"])
def test_port_out_of_range(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^Port must be between 1 and 65535$"):
        parse_port(text)


@pytest.mark.parametrize("text", ["x", "", "1.5", "0x10", "104a"])
def test_port_not_a_number(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_port(text)
    assert str(info.value) == f"Invalid port number '{text}'"


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("MY_PACS", "MY_PACS"),
        ("A", "A"),
        ("  PACS  ", "PACS"),
        ("X" * 16, "X" * 16),
        ("A B", "A B"),
    ],
)
def test_ae_title_valid(title: str, expected: str) -> None:
    assert validate_ae_title(title) == expected


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("", "AE title must not be empty"),
        ("    ", "AE title must not be empty"),
        ("X" * 17, "AE title exceeds 16 characters"),
        ("A\\B", "AE title must not contain a backslash"),
        ("A\nB", "AE title contains an invalid character"),
        ("A\x00", "AE title contains an invalid character"),
        ("A\tB", "AE title contains an invalid character"),
        ("PACSé", "AE title contains an invalid character"),
    ],
)
def test_ae_title_invalid(title: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        validate_ae_title(title)


def test_naming_and_duplicate() -> None:
    assert [parse_naming(n) for n in ("hierarchical", "date", "flat")] == [
        "hierarchical",
        "date",
        "flat",
    ]
    assert [parse_duplicate(p) for p in ("reject", "replace", "ignore")] == [
        "reject",
        "replace",
        "ignore",
    ]
    with pytest.raises(ConfigError, match=r"^Unknown naming scheme 'Flat'"):
        parse_naming("Flat")
    with pytest.raises(ConfigError, match=r"^Unknown duplicate policy 'skip'"):
        parse_duplicate("skip")


def test_max_assoc() -> None:
    assert parse_max_assoc("1") == 1
    assert parse_max_assoc("10000") == 10000
    with pytest.raises(ConfigError, match=r"^max-assoc must be positive$"):
        parse_max_assoc("0")
    with pytest.raises(ConfigError, match=r"^max-assoc must be at most 10000$"):
        parse_max_assoc("10001")
    with pytest.raises(ConfigError, match=r"^Invalid max-assoc value 'ten'$"):
        parse_max_assoc("ten")


def test_seconds() -> None:
    assert parse_seconds("0", "timeout") == 0
    assert parse_seconds("0.5", "timeout") == 0.5
    assert parse_seconds("300", "timeout") == 300
    with pytest.raises(ConfigError, match=r"^timeout cannot be negative$"):
        parse_seconds("-1", "timeout")
    with pytest.raises(ConfigError, match=r"^Invalid timeout value 'soon'$"):
        parse_seconds("soon", "timeout")
    for absurd in ("inf", "1e12"):
        with pytest.raises(ConfigError, match=r"^timeout must be at most 1000000 seconds$"):
            parse_seconds(absurd, "timeout")
    with pytest.raises(ConfigError, match=r"^Invalid timeout value"):
        parse_seconds("nan", "timeout")


def test_max_pdu() -> None:
    assert parse_max_pdu("4096") == 4096
    assert parse_max_pdu("16777216") == 16777216
    for bad in ("4095", "16777217", "0"):
        with pytest.raises(ConfigError, match=r"^max-pdu must be between 4096 and 16777216$"):
            parse_max_pdu(bad)
    with pytest.raises(ConfigError, match=r"^Invalid max-pdu value 'big'$"):
        parse_max_pdu("big")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("0.0.0.0", "0.0.0.0"), ("127.0.0.1", "127.0.0.1"), ("::", "::"), ("[::1]", "::1")],
)
def test_bind_valid(text: str, canonical: str) -> None:
    assert validate_bind(text) == canonical


@pytest.mark.parametrize("text", ["localhost", "", "256.1.1.1", "1.2.3"])
def test_bind_invalid(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^Invalid bind address"):
        validate_bind(text)


def test_allowed_calling() -> None:
    assert parse_allowed_calling("MODALITY") == "MODALITY"
    assert parse_allowed_calling(" CT1 @10.0.0.7") == "CT1@10.0.0.7"
    assert parse_allowed_calling("CT1@::1") == "CT1@::1"
    with pytest.raises(ConfigError, match=r"^Invalid host 'scanner'"):
        parse_allowed_calling("CT1@scanner")
    with pytest.raises(ConfigError, match=r"^calling AE title exceeds 16 characters$"):
        parse_allowed_calling("X" * 17)
    with pytest.raises(ConfigError, match=r"^calling AE title must not be empty$"):
        parse_allowed_calling("@10.0.0.7")


@pytest.mark.parametrize("uid", ["1", "1.2.840.10008.5.1.4.1.1.2", "0.0", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", ".1", "1.", "1..2", "1.2a", "1/2", "1.2 ", "1.2\x00", "1." + "2" * 63, "../x"]
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_server_config_defaults_and_normalization() -> None:
    config = ServerConfig(ae_title=" PACS ", storage_dir="store", allowed_calling=("A @127.0.0.1",))
    assert config.ae_title == "PACS"
    assert config.allowed_calling == ("A@127.0.0.1",)
    assert (config.port, config.bind, config.naming, config.duplicate) == (
        11112,
        "0.0.0.0",
        "hierarchical",
        "reject",
    )
    assert (config.max_assoc, config.idle_timeout, config.artim_timeout) == (10, 300.0, 30.0)
    assert (config.max_pdu, config.fsync, config.require_called_ae) == (262144, True, False)
    assert config.index_db is None
    assert config.accepted_sop_classes is None


def test_server_config_is_frozen() -> None:
    config = ServerConfig(ae_title="PACS", storage_dir="store")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"storage_dir": ""}, "--storage-dir is required"),
        ({"port": 70000}, "Port must be between 0 and 65535"),
        ({"ae_title": "X" * 17}, "AE title exceeds 16 characters"),
        ({"naming": "tree"}, "Unknown naming scheme 'tree'"),
        ({"duplicate": "keep"}, "Unknown duplicate policy 'keep'"),
        ({"max_assoc": 0}, "max-assoc must be positive"),
        ({"idle_timeout": -1.0}, "timeout cannot be negative"),
        ({"artim_timeout": 0.0}, "artim-timeout must be positive"),
        ({"max_pdu": 100}, "max-pdu must be between"),
        ({"bind": "example.org"}, "Invalid bind address"),
        ({"accepted_sop_classes": ()}, "--accept selects no storage SOP class"),
        ({"accepted_sop_classes": ("1.2..3",)}, "Invalid SOP Class UID '1.2..3'"),
        ({"index_db": ""}, "--index-db must not be empty"),
    ],
)
def test_server_config_rejects(changes: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"ae_title": "PACS", "storage_dir": "store", **changes}
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**arguments)  # type: ignore[arg-type]


def test_port_zero_is_allowed_for_the_api() -> None:
    assert ServerConfig(ae_title="PACS", storage_dir="store", port=0).port == 0


def test_artim_is_capped_by_a_shorter_idle_timeout() -> None:
    def artim(idle: float, artim: float) -> float:
        config = ServerConfig(
            ae_title="PACS", storage_dir="s", idle_timeout=idle, artim_timeout=artim
        )
        return config.effective_artim_timeout

    assert artim(300, 30) == 30
    assert artim(5, 30) == 5
    assert artim(0, 30) == 30
