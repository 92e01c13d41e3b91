"""Fixtures of the method tests: tiny models saved to tmp_path, a seeded torch, one thread."""
from __future__ import annotations

import pytest
import torch

from hybridreg.models import FAEMRegNet, save_model
from method_cases import intensity_autoencoder

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



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


@pytest.fixture
def ae_path(tmp_path):
    return save_model(intensity_autoencoder(), tmp_path / "intensity_ae.safetensors")
