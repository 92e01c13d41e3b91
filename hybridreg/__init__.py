"""hybridreg: learned, iterative and hybrid registration of serial-section EM stacks.

Importing hybridreg imports neither itk nor torch; the modules that need them load them
when first used. The displacement-field contract is in :mod:`hybridreg.fields`.

ITK-style entry points: :func:`hybridreg.register` and :func:`hybridreg.align_stack`
(:mod:`hybridreg.api`).
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

_SUBMODULES = ("fields", "warp", "io", "phantom", "synthetic", "metrics", "joint", "stack",
               "elastix", "methods", "models", "training", "cli", "api", "compare",
               "report", "tiling")
#: The ITK-style API (:mod:`hybridreg.api`), loaded on first use.
_API = ("register", "align_stack", "Registration", "StackRegistration")

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'hybridreg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_API))
