"""The elastix method on a deformed phantom section."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import metrics, phantom, synthetic, warp
from hybridreg.methods import get_method
from hybridreg.methods.base import content_mask

pytestmark = pytest.mark.elastix


def test_default_chain_recovers_a_deformed_phantom_section():
    """em_affine + em_bspline on one phantom section deformed with the default magnitudes.

    Bound: the synthetic deformation (affine + cubic B-spline on a 64-px control grid) lies
    inside the model class of the chain (affine, then a 32-px B-spline grid), so the residual
    comes from interpolation and the bending-energy penalty only: 0.08-0.11 px mean, at most
    0.2 px at the 95th percentile, over three seeds (unregistered: 11-13 px). We require
    0.25 px mean and 0.5 px p95, about 2% of the motion.
    """
    shape = (192, 192)
    section = phantom.make_phantom(sections=1, shape_yx=shape, seed=1).stack[0]
    section = section.astype(np.float32)
    deformation = synthetic.random_deformation(shape, seed=11)
    moving = warp.warp(section, deformation.forward, order=3)[0]
    r = get_method("elastix", threads=2).register(section, moving)
    mask = metrics.interior_mask(shape, margin_px=16) & warp.valid_mask(deformation.recovery)
    none = metrics.endpoint_error(np.zeros_like(r.field), deformation.recovery, mask=mask)
    err = metrics.endpoint_error(r.field, deformation.recovery, mask=mask)
    assert none.mean_px > 8.0
    assert err.mean_px < 0.25 and err.p95_px < 0.5, err
    assert metrics.jacobian_stats(r.field, mask=mask)["folding_fraction"] == 0.0
    assert r.metric is not None and r.metric < 0  # elastix's normalised correlation


def test_empty_space_is_masked():
    blank = np.zeros((40, 40), np.float32)
    blank[5:35, 8:30] = 100.0
    m = content_mask(blank, erode_px=1)
    assert m is not None and m[20, 20] and not m[2, 2] and not m[5, 8]
    assert content_mask(np.ones((10, 10))) is None  # all content: no mask needed
    assert content_mask(np.zeros((10, 10))) is None  # blank: better unmasked


def test_unknown_method_and_params():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nonsense")
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        get_method("elastix", params=["no_such_file.txt"])
