"""`python -m storescp.index`: the same tool as `storescp-index`."""

from storescp.index_cli import main

main()
