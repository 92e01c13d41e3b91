"""Metrics: exact answers where they exist."""
from __future__ import annotations


import numpy as np
import pytest

from hybridreg import fields, metrics
from hybridreg.warp import warp

from helpers import smooth_field, smooth_texture


def test_ncc_mse_ssim_exact_cases():
    a = smooth_texture((40, 50), seed=0)
    assert metrics.ncc(a, a) == pytest.approx(1.0)
    assert metrics.ncc(a, 3 * a + 2) == pytest.approx(1.0)
    assert metrics.ncc(a, -a) == pytest.approx(-1.0)
    assert metrics.mse(a, a) == 0.0
    assert metrics.mse(a, a + 0.5) == pytest.approx(0.25)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    b = smooth_texture((40, 50), seed=1)
    assert metrics.ssim(a, b) < 0.5
    assert np.isnan(metrics.ncc(np.ones((5, 5)), a[:5, :5]))


def test_mask_restricts_ncc():
    a = smooth_texture((30, 30), seed=2)
    b = a.copy()
    b[:, 20:] = 0
    m = np.zeros(a.shape, bool)
    m[:, :20] = True
    assert metrics.ncc(a, b, mask=m) == pytest.approx(1.0)
    assert metrics.ncc(a, b) < 0.99
    with pytest.raises(ValueError, match="mask has shape"):
        metrics.ncc(a, b, mask=m[:10])


def test_endpoint_error_known_offset_and_spacing():
    u = np.zeros((2, 20, 20), np.float32)
    v = u.copy()
    v[0] = 3.0 * 0.5   # 3 px in x at spacing 0.5
    v[1] = 4.0 * 2.0   # 4 px in y at spacing 2
    e = metrics.endpoint_error(u, v, spacing_xy=(0.5, 2.0))
    assert e.mean_px == pytest.approx(5.0) and e.p95_px == pytest.approx(5.0)
    assert metrics.endpoint_error(v, v).mean_px == 0.0
    with pytest.raises(ValueError, match="grid shape"):
        metrics.endpoint_error(u, np.zeros((2, 10, 20)))


def test_interior_mask():
    m = metrics.interior_mask((10, 12), margin_px=2)
    assert m.sum() == 6 * 8 and not m[1].any() and m[2, 2]
    with pytest.raises(ValueError, match="no interior"):
        metrics.interior_mask((10, 10), margin_px=5)


def test_jacobian_stats_identity():
    s = metrics.jacobian_stats(np.zeros((2, 16, 16), np.float32))
    assert s["jac_min"] == s["jac_max"] == 1.0 and s["folding_fraction"] == 0.0


def test_label_overlap():
    lab = np.zeros((20, 20), np.int32)
    lab[2:10, 2:10] = 1
    lab[12:18, 3:15] = 2
    r = metrics.label_overlap(lab, lab)
    assert r["dice_mean"] == 1.0 and r["pixel_agreement"] == 1.0
    shifted = np.roll(lab, 2, axis=1)
    r = metrics.label_overlap(shifted, lab)
    # label 1: |A|=|B|=64, overlap 48 -> 0.75; label 2: |A|=|B|=72, overlap 60 -> 10/12
    assert r["dice_mean"] == pytest.approx((0.75 + 60 / 72) / 2)
    assert metrics.label_overlap(shifted, lab, top_k=1)["dice_mean"] == pytest.approx(60 / 72)


def test_evaluate_stack_perfect_and_identity():
    z, shape = 3, (48, 48)
    ref = np.stack([smooth_texture(shape, seed=k) for k in range(z)])
    labels_ref = (ref * 4).astype(np.int32) + 1
    true = np.stack([np.zeros((2,) + shape, np.float32)]
                    + [smooth_field(shape, seed=10 + k, amplitude_px=2.0) for k in range(1, z)])
    inv = np.stack([fields.invert(t) for t in true])
    deformed = np.stack([warp(ref[k], inv[k], order=3)[0] for k in range(z)])
    labels_def = np.stack([warp(labels_ref[k], inv[k], order=0)[0] for k in range(z)])
    aligned = np.stack([warp(deformed[k], true[k], order=3)[0] for k in range(z)])
    perfect = metrics.evaluate_stack(aligned=aligned, reference=ref, fields=true,
                                     true_fields=true, labels=labels_def,
                                     labels_ref=labels_ref, margin_px=6)
    none = metrics.evaluate_stack(fields=np.zeros_like(true), true_fields=true,
                                  labels=labels_def, labels_ref=labels_ref, margin_px=6)
    assert all(r["epe_mean_px"] == 0.0 for r in perfect)
    assert all(r["ncc_ref"] > 0.99 for r in perfect)
    assert "ncc_prev" in perfect[1] and "ncc_prev" not in perfect[0]
    assert none[0]["epe_mean_px"] == 0.0 and none[1]["epe_mean_px"] > 0.5
    s_perfect, s_none = metrics.summarize(perfect), metrics.summarize(none)
    assert s_perfect["sections"] == 2
    assert s_perfect["pixel_agreement"] > 0.97 > s_none["pixel_agreement"]
    with pytest.raises(ValueError, match="at least one"):
        metrics.evaluate_stack()
