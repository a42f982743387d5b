"""``python -m recbole_iisan.download``: see :func:`recbole_iisan.quick_start.commands.download_main`."""
import sys

from recbole_iisan.quick_start.commands import download_main as main

if __name__ == "__main__":
    sys.exit(main())
