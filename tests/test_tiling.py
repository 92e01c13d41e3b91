"""Large sections: coarse-then-fine registration over overlapping, blended tiles."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import metrics, synthetic
from hybridreg.fields import physical_grid, sample_field
from hybridreg.methods.base import RegistrationResult, check_pair
from hybridreg.tiling import TiledMethod, tile_starts, tile_weights

from helpers import smooth_field, smooth_texture

SHAPE = (256, 256)


class Oracle:
    """Returns the true field wherever it is asked (a tile, any grid), plus an error that
    is constant per call and depends on where the tile is: the blend must hide the steps."""

    name = "oracle"
    config = {"method": "oracle"}

    def __init__(self, truth, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0), step_px=0.0):
        self.truth, self.spacing, self.origin, self.step_px = truth, spacing_xy, origin_xy, step_px
        self.calls = []

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        fixed, moving, _ = check_pair(fixed, moving, references)
        self.calls.append((fixed.shape, tuple(origin_xy)))
        p = physical_grid(fixed.shape, spacing_xy=spacing_xy, origin_xy=origin_xy)
        pts = np.stack([(p[0] - self.origin[0]) / self.spacing[0],
                        (p[1] - self.origin[1]) / self.spacing[1]])
        u = sample_field(self.truth, pts)
        # +step or -step in x, alternating like a chequerboard over the tiles
        tile = int(round(pts[0, 0, 0])) // 50 + int(round(pts[1, 0, 0])) // 50
        u[0] += self.step_px * self.spacing[0] * (1 if tile % 2 else -1)
        return RegistrationResult(field=u, warped=moving)


class Shift:
    """Translation by phase correlation (Hann window, parabolic sub-pixel peak)."""

    name = "shift"
    config = {"method": "shift"}

    def __init__(self, fail_at=None):
        self.fail_at = fail_at  # an origin_xy at which to raise (a failing tile)

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        fixed, moving, _ = check_pair(fixed, moving, references)
        if self.fail_at is not None and tuple(origin_xy) == tuple(self.fail_at):
            raise RuntimeError("this tile fails")
        h, w = fixed.shape
        win = np.outer(np.hanning(h), np.hanning(w))
        c = (np.fft.fft2((moving - moving.mean()) * win)
             * np.conj(np.fft.fft2((fixed - fixed.mean()) * win)))
        r = np.fft.fftshift(np.fft.ifft2(c / (np.abs(c) + 1e-9)).real)
        i, j = np.unravel_index(np.argmax(r), r.shape)

        def sub(a, b, c):
            d = a - 2 * b + c
            return 0.0 if d == 0 else 0.5 * (a - c) / d

        dy = i - h // 2 + sub(r[(i - 1) % h, j], r[i, j], r[(i + 1) % h, j])
        dx = j - w // 2 + sub(r[i, (j - 1) % w], r[i, j], r[i, (j + 1) % w])
        u = np.zeros((2, h, w), np.float32)
        u[0], u[1] = dx * spacing_xy[0], dy * spacing_xy[1]
        return RegistrationResult(field=u, warped=moving, metric=float(r.max()))


@pytest.fixture(scope="module")
def pair():
    """A textured section and a smooth known deformation of it (rotation, shift, elastic)."""
    img = smooth_texture(SHAPE, seed=3, sigma=2.5) * 255
    d = synthetic.deform_stack(np.stack([img, img]), seed=5, max_rotation_deg=3,
                               max_shift_px=10, max_scale=0.01, elastic_px=3,
                               elastic_spacing_px=64)
    return img, d.stack[1].astype(np.float32), d.fields[1]


MASK = metrics.interior_mask(SHAPE, margin_px=24)


def epe(u, truth, mask=MASK):
    return metrics.endpoint_error(u, truth, mask=mask).mean_px


def max_step(u):
    """The largest change of the field between neighbouring pixels (a seam shows here)."""
    return max(float(np.abs(np.diff(u, axis=1)).max()), float(np.abs(np.diff(u, axis=2)).max()))


# --- the tile grid ------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [96, 97, 200, 256, 1000])
def test_tiles_cover_the_axis_with_overlap(length):
    tile, overlap = 96, 24
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by at least overlap_px
    weights = tile_weights(starts, tile, length)
    total = np.zeros(length)
    for s, w in zip(starts, weights):
        total[s:s + w.size] += w
        assert np.all(w > 0) and np.all(w <= 1)
    # two ramps over one overlap sum to one: wherever only two tiles meet, exactly 1
    if len(starts) == 2 or all(b - a >= tile / 2 for a, b in zip(starts, starts[1:])):
        np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_options_are_checked():
    with pytest.raises(ValueError, match="tile_px"):
        TiledMethod(Shift(), tile_px=8)
    with pytest.raises(ValueError, match="overlap_px"):
        TiledMethod(Shift(), tile_px=64, overlap_px=40)
    with pytest.raises(TypeError, match="registration method"):
        TiledMethod(object(), tile_px=64)


# --- exact answers --------------------------------------------------------------------------

def test_exact_tiles_give_the_exact_field_in_physical_units():
    spacing, origin = (2.0, 3.0), (10.0, -5.0)
    truth = smooth_field(SHAPE, seed=1, amplitude_px=4.0) * np.array(spacing)[:, None, None]
    oracle = Oracle(truth, spacing_xy=spacing, origin_xy=origin)
    img = smooth_texture(SHAPE, seed=2)
    r = TiledMethod(oracle, tile_px=96, overlap_px=32, coarse=False).register(
        img, img, spacing_xy=spacing, origin_xy=origin)
    assert r.info["grid"] == (4, 4) and len(oracle.calls) == 16
    assert {s for s, _ in oracle.calls} == {(96, 96)}
    np.testing.assert_allclose(r.field, truth, atol=1e-4)
    assert r.field.dtype == np.float32 and r.spacing_xy == spacing and r.origin_xy == origin


def test_blending_leaves_no_seams():
    """Tiles that disagree by 1.6 px (alternating +-0.8 px) blend without a step."""
    truth = smooth_field(SHAPE, seed=1, amplitude_px=4.0)
    img = smooth_texture(SHAPE, seed=2)
    overlap = 32
    r = TiledMethod(Oracle(truth, step_px=0.8), tile_px=96, overlap_px=overlap,
                    coarse=False).register(img, img)
    # a hard cut between tiles would step by 1.6 px; the cosine ramp spreads it over the
    # overlap: at most 1.6 * pi / (2 * overlap) = 0.079 px per pixel on top of the truth's
    assert max_step(r.field) <= max_step(truth) + 1.6 * np.pi / (2 * overlap) + 1e-3
    assert np.abs(r.field - truth).max() <= 0.8 + 1e-4


# --- registration of a known deformation ----------------------------------------------------

@pytest.mark.parametrize("coarse", [True, False])
def test_tiles_recover_a_smooth_deformation(pair, coarse):
    fixed, moving, truth = pair
    whole = Shift().register(fixed, moving).field
    r = TiledMethod(Shift(), tile_px=96, overlap_px=32, coarse=coarse).register(fixed, moving)
    assert r.info["grid"] == (4, 4) and not r.warnings
    assert (r.info["coarse"] is not None) == coarse
    # a translation per tile follows the rotation and the elastic part; one for the whole
    # section cannot (no registration: about 6 px)
    assert epe(r.field, truth) < 0.8, epe(r.field, truth)
    assert epe(r.field, truth) < 0.5 * epe(whole, truth)
    assert max_step(r.field) < 2 * max_step(truth) + 0.05  # continuous: no seams


def test_a_blank_tile_is_flagged_and_filled(pair):
    """A fold or crack: a corner of the section is empty in both sections."""
    fixed, moving, truth = (a.copy() for a in pair)
    fixed[:52, :52] = 0  # 29% of tile 0,0 (0:96, 0:96), none of the next tiles (from 53)
    moving[:52, :52] = 0
    content = MASK.copy()
    content[:96, :96] = False
    for coarse in (True, False):
        r = TiledMethod(Shift(), tile_px=96, overlap_px=32, coarse=coarse,
                        min_content=0.75).register(fixed, moving)
        blank = [t for t in r.info["tiles"] if t["status"] == "blank"]
        assert [t["tile"] for t in blank] == [(0, 0)]
        assert any("tile 0,0" in w and "blank" in w for w in r.warnings)
        assert np.isfinite(r.field).all()
        assert epe(r.field, truth, content) < 0.8
        # the fill (coarse field, or the neighbours' mean) blends in across the overlap
        assert max_step(r.field) < 2 * max_step(truth) + 0.05
    # tiles of pure background are blank whatever min_content
    fixed[:, :] = 0
    r = TiledMethod(Shift(), tile_px=96, min_content=0.0).register(fixed, moving)
    assert all(t["status"] == "blank" for t in r.info["tiles"])


def test_a_failing_tile_is_flagged_and_filled(pair):
    fixed, moving, truth = pair
    starts = tile_starts(SHAPE[1], 96, 32)
    r = TiledMethod(Shift(fail_at=(float(starts[1]), float(starts[2]))), tile_px=96,
                    overlap_px=32, coarse=False).register(fixed, moving)
    failed = [t for t in r.info["tiles"] if t["status"] == "failed"]
    assert [t["tile"] for t in failed] == [(2, 1)]
    assert "this tile fails" in failed[0]["warnings"]
    assert any("tile 2,1" in w and "failed" in w for w in r.warnings)
    assert epe(r.field, truth) < 1.0


def test_nothing_to_register_raises_without_a_coarse_pass():
    blank = np.zeros(SHAPE, np.float32)
    with pytest.raises(RuntimeError, match="no tile could be registered"):
        TiledMethod(Shift(), tile_px=96, coarse=False).register(blank, blank)
    # with a coarse pass the (blank) tiles keep the coarse field
    r = TiledMethod(Shift(), tile_px=96).register(blank, blank)
    assert np.isfinite(r.field).all() and len(r.warnings) == 16


def test_a_section_that_fits_one_tile_is_registered_whole(pair):
    fixed, moving, truth = pair
    oracle = Oracle(truth)
    r = TiledMethod(oracle, tile_px=256).register(fixed, moving)
    assert oracle.calls == [(SHAPE, (0.0, 0.0))]
    np.testing.assert_allclose(r.field, truth, atol=1e-5)


def test_tiled_method_aligns_a_stack(pair):
    from hybridreg.stack import align_stack

    fixed, moving, truth = pair
    tiled = TiledMethod(Shift(), tile_px=96, overlap_px=32)
    r = align_stack(np.stack([fixed, moving]), tiled, mode="sequential")
    assert epe(r.fields[1], truth) < 0.8
    assert tiled.config["inner"] == {"method": "shift"} and tiled.name == "shift+tiles"


@pytest.mark.elastix
def test_tiled_elastix_recovers_a_deformation(pair):
    from hybridreg.methods import get_method

    fixed, moving, truth = pair
    method = TiledMethod(get_method("elastix", params=["em_rigid"], threads=1), tile_px=128,
                         overlap_px=32)
    r = method.register(fixed, moving)
    assert r.info["grid"] == (3, 3) and r.info["coarse"]["status"] == "ok", r.warnings
    assert epe(r.field, truth) < 1.0, epe(r.field, truth)
    assert max_step(r.field) < 2 * max_step(truth) + 0.05


def test_cli_tile_options(pair, tmp_path, monkeypatch, capsys):
    from hybridreg import cli, io

    fixed, moving, truth = pair
    monkeypatch.setattr(cli, "_method", lambda args, sample=None: Shift())
    io.write_stack(tmp_path / "fixed.tif", fixed)
    io.write_stack(tmp_path / "moving.tif", moving)
    base = ["register", str(tmp_path / "fixed.tif"), str(tmp_path / "moving.tif")]
    assert cli.main(base + ["--out", str(tmp_path / "w.tif"), "--fields-out",
                            str(tmp_path / "f"), "--tile", "96", "--tile-overlap", "32"]) == 0
    assert "shift+tiles" in capsys.readouterr().out
    u, _, _ = io.read_field(tmp_path / "f" / "section_0000.mha")
    assert epe(u, truth) < 0.8
    assert cli.main(base + ["--out", str(tmp_path / "x.tif"), "--tile-overlap", "32"]) == 2
    assert "need --tile" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "x.tif"), "--tile", "96",
                            "--tile-overlap", "60"]) == 2
    assert "overlap_px" in capsys.readouterr().err


# --- coarse maps, tile by tile (stack alignment at any section size) -------------------------

def test_a_map_built_tile_by_tile_is_the_projected_field():
    """register_map gives the same transform as register (blended, composed) projected on
    the nodes, without a dense field of the section."""
    from hybridreg.fields import MapGrid

    spacing, origin = (2.0, 3.0), (10.0, -5.0)
    truth = smooth_field(SHAPE, seed=1, amplitude_px=4.0) * np.array(spacing)[:, None, None]
    img = smooth_texture(SHAPE, seed=2)
    grid = MapGrid(SHAPE, stride=16, spacing_xy=spacing, origin_xy=origin)
    tiled = TiledMethod(Oracle(truth, spacing_xy=spacing, origin_xy=origin), tile_px=96,
                        overlap_px=32, coarse=False)
    r = tiled.register_map(img, img, grid)
    assert r.field.shape == (2,) + grid.node_shape and r.warped is None
    assert r.spacing_xy == grid.node_spacing_xy
    np.testing.assert_allclose(r.field, grid.project(truth), atol=1e-3)


@pytest.mark.parametrize("coarse", [True, False])
def test_a_map_of_a_registered_pair_matches_the_dense_tiles(pair, coarse):
    from hybridreg.fields import MapGrid

    fixed, moving, truth = pair
    grid = MapGrid(SHAPE, stride=8)
    tiled = TiledMethod(Shift(), tile_px=96, overlap_px=32, coarse=coarse)
    dense = tiled.register(fixed, moving)
    # integer sections in their own dtype, as a stack alignment passes them
    r = tiled.register_map(np.clip(fixed, 0, 255).astype(np.uint8),
                           np.clip(moving, 0, 255).astype(np.uint8), grid)
    assert r.info["grid"] == dense.info["grid"] and not r.warnings
    assert epe(grid.dense(r.field), truth) < 0.8
    assert abs(epe(grid.dense(r.field), truth) - epe(grid.dense(grid.project(dense.field)),
                                                      truth)) < 0.15


def test_a_map_fills_blank_and_failing_tiles(pair):
    from hybridreg.fields import MapGrid

    fixed, moving, truth = (a.copy() for a in pair)
    fixed[:52, :52] = 0
    moving[:52, :52] = 0
    content = MASK.copy()
    content[:96, :96] = False
    grid = MapGrid(SHAPE, stride=8)
    starts = tile_starts(SHAPE[1], 96, 32)
    for coarse in (True, False):
        r = TiledMethod(Shift(fail_at=(float(starts[1]), float(starts[2]))), tile_px=96,
                        overlap_px=32, coarse=coarse, min_content=0.75).register_map(
            fixed, moving, grid)
        status = {tuple(t["tile"]): t["status"] for t in r.info["tiles"]}
        assert status[(0, 0)] == "blank" and status[(2, 1)] == "failed"
        assert epe(grid.dense(r.field), truth, content) < 1.0
    with pytest.raises(RuntimeError, match="no tile"):
        TiledMethod(Shift(), tile_px=96, coarse=False).register_map(
            np.zeros(SHAPE, np.float32), moving, grid)


def test_the_memory_plan_tiles_what_does_not_fit_and_refuses_what_cannot():
    from hybridreg.tiling import memory_plan, plan_tile

    gb = 1e9
    # small sections: whole; 16384^2 uint8 with learned: tiles, under the limit
    assert plan_tile((512, 512), itemsize=1, method="learned", limit_bytes=4 * gb) is None
    tile = plan_tile((16384, 16384), itemsize=1, method="learned", limit_bytes=4 * gb)
    assert tile is not None and tile < 16384
    assert memory_plan((16384, 16384), itemsize=1, method="learned",
                       tile_px=tile)["total"] <= 4 * gb
    # the tile cuts the section with little overlap: 16384 = n * tile - (n - 1) * 256
    n = len(tile_starts(16384, tile, 256))
    assert n * tile - (n - 1) * 256 - 16384 < 16 * n
    # a given tile that does not fit is refused, naming one that does
    with pytest.raises(ValueError, match=f"use --tile {tile}"):
        plan_tile((16384, 16384), itemsize=1, method="learned", limit_bytes=4 * gb,
                  tile_px=8192)
    # sections that alone exceed the limit: refused, saying so
    with pytest.raises(ValueError, match="the sections themselves take"):
        plan_tile((100_000, 100_000), itemsize=1, method="learned", limit_bytes=4 * gb)


def test_a_coarse_pass_that_matches_worse_than_none_is_not_used(pair):
    """A method out of its range on the reduced sections (a network at 1/16 scale) must not
    pre-warp the tiles with its noise."""
    from hybridreg.fields import MapGrid

    class WrongWhenSmall(Shift):
        def register(self, fixed, moving, **kw):
            r = super().register(fixed, moving, **kw)
            if fixed.shape[0] < 96:  # the coarse pass: a field far off the truth
                r = RegistrationResult(field=np.full_like(r.field, 7.0), warped=moving)
            return r

    fixed, moving, truth = pair
    grid = MapGrid(SHAPE, stride=8)
    r = TiledMethod(WrongWhenSmall(), tile_px=96, overlap_px=32,
                    coarse_px=64).register_map(fixed, moving, grid)
    assert r.info["coarse"]["status"] == "rejected"
    assert r.info["coarse"]["ncc_after"] < r.info["coarse"]["ncc_before"]
    assert epe(grid.dense(r.field), truth) < 0.8
    good = TiledMethod(Shift(), tile_px=96, overlap_px=32, coarse_px=64).register_map(
        fixed, moving, grid)
    assert good.info["coarse"]["status"] == "ok"
