"""``python -m modeconn <command> [args]``: the same as ``python -m modeconn.<command> [args]``."""
import sys

from modeconn.cli import main

if __name__ == "__main__":
    sys.exit(main())
