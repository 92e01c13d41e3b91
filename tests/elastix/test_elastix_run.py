"""Pair registration with elastix: the sign, the total field, initial fields, channels, errors.

Seeded synthetic EM-like sections deformed by known pull fields (``elastix_cases``); the
shared registrations are fixtures of ``conftest.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from elastix_cases import (ORIGIN_XY, SHAPE_YX, SHIFT_PX, SPACING_XY, fewer_iterations,
                           interior, shift_field)
from scipy import ndimage

from hybridreg import elastix as elx
from hybridreg import fields
from hybridreg.metrics import endpoint_error, ncc
from hybridreg.warp import warp

pytestmark = pytest.mark.elastix


def test_parse_final_metric():
    log = ("1:ItNr\t2:Metric\t3a:Time\n0\t-0.5\t0.1\n1\t-0.7\t0.1\n"
           "Final metric value  = -0.71\n"
           "1:ItNr\t2:Metric\t3a:Time\n0\t-0.8\t0.1\n1\t-0.9\t0.1\n"
           "Final metric value  = -0.912\nSettings of ...\n")
    assert elx.parse_final_metric(log) == pytest.approx(-0.912)
    cut = log[:log.rindex("Final metric")]  # a log cut short: the last table row
    assert elx.parse_final_metric(cut) == pytest.approx(-0.9)
    assert elx.parse_final_metric("nothing here") is None


# --- registration ----------------------------------------------------------------------------

@pytest.mark.parametrize("params, spacing_xy, as_itk", [
    ("translation", (1.0, 1.0), False),
    ("em_affine", SPACING_XY, True),
])
def test_pure_shift_has_the_right_sign(itk, fixed, params, spacing_xy, as_itk):
    # moving(p) = fixed(p - s): then warped(p) = moving(p + u) = fixed(p) needs u = +s.
    u_shift = shift_field(SHAPE_YX, SHIFT_PX, spacing_xy)
    moving = warp(fixed, -u_shift, spacing_xy=spacing_xy, order=3)[0]
    f, m = fixed, moving
    kwargs = {"spacing_xy": spacing_xy, "origin_xy": ORIGIN_XY}
    if as_itk:  # itk.Image input: the grid comes from the image
        f, m = itk.image_from_array(fixed), itk.image_from_array(moving)
        for img in (f, m):
            img.SetSpacing(spacing_xy)
            img.SetOrigin(ORIGIN_XY)
        kwargs = {}
    r = elx.register_pair(f, m, params=params, threads=2, **kwargs)
    assert r.field.shape == (2,) + SHAPE_YX and r.field.dtype == np.float32
    assert r.spacing_xy == spacing_xy and r.origin_xy == ORIGIN_XY
    err_px = fields.to_pixels(r.field - u_shift, spacing_xy)[:, interior()]
    assert np.abs(err_px.mean(axis=1)).max() < 0.1, err_px.mean(axis=1)
    assert np.abs(err_px).max() < 0.2
    assert r.final_metric is not None and r.seconds > 0


def test_writes_only_into_log_dir(itk, fixed, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    moving = np.roll(fixed, 1, axis=1)
    r = elx.register_pair(fixed, moving, params="translation", threads=2)
    assert list(work.iterdir()) == []  # (itk.transformix_deformation_field writes here)
    assert abs(r.field[0][interior()].mean() - 1.0) < 0.1
    logs = tmp_path / "logs"
    elx.register_pair(fixed, moving, params="translation", threads=2, log_dir=logs)
    assert list(work.iterdir()) == []
    assert {"elastix.log", "transformix.log", "TransformParameters.0.txt"} <= \
        {p.name for p in logs.iterdir()}


def test_bspline_chain_recovers_a_smooth_field(chain_result, smooth_case):
    r = chain_result
    assert [m["Transform"][0] for m in r.transform_parameter_maps] == [
        "AffineTransform", "BSplineTransform"]
    assert [m["Transform"][0] for m in r.parameter_maps] == ["AffineTransform",
                                                             "BSplineTransform"]
    err = endpoint_error(r.field, smooth_case["u_true"], spacing_xy=SPACING_XY,
                         mask=interior())
    none = endpoint_error(np.zeros_like(r.field), smooth_case["u_true"],
                          spacing_xy=SPACING_XY, mask=interior())
    # Unregistered: over 3 px. The affine stage alone leaves about 0.9 px (it cannot follow
    # two bumps). The 32-px grid with its bending-energy penalty smooths bumps of sigma
    # 20-25 px a little: 0.12 px measured (the same at 150 and at the shipped 500
    # iterations). 0.3 px is a tenth of the motion and a third of the affine-only error.
    assert none.mean_px > 3.0
    assert err.mean_px < 0.3, err
    assert err.max_px < 1.0, err
    assert fields.folding_fraction(r.field, spacing_xy=SPACING_XY) == 0.0
    assert r.final_metric is not None and -1.0 <= r.final_metric < -0.9


def reproduce(moving, u):
    """``warp(moving, u)`` with elastix's final interpolator (cubic B-spline, order 3)."""
    return warp(moving, u, spacing_xy=SPACING_XY, order=3)


