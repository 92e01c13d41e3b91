"""Random deformations and their exact inverses, held to the field contract (pull)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hybridreg import fields
from hybridreg.phantom import make_phantom
from hybridreg.synthetic import (MAGNITUDES, Deformation, DeformedStack, deform_stack,
                                 max_displacement_px, random_deformation)
from hybridreg.warp import warp

SHAPE = (96, 112)          # H, W
MARGIN = 20                # px: the interior, away from pixels sampled outside the section
PURE_SHIFT = dict(max_rotation_deg=0.0, max_scale=0.0, elastic_px=0.0)


def interior(a, margin=MARGIN):
    return a[..., margin:-margin, margin:-margin]


def ncc(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def pixel_grid(shape_yx):
    h, w = shape_yx
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
    return np.stack([x, y])


@pytest.fixture(scope="module")
def em():
    return make_phantom(sections=4, shape_yx=(112, 128), seed=5)


@pytest.fixture(scope="module")
def deformed(em):
    return deform_stack(em.stack, seed=11, labels=em.labels)


# --- random_deformation -----------------------------------------------------------------------

def test_recovery_solves_the_analytic_equation():
    """y = p + recovery(p) solves y + d(y) = p with the analytic d, everywhere."""
    d = random_deformation(SHAPE, seed=1)
    assert isinstance(d, Deformation)
    assert d.forward.shape == (2,) + SHAPE and d.forward.dtype == np.float32
    assert d.recovery.shape == (2,) + SHAPE and d.recovery.dtype == np.float32
    p = pixel_grid(SHAPE)
    y = p + d.recovery.astype(np.float64)
    residual = y + d.displacement_px(y) - p
    assert np.abs(residual).max() < 1e-4
    # forward is d on the grid
    np.testing.assert_allclose(d.forward, d.displacement_px(p), atol=1e-5)


def test_displacement_is_defined_between_and_beyond_pixels():
    d = random_deformation(SHAPE, seed=2)
    pts = np.array([[10.25, -30.0, 200.0], [3.5, 50.0, -40.0]])
    out = d.displacement_px(pts)
    assert out.shape == (2, 3) and np.all(np.isfinite(out))
    # continuous: a tiny step moves d by a tiny amount
    step = d.displacement_px(pts + 1e-4) - out
    assert np.abs(step).max() < 1e-3


def test_compose_recovery_forward_is_zero_on_the_interior():
    d = random_deformation(SHAPE, seed=3)
    # forward is sampled on the grid; cubic interpolation of it is accurate to ~1e-6 px
    c = fields.compose(d.recovery, d.forward, order=3)
    assert np.abs(interior(c)).max() < 1e-3
    c = fields.compose(d.forward, d.recovery, order=3)
    assert np.abs(interior(c)).max() < 1e-3
    # bilinear interpolation of the smooth field stays within a few thousandths of a pixel
    c = fields.compose(d.recovery, d.forward)
    assert np.abs(interior(c)).max() < 5e-3


def test_recovery_is_not_just_minus_forward():
    d = random_deformation(SHAPE, seed=4)
    # with rotation and elastic parts, the inverse differs from the negated field
    assert np.abs(d.recovery + d.forward).max() > 0.05


def test_pure_shift_sign_and_exact_recovery():
    h, w = 64, 80
    d = random_deformation((h, w), seed=8, **PURE_SHIFT)
    sx, sy = d.shift_px                            # (-4.35, 6.93)
    assert abs(sx) > 1 and abs(sy) > 1 and abs(sx - sy) > 1   # both axes, told apart
    assert d.rotation_deg == 0 and d.scale == 1
    # forward = +s everywhere, recovery = -s exactly
    np.testing.assert_allclose(d.forward[0], sx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.forward[1], sy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.recovery[0], -sx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.recovery[1], -sy, rtol=0, atol=1e-6)
    # a bright dot at (x0, y0) in the original appears at (x0 - s_x, y0 - s_y) (pull)
    x0, y0 = 40.0, 30.0
    p = pixel_grid((h, w))
    dot = np.exp(-((p[0] - x0) ** 2 + (p[1] - y0) ** 2) / (2 * 2.0 ** 2)).astype(np.float32)
    moved, _ = warp(dot, d.forward, order=3)
    cx = (moved * p[0]).sum() / moved.sum()
    cy = (moved * p[1]).sum() / moved.sum()
    assert abs(cx - (x0 - sx)) < 0.05
    assert abs(cy - (y0 - sy)) < 0.05
    back, _ = warp(moved, d.recovery, order=3)
    np.testing.assert_allclose(interior(back), interior(dot), atol=5e-3)  # two cubic resamplings


def test_magnitudes_are_respected():
    shape = (80, 100)
    mg = dict(max_rotation_deg=3.0, max_shift_px=5.0, max_scale=0.03, elastic_px=4.0,
              elastic_spacing_px=32.0)
    bound = max_displacement_px(shape, **mg)
    h, w = shape
    assert math.isclose(bound, math.sqrt(2) * 9.0 + math.sqrt(
        1.03 ** 2 - 2 * 1.03 * math.cos(math.radians(3)) + 1) * 0.5 * math.hypot(w - 1, h - 1))
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = random_deformation(shape, rng=rng, **mg)
        assert abs(d.rotation_deg) <= 3.0
        assert abs(d.scale - 1) <= 0.03
        assert max(abs(s) for s in d.shift_px) <= 5.0
        assert np.abs(d.control_px).max() <= 4.0
        assert np.hypot(*d.forward).max() <= bound + 1e-4
    # the elastic part alone is bounded by elastic_px per axis (B-spline weights sum to 1)
    d = random_deformation(shape, seed=1, max_rotation_deg=0, max_shift_px=0, max_scale=0,
                           elastic_px=4.0, elastic_spacing_px=32.0)
    assert 0.5 < np.abs(d.forward).max() <= 4.0
    # zero magnitudes give the identity
    d = random_deformation(shape, seed=1, max_rotation_deg=0, max_shift_px=0, max_scale=0,
                           elastic_px=0)
    assert not np.any(d.forward) and not np.any(d.recovery)


def test_default_magnitudes():
    assert MAGNITUDES == dict(max_rotation_deg=2.0, max_shift_px=12.0, max_scale=0.02,
                              elastic_px=6.0, elastic_spacing_px=64.0)
    d = random_deformation((64, 64), seed=0)
    assert 0 < np.hypot(*d.forward).max() <= max_displacement_px((64, 64))


def test_elastic_spacing_sets_the_smoothness():
    kw = dict(max_rotation_deg=0, max_shift_px=0, max_scale=0, elastic_px=4.0)
    coarse = random_deformation(SHAPE, seed=6, elastic_spacing_px=64.0, **kw)
    fine = random_deformation(SHAPE, seed=6, elastic_spacing_px=16.0, **kw)

    def roughness(u):
        return np.abs(np.diff(u, axis=-1)).mean()

    assert roughness(fine.forward) > 2 * roughness(coarse.forward)


def test_non_unit_spacing_scales_the_fields():
    spacing = (2.5, 0.4)
    unit = random_deformation(SHAPE, seed=7)
    phys = random_deformation(SHAPE, seed=7, spacing_xy=spacing)
    assert phys.spacing_xy == spacing
    scale = np.array(spacing, dtype=np.float32).reshape(2, 1, 1)
    np.testing.assert_allclose(phys.forward, unit.forward * scale, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(phys.recovery, unit.recovery * scale, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(fields.to_pixels(phys.recovery, spacing), unit.recovery,
                               atol=1e-5)


def test_rng_and_seed_are_deterministic():
    a = random_deformation(SHAPE, seed=9)
    b = random_deformation(SHAPE, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a.forward, b.forward)
    np.testing.assert_array_equal(a.recovery, b.recovery)
    c = random_deformation(SHAPE, seed=10)
    assert np.abs(a.forward - c.forward).max() > 0.1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=0, max_shift_px=-1.0), ValueError, "max_shift_px"),
    (dict(seed=0, elastic_px=float("inf")), ValueError, "elastic_px"),
    (dict(seed=0, elastic_spacing_px=0.0), ValueError, "elastic_spacing_px"),
    (dict(seed=0, max_scale=1.5), ValueError, "max_scale"),
    (dict(seed=0, max_shift=3.0), TypeError, "unknown magnitude"),
    (dict(), TypeError, "rng"),
    (dict(seed=0, rng=np.random.default_rng(0)), TypeError, "exactly one"),
    (dict(rng=0), TypeError, "Generator"),
    (dict(seed=0, spacing_xy=(1.0, -1.0)), ValueError, "spacing_xy"),
])
def test_random_deformation_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        random_deformation(SHAPE, **kwargs)


def test_folding_deformation_is_refused():
    with pytest.raises(ValueError, match="folds"):
        random_deformation((64, 64), seed=0, elastic_px=30.0, elastic_spacing_px=8.0)


# --- deform_stack -----------------------------------------------------------------------------

def test_deformed_stack_layout(em, deformed):
    assert isinstance(deformed, DeformedStack)
    z, h, w = em.stack.shape
    assert deformed.stack.shape == (z, h, w) and deformed.stack.dtype == np.uint8
    assert deformed.labels.shape == (z, h, w) and deformed.labels.dtype == em.labels.dtype
    assert deformed.fields.shape == (z, 2, h, w) and deformed.fields.dtype == np.float32
    assert deformed.forward_fields.shape == (z, 2, h, w)
    assert deformed.forward_fields.dtype == np.float32
    assert deformed.valid.shape == (z, h, w) and deformed.valid.dtype == bool


def test_section_zero_is_unchanged(em, deformed):
    np.testing.assert_array_equal(deformed.stack[0], em.stack[0])
    np.testing.assert_array_equal(deformed.labels[0], em.labels[0])
    assert not np.any(deformed.fields[0]) and not np.any(deformed.forward_fields[0])
    assert deformed.valid[0].all()


def test_other_sections_are_deformed_independently(em, deformed):
    for k in range(1, len(em.stack)):
        assert np.abs(deformed.forward_fields[k]).max() > 1.0
        assert ncc(interior(deformed.stack[k]), interior(em.stack[k])) < 0.9
    # independent deformations: no two sections share a field
    f = deformed.forward_fields
    assert np.abs(f[1] - f[2]).max() > 0.5 and np.abs(f[2] - f[3]).max() > 0.5


def test_recovery_restores_the_original(em, deformed):
    for k in range(1, len(em.stack)):
        u = deformed.fields[k]
        fields.validate_field(u, shape_yx=em.stack.shape[1:])
        restored, valid = warp(deformed.stack[k].astype(np.float32), u, order=3)
        mask = interior(valid)
        assert mask.mean() > 0.99
        r, o = interior(restored)[mask], interior(em.stack[k])[mask]
        assert ncc(r, o) > 0.99                     # measured: 0.999
        assert np.abs(r - o).mean() < 4.0           # grey levels, of a std of 44
        # labels come back with nearest neighbour everywhere but on a few boundary pixels
        back, _ = warp(deformed.labels[k], u, order=0)
        assert np.mean(interior(back) == interior(em.labels[k])) > 0.98


def test_deformed_stack_matches_forward_warp(em, deformed):
    for k in range(1, len(em.stack)):
        expected, valid = warp(em.stack[k].astype(np.float32), deformed.forward_fields[k],
                               order=3)
        expected = np.clip(np.rint(expected), 0, 255)
        np.testing.assert_array_equal(deformed.stack[k], expected.astype(np.uint8))
        np.testing.assert_array_equal(deformed.valid[k], valid)
        # pixels sampled beyond half a pixel outside the original are 0 (ITK's rule, as
        # transformix: within half a pixel the section is mirrored about its border pixels)
        from hybridreg.fields import index_grid

        pts = index_grid(valid.shape) + deformed.forward_fields[k]
        h, w = valid.shape
        beyond = ((pts[0] < -0.5) | (pts[0] >= w - 0.5) | (pts[1] < -0.5)
                  | (pts[1] >= h - 0.5))
        assert beyond.sum() > 100 and np.all(~valid[beyond])
        assert np.all(deformed.stack[k][beyond] == 0)
        assert np.all(deformed.labels[k][beyond] == 0)


def test_deform_stack_is_deterministic(em):
    a = deform_stack(em.stack, seed=3)
    b = deform_stack(em.stack, seed=3)
    np.testing.assert_array_equal(a.stack, b.stack)
    np.testing.assert_array_equal(a.fields, b.fields)
    assert a.labels is None
    c = deform_stack(em.stack, seed=4)
    assert np.abs(a.fields[1:] - c.fields[1:]).max() > 0.1


def test_deform_stack_uses_one_rng_for_all_sections(em):
    """Section k's deformation is the k-th draw from default_rng(seed)."""
    out = deform_stack(em.stack, seed=21, max_shift_px=3.0)
    rng = np.random.default_rng(21)
    for k in range(1, len(em.stack)):
        d = random_deformation(em.stack.shape[1:], rng=rng, max_shift_px=3.0)
        np.testing.assert_array_equal(out.fields[k], d.recovery)
        np.testing.assert_array_equal(out.forward_fields[k], d.forward)


