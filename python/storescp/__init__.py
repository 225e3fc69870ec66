"""storescp: a DICOM Storage SCP with a Rust core.

The public API is `StorageSCP`, configured by a `ServerConfig`; the command line
(``storescp``, ``store_scp``, ``python -m storescp``) is built on it.
"""

from storescp.config import ConfigError, ServerConfig
from storescp.server import StartError, Statistics, StorageSCP

__all__ = [
    "ConfigError",
    "ServerConfig",
    "StartError",
    "Statistics",
    "StorageSCP",
    "__version__",
]


def __getattr__(name: str) -> str:
    # `__version__` is looked up when asked for: importlib.metadata alone takes longer to
    # import than the rest of the server's start.
    if name != "__version__":
        raise AttributeError(f"module 'storescp' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("storescp")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
