"""The learned methods: FAEMReg-style forward pass (LearnedMethod) and ssEMnet optimisation.

Tiny models saved with save_model to tmp_path, 48-64 px images, one torch thread.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from helpers import smooth_texture
from hybridreg import weights
from hybridreg.methods.learned import LearnedMethod
from hybridreg.methods.ssemnet import SSEMnetMethod
from hybridreg.models import (CheckpointError, FAEMRegNet, FeatureAutoencoder, normalize,
                              save_model)
from hybridreg.warp import warp

torch.set_num_threads(1)

SHIFT = (2.5, -1.5)  # (x, y) pixels: the true pull field of the shifted pairs
FAST = dict(iterations=(30, 20, 10), grid_px=16)  # ssEMnet settings sized for 64 px tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shifted_pair(n: int = 64, shift=SHIFT, *, seed: int = 0):
    """A smooth texture (grey values 20-220) and a copy shifted so that the pull field is
    ``shift``: ``moving(p + shift) == fixed(p)``."""
    big = smooth_texture((n + 16, n + 16), seed=seed, sigma=2.0) * 200 + 20
    u = np.zeros((2, n + 16, n + 16), np.float32)
    u[0], u[1] = -shift[0], -shift[1]
    moving = warp(big, u)[0]
    return big[8:-8, 8:-8], moving[8:-8, 8:-8]


def true_field(n: int = 64, shift=SHIFT) -> np.ndarray:
    u = np.zeros((2, n, n), np.float32)
    u[0], u[1] = shift
    return u


def epe(u, u_true, margin: int = 8) -> float:
    e = np.linalg.norm(u - u_true, axis=0)
    return float(e[margin:-margin, margin:-margin].mean())


# --- models ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_net_path(tmp_path):
    """An untrained tiny FAEMRegNet (its flow heads start near zero)."""
    net = FAEMRegNet.from_preset("tiny")
    return save_model(net, tmp_path / "tiny.safetensors")


@pytest.fixture
def loud_net_path(tmp_path):
    """A tiny FAEMRegNet predicting fields of a few pixels (flow heads scaled by 300)."""
    net = FAEMRegNet.from_preset("tiny")
    with torch.no_grad():
        for head in net.flow_heads:
            head.weight.mul_(300.0)
    return save_model(net, tmp_path / "loud.safetensors")


def intensity_autoencoder() -> FeatureAutoencoder:
    """A FeatureAutoencoder whose encoder is the intensity, blurred and at half resolution.

    Layer 1 (1 -> 2 channels, 3x3 centre taps +1 and -1, ReLU) splits the normalised
    intensity into its positive and negative parts without losing anything; layer 2 (stride
    2) averages each part over 3x3. The features are thus a smoothed, downsampled intensity:
    a stand-in that takes the (untrained) learned features out of the test, so that what is
    tested is the optimisation (map, pyramid, warp, masks, loss drop).
    """
    ae = FeatureAutoencoder([(2, 3, 1), (2, 3, 2)], feature_relu=True)
    with torch.no_grad():
        for p in ae.encoder.parameters():
            p.zero_()
        ae.encoder[0].weight[0, 0, 1, 1] = 1.0
        ae.encoder[0].weight[1, 0, 1, 1] = -1.0
        for ch in range(2):
            ae.encoder[1].weight[ch, ch] = 1.0 / 9.0
    return ae


@pytest.fixture
def ae_path(tmp_path):
    return save_model(intensity_autoencoder(), tmp_path / "intensity_ae.safetensors")


def ssemnet(ae_path, **kw) -> SSEMnetMethod:
    return SSEMnetMethod(ae_path, feature_stride=2, **{**FAST, **kw})


# --- imports and weights ---------------------------------------------------------------------

def test_importing_the_methods_does_not_import_torch():
    code = ("import sys, hybridreg.methods.learned, hybridreg.methods.ssemnet, hybridreg.weights;"
            "bad = [m for m in ('torch', 'safetensors') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_default_weights_name_the_file_and_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"faemreg_compact\.safetensors.*train"):
        LearnedMethod()
    with pytest.raises(weights.MissingWeightsError, match=r"feature_ae\.safetensors.*train"):
        SSEMnetMethod()
    with pytest.raises(ValueError, match="unknown weights"):
        weights.default_weights("nope")
    # once the file is there, model=None finds it
    save_model(FAEMRegNet.from_preset("tiny"), tmp_path / "faemreg_compact.safetensors")
    assert LearnedMethod().model_path == tmp_path / "faemreg_compact.safetensors"
    assert weights.default_weights("faemreg_compact").is_file()


def test_a_missing_checkpoint_path_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        LearnedMethod(tmp_path / "nothere.safetensors")


# --- LearnedMethod ---------------------------------------------------------------------------

def test_learned_untrained_tiny_net_gives_about_the_identity(tiny_net_path):
    fixed, moving = shifted_pair(48)
    m = LearnedMethod(tiny_net_path)
    r = m.register(fixed.astype(np.uint8), moving.astype(np.uint8))
    assert r.field.shape == (2, 48, 48) and r.field.dtype == np.float32
    assert r.warped.shape == (48, 48) and r.warped.dtype == np.float32
    assert np.isfinite(r.field).all() and np.isfinite(r.warped).all()
    assert 0 < np.abs(r.field).max() < 0.5  # flow heads start near zero
    assert -1 <= r.metric <= 1 and r.seconds > 0
    assert r.info["model"] == str(tiny_net_path)
    assert r.info["config"] == FAEMRegNet.from_preset("tiny").config
    json.dumps(m.config)


def test_learned_field_is_in_physical_units(loud_net_path):
    fixed, moving = shifted_pair(48)
    m = LearnedMethod(loud_net_path)
    u1 = m.register(fixed, moving).field
    u2 = m.register(fixed, moving, spacing_xy=(2.0, 0.5)).field
    assert np.abs(u1).max() > 0.5  # a real field, not zeros
    np.testing.assert_allclose(u2[0], 2.0 * u1[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u2[1], 0.5 * u1[1], rtol=1e-5, atol=1e-6)
    # the warped image is the moving one resampled with the physical field on that grid
    r = m.register(fixed, moving, spacing_xy=(2.0, 0.5))
    np.testing.assert_allclose(r.warped, warp(moving, u2, spacing_xy=(2.0, 0.5))[0], atol=1e-4)


def _spy_window(method):
    seen = []
    method.network().register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen


def test_learned_window_is_mirrored_with_references_oldest_first(tiny_net_path):
    h, w = 48, 40
    r0, r1, r2, fixed, moving = (np.full((h, w), v, np.float32) for v in (10, 20, 30, 40, 50))
    m = LearnedMethod(tiny_net_path)
    seen = _spy_window(m)
    val = lambda x: [round(float(normalize(np.float32(v))), 4) for v in x]  # noqa: E731
    depth = lambda x: [round(float(v), 4) for v in x[0, 0, :, 0, 0]]  # noqa: E731

    m.register(fixed, moving, references=[r0, r1, r2])
    x = seen[-1]
    assert x.shape == (1, 1, 7, h, w)
    # the nearest three: r1, r2 and fixed; the moving section in the centre
    assert depth(x) == val([20, 30, 40, 50, 40, 30, 20])
    assert torch.equal(x[0, 0, 3], torch.from_numpy(normalize(moving)))

    m.register(fixed, moving, references=[r2])  # too few: the oldest one used repeats
    assert depth(seen[-1]) == val([30, 30, 40, 50, 40, 30, 30])
    m.register(fixed, moving)  # the start of a stack: copies of the fixed section
    assert depth(seen[-1]) == val([40, 40, 40, 50, 40, 40, 40])

    pairwise = LearnedMethod(tiny_net_path, references=1)
    seen1 = _spy_window(pairwise)
    pairwise.register(fixed, moving, references=[r0, r1, r2])
    assert depth(seen1[-1]) == val([40, 40, 40, 50, 40, 40, 40])


def test_learned_pyramid_net_encodes_each_section_once_with_the_same_result(tmp_path):
    """A sequential chain shows every aligned section to up to `references` pairs: the
    pyramid network's per-section features are reused, and the fields do not change."""
    net = FAEMRegNet.from_preset("tiny-pyramid")
    with torch.no_grad():
        for head in net.flow_heads:
            head.weight.mul_(300.0)
    path = save_model(net, tmp_path / "pyr.safetensors")
    rng = np.random.default_rng(3)
    s = [ndimage.gaussian_filter(rng.uniform(0, 255, (40, 48)), 2).astype(np.float32)
         for _ in range(5)]
    cached = LearnedMethod(path)
    encoded = []
    real = cached.network().encode_sections
    cached.network().encode_sections = lambda x: encoded.append(len(x)) or real(x)

    calls = [(s[1], s[2], [s[0]]), (s[2], s[3], [s[0], s[1]]), (s[3], s[4], [s[1], s[2]]),
             (s[3], s[4], [s[1], s[2]])]
    for fixed, moving, refs in calls:
        r = cached.register(fixed, moving, references=refs)
        fresh = LearnedMethod(path).register(fixed, moving, references=refs)
        assert np.abs(fresh.field).max() > 0.5
        np.testing.assert_allclose(r.field, fresh.field, atol=1e-4)
    # 3 sections, then one new each (the moving one), then nothing: a repeated window
    assert encoded == [3, 1, 1]
    # weights changed in place (training an in-memory model) invalidate the features
    with torch.no_grad():
        for head in cached.network().flow_heads:
            head.weight.mul_(0.5)
    cached.register(*calls[-1][:2], references=calls[-1][2])
    assert encoded == [3, 1, 1, 4]


