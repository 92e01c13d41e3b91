"""The one registry of methods: a method built from its name and options.

The CLI, the Python API, ``compare`` and the benchmarks build methods here. Each method
lives in its own module, imported (with its heavy dependencies) only when it is built.
"""
from __future__ import annotations

import importlib
import inspect

from .base import Method

__all__ = ["METHODS", "ALL_METHODS", "method_class", "accepts", "get_method", "build_method"]

#: method name -> "module:class"
METHODS = {
    "elastix": "hybridreg.methods.elastix:ElastixMethod",
    "learned": "hybridreg.methods.learned:LearnedMethod",
    "ssemnet": "hybridreg.methods.ssemnet:SSEMnetMethod",
    "hybrid": "hybridreg.methods.hybrid:HybridMethod",
}
#: Every method, in the order ``compare`` and ``demo`` run them.
ALL_METHODS = tuple(METHODS)


def method_class(name: str) -> type:
    """The class of method ``name`` (imports its module)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def accepts(name: str, key: str) -> bool:
    """Whether method ``name``'s constructor takes option ``key`` (False if it cannot tell)."""
    try:
        params = inspect.signature(method_class(name)).parameters
    except Exception:  # unknown or broken method: building it reports why
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                for p in params.values())


def get_method(name: str, **options) -> Method:
    """Build a registration method by name (e.g. ``get_method("elastix", params=[...])``)."""
    return method_class(name)(**options)


def build_method(method, options: dict) -> Method:
    """A method from a name and its options, or a built method object (no options) as is."""
    if isinstance(method, str):
        return get_method(method, **options)
    if options:
        raise TypeError(f"options {sorted(options)} are for a method given by name; "
                        f"{type(method).__name__} is already built")
    if not hasattr(method, "register"):
        raise TypeError(f"method must be a name or an object with register(), got "
                        f"{type(method).__name__}")
    return method
