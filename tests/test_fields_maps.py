"""Coarse maps (hybridreg.fields.MapGrid): the transform every stack alignment keeps.

The reference is ITK: a map written as a displacement image with its nodes' spacing and
origin, given to a DisplacementFieldTransform, must warp exactly as hybridreg's dense
upsampling of it (issue 16, item 1).
"""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import fields
from hybridreg.fields import MapGrid
from hybridreg.warp import render, warp

from helpers import smooth_field, smooth_texture
from test_fields import ORIGIN, SPACING, itk_resample  # ITK's own warp, on this grid

SHAPE = (150, 203)     # neither a multiple of the stride


@pytest.fixture(scope="module")
def case():
    grid = MapGrid(SHAPE, stride=16, spacing_xy=SPACING, origin_xy=ORIGIN)
    m = fields.to_physical(smooth_field(grid.node_shape, seed=3, amplitude_px=3.0), SPACING)
    return grid, m, smooth_texture(SHAPE, seed=4)


def test_grid_covers_the_section_with_nodes():
    g = MapGrid((150, 203), stride=16, spacing_xy=(2.0, 3.0), origin_xy=(1.0, 2.0))
    assert g.node_shape == (11, 14)  # (149 / 16 -> 10) + 1, (202 / 16 -> 13) + 1
    assert (g.node_shape[0] - 1) * 16 >= 149 and (g.node_shape[1] - 1) * 16 >= 202
    assert g.node_spacing_xy == (32.0, 48.0) and g.node_origin_xy == (1.0, 2.0)
    assert MapGrid.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="stride"):
        MapGrid((10, 10), stride=0)
    with pytest.raises(ValueError, match="shape|grid"):
        g.validate(np.zeros((2, 10, 14)))


def test_a_map_warps_as_itk_warps_it(case):
    """ITK's DisplacementFieldTransform of the map (its nodes' spacing and origin) gives
    hybridreg's rendering of the map, and its dense field is hybridreg's upsampling."""
    import itk

    grid, m, moving = case
    transform = fields.to_itk_transform(m, spacing_xy=grid.node_spacing_xy,
                                        origin_xy=grid.origin_xy)
    ours = render(moving, m, grid)
    theirs = itk_resample(moving, transform)
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-4)
    dense_itk = fields.from_itk_transform(transform, shape_yx=SHAPE, spacing_xy=SPACING,
                                          origin_xy=ORIGIN)
    np.testing.assert_allclose(grid.dense(m), dense_itk, atol=1e-5)
    assert itk is not None


def test_rendering_equals_warping_with_the_dense_field(case):
    grid, m, moving = case
    u = grid.dense(m)
    for order in (0, 1, 3):
        a = render(moving, m, grid, order=order, chunk_px=999)  # many chunks
        b = warp(moving, u, spacing_xy=SPACING, order=order)[0]
        np.testing.assert_array_equal(a, b)
    # an integer output is the float one, rounded and clipped
    a8 = render(moving * 255, m, grid, dtype=np.uint8)
    b8 = np.clip(np.rint(warp(moving * 255, u, spacing_xy=SPACING)[0]), 0, 255)
    np.testing.assert_array_equal(a8, b8)


def test_windows_of_the_dense_field_are_the_whole_field_cut(case):
    grid, m, _ = case
    u = grid.dense(m)
    np.testing.assert_array_equal(grid.dense(m, 17, 90, 33, 200), u[:, 17:90, 33:200])
    # at the nodes the dense field is the map
    np.testing.assert_allclose(u[:, ::16, ::16], m[:, :u[:, ::16].shape[1],
                                                     :u[:, :, ::16].shape[2]], atol=1e-6)


def test_projection_is_the_least_squares_map(case):
    grid, m, _ = case
    # a bilinear field is projected back onto its own map
    np.testing.assert_allclose(grid.project(grid.dense(m)), m, atol=1e-4)
    # any other field: the projection's residual is orthogonal to every map
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2,) + SHAPE).astype(np.float32)
    p = grid.project(u)
    r = u - grid.dense(p)
    for _ in range(3):
        probe = rng.normal(size=(2,) + grid.node_shape).astype(np.float32)
        assert abs(float((r * grid.dense(probe)).sum())) < 1e-2 * float(np.abs(r).sum())
    # so no other map is closer to u
    for _ in range(3):
        other = p + 0.05 * rng.normal(size=p.shape).astype(np.float32)
        assert np.mean((u - grid.dense(p)) ** 2) < np.mean((u - grid.dense(other)) ** 2)


def test_tiles_blended_then_solved_give_the_projection(case):
    """The tile-by-tile build of a map (weights summing to one) is the projection of the
    whole field: no dense field of the section is needed."""
    grid, _, _ = case
    rng = np.random.default_rng(1)
    u = rng.normal(size=(2,) + SHAPE).astype(np.float32)
    rhs = np.zeros((2,) + grid.node_shape)
    wy = np.concatenate([np.ones(60), np.linspace(1, 0, 30), np.zeros(60)])
    for y0, y1, wt in ((0, 90, wy[:90]), (60, 150, 1 - wy[60:])):
        rhs += grid.rhs(u[:, y0:y1], y0, 0, weight=(wt, np.ones(SHAPE[1])))
    np.testing.assert_allclose(grid.solve(rhs), grid.project(u), atol=1e-5)


def test_stride_one_is_the_dense_field(case):
    _, m, _ = case
    grid = MapGrid(m.shape[1:], stride=1, spacing_xy=SPACING)
    np.testing.assert_array_equal(grid.project(m), m)
    np.testing.assert_array_equal(grid.dense(m), m)
    np.testing.assert_array_equal(grid.quantize(m), m)


def test_quantized_maps_are_within_a_five_hundredth_of_a_pixel(case):
    grid, m, _ = case
    q = grid.quantize(m)
    assert np.abs(fields.to_pixels(q - m, SPACING)).max() <= 2.0 ** -9 + 1e-7
    assert grid.quantum() == 2.0 ** np.floor(np.log2(0.7 / 256))
    np.testing.assert_array_equal(grid.quantize(q), q)
