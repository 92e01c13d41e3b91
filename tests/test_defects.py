"""Issue 17: defect masks -- trust, fill, detection, masks in the learned methods, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hybridreg import io
from hybridreg import cli
from hybridreg.defects import (DetectedMasks, detect_defects, fill_untrusted, node_trust,
                               pair_trust, trusted_field, trusted_map)
from hybridreg.fields import MapGrid
from hybridreg.metrics import evaluate_stack


def run(argv) -> int:
    return cli.main([str(a) for a in argv])


def test_fill_keeps_trusted_values_and_fills_holes_from_their_rim():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 19, 23)).astype(np.float32)
    trust = np.ones((19, 23), np.float32)
    trust[4:12, 3:20] = 0
    out = fill_untrusted(v, trust)
    np.testing.assert_array_equal(out[:, trust == 1], v[:, trust == 1])
    assert np.isfinite(out).all()
    # a constant field stays constant wherever it is filled; nothing trusted -> zeros
    const = np.stack([np.full((19, 23), 2.5), np.full((19, 23), -1.0)]).astype(np.float32)
    const[:, trust == 0] = 99.0  # garbage under the hole
    np.testing.assert_allclose(fill_untrusted(const, trust)[:, trust == 0][0], 2.5, atol=1e-5)
    np.testing.assert_array_equal(fill_untrusted(v, np.zeros((19, 23))), 0)
    with pytest.raises(ValueError, match="must match"):
        fill_untrusted(v, trust[:5])


def test_node_trust_marks_the_nodes_whose_support_holds_a_defect():
    grid = MapGrid((100, 130), stride=32)  # nodes at 0, 32, 64, 96 (rows); ..., 128 (cols)
    mask = np.full((100, 130), 255, np.uint8)
    mask[40, 70] = 0  # between node rows 1-2 and node columns 2-3
    t = node_trust(mask, grid, margin_nodes=0)
    assert t.shape == grid.node_shape == (5, 6)
    assert set(zip(*np.nonzero(t == 0))) == {(1, 2), (1, 3), (2, 2), (2, 3)}
    wider = node_trust(mask, grid)  # one node more, as the pairs' maps use
    assert set(zip(*np.nonzero(wider == 0))) == set(zip(*np.nonzero(
        ndimage.binary_dilation(t == 0))))
    mask[:, :3] = 0  # empty space along the left edge: no margin from it
    edge = node_trust(mask, grid)
    assert edge[:, :2].max() == 0 and edge[4, 2] == 1  # (col 1 reads the edge block)
    # the moving section's trust is looked up where each node's motion points
    moving = np.ones(grid.node_shape, np.float32)
    moving[4, 5] = 0
    shift = np.zeros((2,) + grid.node_shape, np.float32)
    shift[0], shift[1] = 32.0, 32.0  # one node right and down
    assert pair_trust(np.ones_like(moving), moving, shift, grid)[3, 4] == 0
    assert pair_trust(np.ones_like(moving), moving, shift, grid)[2, 2] == 1


def test_trusted_map_replaces_motion_near_a_defect_by_its_neighbours():
    grid = MapGrid((128, 128), stride=16)
    m = np.zeros((2,) + grid.node_shape, np.float32)
    m[0] = 3.0
    m[:, 3:6, 3:6] = 40.0  # what a method made of a fold in the middle
    mask = np.full((128, 128), 255, np.uint8)
    mask[60:68, 60:68] = 0
    out = trusted_map(m, mask, None, grid)
    np.testing.assert_allclose(out[0], 3.0, atol=1e-5)
    np.testing.assert_allclose(out[1], 0.0, atol=1e-5)


def test_trusted_field_fills_the_dense_field_under_both_masks():
    u = np.zeros((2, 64, 64), np.float32)
    u[0] = 1.0
    u[:, 22:28, 22:28] = 50.0  # garbage under the fixed section's defect
    fixed = np.full((64, 64), 255, np.uint8)
    fixed[22:28, 22:28] = 0
    out = trusted_field(u, fixed, None, margin_px=2)
    np.testing.assert_allclose(out[0, 18:32, 18:32], 1.0, atol=1e-5)
    # the moving mask's defect is where the motion points: one pixel to the right
    moving = np.full((64, 64), 255, np.uint8)
    moving[40:44, 41:45] = 0
    v = np.zeros((2, 64, 64), np.float32)
    v[0] = 1.0
    v[0, 40:44, 40:43] = 1.5  # still pointing into the defect
    out = trusted_field(v, None, moving, margin_px=1)
    np.testing.assert_allclose(out[0, 38:46, 38:46], 1.0, atol=1e-5)


def _em_like(shape, seed):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=shape), 2) * 40 + 128
    return np.clip(x + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)


def test_detector_finds_flat_extreme_regions_and_nothing_in_tissue():
    section = _em_like((200, 200), 0)
    assert (detect_defects(section) == 255).all()  # textured tissue: no defect
    painted = section.copy()
    yy, xx = np.mgrid[0:200, 0:200]
    fold = np.abs((xx - 100) * 0.6 + (yy - 100) * 0.8) <= 1.5  # a 3 px dark line, tilted
    crack = np.abs(xx - 40) <= 3
    debris = ((xx - 150) / 8.0) ** 2 + ((yy - 50) / 5.0) ** 2 <= 1
    painted[fold] = 5
    painted[crack] = 0
    painted[debris] = 5
    found = detect_defects(painted) == 0
    truth = fold | crack | debris
    assert found[truth].mean() > 0.97  # recall
    assert (found & ~ndimage.binary_dilation(truth, iterations=2)).sum() == 0  # no stray
    with pytest.raises(ValueError, match="2D"):
        detect_defects(painted[None])
    lazy = DetectedMasks(np.stack([section, painted]))
    assert lazy.shape == (2, 200, 200) and lazy[1].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(lazy)[1], detect_defects(painted))


def test_learned_method_fills_masked_inputs_and_trusts_no_motion_under_them():
    from hybridreg.methods import get_method

    method = get_method("learned", threads=1)
    fixed, moving = _em_like((96, 96), 1).astype(np.float32), _em_like((96, 96), 1)
    moving = ndimage.shift(moving.astype(np.float32), (1.0, -2.0), mode="nearest")
    mask = np.full((96, 96), 255, np.uint8)
    mask[40:56, :] = 0
    filled = fixed.copy()
    filled[mask == 0] = fixed[mask != 0].mean()
    # the network sees the filled section: the same prediction, then the trust fill
    u_mask, _ = method.predict_field(fixed, moving, fixed_mask=mask)
    u_fill, _ = method.predict_field(filled, moving)
    np.testing.assert_allclose(u_mask, trusted_field(u_fill, mask, None), atol=1e-5)
    res = method.register(fixed, moving, fixed_mask=mask, moving_mask=mask)
    assert res.field.shape == (2, 96, 96) and np.isfinite(res.field).all()


def test_metrics_leave_the_defects_out_and_measure_away_from_them():
    truth = np.zeros((2, 2, 96, 96), np.float32)
    fields = truth.copy()
    fields[1, :, 40:50, 40:50] = 30.0  # wrong only under the defect
    fields[1, :, 40:50, 80:90] = 1.0  # and a little, 30 px away from it
    masks = np.full((2, 96, 96), 255, np.uint8)
    masks[1, 40:50, 40:50] = 0
    rows = evaluate_stack(fields=fields, true_fields=truth, masks=masks, margin_px=4,
                          away_px=20)
    plain = evaluate_stack(fields=fields, true_fields=truth, margin_px=4)
    assert rows[1]["defect_fraction"] == pytest.approx(100 / 96 ** 2)
    assert rows[0]["defect_fraction"] == 0.0 and "epe_away_px" not in rows[0]
    assert rows[1]["epe_mean_px"] < 0.1 < plain[1]["epe_mean_px"]
    far = (96 - 8) ** 2 - 50 * 50 + (96 - 8 - 50) * 0  # (only checked to be positive)
    assert far > 0 and 0 < rows[1]["epe_away_px"] <= 2 ** 0.5


def test_defects_command_and_masks_through_align_apply_compare(tmp_path, capsys):
    """`hybridreg defects` writes masks (255 tissue, 0 defect); `align --masks auto` and a
    mask stack run the learned method; `apply --masks --masks-out` warps the masks with
    the same transforms; `compare --masks auto` measures away from the defects."""
    assert run(["phantom", "--out", tmp_path / "ph.tif", "--sections", 4, "--size", 96, 96,
                "--seed", 2]) == 0
    assert run(["deform", tmp_path / "ph.tif", "--out", tmp_path / "d.tif", "--fields-out",
                tmp_path / "t", "--seed", 3, "--defects", "cracks", "--defect-fraction", 1,
                "--masks-out", tmp_path / "m.tif"]) == 0
    capsys.readouterr()
    assert run(["defects", tmp_path / "d.tif", "--out", tmp_path / "auto.tif",
                "--no-progress"]) == 0
    assert "defects in" in capsys.readouterr().out
    auto = io.read_stack(tmp_path / "auto.tif").data
    true = io.read_stack(tmp_path / "m.tif").data
    assert auto.shape == true.shape and auto.dtype == np.uint8
    assert ((auto == 0) & (true == 0)).sum() >= 0.9 * (true == 0).sum()  # cracks found
    assert run(["defects", tmp_path / "d.tif", "--out", tmp_path / "auto.tif"]) == 2
    for masks in ("auto", tmp_path / "m.tif"):
        assert run(["align", tmp_path / "d.tif", "--method", "learned", "--masks", masks,
                    "--out", tmp_path / "a.tif", "--fields-out", tmp_path / "f",
                    "--overwrite", "--no-progress"]) == 0
    assert run(["apply", tmp_path / "d.tif", "--fields", tmp_path / "f", "--out",
                tmp_path / "ap.tif", "--masks", tmp_path / "m.tif", "--masks-out",
                tmp_path / "am.tif"]) == 0
    aligned = io.read_stack(tmp_path / "am.tif").data
    assert aligned.shape == true.shape and set(np.unique(aligned)) <= {0, 255}
    assert run(["apply", tmp_path / "d.tif", "--fields", tmp_path / "f", "--out",
                tmp_path / "ap2.tif", "--masks", tmp_path / "m.tif"]) == 2
    assert "--masks and --masks-out go together" in capsys.readouterr().err
    assert run(["compare", tmp_path / "ph.tif", "--methods", "learned", "--deform-seed", 3,
                "--masks", tmp_path / "m.tif", "--report", tmp_path / "r"]) == 2
    assert "use --masks auto" in capsys.readouterr().err
    assert run(["compare", tmp_path / "d.tif", "--methods", "learned", "--masks",
                tmp_path / "m.tif", "--report", tmp_path / "r", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "defect_fraction" in out


def test_report_outlines_defects_and_plots_their_area(tmp_path):
    """Issue 17 item 7: with masks the report draws the defects' outlines on the overlays
    of the most damaged section, and the per-section curves include the defect area."""
    from hybridreg import phantom, synthetic
    from hybridreg.compare import compare_methods, make_case
    from hybridreg.report import render_report, representative_sections

    ph = phantom.make_phantom(sections=4, shape_yx=(96, 96), seed=1)
    d = synthetic.deform_stack(ph.stack, seed=2, defects=("cracks",), defect_fraction=1.0)
    case = make_case(d.stack)
    comparison = compare_methods(case, ["learned"], masks=d.masks, threads=1)
    area = [row.get("defect_fraction") for row in comparison.runs[0].rows]
    assert area[0] == 0.0 and all(a > 0 for a in area[1:])
    assert comparison.settings["masks"] == "given"
    worst = max(range(1, 4), key=lambda k: area[k])
    assert worst in representative_sections(comparison)
    page = render_report(comparison)
    assert "Outlined: the defects of section" in page
    from hybridreg.report import curve_metrics

    assert {"defect_fraction", "ncc_prev"} <= set(curve_metrics(comparison))
    plain = compare_methods(case, [], threads=1)  # without masks: no such curve
    assert "defect_fraction" not in curve_metrics(plain)


def test_tiles_give_each_tile_its_part_of_the_masks():
    """Masks through TiledMethod: each tile's method gets the crop of the fixed mask and
    the moving mask warped as the tile (here no coarse pass: cropped), in both the dense
    and the map path; a tile the masks leave mostly empty is filled in, not registered."""
    from hybridreg.methods.base import takes_masks
    from helpers import PhaseCorrelation
    from hybridreg.tiling import TiledMethod

    class Recording(PhaseCorrelation):
        def __init__(self):
            super().__init__()
            self.kept = []

        def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                     origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None):
            self.kept.append((origin_xy, None if fixed_mask is None else int(fixed_mask.sum()),
                              None if moving_mask is None else int(moving_mask.sum())))
            return super().register(fixed, moving, references=references,
                                    spacing_xy=spacing_xy, origin_xy=origin_xy)

    section = _em_like((126, 126), 3).astype(np.float32)
    fixed_mask = np.full((126, 126), 255, np.uint8)
    fixed_mask[:64, :64] = 0  # the first tile (0:64, 0:64): all defect
    moving_mask = np.full((126, 126), 255, np.uint8)
    moving_mask[64:, 64:70] = 0
    inner = Recording()
    tiled = TiledMethod(inner, tile_px=64, overlap_px=2, coarse=False)  # tiles at 0 and 62
    assert takes_masks(tiled)

    def expected(origin):
        x0, y0 = int(origin[0]), int(origin[1])
        crop = (slice(y0, y0 + 64), slice(x0, x0 + 64))
        return (origin, int((fixed_mask[crop] != 0).sum()), int((moving_mask[crop] != 0).sum()))

    res = tiled.register(section, section, fixed_mask=fixed_mask, moving_mask=moving_mask)
    assert len(inner.kept) == 3 and (0.0, 0.0) not in [o for o, *_ in inner.kept]
    assert all(row == expected(row[0]) for row in inner.kept), inner.kept
    assert [r["status"] for r in res.info["tiles"]].count("blank") == 1
    inner.kept.clear()
    tiled.register_map(section, section, MapGrid((126, 126), stride=16),
                       fixed_mask=fixed_mask, moving_mask=moving_mask)
    assert len(inner.kept) == 3 and all(row == expected(row[0]) for row in inner.kept)


def test_detection_in_strips_equals_the_whole_section(monkeypatch):
    """A section larger than DETECT_STRIP_PX is searched strip by strip: the same mask up
    to the percentiles, which come from every 4th textured pixel here."""
    import hybridreg.defects as D

    section = _em_like((300, 120), 5)
    section[100:106, :] = 0  # a crack across a strip boundary
    section[40:48, 10:20] = 255  # a saturated spot
    whole = detect_defects(section)
    monkeypatch.setattr(D, "DETECT_OVERLAP_PX", 16)
    rows = []
    monkeypatch.setattr(D, "_defects_in", lambda x, *a, _f=D._defects_in: rows.append(
        x.shape[0]) or _f(x, *a))
    monkeypatch.setattr(D, "DETECT_STRIP_PX", 64 * 120)
    striped = D.detect_defects(section)
    assert len(rows) == 5 and max(rows) == 64 + 2 * 16  # strips of 64 rows and overlaps
    assert (whole == 0)[100:106].all() and (striped == 0)[100:106].all()
    np.testing.assert_array_equal(whole[40:48, 10:20], striped[40:48, 10:20])
    assert np.mean(whole != striped) < 0.001


def test_itk_style_align_stack_takes_masks():
    """`hybridreg.align_stack(..., masks=...)`: an array, an itk.Image or "auto"; a lost
    section (its mask all zero) is skipped and flagged."""
    import itk

    import hybridreg
    from hybridreg import phantom

    ph = phantom.make_phantom(sections=4, shape_yx=(96, 96), seed=4)
    masks = np.full(ph.stack.shape, 255, np.uint8)
    masks[2] = 0
    for given in (masks, itk.image_from_array(masks), "auto"):
        out = hybridreg.align_stack(ph.stack.astype(np.float32), method="learned",
                                    masks=given)
        assert np.asarray(out.fields).shape == (4, 2, 96, 96)
        if not isinstance(given, str):
            assert "skipped" in out.table[2]["warnings"]
    with pytest.raises(ValueError, match="masks must be a mask stack or 'auto'"):
        hybridreg.align_stack(ph.stack.astype(np.float32), method="learned", masks="yes")


def test_local_ncc_is_each_nodes_window_ncc_and_finds_a_mismatch():
    """stack.local_ncc equals the NCC over each node's window (its support) computed
    directly, and node_confidence is low where the pair did not match."""
    from hybridreg.fields import MapGrid
    from hybridreg.stack import local_ncc, node_confidence

    rng = np.random.default_rng(4)
    fixed = rng.uniform(0, 255, (70, 90)).astype(np.float32)
    warped = fixed + rng.normal(0, 40, fixed.shape).astype(np.float32)
    warped[:32, 48:] = rng.uniform(0, 255, (32, 42))  # a region that matched nothing
    mask = np.ones(fixed.shape, bool)
    mask[60:, :] = False  # no usable content there
    grid = MapGrid(fixed.shape, stride=8)
    got = local_ncc(fixed, warped, mask, grid)
    assert got.shape == grid.node_shape
    for ny, nx in [(2, 2), (3, 8), (0, 0), (8, 11), (5, 4)]:
        ys = slice(max(0, (ny - 1) * 8), (ny + 1) * 8)
        xs = slice(max(0, (nx - 1) * 8), (nx + 1) * 8)
        m = mask[ys, xs]
        if m.sum() < 0.25 * m.size:
            assert np.isnan(got[ny, nx])
            continue
        a, b = fixed[ys, xs][m], warped[ys, xs][m]
        want = np.corrcoef(a, b)[0, 1]
        assert got[ny, nx] == pytest.approx(want, abs=1e-4)
    assert np.isnan(got[9, 3])  # the window is masked out
    conf = node_confidence(got)
    assert conf[1:3, 7:10].max() < 0.4  # the mismatched region (0.3 at the least)
    assert np.median(conf[4:7, 1:5]) > 0.9
    assert conf.min() == pytest.approx(0.3) and conf[9, 3] == pytest.approx(0.3)
    assert node_confidence(None) is None


def test_node_weights_option_reaches_the_solve(monkeypatch):
    """align_stack(node_weights=True) gives the solve each pair's node weights; off by
    default; refused in the sequential mode."""
    import hybridreg.stack as stack_mod
    from hybridreg.stack import align_stack

    from helpers import PhaseCorrelation

    seen = []
    solve = stack_mod.solve_joint

    def spy(*args, **kwargs):
        seen.append(kwargs.get("node_weights"))
        return solve(*args, **kwargs)

    monkeypatch.setattr(stack_mod, "solve_joint", spy)
    stack = np.random.default_rng(0).uniform(0, 255, (3, 48, 48)).astype(np.float32)
    align_stack(stack, PhaseCorrelation(), stride=8)
    align_stack(stack, PhaseCorrelation(), stride=8, node_weights=True)
    assert seen[0] is None
    assert sorted(seen[1]) == [(0, 1), (1, 2)]
    assert seen[1][(0, 1)].shape == (7, 7) and 0.299 < float(np.min(seen[1][(0, 1)])) <= 1
    with pytest.raises(ValueError, match="node_weights is for mode='joint'"):
        align_stack(stack, PhaseCorrelation(), mode="sequential", node_weights=True)
