"""Joint solve of section fields from pairwise fields: exact cases."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import fields
from hybridreg.joint import pair_list, solve_joint

from helpers import smooth_field

SHAPE = (24, 28)


def const(tx, ty):
    u = np.zeros((2,) + SHAPE, np.float32)
    u[0], u[1] = tx, ty
    return u


def translation_pairs(t, neighbours):
    return {(i, j): const(*(t[j] - t[i])) for (i, j) in pair_list(len(t), neighbours=neighbours)}


def test_pair_list():
    assert pair_list(4, neighbours=1) == [(0, 1), (1, 2), (2, 3)]
    assert pair_list(4, neighbours=2) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="neighbours"):
        pair_list(3, neighbours=0)


@pytest.mark.parametrize("neighbours", [1, 2, 3])
def test_exact_translations_with_anchor(neighbours):
    rng = np.random.default_rng(0)
    t = rng.uniform(-10, 10, (7, 2))
    t[0] = 0
    sol = solve_joint(translation_pairs(t, neighbours), 7, prior=1e-9, anchor=0)
    np.testing.assert_allclose(sol.fields[:, :, 5, 5], t, atol=1e-4)


def test_prior_keeps_sections_near_their_mean():
    """Without an anchor, the solution is the truth up to the stack's mean position."""
    t = np.array([[0, 0], [4, -2], [-3, 5], [6, 1], [1, -4]], float)
    sol = solve_joint(translation_pairs(t, 2), 5, prior=1e-6)
    est = sol.fields[:, :, 0, 0]
    np.testing.assert_allclose(est, t - t.mean(axis=0), atol=1e-3)


def test_robust_weights_reject_a_wrong_pair():
    t = np.zeros((6, 2))
    pairs = translation_pairs(t, 2)
    pairs[(2, 3)] = const(20.0, -15.0)  # one failed registration
    plain = solve_joint(pairs, 6, prior=0.1, robust_scale_px=0)
    robust = solve_joint(pairs, 6, prior=0.1)
    err_plain = np.abs(plain.fields[:, :, 0, 0]).max()
    err_robust = np.abs(robust.fields[:, :, 0, 0]).max()
    assert err_plain > 3.0
    assert err_robust < 0.3 * err_plain
    assert robust.pair_weight[(2, 3)] < 0.1
    assert min(w for p, w in robust.pair_weight.items() if p != (2, 3)) > 0.5


def test_nonlinear_fields_are_composed_correctly():
    """Smooth, non-translational fields: pairs v_ij = compose(inv(u_i), u_j) are undone."""
    z = 4
    u = np.stack([np.zeros((2,) + SHAPE, np.float32)]
                 + [smooth_field(SHAPE, seed=k, amplitude_px=3.0, sigma=6.0)
                    for k in range(1, z)])
    pairs = {(i, j): fields.compose(fields.invert(u[i]), u[j], order=3)
             for (i, j) in pair_list(z, neighbours=2)}
    linear = solve_joint(pairs, z, prior=1e-9, anchor=0, iterations=1)
    sol = solve_joint(pairs, z, prior=1e-9, anchor=0, iterations=5)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    err = np.abs(sol.fields - u)[inner].max()
    assert err < 0.05
    assert err < 0.5 * np.abs(linear.fields - u)[inner].max()  # the re-sampling matters


def test_bad_input():
    with pytest.raises(ValueError, match="no pairs"):
        solve_joint({}, 3)
    with pytest.raises(ValueError, match="distinct sections"):
        solve_joint({(0, 5): const(0, 0)}, 3)
    with pytest.raises(ValueError, match="prior"):
        solve_joint({(0, 1): const(0, 0)}, 2, prior=0)
    with pytest.raises(ValueError, match="grid shape"):
        solve_joint({(0, 1): const(0, 0), (1, 2): np.zeros((2, 5, 5))}, 3)


