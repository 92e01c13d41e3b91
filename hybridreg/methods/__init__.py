"""Registration methods behind one interface (see :mod:`hybridreg.methods.base`).

``get_method(name, **options)`` (:mod:`hybridreg.methods.registry`) builds a method by name;
each lives in its own module and loads its heavy dependencies (itk's elastix wrapping,
torch) only when first used. What the torch-based methods share is
:mod:`hybridreg.methods.neural`.
"""
from __future__ import annotations

from .base import Method, RegistrationResult, check_pair
from .neural import IntensityMap, intensity_map
from .registry import ALL_METHODS, METHODS, get_method

__all__ = ["Method", "RegistrationResult", "check_pair", "get_method", "METHODS",
           "ALL_METHODS", "intensity_map", "IntensityMap"]
