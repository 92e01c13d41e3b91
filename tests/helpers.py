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


class PhaseCorrelation:
    """A small, deterministic translation-only method for testing the stack machinery."""

    name = "phasecorr"
    config = {"method": "phasecorr"}

    def __init__(self):
        self.calls = 0

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        from hybridreg.methods.base import RegistrationResult, check_pair

        self.calls += 1
        fixed, moving, _ = check_pair(fixed, moving, references)
        f = np.fft.fft2(fixed - fixed.mean())
        m = np.fft.fft2(moving - moving.mean())
        r = np.fft.ifft2(m * np.conj(f) / (np.abs(m * np.conj(f)) + 1e-9)).real
        dy, dx = np.unravel_index(np.argmax(r), r.shape)
        h, w = fixed.shape
        dy, dx = (dy + h // 2) % h - h // 2, (dx + w // 2) % w - w // 2
        u = np.zeros((2, h, w), np.float32)
        u[0], u[1] = dx * spacing_xy[0], dy * spacing_xy[1]
        return RegistrationResult(field=u, warped=moving, metric=float(r.max()))
