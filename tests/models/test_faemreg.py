import pytest
import torch

from hybridreg.models import FAEMRegNet, SpatialTransformer, make_window, ncc_loss, smoothness

# a paper-like net (3D throughout, 3D decoder with depth-collapsing flow heads), tiny widths
TINY_3D = dict(window=7, encoder=[[4, [3, 5, 5], 2], [8, 3, 2], [8, 3, 1], [8, 3, 2]],
               decoder=[8, 4, 4], output_level=0)


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_make_window_is_mirrored():
    refs = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    moving = torch.full((2, 1, 4, 5), 9.0)
    win = make_window(refs, moving)
    assert win.shape == (2, 1, 7, 4, 5)
    assert win[0, 0, :, 0, 0].tolist() == [1, 2, 3, 9, 3, 2, 1]
    one = make_window(refs[:, 2:], moving)
    assert one[0, 0, :, 0, 0].tolist() == [3, 9, 3]
    # fewer references than the window needs: the oldest is repeated (FAEMReg's start)
    padded = make_window(refs[:, 1:], moving, window=7)
    assert padded[0, 0, :, 0, 0].tolist() == [2, 2, 3, 9, 3, 2, 2]
    # more: the nearest are kept
    assert make_window(refs, moving, window=5)[0, 0, :, 0, 0].tolist() == [2, 3, 9, 3, 2]
    assert FAEMRegNet.make_window(refs, moving).shape == (2, 1, 7, 4, 5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        make_window(refs, moving.expand(2, 2, 4, 5))


@pytest.mark.parametrize("config", [
    {"preset": "tiny"},
    TINY_3D,
    {**TINY_3D, "n_3d": 0},                      # all 2D (window folded into channels)
    {**TINY_3D, "n_3d": 1, "decoder": [8, 4], "output_level": 1},
])
@pytest.mark.parametrize("shape", [(40, 52), (33, 29)])
def test_output_shapes_for_odd_sizes(config, shape):
    net = (FAEMRegNet.from_preset(config["preset"]) if "preset" in config
           else FAEMRegNet(**config))
    x = torch.randn(2, 1, 7, *shape)
    u = net(x)
    assert u.shape == (2, 2, *shape)
    pyr = net.forward_pyramid(x)
    assert len(pyr) == net.levels - net.output_level + 1
    for flow, lvl in zip(pyr, range(net.levels, net.output_level - 1, -1)):
        f = 2 ** lvl
        assert flow.shape == (2, 2, -(-shape[0] // f), -(-shape[1] // f))


def test_decoder_kind_follows_the_encoder():
    assert FAEMRegNet(**TINY_3D).decoder_3d
    head = FAEMRegNet(**TINY_3D).flow_heads[-1]
    assert isinstance(head, torch.nn.Conv3d) and head.stride == (7, 1, 1) \
        and head.padding == (0, 1, 1) and head.out_channels == 2
    assert not FAEMRegNet.from_preset("tiny").decoder_3d


@pytest.mark.parametrize("config", [{"preset": "tiny"}, TINY_3D])
def test_gradients_reach_every_parameter(config, check_grads):
    net = (FAEMRegNet.from_preset(config["preset"]) if "preset" in config
           else FAEMRegNet(**config))
    u = net(torch.randn(1, 1, 7, 40, 52))
    (u ** 2).mean().backward()
    check_grads(net)


# (the "compact" preset's soft argmax is block matching from the first step, not an identity:
# tests/models/test_pyramid.py)
@pytest.mark.parametrize("name", ["tiny", "compact-flownet"])
def test_untrained_net_is_near_identity(name, smooth):
    net = FAEMRegNet.from_preset(name)
    frames = smooth(1, 64, 64).expand(-1, 4, -1, -1)
    with torch.no_grad():
        u = net(make_window(frames[:, :3], frames[:, 3:]))
    assert u.abs().max() < 0.1  # pixels


def test_adam_steps_recover_a_translation(smooth):
    fixed = smooth(2, 40, 52, sigma_px=3.0, seed=1)
    st = SpatialTransformer()
    shift = torch.zeros(2, 2, 40, 52)
    shift[:, 0] = -2.0
    moving, _ = st(fixed, shift)  # moving(p) = fixed(p - 2 e_x): the aligning field is +2 px
    net = FAEMRegNet.from_preset("tiny")
    x = make_window(fixed.expand(-1, 3, -1, -1), moving)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss_and_field():
        u = net(x)
        warped, valid = st(moving, u)
        return ncc_loss(warped, fixed, valid, window=9) + 0.1 * smoothness(u), u

    with torch.no_grad():
        before, u0 = loss_and_field()
    for _ in range(25):
        opt.zero_grad()
        loss, _ = loss_and_field()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, u = loss_and_field()
    assert float(after) < 0.4 * float(before), (float(before), float(after))
    mean_ux = float(u[:, 0, 4:-4, 4:-4].mean())
    assert 1.0 < mean_ux < 3.0  # the right sign and roughly the size
    assert abs(float(u0[:, 0].mean())) < 0.1


def test_presets():
    paper = FAEMRegNet.from_preset("paper")
    n = _params(paper)
    assert abs(n - 24e6) / 24e6 < 0.03, n
    assert paper.window == 7 and paper.levels == 6 and paper.decoder_3d
    assert paper.flow_scale == 20.0 and paper.negative_slope == 0.1
    convs = list(paper.encoder)
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256, 512, 512]
    assert convs[0].kernel_size == (3, 7, 7) and convs[0].stride == (1, 2, 2)
    assert all(isinstance(c, torch.nn.Conv3d) for c in convs)
    assert _params(FAEMRegNet.from_preset("compact")) < 1_000_000
    assert _params(FAEMRegNet.from_preset("tiny")) < 20_000
    assert FAEMRegNet.from_preset("tiny", flow_scale=5.0).flow_scale == 5.0
    with pytest.raises(ValueError, match="unknown preset"):
        FAEMRegNet.from_preset("huge")


def test_config_round_trip_and_validation():
    net = FAEMRegNet(**TINY_3D)
    cfg = net.config
    assert cfg["n_3d"] == 4 and cfg["window"] == 7 and cfg["flow_scale"] == 20.0
    clone = FAEMRegNet(**cfg)
    assert {k: v.shape for k, v in clone.state_dict().items()} == \
        {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(B, 1, 7, H, W\)"):
        net(torch.randn(1, 1, 5, 32, 32))
    with pytest.raises(ValueError, match="decoder must list 3 widths"):
        FAEMRegNet(**{**TINY_3D, "decoder": [8, 4]})
    with pytest.raises(ValueError, match="window must be odd"):
        FAEMRegNet(**{**TINY_3D, "window": 6})
