"""``python -m recbole_iisan.report DIR``: the comparison table of a results folder; see
:mod:`recbole_iisan.quick_start.results`."""
import sys

from recbole_iisan.quick_start.results import main

if __name__ == "__main__":
    sys.exit(main())
