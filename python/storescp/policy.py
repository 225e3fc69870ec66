"""Negotiation policy: which abstract and transfer syntaxes the server accepts.

The lists come from pydicom's UID dictionary (PS3.6 Annex A), so a newer pydicom brings newer
SOP classes and transfer syntaxes without a change here. Everything is decided once, at start,
and handed to the core as plain lists of UIDs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from storescp.config import ConfigError, is_valid_uid

# An entry of pydicom's table: (name, type, info, retired, keyword).
UIDEntry = tuple[str, str, str, str, str]


def _load_uid_dictionary() -> Mapping[str, UIDEntry]:
    """pydicom's UID dictionary, read without importing the pydicom package.

    The package loads its whole data model on import: ~20 MB resident and ~0.1 s of a
    start, for a server that needs this one table (a module of literals, no imports).
    """
    package = importlib.util.find_spec("pydicom")  # locates it, runs none of it
    if package is None or not package.submodule_search_locations:
        raise ImportError("pydicom is not installed")
    source = Path(package.submodule_search_locations[0], "_uid_dict.py")
    spec = importlib.util.spec_from_file_location("storescp._uid_dict", source)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load pydicom's UID dictionary from {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table: Mapping[str, UIDEntry] = module.UID_dictionary
    return table


UID_dictionary: Final = _load_uid_dictionary()

VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.98"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"

# Classes whose name says "Storage" but that do not store a composite instance with C-STORE:
# the Storage Commitment services (N-ACTION/N-EVENT-REPORT) and the DICOMDIR media class.
_NOT_STORAGE: Final = frozenset(
    {
        "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
        "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model (retired)
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR, media only)
    }
)

# Transfer syntaxes that are not a network encoding of a data set (PS3.5 A.1: MIME and XML
# encodings, Papyrus' private file syntax): a data set in them cannot be stored as received.
_NOT_NETWORK_SYNTAXES: Final = frozenset(
    {
        "1.2.840.10008.1.2.6.1",  # RFC 2557 MIME encapsulation (retired)
        "1.2.840.10008.1.2.6.2",  # XML Encoding (retired)
        "1.2.840.10008.1.20",  # Papyrus 3 Implicit VR Little Endian (retired)
    }
)

# The uncompressed syntaxes lead the list the banner and documentation show. Within one
# presentation context the core accepts the first syntax the requestor proposes that is in
# this list: data sets are stored as received, so the sender's own preference wins.
_PREFERRED_SYNTAXES: Final = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)

_BASE: Final = "1.2.840.10008.5.1.4.1.1."

# --accept names. The first ten are the example's map (SPEC.md section 1), kept verbatim; the
# rest are DICOM Modality (0008,0060) values mapped to their usual storage classes.
MODALITY_SOP_CLASSES: Final[Mapping[str, tuple[str, ...]]] = {
    "CT": (_BASE + "2", _BASE + "2.1"),
    "MR": (_BASE + "4", _BASE + "4.1"),
    "US": (_BASE + "6.1",),
    "CR": (_BASE + "1",),
    "DX": (_BASE + "1.1", _BASE + "1.1.1"),
    "XR": (_BASE + "12.1", _BASE + "12.2"),
    "NM": (_BASE + "20",),
    "PT": (_BASE + "128", _BASE + "130"),
    "SC": (_BASE + "7",),
    "SR": (_BASE + "88.11", _BASE + "88.22", _BASE + "88.33"),
    "MG": (_BASE + "1.2", _BASE + "1.2.1", _BASE + "13.1.3", _BASE + "13.1.4", _BASE + "13.1.5"),
    "IO": (_BASE + "1.3", _BASE + "1.3.1"),
    "XA": (_BASE + "12.1", _BASE + "12.1.1", _BASE + "13.1.1"),
    "RF": (_BASE + "12.2", _BASE + "12.2.1"),
    "OT": (_BASE + "7", _BASE + "7.1", _BASE + "7.2", _BASE + "7.3", _BASE + "7.4"),
    "SEG": (_BASE + "66.4", _BASE + "66.5"),
    "KO": (_BASE + "88.59",),
    "PR": tuple(f"{_BASE}11.{n}" for n in range(1, 13)),
    "DOC": (_BASE + "104.1", _BASE + "104.2"),
    "ECG": (_BASE + "9.1.1", _BASE + "9.1.2", _BASE + "9.1.3", _BASE + "9.1.4"),
    "ES": (_BASE + "77.1.1", _BASE + "77.1.1.1"),
    "XC": (_BASE + "77.1.4", _BASE + "77.1.4.1"),
    "SM": (_BASE + "77.1.6",),
    "OP": (_BASE + "77.1.5.1", _BASE + "77.1.5.2"),
    "OPT": (_BASE + "77.1.5.4",),
    "RTIMAGE": (_BASE + "481.1",),
    "RTDOSE": (_BASE + "481.2",),
    "RTSTRUCT": (_BASE + "481.3",),
    "RTPLAN": (_BASE + "481.5", _BASE + "481.8"),
    "RTRECORD": (_BASE + "481.4", _BASE + "481.6", _BASE + "481.7", _BASE + "481.9"),
    "RT": tuple(f"{_BASE}481.{n}" for n in range(1, 10)),
}


def _storage_sop_classes() -> tuple[str, ...]:
    """Every SOP Class of the UID dictionary that is stored with C-STORE, retired included.

    Retired classes stay in because old modalities still send them and storing them costs
    nothing; the UID dictionary's order (PS3.6 Table A-1) is kept.
    """
    return tuple(
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and uid not in _NOT_STORAGE
    )


def _transfer_syntaxes() -> tuple[str, ...]:
    """Every network transfer syntax of the UID dictionary, uncompressed ones first."""
    known = [
        uid
        for uid, (_name, kind, *_rest) in UID_dictionary.items()
        if kind == "Transfer Syntax" and uid not in _NOT_NETWORK_SYNTAXES
    ]
    preferred = [uid for uid in _PREFERRED_SYNTAXES if uid in known]
    return (*preferred, *(uid for uid in known if uid not in _PREFERRED_SYNTAXES))


STORAGE_SOP_CLASSES: Final[tuple[str, ...]] = _storage_sop_classes()
"""Every standard Storage SOP Class (accepted when ``--accept`` is not given)."""

TRANSFER_SYNTAXES: Final[tuple[str, ...]] = _transfer_syntaxes()
"""Every standard network transfer syntax, in order of preference."""


def parse_accept(text: str) -> tuple[str, ...]:
    """Turn an ``--accept`` value into the SOP Class UIDs it names.

    Items are separated by commas; spaces around them are trimmed and empty items ignored.
    An item starting with a digit is a raw SOP Class UID (private classes included); any other
    item is a modality name of `MODALITY_SOP_CLASSES`, case-insensitive. Verification is
    dropped because it is always accepted.

    Returns:
        The UIDs in the order named, without repeats; never empty.

    Raises:
        ConfigError: For an unknown name (the message lists the known names), a malformed UID,
            or a list that selects no storage class.
    """
    uids: dict[str, None] = {}
    for item in (part.strip() for part in text.split(",")):
        if item:
            uids.update(dict.fromkeys(_resolve_item(item)))
    uids.pop(VERIFICATION_SOP_CLASS, None)
    if not uids:
        raise ConfigError(f"--accept '{text}' selects no storage SOP class")
    return tuple(uids)


def _resolve_item(item: str) -> Iterable[str]:
    if item[0].isdigit():
        if not is_valid_uid(item):
            raise ConfigError(f"Invalid SOP Class UID '{item}' in --accept")
        return (item,)
    classes = MODALITY_SOP_CLASSES.get(item.upper())
    if classes is None:
        raise ConfigError(
            f"Unknown modality '{item}' in --accept; known names: "
            f"{', '.join(MODALITY_SOP_CLASSES)} (or a SOP Class UID)"
        )
    return classes


def accepted_sop_classes(selected: tuple[str, ...] | None) -> tuple[str, ...]:
    """The abstract syntaxes to hand to the core, Verification excluded.

    Args:
        selected: `ServerConfig.accepted_sop_classes`; None means every standard class.
    """
    return STORAGE_SOP_CLASSES if selected is None else selected
