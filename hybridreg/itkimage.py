"""numpy arrays to and from ITK and SimpleITK images: the one place that converts.

Arrays are in numpy memory order (``(Z,) Y, X``, vector components last); spacing and
origin are in ITK order (``x, y[, z]``). Every image built here gets its spacing, origin
and an identity direction set explicitly (``CopyInformation`` from a scalar image would
reset a vector image's length). hybridreg supports axis-aligned grids only: images with
another direction are refused. itk and SimpleITK are imported on first use.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .checks import as_xy

__all__ = ["is_itk_image", "to_itk", "from_itk", "section_to_itk", "section_from_itk",
           "to_sitk", "from_sitk"]


def is_itk_image(obj) -> bool:
    """Whether ``obj`` is an ``itk.Image`` (duck-typed: numpy arrays are not)."""
    return (not isinstance(obj, np.ndarray) and hasattr(obj, "GetImageDimension")
            and hasattr(obj, "GetSpacing"))


def _grid(arr: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
          is_vector: bool) -> tuple[int, list[float], list[float]]:
    dim = arr.ndim - (1 if is_vector else 0)
    spacing = [float(s) for s in spacing]
    origin = [float(o) for o in origin]
    if len(spacing) != dim or len(origin) != dim:
        raise ValueError(f"a {dim}D image needs {dim} spacing and origin values, got "
                         f"spacing {spacing} and origin {origin}")
    return dim, spacing, origin


def to_itk(arr: np.ndarray, *, spacing: Sequence[float], origin: Sequence[float],
           is_vector: bool = False):
    """An ``itk.Image`` of ``arr`` with spacing, origin and identity direction set.

    Parameters
    ----------
    arr : ndarray, shape ((Z,) Y, X) or ((Z,) Y, X, C) with ``is_vector``
        Pixel values, in the pixel type they should have (no conversion here).
    spacing, origin : sequence of float, ITK order (x, y[, z])
    is_vector : bool
        The last axis holds vector components.
    """
    import itk  # lazy: importing hybridreg must not import itk

    dim, spacing, origin = _grid(np.asarray(arr), spacing, origin, is_vector)
    img = itk.image_from_array(np.ascontiguousarray(arr), is_vector=is_vector)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    direction = itk.Matrix[itk.D, dim, dim]()
    direction.SetIdentity()
    img.SetDirection(direction)
    return img


def from_itk(image, *, what: str = "image", dimension: int | None = None
             ) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """``(array, spacing, origin)`` of an ``itk.Image``; the array is a copy.

    Raises
    ------
    ValueError
        The image is not ``dimension``-D (when given) or its direction is not the identity;
        the message names ``what``.
    """
    import itk

    dim = image.GetImageDimension()
    if dimension is not None and dim != dimension:
        raise ValueError(f"{what}: expected a {dimension}D image, got dimension {dim}")
    direction = np.asarray(image.GetDirection())
    if not np.allclose(direction, np.eye(dim)):
        raise ValueError(f"{what} has a non-identity direction {direction.tolist()}; "
                         f"hybridreg supports axis-aligned grids only")
    arr = np.array(itk.array_from_image(image), copy=True)
    return (arr, tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()))


def section_to_itk(section, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0), dtype=np.float32):
    """One section to a 2D ``itk.Image`` with spacing, origin and identity direction set.

    Parameters
    ----------
    section : ndarray, shape (H, W)
        Rows are y, columns x.
    spacing_xy, origin_xy : (float, float)
        Physical spacing and the physical position of pixel (0, 0), as (x, y).
    dtype : numpy dtype or None
        Pixel type of the image (default float32); ``None`` keeps the section's dtype.

    Returns
    -------
    itk.Image
        2D scalar image of size (W, H) in ITK's (x, y) order.
    """
    arr = np.asarray(section)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"section must be a non-empty 2D array (H, W), got shape {arr.shape}")
    spacing = as_xy(spacing_xy, "spacing_xy", positive=True)
    origin = as_xy(origin_xy, "origin_xy")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return to_itk(arr, spacing=spacing, origin=origin)


def section_from_itk(image) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """A 2D scalar ``itk.Image`` to ``(section, spacing_xy, origin_xy)``.

    Returns
    -------
    section : ndarray, shape (H, W)
        A copy, in the image's pixel type.
    spacing_xy, origin_xy : (float, float)

    Raises
    ------
    ValueError
        For images that are not 2D, vector images and non-identity directions.
    """
    if image.GetImageDimension() != 2:
        raise ValueError(f"expected a 2D image, got dimension {image.GetImageDimension()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
                         f"components per pixel (for fields use hybridreg.fields.from_itk)")
    return from_itk(image, what="image", dimension=2)


def to_sitk(arr: np.ndarray, *, spacing: Sequence[float], origin: Sequence[float],
            is_vector: bool = False):
    """A ``SimpleITK.Image`` of ``arr`` with spacing, origin and identity direction set.

    Same conventions as :func:`to_itk`.
    """
    import SimpleITK as sitk

    dim, spacing, origin = _grid(np.asarray(arr), spacing, origin, is_vector)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=is_vector)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.eye(dim).ravel().tolist()))
    return img


def from_sitk(image) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """``(array, spacing, origin)`` of a ``SimpleITK.Image``: numpy order, components last.

    No checks: the caller validates dimension, components and direction with its own
    messages.
    """
    import SimpleITK as sitk

    return (sitk.GetArrayFromImage(image), tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()))