def test_returned_field_reproduces_elastix_result(chain_result, smooth_case, itk):
    r = chain_result
    warped, valid = reproduce(smooth_case["moving"], r.field)
    mask = interior() & valid
    assert ncc(warped, r.warped, mask=mask) > 0.999
    np.testing.assert_allclose(warped[mask], r.warped[mask], atol=1e-4)  # exact, in fact
    # a component-swapped field does not
    swapped = reproduce(smooth_case["moving"], r.field[::-1].copy())[0]
    assert ncc(swapped, r.warped, mask=mask) < 0.99
    # the ITK transform holds the same field on the same grid
    u, spacing, origin = fields.from_itk(r.transform.GetDisplacementField())
    np.testing.assert_allclose(u, r.field, atol=1e-5)
    assert spacing == SPACING_XY and origin == ORIGIN_XY


def test_initial_field_gives_the_total_field(initial_result, smooth_case):
    r = initial_result
    assert [m["Transform"][0] for m in r.transform_parameter_maps] == [
        "ExternalTransform", "BSplineTransform"]
    assert all("TransformAddress" not in m for m in r.transform_parameter_maps)
    np.testing.assert_array_equal(r.initial_field, smooth_case["initial"])
    mask = interior()
    # the total field reproduces elastix's own result image ...
    warped, valid = reproduce(smooth_case["moving"], r.field)
    assert ncc(warped, r.warped, mask=mask & valid) > 0.999
    np.testing.assert_allclose(warped[mask & valid], r.warped[mask & valid], atol=1e-4)
    # ... the initial field alone does not, and the total is close to the truth
    alone = reproduce(smooth_case["moving"], r.initial_field)[0]
    assert ncc(alone, r.warped, mask=mask) < 0.99
    before = endpoint_error(r.initial_field, smooth_case["u_true"], spacing_xy=SPACING_XY,
                            mask=mask)
    after = endpoint_error(r.field, smooth_case["u_true"], spacing_xy=SPACING_XY, mask=mask)
    assert before.mean_px > 0.8
    assert after.mean_px < 0.15, after  # the refinement finds the missing bump (0.02 measured)


def test_resampled_initial_field_gives_the_total_field(resampled_result, initial_result,
                                                       smooth_case):
    r = resampled_result
    assert r.initial_mode == "resample" and initial_result.initial_mode == "external"
    assert [m["Transform"][0] for m in r.transform_parameter_maps] == ["BSplineTransform"]
    np.testing.assert_array_equal(r.initial_field, smooth_case["initial"])
    mask = interior()
    # warped is the moving section resampled with the total field (elastix wrote none)
    warped, valid = reproduce(smooth_case["moving"], r.field)
    np.testing.assert_allclose(warped[mask & valid], r.warped[mask & valid], atol=1e-4)
    before = endpoint_error(r.initial_field, smooth_case["u_true"], spacing_xy=SPACING_XY,
                            mask=mask)
    after = endpoint_error(r.field, smooth_case["u_true"], spacing_xy=SPACING_XY, mask=mask)
    assert before.mean_px > 0.8
    assert after.mean_px < 0.15, after
    # the same total as the external initial transform, up to the second interpolation
    between = endpoint_error(r.field, initial_result.field, spacing_xy=SPACING_XY, mask=mask)
    assert between.mean_px < 0.1, between


