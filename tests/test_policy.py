"""Negotiation policy (storescp.policy): storage classes, transfer syntaxes, --accept."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import storescp
from pydicom._uid_dict import UID_dictionary
from storescp.config import ConfigError, is_valid_uid
from storescp.policy import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MODALITY_SOP_CLASSES,
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    accepted_sop_classes,
    parse_accept,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
US = "1.2.840.10008.5.1.4.1.1.6.1"

# The example's map, which SPEC.md section 1 says may grow but never lose a name.
SPEC_MAP = {
    "CT": [CT, ENHANCED_CT],
    "MR": [MR, ENHANCED_MR],
    "US": [US],
    "CR": ["1.2.840.10008.5.1.4.1.1.1"],
    "DX": ["1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"],
    "XR": ["1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.2"],
    "NM": ["1.2.840.10008.5.1.4.1.1.20"],
    "PT": ["1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130"],
    "SC": ["1.2.840.10008.5.1.4.1.1.7"],
    "SR": [
        "1.2.840.10008.5.1.4.1.1.88.11",
        "1.2.840.10008.5.1.4.1.1.88.22",
        "1.2.840.10008.5.1.4.1.1.88.33",
    ],
}


def test_storage_classes_cover_the_common_ones() -> None:
    for classes in SPEC_MAP.values():
        assert set(classes) <= set(STORAGE_SOP_CLASSES)
    for uid in (
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.3",  # retired US Multi-frame, still sent by old devices
    ):
        assert uid in STORAGE_SOP_CLASSES


@pytest.mark.parametrize(
    "uid",
    [
        VERIFICATION_SOP_CLASS,
        "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
        "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage
        "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Q/R FIND
        "1.2.840.10008.5.1.4.1.1.200.4",  # Protocol Approval FIND
        "1.2.840.10008.5.1.4.1.1.201.2",  # Inventory FIND
    ],
)
def test_storage_classes_exclude_non_storage(uid: str) -> None:
    assert uid not in STORAGE_SOP_CLASSES


def test_storage_classes_are_unique_sop_classes() -> None:
    assert len(set(STORAGE_SOP_CLASSES)) == len(STORAGE_SOP_CLASSES)
    assert len(STORAGE_SOP_CLASSES) > 150
    for uid in STORAGE_SOP_CLASSES:
        assert UID_dictionary[uid][1] == "SOP Class"
        assert is_valid_uid(uid)


def test_transfer_syntaxes() -> None:
    assert TRANSFER_SYNTAXES[:2] == (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
    assert len(set(TRANSFER_SYNTAXES)) == len(TRANSFER_SYNTAXES)
    for uid in (
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.100",  # MPEG2
        "1.2.840.10008.1.2.4.107",  # HEVC
    ):
        assert uid in TRANSFER_SYNTAXES
    for uid in TRANSFER_SYNTAXES:
        assert UID_dictionary[uid][1] == "Transfer Syntax"
    # Not network encodings of a data set.
    for uid in ("1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"):
        assert uid not in TRANSFER_SYNTAXES


def test_modality_map_keeps_the_spec_names() -> None:
    for name, classes in SPEC_MAP.items():
        assert list(MODALITY_SOP_CLASSES[name]) == classes


def test_modality_map_points_at_storage_classes() -> None:
    for classes in MODALITY_SOP_CLASSES.values():
        assert classes
        assert set(classes) <= set(STORAGE_SOP_CLASSES)


def test_accept_names_case_spaces_and_empty_items() -> None:
    assert parse_accept("CT,MR") == (CT, ENHANCED_CT, MR, ENHANCED_MR)
    assert parse_accept(" ct , , Mr ,") == (CT, ENHANCED_CT, MR, ENHANCED_MR)


def test_accept_deduplicates_in_order() -> None:
    assert parse_accept("US,us,US") == (US,)
    assert parse_accept(f"{CT},CT") == (CT, ENHANCED_CT)


def test_accept_raw_uids_including_private_ones() -> None:
    assert parse_accept("1.2.3.4.5, CT") == ("1.2.3.4.5", CT, ENHANCED_CT)


def test_accept_drops_verification() -> None:
    assert parse_accept(f"{VERIFICATION_SOP_CLASS},US") == (US,)
    with pytest.raises(ConfigError, match="selects no storage SOP class"):
        parse_accept(VERIFICATION_SOP_CLASS)


def test_accept_unknown_name_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        parse_accept("CT,XYZ")
    message = str(info.value)
    assert "Unknown modality 'XYZ'" in message
    for name in SPEC_MAP:
        assert name in message


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_accept_empty_is_an_error_never_accept_all(text: str) -> None:
    with pytest.raises(ConfigError, match="selects no storage SOP class"):
        parse_accept(text)


@pytest.mark.parametrize("text", ["1.2..3", "1.2.", "1.2.3a", "1/2"])
def test_accept_malformed_uid(text: str) -> None:
    with pytest.raises(ConfigError, match="Invalid SOP Class UID"):
        parse_accept(text)


def test_accepted_sop_classes() -> None:
    assert accepted_sop_classes(None) == STORAGE_SOP_CLASSES
    assert accepted_sop_classes((US,)) == (US,)


def test_the_server_starts_without_importing_pydicom() -> None:
    # The pydicom package costs ~20 MB resident; the server reads its UID table alone.
    code = (
        "import sys, storescp.cli, storescp.policy as policy\n"
        "print(len(policy.STORAGE_SOP_CLASSES), len(policy.TRANSFER_SYNTAXES))\n"
        "print(sorted(m for m in ('pydicom', 'importlib.metadata') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    counts, loaded = done.stdout.splitlines()
    assert counts == f"{len(STORAGE_SOP_CLASSES)} {len(TRANSFER_SYNTAXES)}"
    assert loaded == "[]"


def test_version_is_the_installed_one() -> None:
    assert storescp.__version__ == version("storescp")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = storescp.nothing  # type: ignore[attr-defined]
