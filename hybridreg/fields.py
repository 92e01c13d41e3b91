"""The displacement-field contract of hybridreg, and field algebra.

Every module of hybridreg holds to this contract; so must code that hands fields to it.

Direction (pull)
    A field ``u`` lives on the *fixed* (output) grid. The fixed physical point ``p`` maps to
    the moving point ``p + u(p)``, and the warped image is ``warped(p) = moving(p + u(p))``.
    This is what ITK's ``DisplacementFieldTransform`` and the deformation fields of
    elastix/transformix mean, so a hybridreg field *is* an ITK/elastix field.

Layout
    numpy ``(2, H, W)`` float32; torch ``(B, 2, H, W)``. Channel 0 is ``u_x`` (along W,
    the columns), channel 1 is ``u_y`` (along H, the rows). Spatial axes stay in memory order
    (y, x). Stacks of fields are ``(Z, 2, H, W)``.

Units
    Physical units (the grid's spacing units, e.g. nm) in every public function and on disk,
    always together with the grid: ``spacing_xy`` and ``origin_xy``. With the default spacing
    of 1, physical units are pixels. Pixel displacements (``disp_px``, ``u_px``) appear only
    inside ``hybridreg.models``; :func:`to_pixels` and :func:`to_physical` are the one place
    that converts. Direction cosines are always the identity.

Grid
    Pixel ``(i, j)`` (row, column) is centred at physical point
    ``(x, y) = (origin_x + j * spacing_x, origin_y + i * spacing_y)``, as in ITK. Fixed and
    moving sections of one stack share a grid.

To ITK
    :func:`to_itk` builds ``itk.Image[itk.Vector[itk.D, 2], 2]`` with
    ``itk.image_from_array(np.moveaxis(u, 0, -1).astype(np.float64), is_vector=True)``, then
    sets origin, spacing and direction explicitly (``CopyInformation`` from a scalar image
    would reset the vector length). :func:`to_itk_transform` wraps it in a
    ``DisplacementFieldTransform[itk.D, 2]``. :func:`from_itk_transform` samples any ITK
    transform (an elastix result, a composite chain) back into a field.

To torch
    ``grid_sample`` is always called with an explicit ``align_corners``; the mapping from
    pixel displacements to normalised sampling coordinates is :func:`sampling_grid`, and
    nowhere else.

On disk
    One ITK vector image per section (``DIR/section_0000.mha``) in physical units carrying the
    fixed grid's spacing and origin (see :mod:`hybridreg.io`), plus, where there is one, the
    section's ITK transform (``.h5``).

Composition
    ``compose(first, second)`` is the field of the point map ``p -> q = p + first(p) ->
    q + second(q)``, so ``warp(moving, compose(first, second)) == warp(warp(moving, second),
    first)`` up to interpolation. Aligning section k to the aligned section k-1 with a pairwise
    field ``v_k`` (raw k-1 grid to raw k) gives ``U_k = compose(U_{k-1}, v_k)``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from .checks import as_spacing_xy, as_xy

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "identity",
    "validate_field",
    "to_pixels",
    "to_physical",
    "physical_grid",
    "sample_field",
    "compose",
    "invert",
    "resample",
    "jacobian_determinant",
    "folding_fraction",
    "to_itk",
    "from_itk",
    "to_itk_transform",
    "from_itk_transform",
    "sampling_grid",
]


def identity(shape_yx: Sequence[int], *, dtype=np.float32) -> np.ndarray:
    """Return the identity field, all zeros.

    Parameters
    ----------
    shape_yx : (int, int)
        Grid shape ``(H, W)``.

    Returns
    -------
    u : ndarray, shape (2, H, W)
    """
    h, w = (int(s) for s in shape_yx)
    return np.zeros((2, h, w), dtype=dtype)


def validate_field(u, *, name: str = "u", shape_yx: Sequence[int] | None = None) -> np.ndarray:
    """Check that ``u`` is a finite ``(2, H, W)`` field and return it as float32.

    Raises
    ------
    ValueError
        With a message naming ``name``, the expected layout and what was found.
    """
    arr = np.asarray(u)
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise ValueError(
            f"{name} must be a displacement field of shape (2, H, W) (channel 0 = u_x, "
            f"channel 1 = u_y), got shape {arr.shape}"
        )
    if arr.shape[1] < 2 or arr.shape[2] < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got {arr.shape[1:]}")
    if shape_yx is not None and tuple(arr.shape[1:]) != tuple(int(s) for s in shape_yx):
        raise ValueError(
            f"{name} has grid shape {tuple(arr.shape[1:])}, expected {tuple(shape_yx)}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def to_pixels(u: np.ndarray, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Physical displacement ``(2, ...)`` to pixels: divide u_x by spacing_x, u_y by spacing_y."""
    sx, sy = as_spacing_xy(spacing_xy)
    scale = np.array([sx, sy], dtype=np.float64).reshape((2,) + (1,) * (np.ndim(u) - 1))
    return (np.asarray(u) / scale).astype(np.float32)