def test_a_pre_resampled_moving_section_gives_the_same_result(resampled_result, fixed,
                                                             smooth_case):
    """moving_resampled (the caller's own warp by the initial field) replaces register_pair's
    resampling: the same field to float precision, and the ITK transform is built only when
    asked for."""
    pre = warp(smooth_case["moving"], smooth_case["initial"], spacing_xy=SPACING_XY, order=1)[0]
    r = elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                          spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                          initial_field=smooth_case["initial"], threads=2,
                          initial_mode="resample", moving_resampled=pre)
    np.testing.assert_allclose(r.field, resampled_result.field, atol=1e-5)
    assert "transform" not in vars(r)  # nothing built that is not used
    u, _, _ = fields.from_itk(r.transform.GetDisplacementField())
    np.testing.assert_allclose(u, r.field, atol=1e-6)
    with pytest.raises(ValueError, match="moving_resampled"):
        elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                          initial_field=smooth_case["initial"], moving_resampled=pre)
    with pytest.raises(ValueError, match="moving_resampled has shape"):
        elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                          initial_field=smooth_case["initial"], initial_mode="resample",
                          moving_resampled=pre[:-1])


def test_bspline_map_field_equals_transformix(itk, fixed, smooth_case, tmp_path, monkeypatch):
    """The numpy B-spline evaluation against transformix, on a non-unit grid with an origin."""
    r = elx.register_pair(fixed, smooth_case["moving"],
                          params=fewer_iterations(["em_bspline"], 60),
                          spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY, threads=2)
    (tmap,) = r.transform_parameter_maps
    mine = elx.bspline_map_field(tmap, SHAPE_YX, spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY)
    assert np.abs(mine).max() > 0.5  # a real deformation, not the identity
    moving = itk.image_from_array(smooth_case["moving"].astype(np.float32))
    moving.SetSpacing(SPACING_XY)
    moving.SetOrigin(ORIGIN_XY)
    monkeypatch.chdir(tmp_path)  # transformix writes its files into the working directory
    df = itk.transformix_deformation_field(moving, elx.parameter_object([tmap]))
    theirs = fields.from_itk(df)[0]
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
    np.testing.assert_allclose(r.field, theirs, atol=1e-4)
    # what it does not evaluate is left to transformix
    assert elx.bspline_map_field({**tmap, "Transform": ["AffineTransform"]}, SHAPE_YX) is None
    assert elx.bspline_map_field({**tmap, "BSplineTransformSplineOrder": ["2"]},
                                 SHAPE_YX) is None


def test_resample_mode_options(itk, fixed, smooth_case):
    with pytest.raises(ValueError, match="initial_mode"):
        elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                          initial_field=smooth_case["initial"], initial_mode="prewarp")
    # an initial field that sends everything outside the moving section
    far = np.full((2,) + SHAPE_YX, 1e4, np.float32)
    with pytest.raises(ValueError, match="outside the moving section"):
        elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                          initial_field=far, initial_mode="resample")


def test_penalty_with_the_resample_start(itk, fixed, smooth_case):
    """elastix evaluates a bending-energy penalty when the refinement starts by resampling
    (it sees no initial transform); after an external initial transform it is refused."""
    maps = [elx.refinement_map(1, grid_spacing_px=16, resolutions=1, iterations=60,
                               bending_weight=10.0)]
    r = elx.register_pair(fixed, smooth_case["moving"], params=maps, spacing_xy=SPACING_XY,
                          origin_xy=ORIGIN_XY, initial_field=smooth_case["initial"],
                          initial_mode="resample", threads=2)
    assert r.parameter_maps[0]["Metric"][-1] == "TransformBendingEnergyPenalty"
    mask = interior()
    before = endpoint_error(r.initial_field, smooth_case["u_true"], spacing_xy=SPACING_XY,
                            mask=mask)
    after = endpoint_error(r.field, smooth_case["u_true"], spacing_xy=SPACING_XY, mask=mask)
    assert after.mean_px < 0.5 * before.mean_px, (before, after)
    with pytest.raises(ValueError, match="penalties"):
        elx.register_pair(fixed, smooth_case["moving"], params=maps,
                          initial_field=smooth_case["initial"], initial_mode="external")


def test_refinement_with_two_channels(itk, fixed, smooth_case):
    moving = smooth_case["moving"]
    feat_f, feat_m = (ndimage.gaussian_gradient_magnitude(x, 2.0) for x in (fixed, moving))
    mask = np.zeros(SHAPE_YX, bool)
    mask[4:-4, 4:-4] = True
    r = elx.register_pair(fixed, moving, params="refine_bspline_2ch", spacing_xy=SPACING_XY,
                          origin_xy=ORIGIN_XY, initial_field=smooth_case["initial"],
                          fixed_channels=[feat_f], moving_channels=[feat_m],
                          fixed_mask=mask, threads=2)
    warped, valid = reproduce(moving, r.field)
    assert ncc(warped, r.warped, mask=interior() & valid) > 0.999
    err = endpoint_error(r.field, smooth_case["u_true"], spacing_xy=SPACING_XY,
                         mask=interior())
    assert err.mean_px < 0.3, err
    # N channels from the function: 3 channels
    r3 = elx.register_pair(fixed, moving, params=elx.refinement_map(3, iterations=50),
                           spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                           initial_field=smooth_case["initial"],
                           fixed_channels=[feat_f, fixed], moving_channels=[feat_m, moving],
                           threads=2)
    assert np.isfinite(r3.field).all()


