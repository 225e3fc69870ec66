"""Command-line argument errors: exit status 1 and one ``Error: ...`` line on stderr.

The CLI runs in a subprocess (``python -m storescp``, which no console script can shadow), so
the exit status is the real one. These paths end before the core starts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import storescp

# The subprocess must import the same storescp as this test process.
_PACKAGE_ROOT = str(Path(storescp.__file__).resolve().parent.parent)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "storescp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def assert_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [f"Error: {message}"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0(flag: str) -> None:
    result = run_cli(flag)
    assert result.returncode == 0
    assert result.stderr == ""
    assert "Usage:" in result.stdout
    assert "<port> <ae_title>" in result.stdout
    for option in (
        "--storage-dir",
        "--index-db",
        "--accept",
        "--naming",
        "--duplicate",
        "--max-assoc",
        "--timeout",
        "--bind",
        "--max-pdu",
        "--no-fsync",
        "--require-called-ae",
        "--allow-calling",
        "--quiet",
        "Exit Codes:",
    ):
        assert option in result.stdout


def test_help_wins_over_bad_arguments() -> None:
    result = run_cli("nope", "X" * 40, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0", "PACS", "--storage-dir", "d"], "Port must be between 1 and 65535"),
        (["65536", "PACS", "--storage-dir", "d"], "Port must be between 1 and 65535"),
        (["-1", "PACS", "--storage-dir", "d"], "Port must be between 1 and 65535"),
        (["x", "PACS", "--storage-dir", "d"], "Invalid port number 'x'"),
        (["104", "X" * 17, "--storage-dir", "d"], "AE title exceeds 16 characters"),
        (["104", "A\\B", "--storage-dir", "d"], "AE title must not contain a backslash"),
        (["104", "   ", "--storage-dir", "d"], "AE title must not be empty"),
        (["104", "PACS"], "--storage-dir is required"),
        (["104", "PACS", "--storage-dir", ""], "--storage-dir is required"),
        (
            ["104", "PACS", "--storage-dir", "d", "--naming", "tree"],
            "Unknown naming scheme 'tree' (expected hierarchical, date or flat)",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--duplicate", "keep"],
            "Unknown duplicate policy 'keep' (expected reject, replace or ignore)",
        ),
        (["104", "PACS", "--storage-dir", "d", "--max-assoc", "0"], "max-assoc must be positive"),
        (
            ["104", "PACS", "--storage-dir", "d", "--max-assoc", "many"],
            "Invalid max-assoc value 'many'",
        ),
        (["104", "PACS", "--storage-dir", "d", "--timeout", "-5"], "timeout cannot be negative"),
        (["104", "PACS", "--storage-dir", "d", "--timeout", "x"], "Invalid timeout value 'x'"),
        (
            ["104", "PACS", "--storage-dir", "d", "--max-pdu", "1024"],
            "max-pdu must be between 4096 and 16777216",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--bind", "nowhere"],
            "Invalid bind address 'nowhere' (expected an IPv4 or IPv6 address)",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--artim-timeout", "0"],
            "artim-timeout must be positive",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--drain-timeout", "-1"],
            "drain-timeout cannot be negative",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--allow-calling", "CT@scanner"],
            "Invalid host 'scanner' in --allow-calling 'CT@scanner' (expected an IP address)",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--accept", " , "],
            "--accept ' , ' selects no storage SOP class",
        ),
        (
            ["104", "PACS", "--storage-dir", "d", "--accept", "1.2..3"],
            "Invalid SOP Class UID '1.2..3' in --accept",
        ),
    ],
)
def test_invalid_value(args: list[str], message: str) -> None:
    assert_error(run_cli(*args), message)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["104"],
        ["104", "PACS", "--storage-dir", "d", "--bogus"],
        ["104", "PACS", "--storage-dir"],
        ["104", "PACS", "--storage-dir", "d", "extra"],
        ["104", "PACS", "--storage-dir", "d", "--quiet=yes"],
    ],
)
def test_usage_errors_exit_1_not_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: ")
    assert result.stdout == ""


def test_unknown_modality_lists_known_names() -> None:
    result = run_cli("104", "PACS", "--storage-dir", "d", "--accept", "CT, xyz")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: Unknown modality 'xyz' in --accept; known names: ")
    for name in ("CT", "MR", "US", "CR", "DX", "XR", "NM", "PT", "SC", "SR"):
        assert name in line


def test_storage_dir_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "store"
    result = run_cli("104", "PACS", "--storage-dir", str(target))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot create storage directory {target}: ")


def test_storage_dir_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("104", "PACS", "--storage-dir", str(blocker))
    assert_error(result, f"storage directory {blocker} exists and is not a directory")


def test_storage_dir_not_writable(tmp_path: Path) -> None:
    """An existing but unwritable storage dir: exit 1 naming the cause.

    Root ignores permission bits, so as root the directory is a read-only tmpfs mount.
    """
    store = tmp_path / "store"
    store.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(store)], check=True
        )
    else:
        store.chmod(0o500)
    try:
        result = run_cli("104", "PACS", "--storage-dir", str(store))
    finally:
        if as_root:
            subprocess.run(["umount", str(store)], check=True)
        else:
            store.chmod(0o700)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: storage directory {store} is not writable: ")


def test_port_in_use(tmp_path: Path) -> None:
    pytest.importorskip("storescp._core", reason="the Rust core is not built")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            str(port), "PACS", "--storage-dir", str(tmp_path / "s"), "--bind", "127.0.0.1"
        )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
