"""storescp: a DICOM Storage SCP with a Rust core.

The public API is `StorageSCP`, configured by a `ServerConfig`; the command line
(``storescp``, ``store_scp``, ``python -m storescp``) is built on it.
"""

from importlib.metadata import PackageNotFoundError, version

from storescp.config import ConfigError, ServerConfig
from storescp.server import StartError, Statistics, StorageSCP

try:
    __version__ = version("storescp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "ServerConfig",
    "StartError",
    "Statistics",
    "StorageSCP",
    "__version__",
]
