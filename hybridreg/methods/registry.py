"""The one registry of methods: a method built from its name and options.

The CLI, the Python API, ``compare`` and the benchmarks build methods here. Each method
lives in its own module, imported (with its heavy dependencies) only when it is built.
"""
from __future__ import annotations

import importlib
import inspect

from .base import Method

__all__ = ["METHODS", "ALL_METHODS", "method_class", "accepts", "get_method", "build_method",
           "with_intensity"]

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


def with_intensity(name, options: dict, stack, how="auto"):
    """``(options, map)``: a method's options with the intensity map of ``stack``
    (:func:`hybridreg.methods.neural.intensity_map`, ``how``) as its ``intensity_scale`` and
    ``intensity_offset``, for a method given by name that takes them (learned, ssemnet,
    hybrid) and whose options do not set them; else ``(options, None)``.

    What the API, ``compare`` and the CLI do by default, so that a ``uint16`` stack or a
    float one in [0, 1] reaches the networks on the 0-255 scale they were trained on."""
    if (not isinstance(name, str) or not accepts(name, "intensity_scale")
            or {"intensity_scale", "intensity_offset"} & set(options)):
        return options, None
    from .neural import intensity_map

    imap = intensity_map(stack, how)
    return {**options, **imap.options()}, imap
