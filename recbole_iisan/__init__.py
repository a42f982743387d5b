"""recbole-iisan: IISAN and IISAN-Versa multimodal sequential recommenders for RecBole."""
from recbole_iisan.utils import compat as _compat

_compat.apply()

__version__ = "0.1.0"
