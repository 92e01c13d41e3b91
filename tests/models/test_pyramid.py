"""The compact preset's correlation-pyramid network (FAEMRegPyramidNet)."""
import pytest
import torch

from hybridreg.models import (FAEMRegNet, FAEMRegPyramidNet, correlation, load_model,
                              make_window, save_model)

torch.set_num_threads(1)


def test_correlation_peaks_at_the_shift():
    torch.manual_seed(0)
    a = torch.randn(1, 64, 20, 24)
    # b(p + d) = a(p) with d = (dx, dy) = (2, -1): b is a moved by +2 in x and -1 in y
    b = torch.roll(a, shifts=(-1, 2), dims=(2, 3))
    c = correlation(a, b, radius=3)
    assert c.shape == (1, 49, 20, 24)
    k = (-1 + 3) * 7 + (2 + 3)
    inner = c[..., 4:-4, 4:-4]
    assert (inner.argmax(1) == k).all()
    # the peak is the mean of a * a over the channels
    assert torch.allclose(inner[:, k], (a * a).mean(1)[..., 4:-4, 4:-4], atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        correlation(a, b[..., :10], radius=1)


@pytest.mark.parametrize("shape", [(40, 52), (33, 29)])
def test_tiny_pyramid_shapes_and_gradients(shape):
    net = FAEMRegNet.from_preset("tiny-pyramid")
    assert isinstance(net, FAEMRegPyramidNet) and isinstance(net, FAEMRegNet)
    x = torch.randn(2, 1, 7, *shape, requires_grad=True)
    u = net(x)
    assert u.shape == (2, 2, *shape)
    pyr = net.forward_pyramid(x)
    assert len(pyr) == net.levels - net.output_level + 1
    for flow, lvl in zip(pyr, range(net.levels, net.output_level - 1, -1)):
        assert flow.shape == (2, 2, -(-shape[0] // 2 ** lvl), -(-shape[1] // 2 ** lvl))
    u.abs().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in net.parameters() if p.requires_grad)
    # untrained: about the identity
    assert float(u.detach().abs().max()) < 0.5


@pytest.mark.parametrize("soft_argmax", [False, True])
def test_soft_argmax_option(soft_argmax):
    net = FAEMRegNet.from_preset("tiny-pyramid", soft_argmax=soft_argmax)
    assert net.config["soft_argmax"] is soft_argmax
    x = torch.randn(1, 1, 7, 40, 36)
    u = net(x)
    assert u.shape == (1, 2, 40, 36) and torch.isfinite(u).all()
    u.sum().backward()
    assert (net.log_temperature.grad is not None) is soft_argmax


def test_compact_preset_is_the_pyramid_and_small():
    net = FAEMRegNet.from_preset("compact")
    assert isinstance(net, FAEMRegPyramidNet) and net.soft_argmax
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    assert net.window == 7 and net.stride == 32
    old = FAEMRegNet.from_preset("compact-flownet")
    assert type(old) is FAEMRegNet


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net = FAEMRegNet.from_preset("tiny-pyramid", flow_scale=5.0)
    for p in net.parameters():  # move off the near-identity start
        p.data += 0.05 * torch.randn_like(p)
    path = save_model(net, tmp_path / "p.safetensors")
    back = load_model(path)
    assert type(back) is FAEMRegPyramidNet and back.config == net.config
    x = make_window(torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32))
    net.eval(), back.eval()
    assert torch.equal(net(x), back(x))


def test_bad_configs():
    with pytest.raises(ValueError, match="output_level"):
        FAEMRegPyramidNet(channels=[4, 4], output_level=3)
    with pytest.raises(ValueError, match="window"):
        FAEMRegPyramidNet(window=4)
    with pytest.raises(ValueError, match="radius"):
        FAEMRegPyramidNet(radius=0)


def test_a_few_steps_learn_a_shift():
    """Supervised on a constant shift, the tiny pyramid's error falls within 60 steps."""
    torch.manual_seed(0)
    net = FAEMRegNet.from_preset("tiny-pyramid")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    base = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 48, 48), 3, 1, 1) * 3
    shift = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    # moving(p + shift) = fixed(p): moving is fixed moved by +shift
    moving = torch.roll(base, shifts=(-1, 2), dims=(2, 3))
    x = make_window(base.expand(4, 3, 48, 48).contiguous(), moving)
    inner = (..., slice(8, -8), slice(8, -8))

    def err():
        with torch.no_grad():
            return float((net(x) - shift)[inner].norm(dim=1).mean())

    before = err()
    for _ in range(60):
        opt.zero_grad()
        loss = (net(x) - shift)[inner].norm(dim=1).mean()
        loss.backward()
        opt.step()
    assert err() < 0.5 * before


@pytest.mark.parametrize("shape", [(40, 52), (33, 29)])
def test_forward_from_per_section_features_matches_forward(shape):
    torch.manual_seed(1)
    net = FAEMRegNet.from_preset("tiny-pyramid").eval()
    with torch.no_grad():
        for head in net.flow_heads:
            head.weight.mul_(300.0)  # a field of some pixels, not about zero
    k = net.refs
    sections = torch.randn(k + 1, 1, *shape)
    x = make_window(sections[None, :k, 0], sections[None, k:, 0], window=net.window)
    with torch.no_grad():
        u = net(x)
        # each section encoded alone, in any order, then assembled in the window's order
        feats = {i: net.encode_sections(sections[i:i + 1]) for i in reversed(range(k + 1))}
        levels = [torch.cat([feats[i][lvl] for i in range(k + 1)]) for lvl in range(net.levels)]
        v = net.forward_features(levels, shape)
    assert u.abs().max() > 0.5
    torch.testing.assert_close(v, u, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sections must have shape"):
        net.encode_sections(sections[:, 0])
    with pytest.raises(ValueError, match="feature levels"):
        net.forward_features(levels[:-1], shape)
