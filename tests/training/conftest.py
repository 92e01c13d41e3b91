"""Shared fixtures of the training tests.

Tiny models, 32-48 px crops and a few steps on one thread: the machine running the tests is
small and busy.
"""
from __future__ import annotations

import pytest
import torch
from training_helpers import TINY_AE

from hybridreg.phantom import make_phantom
from hybridreg.training import train_features

torch.set_num_threads(1)


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