def test_deform_stack_spacing_scales_fields_only(em):
    spacing = (4.0, 2.0)
    unit = deform_stack(em.stack[:2], seed=8)
    phys = deform_stack(em.stack[:2], seed=8, spacing_xy=spacing)
    np.testing.assert_array_equal(phys.stack, unit.stack)
    scale = np.array(spacing, dtype=np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(phys.fields, unit.fields * scale, rtol=1e-6, atol=1e-5)
    restored, _ = warp(phys.stack[1].astype(np.float32), phys.fields[1], spacing_xy=spacing,
                       order=3)
    assert ncc(interior(restored), interior(em.stack[1])) > 0.99


def test_deform_stack_keeps_float_and_integer_dtypes():
    rng = np.random.default_rng(0)
    f64 = rng.uniform(-1, 1, (2, 40, 40))
    out = deform_stack(f64, seed=0, max_shift_px=2.0)
    assert out.stack.dtype == np.float64
    u16 = (rng.uniform(0, 1, (2, 40, 40)) * 65535).astype(np.uint16)
    out = deform_stack(u16, seed=0, max_shift_px=2.0)
    assert out.stack.dtype == np.uint16


def test_single_section_stack(em):
    out = deform_stack(em.stack[:1], seed=0)
    np.testing.assert_array_equal(out.stack, em.stack[:1])
    assert out.fields.shape == (1, 2) + em.stack.shape[1:] and not np.any(out.fields)


@pytest.mark.parametrize("stack, kwargs, error, match", [
    (np.zeros((8, 8)), {}, ValueError, r"\(Z, H, W\)"),
    (np.zeros((0, 8, 8)), {}, ValueError, "Z >= 1"),
    (np.zeros((2, 1, 8)), {}, ValueError, "2 x 2"),
    (np.zeros((2, 8, 8)), dict(elastic_px=-1.0), ValueError, "elastic_px"),
    (np.zeros((2, 8, 8)), dict(labels=np.zeros((2, 8, 9), int)), ValueError, "labels"),
    (np.zeros((2, 8, 8)), dict(labels=np.zeros((2, 8, 8))), ValueError, "integers"),
    (np.zeros((2, 8, 8)), dict(wobble=1.0), TypeError, "unknown magnitude"),
])
def test_deform_stack_validates(stack, kwargs, error, match):
    with pytest.raises(error, match=match):
        deform_stack(stack, seed=0, **kwargs)


@pytest.mark.parametrize("shape", [(192, 192), (97, 130)])
def test_coarse_solve_is_close_to_the_exact_recovery(shape):
    exact = random_deformation(shape, seed=3)
    coarse = random_deformation(shape, seed=3, solve_step_px=8)
    assert coarse.rotation_deg == exact.rotation_deg
    err = np.abs(coarse.recovery - exact.recovery)
    assert err.mean() < 0.005 and err.max() < 0.1
    assert np.abs(coarse.forward - exact.forward).max() < 0.1
    with pytest.raises(ValueError, match="solve_step_px"):
        random_deformation(shape, seed=3, solve_step_px=0)


# --- defects (issue 17 item 6) ------------------------------------------------------------------

def test_defect_pull_and_push_are_inverse_and_a_fold_collapses_onto_its_line():
    from hybridreg.synthetic import Defect

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 100, (2, 2000))
    for kind in ("fold", "crack"):
        d = Defect(kind, (50.0, 40.0), (0.6, 0.8), 10.0)
        ex, ey = d.push(x, y)
        fx, fy = x + ex, y + ey
        seen = ~d.masked(fx, fy)  # final points that show tissue
        dx, dy = d.pull(fx, fy)
        np.testing.assert_allclose((fx + dx)[seen], x[seen], atol=1e-9)
        np.testing.assert_allclose((fy + dy)[seen], y[seen], atol=1e-9)
    fold = Defect("fold", (50.0, 40.0), (0.6, 0.8), 10.0)
    band = np.abs(fold.side(x, y)) < 5.0
    ex, ey = fold.push(x, y)
    np.testing.assert_allclose(fold.side(x + ex, y + ey)[band], 0.0, atol=1e-9)
    crack = Defect("crack", (50.0, 40.0), (0.6, 0.8), 10.0)
    ex, ey = crack.push(x, y)
    assert np.all(np.abs(crack.side(x + ex, y + ey)) >= 5.0 - 1e-9)  # nothing in the gap


