"""``python -m storescp``: the same command line as ``storescp``."""

from storescp.cli import main

if __name__ == "__main__":
    main()
