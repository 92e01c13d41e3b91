"""Training: sampling, the known synthetic answer, loss decrease, checkpoints and resume.

Tiny models, 32-48 px crops and a few steps on one thread: the machine running the tests is
small and busy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from hybridreg.models import (FAEMREG_MEAN, FAEMREG_STD, CheckpointError, FAEMRegNet,
                              FeatureAutoencoder, load_model, read_metadata)
from hybridreg.phantom import make_phantom
from hybridreg.training import (LossWeights, StackSampler, TrainingLog, _lr_at,
                                eight_bit_scaling, evaluate_registration, finetune,
                                registration_losses, state_path, train_features,
                                train_registration)
from hybridreg.warp import valid_mask, warp, warp_torch

torch.set_num_threads(1)

TINY_AE = [(8, 3, 2), (4, 3, 2)]  # stride 4, a few hundred parameters


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(sections=6, shape_yx=(96, 96), seed=3).stack


@pytest.fixture(scope="module")
def features(tmp_path_factory, phantom):
    """A tiny trained autoencoder file."""
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    train_features(phantom, out=path, layers=TINY_AE, crop=32, batch=4, steps=5, lr=3e-3,
                   device="cpu", log_every=5)
    return path


def _weights(path):
    return load_model(path).state_dict()


def _smooth_stack(z=5, shape=(128, 128), seed=0):
    """Smooth uint8 sections (bilinear interpolation is nearly exact on them)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((z, *shape)), (0, 4, 4))
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(40 + 180 * x).astype(np.uint8)


# --- intensities -------------------------------------------------------------------------------

def test_eight_bit_scaling_per_dtype():
    assert eight_bit_scaling(np.zeros((2, 8, 8), np.uint8)) == (1.0, 0.0)
    assert eight_bit_scaling(np.linspace(0, 1, 128).reshape(2, 8, 8)) == (255.0, 0.0)
    assert eight_bit_scaling(np.linspace(3, 250, 128).reshape(2, 8, 8)) == (1.0, 0.0)
    # 12-bit data in uint16: its percentiles go to 0 and 255, not 65535 to 255
    x = np.linspace(1000, 5000, 20000).astype(np.uint16).reshape(2, 100, 100)
    gain, offset = eight_bit_scaling(x)
    lo, hi = np.percentile(x, [0.1, 99.9])
    assert gain * lo + offset == pytest.approx(0.0, abs=1e-6)
    assert gain * hi + offset == pytest.approx(255.0, abs=1e-6)


def test_sections_shape_dtype_and_normalisation():
    stack = np.full((3, 40, 40), 178, np.uint8)
    x = StackSampler(stack, crop=32).sections(5, rng=np.random.default_rng(0))
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (178 - FAEMREG_MEAN) / FAEMREG_STD))
    # uint16 and float versions of the same data normalise alike (up to the percentile map)
    ramp = np.tile(np.linspace(0, 255, 40), (3, 40, 1))
    x8 = StackSampler(ramp.astype(np.float32), crop=40, augment=False).sections(
        1, rng=np.random.default_rng(0))
    assert float(x8.min()) == pytest.approx(-FAEMREG_MEAN / FAEMREG_STD, abs=1e-5)
    assert float(x8.max()) == pytest.approx((255 - FAEMREG_MEAN) / FAEMREG_STD, abs=1e-5)
    x16 = StackSampler((ramp * 100).astype(np.uint16), crop=40, augment=False).sections(
        1, rng=np.random.default_rng(0))
    assert torch.allclose(x16, x8, atol=0.05)


def test_sections_are_flipped_rotated_crops_of_one_section():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 256, (2, 36, 36), dtype=np.uint8)
    norm = (stack.astype(np.float32) - FAEMREG_MEAN) / FAEMREG_STD
    x = StackSampler(stack, crop=32).sections(12, rng=np.random.default_rng(2)).numpy()
    ops_seen = set()
    for img in x[:, 0]:
        found = None
        for z in range(2):
            for y in range(5):
                for xx in range(5):
                    crop = norm[z, y:y + 32, xx:xx + 32]
                    for op in range(8):
                        c = crop[:, ::-1] if op >= 4 else crop
                        if np.array_equal(np.rot90(c, op % 4), img):
                            found = op
        assert found is not None, "a sample is no flipped/rotated crop of a section"
        ops_seen.add(found)
    assert len(ops_seen) > 1  # augmentation happens


