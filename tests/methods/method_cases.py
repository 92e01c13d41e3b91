"""Shared cases of the method tests: shifted textures, tiny models, ssEMnet settings."""
from __future__ import annotations

import numpy as np
import torch

from helpers import smooth_texture
from hybridreg.methods.ssemnet import SSEMnetMethod
from hybridreg.models import FeatureAutoencoder
from hybridreg.warp import warp

SHIFT = (2.5, -1.5)  # (x, y) pixels: the true pull field of the shifted pairs
# ssEMnet settings sized for 64 px tests; the published way of warping (the section, at
# every step), whose mechanics these tests hold: the default warp_stride=2 warps the
# stand-in autoencoder's final features, 32 px here (its own test is in
# test_methods_ssemnet.py)
FAST = dict(iterations=(30, 20, 10), grid_px=16, warp_stride=1)


def shifted_pair(n: int = 64, shift=SHIFT, *, seed: int = 0):
    """A smooth texture (grey values 20-220) and a copy shifted so that the pull field is
    ``shift``: ``moving(p + shift) == fixed(p)``."""
    big = smooth_texture((n + 16, n + 16), seed=seed, sigma=2.0) * 200 + 20
    u = np.zeros((2, n + 16, n + 16), np.float32)
    u[0], u[1] = -shift[0], -shift[1]
    moving = warp(big, u)[0]
    return big[8:-8, 8:-8], moving[8:-8, 8:-8]


def true_field(n: int = 64, shift=SHIFT) -> np.ndarray:
    u = np.zeros((2, n, n), np.float32)
    u[0], u[1] = shift
    return u


def epe(u, u_true, margin: int = 8) -> float:
    e = np.linalg.norm(u - u_true, axis=0)
    return float(e[margin:-margin, margin:-margin].mean())


def intensity_autoencoder() -> FeatureAutoencoder:
    """A FeatureAutoencoder whose encoder is the intensity, blurred and at half resolution.

    Layer 1 (1 -> 2 channels, 3x3 centre taps +1 and -1, ReLU) splits the normalised
    intensity into its positive and negative parts without losing anything; layer 2 (stride
    2) averages each part over 3x3. The features are thus a smoothed, downsampled intensity:
    a stand-in that takes the (untrained) learned features out of the test, so that what is
    tested is the optimisation (map, pyramid, warp, masks, loss drop).
    """
    ae = FeatureAutoencoder([(2, 3, 1), (2, 3, 2)], feature_relu=True)
    with torch.no_grad():
        for p in ae.encoder.parameters():
            p.zero_()
        ae.encoder[0].weight[0, 0, 1, 1] = 1.0
        ae.encoder[0].weight[1, 0, 1, 1] = -1.0
        for ch in range(2):
            ae.encoder[1].weight[ch, ch] = 1.0 / 9.0
    return ae


def ssemnet(ae_path, **kw) -> SSEMnetMethod:
    return SSEMnetMethod(ae_path, feature_stride=2, **{**FAST, **kw})