def test_channel_and_map_mismatches_raise(itk, fixed, smooth_case):
    moving = smooth_case["moving"]
    one = [ndimage.gaussian_filter(fixed, 2)]
    with pytest.raises(ValueError, match="2 image metric"):
        elx.register_pair(fixed, moving, params="refine_bspline_2ch")
    with pytest.raises(ValueError, match="1 image metric"):
        elx.register_pair(fixed, moving, params="refine_bspline_1ch", fixed_channels=one,
                          moving_channels=one)
    with pytest.raises(ValueError, match="1 image metric"):  # the penalty is no channel
        elx.register_pair(fixed, moving, params="em_bspline", fixed_channels=one,
                          moving_channels=one)
    with pytest.raises(ValueError, match="pair up"):
        elx.register_pair(fixed, moving, params="refine_bspline_2ch", fixed_channels=one)
    with pytest.raises(ValueError, match="shape"):
        elx.register_pair(fixed, moving, params="refine_bspline_2ch", fixed_channels=one,
                          moving_channels=[np.zeros((8, 8), np.float32)])
    with pytest.raises(ValueError, match="penalties"):
        elx.register_pair(fixed, moving, params="em_bspline",
                          initial_field=smooth_case["initial"])
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        elx.register_pair(fixed, moving, params="refine_bspline_1ch",
                          initial_field=smooth_case["initial"][0])
    with pytest.raises(ValueError, match="same grid"):
        elx.register_pair(fixed, moving[:-1], params="translation")


def test_elastix_failure_raises_elastix_error(itk, fixed):
    bad = dict(elx.parameter_maps("translation")[0], Transform=["NoSuchTransform"])
    with pytest.raises(elx.ElastixError, match="NoSuchTransform") as info:
        elx.register_pair(fixed, fixed, params=bad)
    assert isinstance(info.value, RuntimeError)
    # the parameter map's fault: one line (a ValueError: the CLI's one-line user error),
    # with elastix's own log kept on the exception
    assert isinstance(info.value, elx.ElastixConfigError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "(Transform)" in str(info.value)
    assert "NoSuchTransform" in info.value.log_tail


_UNIT_SCRIPT = """
import json, sys
import numpy as np
from elastix_cases import deform, em_like, gaussian_bump
from hybridreg import elastix as elx, fields
from hybridreg.metrics import endpoint_error
fixed = em_like((128, 128), seed=11)
truth = gaussian_bump((128, 128), centre_xy=(60, 70), sigma_px=25, amplitude_px=(3, -2))
moving = deform(fixed, truth)
mask = np.zeros((128, 128), bool)
mask[16:-16, 16:-16] = True
px, weights = {}, {}
for s in (4.0, 0.004):
    r = elx.register_pair(fixed, moving, params=["em_affine", "em_bspline"], spacing_xy=(s, s))
    px[s] = fields.to_pixels(r.field, (s, s))
    weights[s] = [m["Metric1Weight"] for m in r.parameter_maps if "Metric1Weight" in m]
print(json.dumps({"epe": endpoint_error(px[4.0], px[0.004], mask=mask).mean_px,
                  "weights": {str(k): v for k, v in weights.items()}}))
"""


def test_the_default_chain_does_not_depend_on_the_unit_of_the_spacing():
    """The same sections with the spacing in nm (4) and in um (0.004): the same field in
    pixels. elastix computes the bending energy in physical units (it scales as 1/s^2), so
    em_bspline's penalty weight is rescaled with the spacing (issue 18, item 3). In a fresh
    process: elastix runs that follow others in one process have been seen to diverge."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _UNIT_SCRIPT], capture_output=True,
                          text=True, cwd=Path(__file__).parent, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["weights"] == {"4.0": [[repr(16000.0)]], "0.004": [[repr(1000.0 * 0.004 ** 2)]]}
    assert got["epe"] < 0.05