def test_defects_keep_the_truth_exact_and_the_seed_s_case(em):
    from scipy import ndimage

    from hybridreg.fields import index_grid

    plain = deform_stack(em.stack, seed=3)
    none = deform_stack(em.stack, seed=3, defects=("folds", "cracks"), defect_fraction=0.0)
    np.testing.assert_array_equal(none.stack, plain.stack)
    np.testing.assert_array_equal(none.fields, plain.fields)
    d = deform_stack(em.stack, seed=3, defects=("folds", "cracks", "debris"),
                     defect_fraction=1.0)
    z, h, w = em.stack.shape
    assert d.masks.dtype == np.uint8 and d.masks.shape == (z, h, w)
    assert np.all(d.masks[0] == 255) and d.defects[0] == []
    for k in range(1, z):
        assert sorted(x.kind for x in d.defects[k]) == ["crack", "debris", "fold"]
        assert 0.01 < (d.masks[k] == 0).mean() < 0.3
        # the truth restores the original away from the defects, as well as without them
        back, valid = warp(d.stack[k].astype(np.float32), d.fields[k], order=3)
        target = index_grid((h, w)) + d.fields[k]
        far = ndimage.binary_erosion(d.masks[k] > 0, iterations=3).astype(np.float32)
        away = ndimage.map_coordinates(far, [target[1], target[0]], order=0) > 0
        inner = np.zeros((h, w), bool)
        inner[16:-16, 16:-16] = True
        err = np.abs(back - em.stack[k])[away & valid & inner].mean()
        back0, valid0 = warp(plain.stack[k].astype(np.float32), plain.fields[k], order=3)
        err0 = np.abs(back0 - em.stack[k])[valid0 & inner].mean()
        assert err < 1.3 * err0 + 0.5, (k, err, err0)
    # a crack alone: every original point moves half the opening away from the line, on
    # top of the smooth recovery of the same seed (to the float32 of the fields)
    cracked = deform_stack(em.stack, seed=3, defects=("cracks",), defect_fraction=1.0)
    for k in range(1, z):
        crack = cracked.defects[k][0]
        moved = np.hypot(*(cracked.fields[k] - plain.fields[k]))
        np.testing.assert_allclose(moved, crack.width / 2, atol=1e-3)
        yy, xx = np.mgrid[0:h, 0:w]
        gap = crack.masked(xx, yy)
        assert gap.sum() > 0 and np.all(cracked.masks[k][gap] == 0)
        assert np.all(cracked.stack[k][gap] == 0)  # the gap is empty


