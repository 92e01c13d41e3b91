"""Seeded synthetic images and fields for tests."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_texture(shape_yx, *, seed: int, sigma: float = 2.0) -> np.ndarray:
    """A seeded, smooth random texture in [0, 1], float32."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape_yx), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return x.astype(np.float32)


def smooth_field(shape_yx, *, seed: int, amplitude_px: float, sigma: float = 8.0) -> np.ndarray:
    """A seeded smooth, asymmetric (u_x != u_y) field in pixels, shape (2, H, W)."""
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape_yx), sigma)
                  for _ in range(2)])
    u *= amplitude_px / np.abs(u).max()
    u[0] += 0.5 * amplitude_px  # a mean shift in x only: swapping channels must show
    return u.astype(np.float32)