def test_learned_uint8_and_float_grey_values_agree(tiny_net_path):
    fixed, moving = shifted_pair(48)
    fixed8, moving8 = np.round(fixed).astype(np.uint8), np.round(moving).astype(np.uint8)
    m = LearnedMethod(tiny_net_path)
    a = m.register(fixed8, moving8).field
    b = m.register(fixed8.astype(np.float32), moving8.astype(np.float64)).field
    np.testing.assert_array_equal(a, b)
    # floats in [0, 1] need intensity_scale=255 to mean the same
    c = LearnedMethod(tiny_net_path, intensity_scale=255.0).register(
        fixed8 / np.float32(255), moving8 / np.float32(255)).field
    np.testing.assert_allclose(c, a, atol=1e-5)
    # and 16-bit-like data the linear map of training (gain, offset) to the same grey values
    d = LearnedMethod(tiny_net_path, intensity_scale=0.5, intensity_offset=-100.0).register(
        (fixed8 + 100.0) * 2, (moving8 + 100.0) * 2).field
    np.testing.assert_allclose(d, a, atol=1e-5)


def test_learned_rejects_other_architectures_and_small_images(tmp_path, tiny_net_path):
    fixed, moving = shifted_pair(48)
    ae_file = save_model(intensity_autoencoder(), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="FeatureAutoencoder.*FAEMRegNet"):
        LearnedMethod(ae_file).register(fixed, moving)

    # a file whose weights do not fit the architecture its config names
    from safetensors.torch import save_file

    other = FAEMRegNet(window=7, encoder=[[4, 3, 2], [8, 3, 2], [8, 3, 2]], n_3d=2,
                       decoder=[8, 8, 4])
    tensors = {k: v.contiguous() for k, v in FAEMRegNet.from_preset("tiny").state_dict().items()}
    header = {"class": "FAEMRegNet", "config": other.config, "format_version": 1}
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata={"hybridreg_config": json.dumps(header)})
    with pytest.raises(CheckpointError, match="shape"):
        LearnedMethod(tmp_path / "bad.safetensors").register(fixed, moving)

    m = LearnedMethod(tiny_net_path)
    with pytest.raises(ValueError, match=r"too small.*16x16"):
        m.register(fixed[:12, :20], moving[:12, :20])
    with pytest.raises(ValueError, match="references=4"):
        LearnedMethod(tiny_net_path, references=4).register(fixed, moving)


