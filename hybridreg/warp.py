"""Warping images with pull fields (see :mod:`hybridreg.fields` for the contract).

Both functions return ``(warped, valid_mask)``: ``valid_mask`` is True where the sampled
moving point ``p + u(p)`` lies inside the moving image (between the centres of its border
pixels), i.e. where the warped value is not made up from outside the section.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .fields import index_grid, sampling_grid, to_pixels, validate_field

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["warp", "warp_torch", "valid_mask"]


def valid_mask(u: np.ndarray, *, spacing_xy=(1.0, 1.0), margin_px: float = 0.0) -> np.ndarray:
    """True where ``p + u(p)`` lies inside the image, at least ``margin_px`` from its edge.

    Returns
    -------
    mask : ndarray of bool, shape (H, W)
    """
    u = validate_field(u)
    return _inside(index_grid(u.shape[1:]) + to_pixels(u, spacing_xy), u.shape[1:],
                   margin_px=margin_px)


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
    warped = np.stack([
        ndimage.map_coordinates(c, coords, order=order, mode="constant", cval=cval,
                                prefilter=order > 1)
        for c in src
    ]).astype(out_dtype, copy=False)
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