def to_physical(u_px: np.ndarray, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Pixel displacement ``(2, ...)`` to physical units: the inverse of :func:`to_pixels`."""
    sx, sy = as_spacing_xy(spacing_xy)
    scale = np.array([sx, sy], dtype=np.float64).reshape((2,) + (1,) * (np.ndim(u_px) - 1))
    return (np.asarray(u_px) * scale).astype(np.float32)


def physical_grid(shape_yx, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)) -> np.ndarray:
    """Physical coordinates of the pixel centres.

    Returns
    -------
    p : ndarray, shape (2, H, W), float64
        ``p[0]`` is x, ``p[1]`` is y.
    """
    sx, sy = as_spacing_xy(spacing_xy)
    ox, oy = as_xy(origin_xy, "origin_xy")
    h, w = (int(s) for s in shape_yx)
    y, x = np.meshgrid(np.arange(h) * sy + oy, np.arange(w) * sx + ox, indexing="ij")
    return np.stack([x, y])


def sample_field(u: np.ndarray, points_px: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Sample a field at continuous pixel positions, extending it constantly past its edges.

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
    points_px : ndarray, shape (2, ...)
        Positions as (x, y) in pixel units of ``u``'s grid.
    order : int
        Spline order (1 = bilinear).

    Returns
    -------
    ndarray, shape (2, ...)
    """
    coords = np.stack([points_px[1], points_px[0]])  # (row, col) for scipy
    return np.stack(
        [ndimage.map_coordinates(c, coords, order=order, mode="nearest") for c in u]
    ).astype(np.float32)


def index_grid(shape_yx) -> np.ndarray:
    """Pixel coordinates ``(2, H, W)`` float64: channel 0 the column x, channel 1 the row y."""
    h, w = shape_yx
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
    return np.stack([x, y])


def compose(first: np.ndarray, second: np.ndarray, *, spacing_xy=(1.0, 1.0),
            order: int = 1) -> np.ndarray:
    """Compose two pull fields on one grid: ``c(p) = first(p) + second(p + first(p))``.

    ``warp(moving, c)`` equals ``warp(warp(moving, second), first)`` up to interpolation:
    ``second`` is applied to the moving image first, then ``first``. ``second`` is extended
    constantly beyond its grid.

    Parameters
    ----------
    first, second : ndarray, shape (2, H, W)
        Physical units.
    spacing_xy : (float, float)

    Returns
    -------
    c : ndarray, shape (2, H, W), float32
    """
    first = validate_field(first, name="first")
    second = validate_field(second, name="second", shape_yx=first.shape[1:])
    pts = index_grid(first.shape[1:]) + to_pixels(first, spacing_xy)
    return (first + sample_field(second, pts, order=order)).astype(np.float32)


def invert(u: np.ndarray, *, spacing_xy=(1.0, 1.0), iterations: int = 100,
           tol_px: float = 1e-4) -> np.ndarray:
    """Numerically invert a pull field by fixed-point iteration.

    Returns ``v`` with ``v(p) = -u(p + v(p))``, so that ``compose(u, v)`` and
    ``compose(v, u)`` are close to zero where both are defined. Converges when the field's
    gradient stays below 1 (no folding).

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Physical units.
    iterations : int
        Maximum number of iterations.
    tol_px : float
        Stop when the largest update is below this many pixels.

    Returns
    -------
    v : ndarray, shape (2, H, W), float32
    """
    u = validate_field(u)
    u_px = to_pixels(u, spacing_xy).astype(np.float64)
    grid = index_grid(u.shape[1:])
    v_px = -u_px
    for it in range(iterations):
        new = -sample_field(u_px, grid + v_px).astype(np.float64)
        step = float(np.abs(new - v_px).max())
        v_px = new
        if step < tol_px:
            break
    else:
        log.warning("invert: no convergence after %d iterations (last step %.3g px)",
                    iterations, step)
    return to_physical(v_px, spacing_xy)


def resample(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0),
             to_shape_yx, to_spacing_xy, to_origin_xy=(0.0, 0.0),
             order: int = 1) -> np.ndarray:
    """Resample a field onto another grid (e.g. a coarse field onto the full-resolution one).

    Values are physical displacements and are not rescaled; the field is extended constantly
    past its edges.

    Returns
    -------
    ndarray, shape (2, *to_shape_yx), float32
    """
    u = validate_field(u)
    sx, sy = as_spacing_xy(spacing_xy)
    ox, oy = as_xy(origin_xy, "origin_xy")
    p = physical_grid(to_shape_yx, spacing_xy=to_spacing_xy, origin_xy=to_origin_xy)
    pts = np.stack([(p[0] - ox) / sx, (p[1] - oy) / sy])
    return sample_field(u, pts, order=order)