def test_the_banded_sweeps_equal_the_dense_normal_equations(tmp_path):
    """One step without reweighting is the dense solve ``A u = rhs`` node by node, with pairs
    up to three sections apart, one of them registered backwards (i > j); with the scratch
    and the result on disk (a block of a few rows), the same numbers, and no scratch left."""
    from scipy import ndimage

    from hybridreg.stack import MapStack

    rng = np.random.default_rng(3)
    z, prior = 7, 0.2
    pairs = {}
    for (i, j) in pair_list(z, neighbours=3) + [(5, 2)]:
        v = np.stack([ndimage.gaussian_filter(rng.standard_normal(SHAPE), 3) * 8
                      for _ in range(2)]).astype(np.float32)
        pairs[(i, j)] = v
    wts = {p: float(rng.uniform(0.3, 1.0)) for p in pairs}
    a = prior * np.eye(z)
    rhs = np.zeros((z, 2) + SHAPE)
    for (i, j), v in pairs.items():
        a[[i, j], [i, j]] += wts[(i, j)]
        a[i, j] -= wts[(i, j)]
        a[j, i] -= wts[(i, j)]
        rhs[j] += wts[(i, j)] * v
        rhs[i] -= wts[(i, j)] * v
    dense = np.einsum("kl,l...->k...", np.linalg.inv(a), rhs)
    sol = solve_joint(pairs, z, prior=prior, pair_weights=wts, robust_scale_px=0,
                      iterations=1)
    np.testing.assert_allclose(sol.fields, dense, atol=1e-4, rtol=0)
    out = MapStack((z, 2) + SHAPE, tmp_path, "maps.zarr")
    disk = solve_joint(pairs, z, prior=prior, pair_weights=wts, robust_scale_px=0,
                       iterations=1, out=out, max_bytes=1)
    np.testing.assert_allclose(np.asarray(disk.fields), dense, atol=1e-4, rtol=0)
    import gc

    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr"]


def test_a_section_without_any_pair_and_no_prior_is_a_clear_error():
    with pytest.raises(ValueError, match="singular"):
        solve_joint({(0, 1): const(1, 0)}, 3, prior=0, anchor=0)


def _per_node_dense(pairs, z, prior, wts, conf):
    """The per-node normal equations of solve_joint with node weights, solved node by node."""
    h, w = next(iter(pairs.values())).shape[1:]
    npairs = np.zeros(z)
    csum = np.zeros((z, h, w))
    for (i, j) in pairs:
        c = conf.get((i, j), np.ones((h, w)))
        npairs[[i, j]] += 1
        csum[i] += c
        csum[j] += c
    a = np.zeros((h, w, z, z))
    rhs = np.zeros((h, w, z, 2))
    for k in range(z):
        a[:, :, k, k] = prior * np.maximum(csum[k] / npairs[k], 1e-3)
    for (i, j), v in pairs.items():
        wt = wts[(i, j)] * conf.get((i, j), np.ones((h, w)))
        a[:, :, i, i] += wt
        a[:, :, j, j] += wt
        a[:, :, i, j] -= wt
        a[:, :, j, i] -= wt
        vv = np.moveaxis(v, 0, -1)
        rhs[:, :, j] += wt[..., None] * vv
        rhs[:, :, i] -= wt[..., None] * vv
    x = np.linalg.solve(a, rhs)  # (h, w, z, 2)
    return np.moveaxis(x, (2, 3), (0, 1))


