"""``python -m recbole_iisan.prepare``: see :func:`recbole_iisan.quick_start.commands.prepare_main`."""
import sys

from recbole_iisan.quick_start.commands import prepare_main as main

if __name__ == "__main__":
    sys.exit(main())