def jacobian_determinant(u: np.ndarray, *, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Jacobian determinant of the point map ``p -> p + u(p)``.

    Central differences in physical units; 1 means no local area change, values <= 0 mean
    folding.

    Returns
    -------
    det : ndarray, shape (H, W), float32
    """
    u = validate_field(u).astype(np.float64)
    sx, sy = as_spacing_xy(spacing_xy)
    dux_dy, dux_dx = np.gradient(u[0], sy, sx)
    duy_dy, duy_dx = np.gradient(u[1], sy, sx)
    return ((1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx).astype(np.float32)


def folding_fraction(u: np.ndarray, *, spacing_xy=(1.0, 1.0), mask=None) -> float:
    """Fraction of pixels (within ``mask``, if given) whose Jacobian determinant is <= 0."""
    det = jacobian_determinant(u, spacing_xy=spacing_xy)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != det.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {det.shape}")
        det = det[mask]
    if det.size == 0:
        return 0.0
    return float(np.mean(det <= 0))


# --- ITK -------------------------------------------------------------------------------------

def to_itk(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)):
    """Field to ``itk.Image[itk.Vector[itk.D, 2], 2]`` with spacing, origin and direction set.

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Physical units.
    """
    from .itkimage import to_itk as image_to_itk

    u = validate_field(u)
    return image_to_itk(np.moveaxis(u, 0, -1).astype(np.float64),
                        spacing=as_spacing_xy(spacing_xy), origin=as_xy(origin_xy, "origin_xy"),
                        is_vector=True)


def from_itk(image) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """ITK 2D vector image (a displacement field) to ``(u, spacing_xy, origin_xy)``.

    Returns
    -------
    u : ndarray, shape (2, H, W), float32, physical units
    spacing_xy, origin_xy : (float, float)
    """
    from .itkimage import from_itk as image_from_itk

    if image.GetImageDimension() != 2:
        raise ValueError(f"expected a 2D vector image, got dimension {image.GetImageDimension()}")
    arr, spacing, origin = image_from_itk(image, what="displacement-field image", dimension=2)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise ValueError(f"expected a 2-component vector image, got array shape {arr.shape}")
    return np.moveaxis(arr, -1, 0).astype(np.float32), spacing, origin


def to_itk_transform(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)):
    """Field to ``itk.DisplacementFieldTransform[itk.D, 2]`` (linear interpolation of the field)."""
    import itk  # lazy: importing hybridreg must not import itk

    transform = itk.DisplacementFieldTransform[itk.D, 2].New()
    transform.SetDisplacementField(to_itk(u, spacing_xy=spacing_xy, origin_xy=origin_xy))
    return transform


def from_itk_transform(transform, *, shape_yx, spacing_xy=(1.0, 1.0),
                       origin_xy=(0.0, 0.0)) -> np.ndarray:
    """Sample any 2D ITK transform on a grid into a field: ``u(p) = T(p) - p``.

    ITK transforms map fixed points to moving points, which is the pull direction of the
    contract, so this is exact up to float precision.

    Returns
    -------
    u : ndarray, shape (2, H, W), float32, physical units
    """
    import itk  # lazy: importing hybridreg must not import itk

    h, w = (int(s) for s in shape_yx)
    # wrapped for float vector images only; T(p) - p is computed in double, then stored as
    # float32, the contract's in-memory type
    field_type = itk.Image[itk.Vector[itk.F, 2], 2]
    filt = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New()
    filt.SetTransform(transform)
    filt.UseReferenceImageOff()
    filt.SetSize([w, h])
    filt.SetOutputSpacing([float(s) for s in as_spacing_xy(spacing_xy)])
    filt.SetOutputOrigin([float(o) for o in as_xy(origin_xy, "origin_xy")])
    filt.Update()
    return from_itk(filt.GetOutput())[0]


# --- torch -----------------------------------------------------------------------------------

def sampling_grid(u_px: "torch.Tensor", *, align_corners: bool) -> "torch.Tensor":
    """Pixel displacements to the normalised sampling grid of ``torch.nn.functional.grid_sample``.

    The only place where normalised coordinates are computed.

    Parameters
    ----------
    u_px : Tensor, shape (B, 2, H, W)
        Pull displacement in pixels, channel 0 = x.
    align_corners : bool
        Must be passed to ``grid_sample`` with the same value. With ``True``, -1 and 1 are the
        centres of the corner pixels; with ``False``, their outer edges.

    Returns
    -------
    grid : Tensor, shape (B, H, W, 2), last axis (x, y)
    """
    import torch

    if u_px.ndim != 4 or u_px.shape[1] != 2:
        raise ValueError(f"u_px must have shape (B, 2, H, W), got {tuple(u_px.shape)}")
    _, _, h, w = u_px.shape
    if h < 2 or w < 2:
        raise ValueError(f"fields must be at least 2x2 pixels, got {h}x{w}")
    ys = torch.arange(h, dtype=u_px.dtype, device=u_px.device)
    xs = torch.arange(w, dtype=u_px.dtype, device=u_px.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    x = gx + u_px[:, 0]
    y = gy + u_px[:, 1]
    if align_corners:
        xn = 2.0 * x / (w - 1) - 1.0
        yn = 2.0 * y / (h - 1) - 1.0
    else:
        xn = (2.0 * x + 1.0) / w - 1.0
        yn = (2.0 * y + 1.0) / h - 1.0
    return torch.stack([xn, yn], dim=-1)
