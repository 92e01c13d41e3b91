"""The one interface every registration method implements.

A method registers a ``moving`` section onto a ``fixed`` section (optionally helped by more,
older ``references``: already-aligned sections, oldest first, ``fixed`` being the nearest) and
returns a :class:`RegistrationResult` whose ``field`` follows :mod:`hybridreg.fields`: a pull
field on the fixed grid with ``warped(p) = moving(p + field(p))``, in physical units.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field as dc_field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["RegistrationResult", "Method", "check_pair", "content_mask", "checked_mask",
           "checked_masks", "takes_masks"]


@dataclass(frozen=True)
class RegistrationResult:
    """What a method returns for one pair.

    Attributes
    ----------
    field : ndarray, shape (2, H, W), float32
        Pull field, physical units, on the fixed grid.
    warped : ndarray, shape (H, W), float32
        The moving section warped onto the fixed grid (as the method itself resampled it).
    spacing_xy, origin_xy : (float, float)
        The fixed grid.
    metric : float or None
        The method's own final similarity/cost value, where it has one; what it is differs
        per method and is said by the method's ``metric_name``.
    seconds : float
        Wall time of the registration.
    warnings : tuple of str
        Anything the user should know about this pair (e.g. a fallback).
    info : dict
        Method-specific details (e.g. the elastix parameter maps actually run).
    """

    field: np.ndarray
    warped: np.ndarray
    spacing_xy: tuple[float, float] = (1.0, 1.0)
    origin_xy: tuple[float, float] = (0.0, 0.0)
    metric: float | None = None
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    info: dict = dc_field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """A registration method: ``register(fixed, moving, references=...) -> RegistrationResult``."""

    name: str

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)) -> RegistrationResult:
        ...  # pragma: no cover


def check_pair(fixed, moving, references=()) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Validate a fixed/moving pair (and references) of 2D finite sections of one shape."""
    fixed = np.asarray(fixed)
    moving = np.asarray(moving)
    for name, a in (("fixed", fixed), ("moving", moving)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be a 2D section (H, W), got shape {a.shape}")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same "
                         f"shape (sections of one stack share a grid)")
    refs = [np.asarray(r) for r in references]
    for i, r in enumerate(refs):
        if r.shape != fixed.shape:
            raise ValueError(f"reference {i} has shape {r.shape}, expected {fixed.shape}")
    for name, a in [("fixed", fixed), ("moving", moving)] + [(f"reference {i}", r)
                                                            for i, r in enumerate(refs)]:
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or infinite values")
    return fixed, moving, refs


def content_mask(section: np.ndarray, *, background: float = 0.0, erode_px: int = 2,
                 min_fraction: float = 0.05) -> np.ndarray | None:
    """Where a section has content: not the empty (``background``-filled) space around it.

    Sections that were warped, or cut from a larger canvas, carry empty borders; a similarity
    measured there aligns the borders instead of the tissue (ssEMnet's "empty space"). The
    mask is ``section != background``, holes filled (dark pixels inside the tissue stay
    in), eroded by ``erode_px`` to drop the interpolated rim.

    Returns
    -------
    ndarray of bool, shape (H, W), or None
        None when the whole section is content (no mask needed), or when less than
        ``min_fraction`` of it would remain (a blank section: better unmasked).
    """
    from scipy import ndimage

    section = np.asarray(section)
    mask = ndimage.binary_fill_holes(section != background)
    if erode_px > 0:
        mask = ndimage.binary_erosion(mask, iterations=int(erode_px), border_value=1)
    if mask.all() or mask.mean() < min_fraction:
        return None
    return mask


#: A mask keeping less than this fraction of its section is warned about (inverted?).
MOSTLY_EXCLUDED = 0.25


def checked_mask(mask, shape, name: str, *, warn: bool = True) -> np.ndarray:
    """A mask (ndarray or itk.Image) as bool, elastix's convention (nonzero = use), checked
    against the section's shape; one that excludes everything is an error."""
    from ..itkimage import is_itk_image

    if is_itk_image(mask):
        import itk

        mask = itk.array_from_image(mask)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape}, the section {tuple(shape)}")
    out = mask != 0
    if not out.any():
        raise ValueError(f"{name} excludes everything (elastix's convention: nonzero = "
                         f"tissue to use, zero = excluded)")
    if warn and out.mean() < MOSTLY_EXCLUDED:
        log.warning("%s keeps only %.0f%% of the section: elastix's convention is nonzero = "
                    "tissue to use, zero = excluded; is it inverted?", name, 100 * out.mean())
    return out


def checked_masks(fixed_mask, moving_mask, shape):
    """``(fixed_mask, moving_mask)`` as bool arrays (:func:`checked_mask`, no warning), each
    None where not given."""
    return tuple(None if m is None else checked_mask(m, shape, name, warn=False)
                 for m, name in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")))


def takes_masks(method) -> bool:
    """Whether ``method.register`` takes ``fixed_mask`` and ``moving_mask`` (every method
    but the tiled one)."""
    import inspect

    params = inspect.signature(method.register).parameters
    return "fixed_mask" in params and "moving_mask" in params
