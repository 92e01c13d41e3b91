"""Registration methods behind one interface (see :mod:`hybridreg.methods.base`).

``get_method(name, **options)`` builds a method by name; each lives in its own module and
loads its heavy dependencies (itk's elastix wrapping, torch) only when first used.
"""
from __future__ import annotations

from .base import Method, RegistrationResult, check_pair

__all__ = ["Method", "RegistrationResult", "check_pair", "get_method", "METHODS"]

#: method name -> "module:class"
METHODS = {
    "elastix": "hybridreg.methods.elastix:ElastixMethod",
    "learned": "hybridreg.methods.learned:LearnedMethod",
    "ssemnet": "hybridreg.methods.ssemnet:SSEMnetMethod",
    "hybrid": "hybridreg.methods.hybrid:HybridMethod",
}


def get_method(name: str, **options) -> Method:
    """Build a registration method by name (e.g. ``get_method("elastix", params=[...])``)."""
    import importlib

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
