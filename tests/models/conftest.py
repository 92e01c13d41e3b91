"""Shared fixtures of the model tests: one CPU thread, seeded, tiny images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def smooth_images(n, h, w, *, sigma_px=2.0, seed=0):
    """Seeded, smoothed noise (B=n, 1, h, w), zero mean and unit std per image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, h, w, generator=g)
    r = int(3 * sigma_px)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma_px ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1))
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.std(dim=(-2, -1), keepdim=True)


@pytest.fixture
def smooth():
    """``smooth(n, h, w, *, sigma_px=2.0, seed=0)``: see :func:`smooth_images`."""
    return smooth_images


def assert_all_grads(module):
    """Every parameter got a finite gradient, and not all gradients are zero."""
    total = 0.0
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        total += float(p.grad.abs().sum())
    assert total > 0


@pytest.fixture
def check_grads():
    return assert_all_grads
