"""Seeded synthetic cases of the elastix tests: EM-like sections, known pull fields, files.

Seeded synthetic EM-like sections (smooth texture, dark membrane lines and blobs) deformed by
known pull fields, on an anisotropic, non-unit grid with an origin.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from hybridreg import elastix as elx
from hybridreg import fields
from hybridreg.metrics import interior_mask
from hybridreg.warp import warp

SHAPE_YX = (112, 128)
SPACING_XY = (2.0, 1.5)  # anisotropic, non-unit: physical units must be handled
ORIGIN_XY = (10.0, -5.0)
SHIFT_PX = (3.0, -2.0)  # (x, y)
MARGIN_PX = 16


def em_like(shape_yx, *, seed: int) -> np.ndarray:
    """A seeded EM-like section in [0, 1]: textured cytoplasm, dark membranes and blobs."""
    rng = np.random.default_rng(seed)
    h, w = shape_yx
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.5)
    cells = ndimage.gaussian_filter(rng.standard_normal((h, w)), 6.0)
    membranes = np.exp(-(cells / (0.25 * cells.std())) ** 2)  # thin lines on the zero set
    blobs = np.zeros((h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 6)
        blobs += (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    blobs = ndimage.gaussian_filter(np.minimum(blobs, 1.0), 1.0)
    img = 0.6 + 0.08 * texture / texture.std() - 0.35 * membranes - 0.3 * blobs
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def gaussian_bump(shape_yx, *, centre_xy, sigma_px, amplitude_px) -> np.ndarray:
    """A smooth bump field in pixels, shape (2, H, W), with different x and y amplitudes."""
    g = fields.physical_grid(shape_yx)
    b = np.exp(-((g[0] - centre_xy[0]) ** 2 + (g[1] - centre_xy[1]) ** 2) / (2 * sigma_px ** 2))
    return np.stack([amplitude_px[0] * b, amplitude_px[1] * b]).astype(np.float32)


def deform(fixed, u_true, *, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """The moving section for a known pull field: ``warp(moving, u_true) ~= fixed``."""
    inverse = fields.invert(u_true, spacing_xy=spacing_xy)
    return warp(fixed, inverse, spacing_xy=spacing_xy, order=3)[0]


def shift_field(shape_yx, shift_px, spacing_xy) -> np.ndarray:
    u = np.empty((2,) + tuple(shape_yx), np.float32)
    u[0], u[1] = shift_px
    return fields.to_physical(u, spacing_xy)


def interior():
    return interior_mask(SHAPE_YX, margin_px=MARGIN_PX)


def fewer_iterations(params, iterations: int) -> list[dict]:
    maps = elx.parameter_maps(params)
    for m in maps:
        m["MaximumNumberOfIterations"] = [str(iterations)]
    return maps


def write_mha(path: Path, image: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing_xy))
    img.SetOrigin(tuple(float(o) for o in origin_xy))
    sitk.WriteImage(img, str(path))


def read_mha(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
