"""hybridreg: learned, iterative and hybrid registration of serial-section EM stacks.

Importing hybridreg imports neither itk nor torch; the modules that need them load them
when first used. The displacement-field contract is in :mod:`hybridreg.fields`.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

_SUBMODULES = ("fields", "warp", "io", "phantom", "synthetic", "metrics", "joint", "stack",
               "elastix", "methods", "models", "training", "cli")

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hybridreg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
