"""The itk-elastix boundary: parameter maps, pair registration, the total field, export.

Seeded synthetic EM-like sections (smooth texture, dark membrane lines and blobs) deformed by
known pull fields. elastix is loaded once per test session (``hybridreg.elastix.load_itk``).
The transformix/elastix command-line tests use the Debian programs in /usr/bin and skip
without them.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from hybridreg import elastix as elx
from hybridreg import fields
from hybridreg.metrics import endpoint_error, interior_mask, ncc
from hybridreg.warp import warp

pytestmark = pytest.mark.elastix

SHAPE_YX = (112, 128)
SPACING_XY = (2.0, 1.5)  # anisotropic, non-unit: physical units must be handled
ORIGIN_XY = (10.0, -5.0)
SHIFT_PX = (3.0, -2.0)  # (x, y)
MARGIN_PX = 16
ELASTIX_BIN = shutil.which("elastix") or "/usr/bin/elastix"
TRANSFORMIX_BIN = shutil.which("transformix") or "/usr/bin/transformix"


# --- synthetic data --------------------------------------------------------------------------

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


def normalised(m: dict) -> dict:
    """A map with numbers compared as numbers."""
    def norm(v):
        try:
            return float(v)
        except ValueError:
            return v
    return {k: [norm(v) for v in vals] for k, vals in m.items()}


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def itk():
    return elx.load_itk()


@pytest.fixture(scope="module")
def fixed():
    return em_like(SHAPE_YX, seed=1)


@pytest.fixture(scope="module")
def smooth_case(fixed):
    """A shift of (3, -2) px plus two smooth bumps, in physical units on a non-unit grid."""
    bump_a = gaussian_bump(SHAPE_YX, centre_xy=(70, 55), sigma_px=25, amplitude_px=(2.0, 1.5))
    bump_b = gaussian_bump(SHAPE_YX, centre_xy=(35, 80), sigma_px=20, amplitude_px=(-2.0, 1.5))
    shift = fields.to_pixels(shift_field(SHAPE_YX, SHIFT_PX, SPACING_XY), SPACING_XY)
    u_true = fields.to_physical(shift + bump_a + bump_b, SPACING_XY)
    moving = deform(fixed, u_true, spacing_xy=SPACING_XY)
    # A coarse "network" estimate: the shift and one bump, missing the other.
    initial = fields.to_physical(shift + bump_b, SPACING_XY)
    return {"moving": moving, "u_true": u_true, "initial": initial}


@pytest.fixture(scope="module")
def chain_result(itk, fixed, smooth_case):
    """em_affine followed by em_bspline (fewer iterations to keep the test short)."""
    maps = fewer_iterations(["em_affine", "em_bspline"], 150)
    return elx.register_pair(fixed, smooth_case["moving"], params=maps, spacing_xy=SPACING_XY,
                             origin_xy=ORIGIN_XY, threads=2)


@pytest.fixture(scope="module")
def initial_result(itk, fixed, smooth_case):
    """refine_bspline_1ch from an external initial field."""
    return elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                             spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                             initial_field=smooth_case["initial"], threads=2)


@pytest.fixture(scope="module")
def resampled_result(itk, fixed, smooth_case):
    """The same refinement with the moving section resampled by the initial field first."""
    return elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                             spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                             initial_field=smooth_case["initial"], threads=2,
                             initial_mode="resample")


# --- loading ---------------------------------------------------------------------------------

def test_import_does_not_load_itk():
    code = ("import sys, hybridreg.elastix; "
            "assert 'itk' not in sys.modules, 'importing hybridreg.elastix imported itk'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loader_selects_pool_threader_once(itk):
    assert elx.load_itk() is itk
    assert itk.MultiThreaderBase.GetGlobalDefaultThreader() == \
        itk.MultiThreaderBaseEnums.Threader_Pool


# --- parameter maps --------------------------------------------------------------------------

def test_parameter_object_accepts_every_form(itk, tmp_path):
    shipped = elx.shipped_parameter_files()
    assert {"em_rigid", "em_affine", "em_bspline", "refine_bspline_1ch", "refine_bspline_2ch",
            "refine_bspline_3ch"} <= set(shipped)
    path = elx.params_dir() / "em_affine.txt"
    by_name = elx.parameter_maps("em_affine")
    assert by_name == elx.parameter_maps(path) == elx.parameter_maps(str(path))
    assert by_name[0]["Transform"] == ["AffineTransform"]
    assert elx.parameter_maps("bspline")[0]["Transform"] == ["BSplineTransform"]
    po = elx.parameter_object({"Transform": "TranslationTransform", "NumberOfResolutions": 2,
                               "AutomaticTransformInitialization": True,
                               "Metric0Weight": 0.5})
    m = dict(po.GetParameterMap(0))
    assert m["NumberOfResolutions"] == ("2",)
    assert m["AutomaticTransformInitialization"] == ("true",)
    assert m["Metric0Weight"] == ("0.5",)
    chain = elx.parameter_object(["translation", po, ["em_affine", path]])
    assert chain.GetNumberOfParameterMaps() == 4
    assert [dict(chain.GetParameterMap(i))["Transform"][0] for i in range(4)] == [
        "TranslationTransform", "TranslationTransform", "AffineTransform", "AffineTransform"]


def test_parameter_object_errors(itk, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        elx.parameter_object(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        elx.parameter_object(["em_affine", str(missing)])
    with pytest.raises(ValueError, match="em_afine") as info:
        elx.parameter_object("em_afine")
    assert "em_affine" in str(info.value)  # lists what exists
    with pytest.raises(TypeError, match="int"):
        elx.parameter_object(3)
    with pytest.raises(TypeError, match="Transform"):
        elx.parameter_object({"Transform": object()})
    with pytest.raises(ValueError, match="no elastix parameter maps"):
        elx.parameter_object([])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_refinement_files_equal_refinement_map(itk, n):
    (from_file,) = elx.parameter_maps(f"refine_bspline_{n}ch")
    assert normalised(from_file) == normalised(elx.refinement_map(n))
    assert not set(from_file["Metric"]) & elx.TRANSFORM_PENALTIES
    for key in ("Metric", "FixedImagePyramid", "MovingImagePyramid", "Interpolator",
                "ImageSampler"):
        assert len(from_file[key]) == n, key
    assert [f"Metric{i}Weight" in from_file for i in range(n + 1)] == [True] * n + [False]


def test_refinement_map_options():
    m = elx.refinement_map(4, grid_spacing_px=24, weights=[1, 0.5, 0.5, 0.25], resolutions=3)
    assert len(m["Metric"]) == 4 and m["Metric3Weight"] == ["0.25"]
    assert m["FinalGridSpacingInVoxels"] == ["24.0", "24.0"]
    assert m["GridSpacingSchedule"] == ["4.0", "4.0", "2.0", "2.0", "1.0", "1.0"]
    assert m["ImagePyramidSchedule"] == ["4", "4", "2", "2", "1", "1"]
    with pytest.raises(ValueError, match="one entry per channel"):
        elx.refinement_map(2, weights=[1.0])
    with pytest.raises(ValueError, match="positive integer"):
        elx.refinement_map(0)


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
    assert "elastix log" in str(info.value)


# --- export ----------------------------------------------------------------------------------

needs_transformix = pytest.mark.skipif(
    not Path(TRANSFORMIX_BIN).is_file(),
    reason=f"elastix's transformix program ({TRANSFORMIX_BIN}) is not installed "
           f"(Debian package 'elastix')")
needs_elastix = pytest.mark.skipif(
    not Path(ELASTIX_BIN).is_file(),
    reason=f"the elastix program ({ELASTIX_BIN}) is not installed (Debian package 'elastix')")


def run_transformix(tmp_path, chain_dir: Path, last: Path, moving, *, cwd=None):
    moving_path = tmp_path / "moving.mha"
    write_mha(moving_path, moving, spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY)
    out = tmp_path / "out"
    out.mkdir()
    tp = last.name if cwd is not None else str(last)
    proc = subprocess.run([TRANSFORMIX_BIN, "-in", str(moving_path), "-out", str(out),
                           "-tp", tp], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return read_mha(out / "result.mha")


@needs_transformix
@pytest.mark.parametrize("absolute_paths", [True, False])
def test_transformix_reproduces_plain_chain(chain_result, smooth_case, tmp_path,
                                            absolute_paths):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(chain_result, chain_dir, absolute_paths=absolute_paths)
    assert last == chain_dir / "TransformParameters.1.txt"
    text = last.read_text()
    link = str((chain_dir / "TransformParameters.0.txt").resolve()) if absolute_paths \
        else "TransformParameters.0.txt"
    assert f'(InitialTransformParametersFileName "{link}")' in text
    assert '(ResultImagePixelType "float")' in text
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"],
                             cwd=None if absolute_paths else chain_dir)
    assert result.dtype == np.float32
    assert ncc(result, chain_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result, chain_result.warped, atol=1e-3)


@needs_transformix
def test_transformix_reproduces_initial_field_chain(initial_result, smooth_case, tmp_path):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(initial_result, chain_dir)
    first = (chain_dir / "TransformParameters.0.txt").read_text()
    assert '(Transform "DeformationFieldTransform")' in first
    assert "(DeformationFieldInterpolationOrder 1)" in first
    field_path = chain_dir / "initial_field.mha"
    assert f'(DeformationFieldFileName "{field_path.resolve()}")' in first
    from hybridreg.io import read_field

    u, spacing, origin = read_field(field_path)
    np.testing.assert_allclose(u, smooth_case["initial"], atol=1e-6)
    assert tuple(spacing) == SPACING_XY and tuple(origin) == ORIGIN_XY
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"])
    assert ncc(result, initial_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result, initial_result.warped, atol=1e-3)


@needs_transformix
def test_transformix_reproduces_resampled_initial_field_chain(resampled_result, smooth_case,
                                                              tmp_path):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(resampled_result, chain_dir)
    # the B-spline acts first on the fixed points, the initial field after it
    assert '(Transform "BSplineTransform")' in \
        (chain_dir / "TransformParameters.0.txt").read_text()
    assert last == chain_dir / "TransformParameters.1.txt"
    assert '(Transform "DeformationFieldTransform")' in last.read_text()
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"])
    assert ncc(result, resampled_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result[interior()], resampled_result.warped[interior()],
                               atol=1e-2)


def test_write_itk_transform_round_trip(itk, initial_result, tmp_path):
    path = elx.write_itk_transform(tmp_path / "sub" / "section.h5", initial_result.transform)
    assert path.is_file()
    (back,) = itk.transformread(str(path))
    back = itk.DisplacementFieldTransform[itk.D, 2].cast(back)
    u, spacing, origin = fields.from_itk(back.GetDisplacementField())
    np.testing.assert_allclose(u, initial_result.field, atol=1e-6)
    assert spacing == SPACING_XY and origin == ORIGIN_XY


# --- the parameter files in the elastix 5.0 command-line program ----------------------------

def run_elastix_cli(tmp_path, files, n_channels=1, *, iterations=None):
    fixed = em_like((80, 96), seed=5)
    moving = deform(fixed, shift_field((80, 96), (1.5, -1.0), (1.0, 1.0)))
    args = [ELASTIX_BIN]
    for i in range(n_channels):
        f, m = tmp_path / f"fixed{i}.mha", tmp_path / f"moving{i}.mha"
        write_mha(f, ndimage.gaussian_filter(fixed, i))
        write_mha(m, ndimage.gaussian_filter(moving, i))
        if n_channels == 1:
            args += ["-f", str(f), "-m", str(m)]
        else:
            args += [f"-f{i}", str(f), f"-m{i}", str(m)]
    for name in files:
        path = elx.params_dir() / f"{name}.txt"
        if iterations is not None:
            copy = tmp_path / path.name
            copy.write_text(re.sub(r"^\(MaximumNumberOfIterations .*\)$",
                                   f"(MaximumNumberOfIterations {iterations})",
                                   path.read_text(), flags=re.MULTILINE))
            path = copy
        args += ["-p", str(path)]
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(args + ["-out", str(out), "-threads", "2"], capture_output=True,
                          text=True, timeout=300)
    log_text = (out / "elastix.log").read_text(errors="replace") \
        if (out / "elastix.log").is_file() else ""
    assert proc.returncode == 0, log_text[-3000:] or proc.stdout[-3000:]
    assert len(list(out.glob("TransformParameters.*.txt"))) == len(files)
    assert len(re.findall(r"Final metric value", log_text)) == len(files)
    return out


@needs_elastix
def test_em_affine_runs_in_elastix_cli(tmp_path):
    out = run_elastix_cli(tmp_path, ["em_affine"])  # as shipped
    text = (out / "TransformParameters.0.txt").read_text()
    params = [float(v) for v in re.search(r"\(TransformParameters ([^)]*)\)", text)
              .group(1).split()]
    np.testing.assert_allclose(params[4:], [1.5, -1.0], atol=0.15)  # translation, +sign


@needs_elastix
@pytest.mark.parametrize("files, n_channels", [
    (["em_rigid"], 1),
    (["em_affine", "em_bspline"], 1),
    (["refine_bspline_1ch"], 1),
    (["refine_bspline_2ch"], 2),
    (["refine_bspline_3ch"], 3),
])
def test_parameter_files_run_in_elastix_cli(tmp_path, files, n_channels):
    run_elastix_cli(tmp_path, files, n_channels, iterations=20)