def test_cli_deform_with_defects(tmp_path, capsys):
    from hybridreg import cli, io

    run = lambda *a: cli.main([str(x) for x in a])  # noqa: E731
    assert run("phantom", "--out", tmp_path / "ph.tif", "--sections", 4, "--size", 96, 96) == 0
    assert run("deform", tmp_path / "ph.tif", "--out", tmp_path / "d.tif", "--fields-out",
               tmp_path / "t", "--seed", 1, "--defects", "folds,cracks,debris",
               "--defect-fraction", 1, "--masks-out", tmp_path / "m.tif") == 0
    assert "defects (folds, cracks, debris) in sections [1, 2, 3]" in capsys.readouterr().out
    masks = io.read_stack(tmp_path / "m.tif").data
    assert masks.dtype == np.uint8 and masks.shape == (4, 96, 96) and (masks == 0).any()
    assert run("deform", tmp_path / "ph.tif", "--out", tmp_path / "e.tif", "--fields-out",
               tmp_path / "u", "--seed", 1, "--defects", "folds") == 2
    assert "--defects needs --masks-out" in capsys.readouterr().err
    assert run("deform", tmp_path / "ph.tif", "--out", tmp_path / "e.tif", "--fields-out",
               tmp_path / "u", "--seed", 1, "--defects", "holes", "--masks-out",
               tmp_path / "n.tif") == 2
    assert "unknown defect kind(s) ['holes']" in capsys.readouterr().err
