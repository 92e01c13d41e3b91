"""Warping images with pull fields (see :mod:`hybridreg.fields` for the contract).

Both functions return ``(warped, valid_mask)``: ``valid_mask`` is True where the sampled
moving point ``p + u(p)`` lies inside the moving image (between the centres of its border
pixels), i.e. where the warped value is not made up from outside the section.

The sampling rule of :func:`warp` and :func:`render` is ITK's (``ResampleImageFilter`` with
elastix's ``FinalBSplineInterpolator``, i.e. what transformix does): a point within half a
pixel of the section (continuous index in ``[-0.5, n - 0.5)`` on both axes) is interpolated
with the image mirrored about its border pixels; a point beyond gets ``cval`` (elastix's
``DefaultPixelValue``). So a transformix chain written by hybridreg reproduces hybridreg's
rendering up to the border pixels, not only in the interior.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .fields import index_grid, sampling_grid, to_pixels, validate_field

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["warp", "warp_torch", "valid_mask", "render", "CHUNK_PX"]

#: Pixels per chunk when a section is rendered from a coarse map (about 4 Mpx: the dense
#: field and coordinates of one chunk take about 100 MB, whatever the section's size).
CHUNK_PX = 1 << 22


def valid_mask(u: np.ndarray, *, spacing_xy=(1.0, 1.0), margin_px: float = 0.0) -> np.ndarray:
    """True where ``p + u(p)`` lies inside the image, at least ``margin_px`` from its edge.

    Returns
    -------
    mask : ndarray of bool, shape (H, W)
    """
    u = validate_field(u)
    return _inside(index_grid(u.shape[1:]) + to_pixels(u, spacing_xy), u.shape[1:],
                   margin_px=margin_px)


def _sampled(pts_y: np.ndarray, pts_x: np.ndarray, shape_yx) -> np.ndarray:
    """True where ITK's resampler interpolates (continuous index in ``[-0.5, n - 0.5)`` on
    both axes); elsewhere it writes its default value."""
    h, w = shape_yx
    return (pts_y >= -0.5) & (pts_y < h - 0.5) & (pts_x >= -0.5) & (pts_x < w - 0.5)


def _inside(pts: np.ndarray, shape_yx, *, margin_px: float = 0.0) -> np.ndarray:
    """True where pixel positions ``pts`` (x, y) lie between the centres of the border pixels
    of a ``shape_yx`` grid, at least ``margin_px`` in (with a 1e-4 px tolerance)."""
    h, w = shape_yx
    m, eps = margin_px, 1e-4
    return ((pts[0] >= m - eps) & (pts[0] <= w - 1 - m + eps)
            & (pts[1] >= m - eps) & (pts[1] <= h - 1 - m + eps))


def warp(moving: np.ndarray, u: np.ndarray, *, spacing_xy=(1.0, 1.0), order: int = 1,
         cval: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Warp an image with a pull field: ``warped(p) = moving(p + u(p))``.

    Parameters
    ----------
    moving : ndarray, shape (H, W) or (C, H, W)
        On the same grid as ``u``.
    u : ndarray, shape (2, H, W)
        Pull field in physical units.
    spacing_xy : (float, float)
        Grid spacing, to convert ``u`` to pixels.
    order : int
        0 for nearest neighbour (labels; keeps the dtype), 1 for bilinear, 3 for cubic.
    cval : float
        Value outside the moving image.

    Returns
    -------
    warped : ndarray, shape of ``moving``; float32 unless ``order == 0``
    valid : ndarray of bool, shape (H, W)
    """
    moving = np.asarray(moving)
    u = validate_field(u, name="u")
    if moving.ndim not in (2, 3):
        raise ValueError(f"moving must have shape (H, W) or (C, H, W), got {moving.shape}")
    if moving.shape[-2:] != u.shape[1:]:
        raise ValueError(f"moving has grid {moving.shape[-2:]} but the field u has grid "
                         f"{u.shape[1:]}; they must match")
    pts = index_grid(u.shape[1:]) + to_pixels(u, spacing_xy)
    coords = np.stack([pts[1], pts[0]])
    chans = moving[None] if moving.ndim == 2 else moving
    out_dtype = moving.dtype if order == 0 else np.float32
    src = chans if order == 0 else chans.astype(np.float32, copy=False)
    outside = ~_sampled(coords[0], coords[1], u.shape[1:])
    warped = np.stack([
        ndimage.map_coordinates(c, coords, order=order, mode="mirror", prefilter=order > 1)
        for c in src
    ]).astype(out_dtype, copy=False)
    warped[:, outside] = cval
    if moving.ndim == 2:
        warped = warped[0]
    return warped, _inside(pts, u.shape[1:])