def test_sections_respect_exclude():
    stack = np.stack([np.full((40, 40), 10 * k, np.uint8) for k in range(5)])
    x = StackSampler(stack, crop=32, exclude=[1, 3]).sections(
        40, rng=np.random.default_rng(0)).numpy()
    drawn = {int(round(v * FAEMREG_STD + FAEMREG_MEAN)) // 10 for v in x[:, 0, 0, 0]}
    assert drawn <= {0, 2, 4} and len(drawn) == 3


def test_sampler_validates_inputs():
    with pytest.raises(ValueError, match="larger than the sections"):
        StackSampler(np.zeros((3, 20, 20), np.uint8), crop=32)
    with pytest.raises(ValueError, match=r"\(Z, H, W\)"):
        StackSampler(np.zeros((20, 20), np.uint8), crop=16)
    with pytest.raises(ValueError, match="every section is excluded"):
        StackSampler(np.zeros((2, 20, 20), np.uint8), crop=16, exclude=[0, 1])
    with pytest.raises(ValueError, match="no window"):
        StackSampler(np.zeros((3, 20, 20), np.uint8), crop=16).windows(1, references=3)


# --- windows and their known answer -------------------------------------------------------------

def test_windows_shapes_order_and_exclude():
    # section k is constant 20 * k: references must be k-3, k-2, k-1 (oldest first), moving k
    stack = np.stack([np.full((64, 64), 20 * k, np.uint8) for k in range(8)])
    s = StackSampler(stack, crop=32, exclude={0: [5]})
    w = s.windows(16, references=3, rng=np.random.default_rng(0))
    assert w["references"].shape == (16, 3, 32, 32) and w["references"].dtype == torch.float32
    assert w["moving"].shape == (16, 1, 32, 32) and w["moving"].dtype == torch.float32
    assert w["truth"].shape == (16, 2, 32, 32) and w["truth"].dtype == torch.float32
    assert w["valid"].shape == (16, 1, 32, 32) and w["valid"].dtype == torch.bool
    level = (w["moving"][:, 0].mean(dim=(1, 2)) * FAEMREG_STD + FAEMREG_MEAN) / 20
    refs = (w["references"].mean(dim=(2, 3)) * FAEMREG_STD + FAEMREG_MEAN) / 20
    k = torch.round(level)
    assert torch.allclose(level, k, atol=1e-3)
    assert torch.allclose(refs, k[:, None] - torch.tensor([3.0, 2.0, 1.0]), atol=1e-3)
    # section 5 is excluded: no window contains it (moving in 3..7 needs 5 outside k-3..k)
    assert set(k.int().tolist()) <= {3, 4} and len(set(k.int().tolist())) == 2
    # the truth is a real deformation, not zero
    assert float(w["truth"].abs().mean()) > 1.0


def test_windows_truth_restores_the_undeformed_section():
    s = StackSampler(_smooth_stack(), crop=48, reference_jitter_px=0.0, seed=0)
    w = s.windows(4, references=2, rng=np.random.default_rng(5), debug=True)
    moving, truth, valid, original = (w[k].numpy() for k in
                                      ("moving", "truth", "valid", "original"))
    assert valid.mean() > 0.3
    for b in range(4):
        v = valid[b, 0]
        restored, _ = warp(moving[b, 0], truth[b])
        err = np.abs(restored - original[b, 0])[v]
        before = np.abs(moving[b, 0] - original[b, 0])[v]
        assert err.max() < 0.05, "warp(moving, truth) does not restore the section"
        assert before.mean() > 10 * err.mean()
        # the contract's direction and channel order matter: a swapped field fails
        wrong, _ = warp(moving[b, 0], truth[b, ::-1].copy())
        assert np.abs(wrong - original[b, 0])[v].mean() > 5 * err.mean()
    # the torch warp (used in training) agrees
    restored_t, _ = warp_torch(w["moving"], w["truth"])
    diff = (restored_t - w["original"]).abs()[w["valid"]]
    assert float(diff.max()) < 0.05
    # without jitter the references are the exact aligned crops (smooth stack: nonconstant)
    assert w["references"].shape == (4, 2, 48, 48)


def test_windows_no_borders_when_the_section_is_large_enough():
    # 128 px sections, crop 32: the margin fits, so every pixel whose recovery lands in the
    # crop is valid
    s = StackSampler(_smooth_stack(z=4, shape=(128, 128)), crop=32, seed=0)
    assert 32 + 2 * s.margin <= 128
    w = s.windows(6, references=3, rng=np.random.default_rng(0))
    for b in range(6):
        assert np.array_equal(w["valid"][b, 0].numpy(), valid_mask(w["truth"][b].numpy()))
    # sections too small for the margin: valid excludes what came from outside
    small = StackSampler(_smooth_stack(z=4, shape=(40, 40)), crop=32, seed=0)
    w = small.windows(6, references=3, rng=np.random.default_rng(0))
    fewer = 0
    for b in range(6):
        vm = valid_mask(w["truth"][b].numpy())
        v = w["valid"][b, 0].numpy()
        assert not np.any(v & ~vm)
        fewer += int(v.sum() < vm.sum())
    assert fewer > 0


def test_windows_are_deterministic_per_rng_and_jitter_moves_references():
    stack = _smooth_stack(z=5, shape=(64, 64))
    s = StackSampler(stack, crop=32, reference_jitter_px=1.5, augment=False)
    a = s.windows(1, rng=np.random.default_rng(7))
    b = s.windows(1, rng=np.random.default_rng(7))
    for key in a:
        assert torch.equal(a[key], b[key])
    # the jitter is drawn after the crop and the deformation: same window without it
    still = StackSampler(stack, crop=32, reference_jitter_px=0.0, augment=False).windows(
        1, rng=np.random.default_rng(7))
    assert torch.equal(still["moving"], a["moving"]) and torch.equal(still["truth"],
                                                                      a["truth"])
    # without jitter the references are exact crops of consecutive aligned sections
    norm = (stack.astype(np.float32) - FAEMREG_MEAN) / FAEMREG_STD
    ref0 = still["references"][0, 0].numpy()
    hits = [(z, y, x) for z in range(5) for y in range(33) for x in range(33)
            if np.array_equal(norm[z, y:y + 32, x:x + 32], ref0)]
    assert len(hits) == 1
    z, y, x = hits[0]
    for j in range(3):
        assert np.array_equal(still["references"][0, j].numpy(),
                              norm[z + j, y:y + 32, x:x + 32])
    # with it, they move by a little: different, but close
    diff = (a["references"] - still["references"]).abs()
    assert float(diff.mean()) > 1e-3
    assert float(diff.mean()) < 0.5 * float((a["moving"] - still["references"][:, 2:]).abs().mean())


# --- losses and configuration ----------------------------------------------------------------

def test_loss_weights():
    assert LossWeights().for_references(3) == (0.33, 0.5, 1.0)
    assert LossWeights().for_references(1) == (1.0,)
    assert LossWeights().for_references(5) == (0.33, 0.33, 0.33, 0.5, 1.0)
    with pytest.raises(ValueError, match="smooth"):
        LossWeights(smooth=-1)
    with pytest.raises(ValueError, match="2 weights for 3"):
        LossWeights(reference_weights=(1, 1)).for_references(3)


def test_lr_schedules():
    assert _lr_at(0, lr=1.0, schedule="step", steps=100) == 1.0
    assert _lr_at(25, lr=1.0, schedule="step", steps=100) == 0.5
    assert _lr_at(99, lr=1.0, schedule="step", steps=100) == 0.125
    assert _lr_at(50, lr=1.0, schedule="cosine", steps=100) == pytest.approx(0.5)
    assert _lr_at(77, lr=1.0, schedule="constant", steps=100) == 1.0


def test_registration_losses_exact_answer_gives_zero_epe(phantom, features):
    s = StackSampler(phantom, crop=34, seed=0)  # 34: not a multiple of the AE's stride 4
    w = s.windows(2, rng=np.random.default_rng(0))

    class Oracle(torch.nn.Module):
        window = 7

        def forward(self, x):
            return w["truth"]

    ae = load_model(features)
    with torch.no_grad():
        losses = registration_losses(Oracle(), w, weights=LossWeights(ncc=1.0),
                                     features=ae)
    assert float(losses["epe_px"]) < 1e-3
    assert np.isfinite(float(losses["feature"])) and float(losses["ncc"]) > 0
    assert float(losses["identity_epe_px"]) > 1.0
    assert float(losses["smooth"]) > 0
    with torch.no_grad():
        zero = registration_losses(FAEMRegNet.from_preset("tiny"), w, weights=LossWeights())
    assert float(zero["epe_px"]) == pytest.approx(float(zero["identity_epe_px"]), abs=0.1)


# --- training ------------------------------------------------------------------------------

def test_train_features_lowers_the_reconstruction_loss(tmp_path, phantom):
    out = tmp_path / "ae.safetensors"
    log_ = train_features(phantom, out=out, layers=TINY_AE, crop=32, batch=4, steps=30,
                          lr=3e-3, seed=1, device="cpu", log_every=10)
    assert isinstance(log_, TrainingLog) and log_.steps == 30 and log_.device == "cpu"
    assert [h["step"] for h in log_.history] == [10, 20, 30]
    x = StackSampler(phantom, crop=32).sections(8, rng=np.random.default_rng(99))
    torch.manual_seed(1)
    untrained = FeatureAutoencoder(TINY_AE)
    trained = load_model(out)
    with torch.no_grad():
        before = float(torch.mean((untrained(x)[0] - x) ** 2))
        after = float(torch.mean((trained(x)[0] - x) ** 2))
    assert after < 0.9 * before
    meta = read_metadata(out)["metadata"]
    assert meta["recipe"] == "hybridreg.training.train_features"
    assert meta["steps"] == 30 and meta["complete"] and meta["seconds"] > 0
    assert meta["options"]["layers"] == [list(layer) for layer in TINY_AE]
    assert "mse" in meta["final_losses"] and meta["data"][0].startswith("array[0]")
    assert state_path(out).is_file()


def test_train_registration_lowers_the_loss_on_what_it_trains(tmp_path, phantom, features,
                                                              monkeypatch):
    # Learning to register fresh windows takes thousands of steps; in 30 steps the loop can
    # show that it minimises its loss: every step gets the same batch, and the total loss
    # and the EPE term on it must fall well below the untrained network's.
    batch = StackSampler(phantom, crop=48).windows(4, rng=np.random.default_rng(0))
    monkeypatch.setattr(StackSampler, "windows",
                        lambda self, n, *, references=3, rng=None, debug=False: batch)
    out = tmp_path / "net.safetensors"
    weights = LossWeights(feature=1.0, smooth=3.0, ncc=0.5, epe=1.0)
    log_ = train_registration(phantom, out=out, features=features, preset="tiny", crop=48,
                              batch=4, steps=30, lr=3e-3, lr_schedule="constant", seed=0,
                              device="cpu", weights=weights, log_every=10)
    assert log_.steps == 30
    ae = load_model(features)
    torch.manual_seed(0)
    untrained = FAEMRegNet.from_preset("tiny")
    trained = load_model(out)
    with torch.no_grad():
        before = registration_losses(untrained, batch, weights=weights, features=ae)
        after = registration_losses(trained, batch, weights=weights, features=ae)
    assert float(before["feature"]) > 0 and float(before["ncc"]) > 0
    assert float(after["total"]) < 0.8 * float(before["total"])
    assert float(after["epe_px"]) < 0.8 * float(before["epe_px"])
    assert log_.history[-1]["epe_px"] < log_.history[0]["epe_px"]
    meta = read_metadata(out)["metadata"]
    assert meta["recipe"] == "hybridreg.training.train_registration"
    assert meta["options"]["weights"]["ncc"] == 0.5
    assert meta["options"]["model_config"]["window"] == 7
    assert meta["features"] == str(features.resolve())
    assert set(meta["final_losses"]) >= {"total", "feature", "smooth", "ncc", "epe_px"}


def test_train_registration_real_windows_and_validation(tmp_path, phantom):
    val = make_phantom(sections=5, shape_yx=(64, 64), seed=9).stack
    log_ = train_registration(phantom, out=tmp_path / "n.safetensors", preset="tiny",
                              references=2, crop=32, batch=2, steps=4, lr=1e-3,
                              device="cpu", weights=LossWeights(feature=0.0),
                              validation=val, validation_every=4, log_every=2,
                              progress=True)
    assert [h["step"] for h in log_.history] == [2, 4]
    assert "val_epe_px" in log_.history[-1] and log_.history[-1]["val_identity_epe_px"] > 0
    assert "val_epe_px" not in log_.history[0]
    assert np.isfinite(log_.final["total"])
    assert load_model(tmp_path / "n.safetensors").window == 5


def test_features_resume_gives_identical_weights(tmp_path, phantom):
    kw = dict(layers=TINY_AE, crop=32, batch=2, steps=6, lr=3e-3, seed=4, device="cpu",
              log_every=2, lr_schedule="cosine")
    straight = tmp_path / "straight.safetensors"
    train_features(phantom, out=straight, **kw)
    parts = tmp_path / "parts.safetensors"
    first = train_features(phantom, out=parts, stop_at=3, **kw)
    assert first.steps == 3 and not read_metadata(parts)["metadata"]["complete"]
    second = train_features(phantom, out=parts, resume=True, **kw)
    assert second.resumed_from == 3 and second.steps == 6
    a, b = _weights(straight), _weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and a different seed does differ
    other = tmp_path / "other.safetensors"
    train_features(phantom, out=other, **{**kw, "seed": 5})
    assert not all(torch.equal(a[k], v) for k, v in _weights(other).items())


def test_registration_resume_gives_identical_weights(tmp_path, phantom, features):
    kw = dict(features=features, preset="tiny", crop=32, batch=2, steps=4, lr=1e-3,
              seed=2, device="cpu", checkpoint_every=1, log_every=1)
    straight = tmp_path / "straight.safetensors"
    train_registration(phantom, out=straight, **kw)
    parts = tmp_path / "parts.safetensors"
    train_registration(phantom, out=parts, stop_at=2, **kw)
    log_ = train_registration(phantom, out=parts, resume=True, **kw)
    assert log_.resumed_from == 2 and [h["step"] for h in log_.history] == [1, 2, 3, 4]
    a, b = _weights(straight), _weights(parts)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # resuming a finished run does nothing and reports it
    again = train_registration(phantom, out=parts, resume=True, **kw)
    assert again.steps == 4 and again.resumed_from == 4
    # changed options cannot resume
    with pytest.raises(ValueError, match="options differ.*lr"):
        train_registration(phantom, out=parts, resume=True, **{**kw, "lr": 2e-3, "steps": 6})


def test_overwrite_is_refused(tmp_path, phantom):
    out = tmp_path / "ae.safetensors"
    kw = dict(layers=TINY_AE, crop=32, batch=2, steps=1, device="cpu")
    train_features(phantom, out=out, **kw)
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True"):
        train_features(phantom, out=out, **kw)
    stamp = out.stat().st_mtime_ns
    train_features(phantom, out=out, overwrite=True, **{**kw, "seed": 1})
    assert out.stat().st_mtime_ns != stamp
    # a model file without its state cannot be resumed
    state_path(out).unlink()
    with pytest.raises(FileExistsError, match="no training state"):
        train_features(phantom, out=out, resume=True, **kw)


def test_corrupt_or_foreign_state_is_a_clear_error(tmp_path, phantom):
    out = tmp_path / "ae.safetensors"
    kw = dict(layers=TINY_AE, crop=32, batch=2, steps=2, device="cpu")
    train_features(phantom, out=out, stop_at=1, **kw)
    sp = state_path(out)
    good = sp.read_bytes()
    sp.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="training state .*corrupt or truncated"):
        train_features(phantom, out=out, resume=True, **kw)
    sp.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="training state"):
        train_features(phantom, out=out, resume=True, **kw)
    # a state of the other kind of run
    sp.write_bytes(good)
    reg = tmp_path / "reg.safetensors"
    state_path(reg).write_bytes(good)
    reg.write_bytes(b"")
    with pytest.raises(CheckpointError, match="belongs to 'train_features'"):
        train_registration(phantom, out=reg, preset="tiny", crop=32, batch=1, steps=1,
                           device="cpu", resume=True)
    # no pickle anywhere: the state is safetensors with JSON metadata
    from safetensors import safe_open

    with safe_open(str(sp), framework="pt") as f:
        meta = json.loads(f.metadata()["hybridreg_training_state"])
        assert meta["step"] == 1 and meta["kind"] == "train_features"
        assert any(k.startswith("optim.") for k in f.keys())


