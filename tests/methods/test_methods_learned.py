"""The learned method (FAEMReg-style forward pass, LearnedMethod).

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

from hybridreg import weights
from hybridreg.methods.learned import LearnedMethod
from hybridreg.methods.ssemnet import SSEMnetMethod
from hybridreg.models import CheckpointError, FAEMRegNet, normalize, save_model
from hybridreg.warp import warp
from method_cases import intensity_autoencoder, shifted_pair, ssemnet

torch.set_num_threads(1)


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
    # 3 sections, then one new each (the moving one), then nothing: a repeated window; one
    # section per call (its features must not depend on what was encoded with it)
    assert encoded == [1, 1, 1, 1, 1]
    # weights changed in place (training an in-memory model) invalidate the features
    with torch.no_grad():
        for head in cached.network().flow_heads:
            head.weight.mul_(0.5)
    cached.register(*calls[-1][:2], references=calls[-1][2])
    assert encoded == [1] * 9


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
