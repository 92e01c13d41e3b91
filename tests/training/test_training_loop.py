"""The training loop: learning-rate schedules, checkpoints, resume, overwrite, bad states."""
from __future__ import annotations

import json

import pytest
import torch
from training_helpers import TINY_AE, model_weights

from hybridreg.models import CheckpointError, read_metadata
from hybridreg.training import state_path, train_features, train_registration
from hybridreg.training.loop import _lr_at


def test_lr_schedules():
    assert _lr_at(0, lr=1.0, schedule="step", steps=100) == 1.0
    assert _lr_at(25, lr=1.0, schedule="step", steps=100) == 0.5
    assert _lr_at(99, lr=1.0, schedule="step", steps=100) == 0.125
    assert _lr_at(50, lr=1.0, schedule="cosine", steps=100) == pytest.approx(0.5)
    assert _lr_at(77, lr=1.0, schedule="constant", steps=100) == 1.0


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
    a, b = model_weights(straight), model_weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and a different seed does differ
    other = tmp_path / "other.safetensors"
    train_features(phantom, out=other, **{**kw, "seed": 5})
    assert not all(torch.equal(a[k], v) for k, v in model_weights(other).items())


def test_registration_resume_gives_identical_weights(tmp_path, phantom, features):
    kw = dict(features=features, preset="tiny", crop=32, batch=2, steps=4, lr=1e-3,
              seed=2, device="cpu", checkpoint_every=1, log_every=1)
    straight = tmp_path / "straight.safetensors"
    train_registration(phantom, out=straight, **kw)
    parts = tmp_path / "parts.safetensors"
    train_registration(phantom, out=parts, stop_at=2, **kw)
    log_ = train_registration(phantom, out=parts, resume=True, **kw)
    assert log_.resumed_from == 2 and [h["step"] for h in log_.history] == [1, 2, 3, 4]
    a, b = model_weights(straight), model_weights(parts)
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

