"""``python -m recbole_iisan.build_cache``: see :func:`recbole_iisan.quick_start.commands.build_cache_main`."""
import sys

from recbole_iisan.quick_start.commands import build_cache_main as main
from recbole_iisan.quick_start.commands import make_config  # noqa: F401  (the config of a build_cache command line)

if __name__ == "__main__":
    sys.exit(main())