def test_evaluate_and_finetune(tmp_path, phantom, features):
    init = tmp_path / "init.safetensors"
    train_registration(phantom, out=init, features=features, preset="tiny", crop=32,
                       batch=2, steps=2, device="cpu")
    res = evaluate_registration(init, phantom, n=3, crop=32, batch=2, device="cpu")
    assert res["n"] == 3 and len(res["epe_px_per_window"]) == 3
    # an untrained-like net predicts about zero: about the identity's error
    assert res["epe_px"] == pytest.approx(res["identity_epe_px"], abs=0.5)
    assert res["identity_epe_px"] > 1.0
    again = evaluate_registration(load_model(init), phantom, n=3, crop=32, batch=2,
                                  device="cpu")
    assert again["epe_px_per_window"] == res["epe_px_per_window"]

    out = tmp_path / "ft.safetensors"
    log_ = finetune(phantom, init=init, out=out, steps=2, crop=32, batch=2, device="cpu",
                    features="init")
    assert log_.steps == 2
    meta = read_metadata(out)["metadata"]
    assert meta["options"]["init"]["path"] == str(init)
    assert meta["features"] == str(features.resolve())  # taken over from init
    assert meta["options"]["lr_schedule"] == "cosine"
    a, b = _weights(init), _weights(out)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="init gives the architecture"):
        train_registration(phantom, out=tmp_path / "x.safetensors", init=init,
                           preset="tiny", crop=32, steps=1, device="cpu")
