"""The ITK-style API: hybridreg.register / hybridreg.align_stack with itk.Image in and out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hybridreg
from hybridreg import synthetic
from hybridreg.metrics import endpoint_error
from hybridreg.models import FAEMRegNet, FeatureAutoencoder
from hybridreg.phantom import make_phantom

torch.set_num_threads(1)
pytestmark = pytest.mark.elastix
itk = pytest.importorskip("itk")

SPACING = (0.5, 0.8)
ORIGIN = (3.0, -2.0)


@pytest.fixture(scope="module")
def case():
    ph = make_phantom(sections=3, shape_yx=(96, 96), seed=2)
    d = synthetic.random_deformation((96, 96), seed=5, max_rotation_deg=0.0, max_scale=0.0,
                                     max_shift_px=3.0, elastic_px=1.0,
                                     elastic_spacing_px=48.0, spacing_xy=SPACING)
    fixed = ph.stack[1].astype(np.float32)
    moving = synthetic.warp(fixed, d.forward, spacing_xy=SPACING, order=3)[0]
    return ph.stack.astype(np.float32), fixed, moving, d.recovery


def _image(arr):
    img = itk.image_from_array(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def test_register_itk_images_in_and_out(case):
    _, fixed, moving, truth = case
    torch.manual_seed(0)
    out = hybridreg.register(_image(fixed), _image(moving), method="hybrid",
                             model=FAEMRegNet.from_preset("tiny-pyramid"),
                             features=FeatureAutoencoder([[8, 3, 1], [8, 3, 2], [8, 3, 2]],
                                                         feature_relu=False),
                             threads=1)
    image, transform = out  # unpacks like itk.elastix_registration_method
    assert tuple(image.GetSpacing()) == SPACING and tuple(image.GetOrigin()) == ORIGIN
    assert out.field.shape == (2, 96, 96)
    inner = (slice(None), slice(12, -12), slice(12, -12))
    err = endpoint_error(out.field[inner], truth[inner], spacing_xy=SPACING).mean_px
    none = endpoint_error(np.zeros_like(truth[inner]), truth[inner], spacing_xy=SPACING).mean_px
    assert err < 0.5 * none
    # the transform reproduces the image with ITK's own resampling
    resampled = itk.resample_image_filter(_image(moving), transform=transform,
                                          use_reference_image=True,
                                          reference_image=_image(fixed))
    a = itk.array_from_image(resampled)[12:-12, 12:-12]
    b = itk.array_from_image(image)[12:-12, 12:-12]
    assert np.abs(a - b).mean() < 0.5  # linear vs the method's own interpolation


def test_register_arrays_and_errors(case):
    _, fixed, moving, _ = case
    out = hybridreg.register(fixed, moving, method="elastix", params="em_rigid", threads=1,
                             spacing_xy=SPACING, origin_xy=ORIGIN)
    assert tuple(out.image.GetSpacing()) == SPACING
    with pytest.raises(ValueError, match="2D"):
        hybridreg.register(fixed[None], moving, method="elastix")
    bad = _image(moving)
    bad.SetSpacing((1.0, 1.0))
    with pytest.raises(ValueError, match="share one grid"):
        hybridreg.register(_image(fixed), bad, method="elastix")
    with pytest.raises(TypeError, match="already built"):
        hybridreg.register(fixed, moving, method=out.result and
                           hybridreg.methods.get_method("elastix"), threads=1)


def test_align_stack_keeps_the_grid(case):
    stack, _, _, _ = case
    img = itk.image_from_array(stack)
    img.SetSpacing((*SPACING, 40.0))
    img.SetOrigin((*ORIGIN, 7.0))
    out = hybridreg.align_stack(img, method="elastix", params="em_rigid", threads=1,
                                mode="sequential")
    image, transforms = out
    assert tuple(image.GetSpacing()) == (*SPACING, 40.0)
    assert tuple(image.GetOrigin()) == (*ORIGIN, 7.0)
    assert len(transforms) == 3 and out.fields.shape == (3, 2, 96, 96)
    assert len(out.table) == 3


def test_align_stack_passes_the_stack_options_through():
    # anchor and drift_window are options of the stack alignment, not of the method
    from helpers import PhaseCorrelation

    section = make_phantom(sections=1, shape_yx=(64, 64), seed=4).stack[0]
    shifts = [(0, 0), (3, -2), (-4, 1), (2, 3), (-1, -3), (4, 2)]
    stack = np.stack([np.roll(section, (-dy, -dx), axis=(0, 1)) for dx, dy in shifts])
    stack = stack.astype(np.float32)
    out = hybridreg.align_stack(stack, method=PhaseCorrelation(), anchor=3, prior=1e-6)
    np.testing.assert_allclose(out.fields[:, :, 32, 32],
                               -(np.array(shifts, float) - shifts[3]), atol=1.0)
    chained = hybridreg.align_stack(stack, method=PhaseCorrelation(), mode="sequential")
    corrected = hybridreg.align_stack(stack, method=PhaseCorrelation(), mode="sequential",
                                      drift_window=3)
    from hybridreg.stack import drift_corrected

    # on the maps, which are kept to 1/256 px (MapGrid.quantize)
    a, b = corrected.alignment, chained.alignment
    np.testing.assert_allclose(a.maps, a.grid.quantize(drift_corrected(b.maps, 3)),
                               atol=1e-6)
