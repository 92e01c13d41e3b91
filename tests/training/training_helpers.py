"""Helpers of the training tests (the fixtures are in conftest.py)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from hybridreg.models import load_model

TINY_AE = [(8, 3, 2), (4, 3, 2)]  # stride 4, a few hundred parameters


def model_weights(path):
    """The state dict of the model saved at ``path``."""
    return load_model(path).state_dict()


def smooth_stack(z=5, shape=(128, 128), seed=0):
    """Smooth uint8 sections (bilinear interpolation is nearly exact on them)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((z, *shape)), (0, 4, 4))
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(40 + 180 * x).astype(np.uint8)
