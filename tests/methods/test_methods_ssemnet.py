"""The ssemnet method (ssEMnet's per-pair optimisation, SSEMnetMethod).

Tiny models saved with save_model to tmp_path, 48-64 px images, one torch thread.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridreg.methods.ssemnet import SSEMnetMethod
from hybridreg.models import CheckpointError
from method_cases import epe, intensity_autoencoder, shifted_pair, ssemnet, true_field

torch.set_num_threads(1)


# --- SSEMnetMethod ---------------------------------------------------------------------------

def test_ssemnet_recovers_a_known_shift(ae_path):
    fixed, moving = shifted_pair(64)
    r = ssemnet(ae_path).register(fixed, moving)
    assert r.field.shape == (2, 64, 64) and r.field.dtype == np.float32
    assert np.isfinite(r.field).all() and np.isfinite(r.warped).all()
    ident = epe(np.zeros((2, 64, 64), np.float32), true_field())
    assert ident > 2.5
    assert epe(r.field, true_field()) < 0.3
    assert r.info["iterations"] == len(r.info["loss_curve"]) == 60
    assert [s["factor"] for s in r.info["stages"]] == [4, 2, 1]
    assert r.metric < r.info["initial_loss"] / 3
    assert r.info["ncc"] > 0.95
    json.dumps(ssemnet(ae_path).config)


def test_ssemnet_field_is_in_physical_units_and_deterministic(ae_path):
    fixed, moving = shifted_pair(64)
    m = ssemnet(ae_path, iterations=(15, 10, 5))
    u1 = m.register(fixed, moving).field
    np.testing.assert_array_equal(m.register(fixed, moving).field, u1)  # bit-identical
    u2 = m.register(fixed, moving, spacing_xy=(2.0, 0.5)).field
    assert np.abs(u1).max() > 1.0
    np.testing.assert_allclose(u2[0], 2.0 * u1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u2[1], 0.5 * u1[1], rtol=1e-5, atol=1e-5)


def test_ssemnet_starts_from_an_initial_field(ae_path):
    fixed, moving = shifted_pair(64)
    spacing = (2.0, 0.5)
    per_axis = np.array(spacing, np.float32).reshape(2, 1, 1)
    u0 = true_field() * per_axis  # physical units
    refine = ssemnet(ae_path, pyramid=(1,), iterations=10, lr=0.1)  # small steps: refinement
    r = refine.register(fixed, moving, spacing_xy=spacing, initial_field=u0)
    # the result is u0 + map, and the map has (almost) nothing left to correct; the border
    # control points, which see least of the sections, move most (0.35 px at most measured)
    c = np.abs(r.info["control_map_px"])
    assert c.mean() < 0.1 and c[:, 1:-1, 1:-1].max() < 0.3 and c.max() < 0.5
    assert epe(r.field / per_axis, true_field()) < 0.2
    # the same few small steps from the identity get nowhere near
    r_id = refine.register(fixed, moving, spacing_xy=spacing)
    assert epe(r_id.field / per_axis, true_field()) > 1.5


def test_ssemnet_empty_space_of_the_fixed_section_is_masked(ae_path):
    fixed, moving = shifted_pair(64)
    fixed[:, :20] = 0  # the fixed section ends: empty space on the left
    masked = ssemnet(ae_path).register(fixed, moving)
    unmasked = ssemnet(ae_path, mask_empty=False).register(fixed, moving)
    e_masked = np.linalg.norm(masked.field - true_field(), axis=0)
    e_unmasked = np.linalg.norm(unmasked.field - true_field(), axis=0)
    # masked: the tissue decides, and the map carries the shift smoothly over the empty
    # space; unmasked: the edge of the empty space drags the map there (tens of pixels)
    assert e_masked.mean() < 0.3 and e_masked.max() < 1.0
    assert e_unmasked.mean() > 1.5 and e_unmasked.max() > 5.0
    content = (slice(8, -8), slice(28, -8))
    assert e_masked[content].mean() < 0.5 * e_unmasked[content].mean()


def test_ssemnet_loss_drop_ignores_an_artefact(ae_path):
    fixed, moving = shifted_pair(64)
    moving[24:36, 28:40] = 255  # a saturated blob (dirt) in the moving section only
    robust = ssemnet(ae_path).register(fixed, moving)
    plain = ssemnet(ae_path, loss_drop=0.0).register(fixed, moving)
    assert epe(robust.field, true_field()) < 0.3
    assert epe(plain.field, true_field()) > 1.0


def test_ssemnet_matches_the_grey_values_of_the_moving_section(ae_path):
    """A section with other brightness and contrast (as between ISBI 2012's sections 8 and 9)
    is mapped onto the fixed section's grey-value statistics before the features are
    compared; without that the feature difference is dominated by the grey values and the
    map runs away (20 px here; 47-116 px on three real ISBI pairs, see RESULTS)."""
    fixed, moving = shifted_pair(64)
    darker = (moving * 0.5 + 110).astype(np.float32)  # half the contrast, brighter
    matched = ssemnet(ae_path).register(fixed, darker)
    plain = ssemnet(ae_path, match_intensity=False).register(fixed, darker)
    assert epe(matched.field, true_field()) < 0.3
    assert epe(plain.field, true_field()) > 5.0
    assert ssemnet(ae_path).config["match_intensity"] is True


def test_match_intensity_maps_onto_the_target_over_content():
    from hybridreg.methods.ssemnet import match_grey_values

    rng = np.random.default_rng(3)
    target = rng.normal(1.0, 2.0, (16, 16)).astype(np.float32)
    other = rng.normal(-3.0, 0.5, (16, 16)).astype(np.float32)
    other[:, :4] = 9.0  # empty space, outside the content mask
    content = np.ones((16, 16), bool)
    content[:, :4] = False
    blank = np.full((16, 16), 5.0, np.float32)
    out = match_grey_values(np.stack([other, blank, target]), [content, None, None], target=2)
    # compared where both show content
    assert out[0][content].mean() == pytest.approx(target[content].mean(), abs=1e-4)
    assert out[0][content].std() == pytest.approx(target[content].std(), rel=1e-4)
    np.testing.assert_array_equal(out[1], blank)  # no spread: left as it is
    np.testing.assert_array_equal(out[2], target)


def test_ssemnet_masks_and_drop_schedule_reach_the_loss(ae_path, monkeypatch):
    import hybridreg.models as models

    calls = []
    real = models.ssemnet_masked_loss

    def spy(diff, valid, drop_fraction=0.0, **kw):
        calls.append((drop_fraction, valid.clone(), tuple(diff.shape)))
        return real(diff, valid, drop_fraction, **kw)

    monkeypatch.setattr(models, "ssemnet_masked_loss", spy)
    fixed, moving = shifted_pair(64)
    fixed[:, :16] = 0
    ssemnet(ae_path, iterations=(8, 2, 2)).register(fixed, moving)
    # one call per iteration plus one final evaluation (drop 0) per stage
    assert len(calls) == 8 + 2 + 2 + 3
    drops = [c[0] for c in calls]
    assert drops[:9] == [0.5, 0.25, 0.125, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0]  # floor 0.1
    for drop, valid, shape in calls:
        assert valid.shape == (1, 1) + shape[-2:]  # on the feature grid
        # the 16 blank columns are a quarter of every stage's feature grid; with the eroded
        # rim and the conservative reduction, one more column is out
        assert not valid[..., : shape[-1] // 4 + 1].any()  # the empty space never counts
        assert valid.sum() > 0.3 * valid.numel()
    # the pixels warped in from outside the moving section are masked too: the map moves
    # content in from the right (u_x > 0), so the last feature columns drop out
    assert not calls[-1][1][..., -1].any()

    calls.clear()
    ssemnet(ae_path, iterations=(6, 1, 1), loss_drop_floor=0.0).register(fixed, moving)
    assert [c[0] for c in calls[:7]] == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0]


def test_ssemnet_uses_weighted_references(ae_path):
    fixed, moving = shifted_pair(64)
    other, _ = shifted_pair(64, seed=5)  # an unrelated older reference
    m1 = ssemnet(ae_path, iterations=(10, 5, 5), reference_weights=(1.0,))
    m0 = ssemnet(ae_path, iterations=(10, 5, 5), reference_weights=(0.0, 1.0))
    mw = ssemnet(ae_path, iterations=(10, 5, 5), reference_weights=(0.5, 1.0))
    alone = m1.register(fixed, moving, references=[other])
    zero = m0.register(fixed, moving, references=[other])
    both = mw.register(fixed, moving, references=[other])
    assert alone.info["references_used"] == 1 and both.info["references_used"] == 2
    # weight 0: no influence (up to the float rounding of batched convolutions)
    np.testing.assert_allclose(zero.field, alone.field, atol=1e-4)
    assert np.abs(both.field - alone.field).max() > 0.05  # weight 0.5: it counts


def test_ssemnet_rejects_bad_models_and_sizes(tmp_path, ae_path, tiny_net_path):
    fixed, moving = shifted_pair(64)
    with pytest.raises(CheckpointError, match="FAEMRegNet.*FeatureAutoencoder"):
        SSEMnetMethod(tiny_net_path).register(fixed, moving)
    with pytest.raises(ValueError, match="feature_stride=4.*reaches"):
        SSEMnetMethod(intensity_autoencoder(), feature_stride=4)
    with pytest.raises(ValueError, match="too small"):
        ssemnet(ae_path).register(fixed[:6, :6], moving[:6, :6])
    with pytest.raises(ValueError, match="decreasing"):
        SSEMnetMethod(ae_path, pyramid=(1, 2))
    with pytest.raises(ValueError, match="one per pyramid stage"):
        SSEMnetMethod(ae_path, iterations=(5, 5))


def test_ssemnet_warping_the_first_layers_output_recovers_the_shift(ae_path):
    """warp_stride: the moving section's first encoder layers run once per stage and their
    output is warped (issue 18 item 18: 5x faster at 1024^2, benchmarks/RESULTS.md); the
    same optimisation, the same answer on a known shift; a stride the encoder does not reach
    is refused when the model loads."""
    fixed, moving = shifted_pair(64)
    image = ssemnet(ae_path).register(fixed, moving)
    feats = ssemnet(ae_path, warp_stride=2).register(fixed, moving)
    assert epe(feats.field, true_field()) < 0.3
    assert abs(epe(feats.field, true_field()) - epe(image.field, true_field())) < 0.15
    assert ssemnet(ae_path, warp_stride=2).config["warp_stride"] == 2
    with pytest.raises(ValueError, match="warp_stride=4 is not a stride"):
        ssemnet(ae_path, warp_stride=4).register(fixed, moving)
    with pytest.raises(ValueError, match="warp_stride must be an int >= 1"):
        ssemnet(ae_path, warp_stride=0)


def test_ssemnet_defect_masks_keep_an_artefact_out_without_loss_drop(ae_path):
    """Issue 17: a defect mask over the moving section's artefact keeps it out of the loss
    (here without loss drop, which alone would not), and the motion under it is filled from
    the trusted motion around."""
    fixed, moving = shifted_pair(64)
    moving[24:36, 28:40] = 255  # debris in the moving section only
    mask = np.full((64, 64), 255, np.uint8)
    mask[22:38, 26:42] = 0
    masked = ssemnet(ae_path, loss_drop=0.0).register(fixed, moving, moving_mask=mask)
    plain = ssemnet(ae_path, loss_drop=0.0).register(fixed, moving)
    assert epe(masked.field, true_field()) < 0.3 < 1.0 < epe(plain.field, true_field())
    assert np.isfinite(masked.info["ncc"]) and masked.info["ncc"] > 0.9