def test_node_weights_solve_each_node_own_system(tmp_path):
    """With node weights the normal matrix differs per node: the sweep's per-node factor gives
    each node's own dense solution, in memory and with its scratch on disk; weights of 1
    give the plain solve."""
    from scipy import ndimage

    from hybridreg.stack import MapStack

    rng = np.random.default_rng(5)
    z, prior = 7, 0.2
    pairs, conf = {}, {}
    for (i, j) in pair_list(z, neighbours=3) + [(5, 2)]:
        pairs[(i, j)] = np.stack([ndimage.gaussian_filter(rng.standard_normal(SHAPE), 3) * 8
                                  for _ in range(2)]).astype(np.float32)
        conf[(i, j)] = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
    conf[(1, 2)][:] = 0.0  # a pair with no trust anywhere
    del conf[(3, 4)]       # and one without node weights (all 1)
    wts = {p: float(rng.uniform(0.3, 1.0)) for p in pairs}
    dense = _per_node_dense(pairs, z, prior, wts, conf)
    kw = dict(prior=prior, pair_weights=wts, robust_scale_px=0, iterations=1)
    sol = solve_joint(pairs, z, node_weights=conf, **kw)
    np.testing.assert_allclose(sol.fields, dense, atol=1e-4, rtol=0)
    out = MapStack((z, 2) + SHAPE, tmp_path, "maps.zarr")
    disk = solve_joint(pairs, z, node_weights=conf, out=out, max_bytes=1, **kw)
    np.testing.assert_allclose(np.asarray(disk.fields), dense, atol=1e-4, rtol=0)
    # and the node weights change the answer (a check that could not pass by ignoring them)
    plain = solve_joint(pairs, z, **kw)
    assert np.abs(plain.fields - dense).max() > 0.5
    ones = solve_joint(pairs, z, node_weights={p: np.ones(SHAPE) for p in pairs}, **kw)
    np.testing.assert_allclose(ones.fields, plain.fields, atol=1e-4, rtol=0)


def test_node_weights_let_a_section_follow_its_good_neighbour():
    """Section 2's pair with section 3 is wrong in the left half (a defect of 3 there) and
    says so by its node weights: section 2 follows its pair with section 1 there."""
    t = np.zeros((5, 2))
    pairs = translation_pairs(t, 1)
    bad = const(0, 0)
    bad[0, :, :SHAPE[1] // 2] = 12.0
    pairs[(2, 3)] = bad
    conf = {(2, 3): np.where(np.arange(SHAPE[1]) < SHAPE[1] // 2, 0.01, 1.0)
            * np.ones(SHAPE)}
    plain = solve_joint(pairs, 5, prior=0.3, robust_scale_px=0)
    weighted = solve_joint(pairs, 5, prior=0.3, robust_scale_px=0, node_weights=conf)
    left = (slice(None), 0, slice(None), slice(0, SHAPE[1] // 2 - 2))
    assert np.abs(plain.fields[(2,) + left[1:]]).mean() > 2.0
    assert np.abs(weighted.fields[(2,) + left[1:]]).mean() < 0.3
    # and section 3 follows its pair with section 4
    assert np.abs(plain.fields[(3,) + left[1:]]).mean() > 4.0
    assert np.abs(weighted.fields[(3,) + left[1:]]).mean() < 0.6


def test_node_weights_all_low_keep_the_balance_with_the_prior():
    """Confidence only shifts trust between the pairs at a node: a section whose pairs are
    all unsure there (a defect of its own, filled from around it) is not pulled to zero."""
    t = np.array([[0, 0], [0, 0], [6, 0], [0, 0], [0, 0]], float)
    pairs = translation_pairs(t, 1)
    low = {p: np.full(SHAPE, 0.05) for p in pairs if 2 in p}
    plain = solve_joint(pairs, 5, prior=0.3, robust_scale_px=0)
    weighted = solve_joint(pairs, 5, prior=0.3, robust_scale_px=0, node_weights=low)
    assert float(plain.fields[2, 0, 5, 5]) > 3.0
    # (its neighbours, whose pairs with it are unsure too, pull it less: closer to its 6 px)
    assert float(plain.fields[2, 0, 5, 5]) <= float(weighted.fields[2, 0, 5, 5]) < 6.0


def test_node_weights_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="node weights of pair"):
        solve_joint({(0, 1): const(1, 0)}, 2, node_weights={(0, 1): np.ones((3, 3))})