def warp_torch(moving: "torch.Tensor", u_px: "torch.Tensor", *, align_corners: bool = True,
               mode: str = "bilinear", padding_mode: str = "zeros"
               ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Differentiable warp with ``grid_sample``: ``warped(p) = moving(p + u(p))``.

    Parameters
    ----------
    moving : Tensor, shape (B, C, H, W)
    u_px : Tensor, shape (B, 2, H, W)
        Pull field in pixels (use :func:`hybridreg.fields.to_pixels` for physical fields).
    align_corners : bool
        Passed to ``grid_sample``. With the default ``True``, pixel centres are the sample
        points, as in ITK, and the result equals ITK's resample in the interior.
    mode, padding_mode : str
        As in ``grid_sample``; ``"border"`` clamps at the edge as FAEMReg does.

    Returns
    -------
    warped : Tensor, shape (B, C, H, W)
    valid : Tensor of bool, shape (B, 1, H, W)
    """
    import torch
    import torch.nn.functional as F

    if moving.ndim != 4:
        raise ValueError(f"moving must have shape (B, C, H, W), got {tuple(moving.shape)}")
    if u_px.ndim != 4 or u_px.shape[1] != 2:
        raise ValueError(f"u_px must have shape (B, 2, H, W), got {tuple(u_px.shape)}")
    if moving.shape[-2:] != u_px.shape[-2:] or moving.shape[0] != u_px.shape[0]:
        raise ValueError(f"moving {tuple(moving.shape)} and u_px {tuple(u_px.shape)} must "
                         f"agree in batch size and grid")
    grid = sampling_grid(u_px.to(moving.dtype), align_corners=align_corners)
    warped = F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode,
                           align_corners=align_corners)
    h, w = moving.shape[-2:]
    # the centres of the border pixels, in normalised coordinates
    lim_x, lim_y = (1.0, 1.0) if align_corners else (1.0 - 1.0 / w, 1.0 - 1.0 / h)
    eps = 1e-5
    with torch.no_grad():
        valid = ((grid[..., 0].abs() <= lim_x + eps)
                 & (grid[..., 1].abs() <= lim_y + eps)).unsqueeze(1)
    return warped, valid


#: Rows and columns read beyond a region's samples for a cubic spline's prefilter: its
#: influence decays as 0.268^n, below 1e-7 of a value 12 px away.
SPLINE_MARGIN_PX = 12


def _region_of(moving, ys: np.ndarray, xs: np.ndarray, order: int):
    """The region of the section ``moving`` (any array-like that slices) that samples at the
    index positions ``ys`` (rows), ``xs`` (columns) need, read, with ``ys`` and ``xs``
    shifted into it (in place); prefiltered for ``order > 1`` (whole-section values within
    1e-7, :data:`SPLINE_MARGIN_PX`). None when every sample is outside. Samples inside the
    section interpolate as on the whole section: the region reaches its edges wherever a
    sample does."""
    h, w = moving.shape
    margin = 1 if order <= 1 else SPLINE_MARGIN_PX
    ry0 = int(np.clip(np.floor(ys.min()) - margin, 0, h))
    ry1 = int(np.clip(np.ceil(ys.max()) + margin + 1, ry0, h))
    rx0 = int(np.clip(np.floor(xs.min()) - margin, 0, w))
    rx1 = int(np.clip(np.ceil(xs.max()) + margin + 1, rx0, w))
    if ry1 <= ry0 or rx1 <= rx0:
        return None
    region = np.asarray(moving[ry0:ry1, rx0:rx1])
    ys -= ry0
    xs -= rx0
    if order > 1:
        region = ndimage.spline_filter(region.astype(np.float32), order=order)
    return region


def render(moving: np.ndarray, m: np.ndarray, grid, *, order: int = 1, cval: float = 0.0,
           dtype=None, rows: tuple[int, int] | None = None,
           cols: tuple[int, int] | None = None, chunk_px: int = CHUNK_PX) -> np.ndarray:
    """Warp a section with a coarse map, chunk by chunk: ``warp(moving, grid.dense(m))``.

    The dense field exists one chunk of rows at a time (about ``chunk_px`` pixels), so the
    memory is the output and the moving section (in its own dtype, never copied to float)
    plus one chunk, at any section size.

    Parameters
    ----------
    moving : ndarray or hybridreg.io.SectionPlane, shape (H, W)
        The raw section on ``grid``'s section grid, any dtype. A section read region by
        region (a :class:`hybridreg.io.SectionPlane`, or any array-like that slices, such
        as a zarr array) is read one chunk's region at a time (cubic: prefiltered per
        region, within 1e-7 of the whole section's prefilter).
    m : ndarray, shape (2, h, w)
        The map (:class:`hybridreg.fields.MapGrid`), physical units.
    grid : hybridreg.fields.MapGrid
    order : int
        0 (nearest; keeps the dtype: labels), 1 (bilinear) or 3 (cubic: prefiltered once).
    dtype : numpy dtype, optional
        Output dtype (rounded and clipped to its range for integers); default float32
        (``moving``'s dtype with ``order=0``).
    rows, cols : (int, int), optional
        Render only rows ``[y0, y1)`` and columns ``[x0, x1)`` (an output chunk).

    Returns
    -------
    ndarray, shape (y1 - y0, x1 - x0)
    """
    # a section read region by region (hybridreg.io.SectionPlane): each chunk reads the
    # region its samples fall in, so that memory stays bounded at any section size
    from .io.base import is_array_like

    lazy = is_array_like(moving)
    if not lazy:
        moving = np.asarray(moving)
    h, w = grid.shape_yx
    if tuple(moving.shape) != (h, w):
        raise ValueError(f"moving has grid {tuple(moving.shape)} but the map is for {h}x{w} "
                         f"sections")
    y_lo, y_hi = (0, h) if rows is None else (int(rows[0]), int(rows[1]))
    x_lo, x_hi = (0, w) if cols is None else (int(cols[0]), int(cols[1]))
    if dtype is None:
        dtype = moving.dtype if order == 0 else np.float32
    dtype = np.dtype(dtype)
    out = np.empty((y_hi - y_lo, x_hi - x_lo), dtype)
    src = moving
    if order > 1 and not lazy:
        src = ndimage.spline_filter(moving.astype(np.float32), order=order)
    nx = x_hi - x_lo
    step = max(1, int(chunk_px) // max(1, nx))
    sx, sy = grid.spacing_xy
    xs = np.arange(x_lo, x_hi, dtype=np.float64)
    for y0 in range(y_lo, y_hi, step):
        y1 = min(y_hi, y0 + step)
        u = grid.dense(m, y0, y1, x_lo, x_hi)
        coords = np.empty((2, y1 - y0, nx), np.float64)  # as warp(): the same values
        coords[0] = to_pixels(u[1:2], (sy, sy))[0] + np.arange(y0, y1, dtype=np.float64)[:, None]
        coords[1] = to_pixels(u[0:1], (sx, sx))[0] + xs[None, :]
        del u
        outside = ~_sampled(coords[0], coords[1], (h, w))  # ITK's rule, see the module
        if lazy:
            src = _region_of(moving, coords[0], coords[1], order)
            if src is None:  # every sample outside the section
                out[y0 - y_lo:y1 - y_lo] = cval
                continue
        if order == 0:
            block = ndimage.map_coordinates(src, coords, order=0, mode="mirror")
        else:
            block = ndimage.map_coordinates(src, coords, order=order, mode="mirror",
                                            prefilter=False, output=np.float32)
        block[outside] = cval
        if np.issubdtype(dtype, np.integer) and block.dtype != dtype:
            info = np.iinfo(dtype)
            block = np.clip(np.rint(block), info.min, info.max)
        out[y0 - y_lo:y1 - y_lo] = block
    return out
