"""The trainers: the registration loss, loss decrease, validation, evaluation, finetuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import TINY_AE, model_weights

from hybridreg.models import FAEMRegNet, FeatureAutoencoder, load_model, read_metadata
from hybridreg.phantom import make_phantom
from hybridreg.training import (LossWeights, StackSampler, TrainingLog, evaluate_registration,
                                finetune, registration_losses, state_path, train_features,
                                train_registration)


# --- losses and configuration ----------------------------------------------------------------

def test_loss_weights():
    assert LossWeights().for_references(3) == (0.33, 0.5, 1.0)
    assert LossWeights().for_references(1) == (1.0,)
    assert LossWeights().for_references(5) == (0.33, 0.33, 0.33, 0.5, 1.0)
    with pytest.raises(ValueError, match="smooth"):
        LossWeights(smooth=-1)
    with pytest.raises(ValueError, match="2 weights for 3"):
        LossWeights(reference_weights=(1, 1)).for_references(3)


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
    a, b = model_weights(init), model_weights(out)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="init gives the architecture"):
        train_registration(phantom, out=tmp_path / "x.safetensors", init=init,
                           preset="tiny", crop=32, steps=1, device="cpu")