def test_learned_config_fingerprints_the_weights(tiny_net_path, loud_net_path):
    a, b = LearnedMethod(tiny_net_path).config, LearnedMethod(loud_net_path).config
    assert a["weights_sha256"] != b["weights_sha256"]
    assert LearnedMethod(tiny_net_path).config == a
    assert json.loads(json.dumps(a)) == a


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


def testmatch_intensity_maps_onto_the_target_over_content():
    from hybridreg.methods.ssemnet import match_intensity

    rng = np.random.default_rng(3)
    target = rng.normal(1.0, 2.0, (16, 16)).astype(np.float32)
    other = rng.normal(-3.0, 0.5, (16, 16)).astype(np.float32)
    other[:, :4] = 9.0  # empty space, outside the content mask
    content = np.ones((16, 16), bool)
    content[:, :4] = False
    blank = np.full((16, 16), 5.0, np.float32)
    out = match_intensity(np.stack([other, blank, target]), [content, None, None], target=2)
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


def test_both_methods_align_a_stack_sequentially(tiny_net_path, ae_path):
    from hybridreg.stack import align_stack

    stack = np.stack([shifted_pair(48, (0.5 * k, 0.0))[1] for k in range(3)])
    m = LearnedMethod(tiny_net_path)
    seen = _spy_window(m)
    out = align_stack(stack, m, mode="sequential", window=3)
    assert out.fields.shape == (3, 2, 48, 48) and not any(r["flagged"] for r in out.table)
    # section 2 saw the aligned sections 0 (older reference) and 1 (fixed)
    x = seen[-1][0, 0].numpy()
    np.testing.assert_allclose(x[2], normalize(out.aligned[1]), atol=1e-5)
    np.testing.assert_allclose(x[1], normalize(out.aligned[0]), atol=1e-5)
    out = align_stack(stack, ssemnet(ae_path, iterations=5), mode="sequential", window=3)
    assert np.isfinite(out.fields).all() and not any(r["flagged"] for r in out.table)
