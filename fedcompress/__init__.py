"""fedcompress: upstream compression for federated learning.

Public names only; see README.md for the tour.
"""

from . import wire
from .api import Compressor, RoundContext, available_compressors, get_compressor, register
from .errors import BackendUnavailable, FormatError
from .parallel import get_num_threads, set_num_threads  # native ops' threads (csrc/pool.h)

__version__ = "0.1.0"

__all__ = [
    "SZ",
    "RandomMask",
    "FormatError",
    "BackendUnavailable",
    "Compressor",
    "RoundContext",
    "get_compressor",
    "available_compressors",
    "register",
    "set_num_threads",
    "get_num_threads",
    "synth",
    "wire",
]


def __getattr__(name):
    # Lazy: importing fedcompress must not import every codec (or fail if one is missing).
    if name == "SZ":
        from .codecs.sz.codec import SZ

        return SZ
    if name == "RandomMask":
        from .codecs.mask import RandomMask

        return RandomMask
    if name == "synth":
        import importlib

        return importlib.import_module(".synth", __name__)
    raise AttributeError(f"module 'fedcompress' has no attribute {name!r}")
