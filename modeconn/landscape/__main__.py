"""``python -m modeconn.landscape``: see :mod:`modeconn.landscape.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
