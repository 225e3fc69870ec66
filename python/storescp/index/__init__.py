"""The SQLite index of a storescp storage root (SPEC.md section 5).

    from storescp.index import Index
    index = Index.open(db_path, storage_dir)   # create if missing, migrate, WAL
    report = index.reconcile()                  # at start, before the core runs
    index.record(events)                        # one durable transaction per batch
    index.close()

The inspection tool is `storescp-index` (or `python -m storescp.index`).
"""

from storescp.index.api import Index, StoreBusyError
from storescp.index.maintenance import (
    Progress,
    RebuildReport,
    ReconcileReport,
    RegistryMismatch,
    VerifyReport,
)
from storescp.index.model import InstanceRecord, StoreEvent
from storescp.index.query import Filters, InstanceRow, SeriesRow, StudyRow, Totals
from storescp.index.schema import SCHEMA_VERSION, IndexOpenError

__all__ = [
    "SCHEMA_VERSION",
    "Filters",
    "Index",
    "IndexOpenError",
    "InstanceRecord",
    "InstanceRow",
    "Progress",
    "RebuildReport",
    "ReconcileReport",
    "RegistryMismatch",
    "SeriesRow",
    "StoreBusyError",
    "StoreEvent",
    "StudyRow",
    "Totals",
    "VerifyReport",
]
