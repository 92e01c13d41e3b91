import logging

import numpy as np
import pytest
import torch

from hybridreg.models import FAEMREG_MEAN, FAEMREG_STD, FeatureAutoencoder, normalize

TINY = [(8, 3, 1), (8, 3, 2), (4, 3, 2), (1, 3, 1)]


def test_default_architecture_is_faemreg():
    ae = FeatureAutoencoder()
    assert ae.stride == 16
    assert ae.feature_channels == 1
    assert [c.out_channels for c in ae.encoder] == [128, 64, 32, 16, 8, 4, 1]
    assert [c.kernel_size[0] for c in ae.encoder] == [5, 3, 3, 3, 3, 3, 3]
    assert [c.out_channels for c in ae.decoder] == [4, 8, 16, 32, 64, 128, 1]
    n = sum(p.numel() for p in ae.parameters())
    assert n == 203_394  # "about 0.2M parameters"


@pytest.mark.parametrize("shape", [(40, 52), (48, 64), (33, 17)])
def test_shapes_for_any_size(shape):
    ae = FeatureAutoencoder()
    x = torch.randn(2, 1, *shape)
    recon, feats = ae(x)
    assert recon.shape == (2, 1, *shape)
    assert feats.shape == (2, 1, -(-shape[0] // 16), -(-shape[1] // 16))
    assert ae.feature_shape(shape) == tuple(feats.shape[-2:])
    assert torch.equal(ae.encode(x), feats)


def test_features_do_not_depend_on_padding_of_aligned_input():
    # an input that is already a multiple of the stride is not padded: cropping the
    # reconstruction of a 48x64 input is the identity
    ae = FeatureAutoencoder(TINY)
    x = torch.randn(1, 1, 48, 64)
    assert ae.decode(ae.encode(x)).shape == (1, 1, 48, 64)


def test_config_rebuilds_the_same_architecture():
    ae = FeatureAutoencoder(TINY, feature_relu=False)
    cfg = ae.config
    assert cfg == {"layers": [list(t) for t in TINY], "in_channels": 1, "feature_relu": False}
    clone = FeatureAutoencoder(**cfg)
    assert {k: v.shape for k, v in clone.state_dict().items()} == \
        {k: v.shape for k, v in ae.state_dict().items()}


def test_bad_input_and_spec_raise():
    ae = FeatureAutoencoder(TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ae(torch.randn(1, 40, 52))
    with pytest.raises(ValueError, match="kernel odd"):
        FeatureAutoencoder([(8, 4, 1)])
    with pytest.raises(ValueError, match="stride 1 or 2"):
        FeatureAutoencoder([(8, 3, 3)])


def test_gradients_reach_every_parameter(smooth, check_grads):
    ae = FeatureAutoencoder(TINY)
    x = smooth(2, 40, 52)
    recon, feats = ae(x)
    ((recon - x) ** 2).mean().add(feats.mean()).backward()
    check_grads(ae)


def test_a_few_adam_steps_lower_the_reconstruction_loss(smooth):
    ae = FeatureAutoencoder([(8, 3, 1), (8, 3, 2), (4, 3, 1)], feature_relu=False)
    x = smooth(4, 32, 32, sigma_px=3.0)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        recon, _ = ae(x)
        loss = ((recon - x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_normalize_uint8_numpy_and_torch():
    a = np.array([0, 255, 144], dtype=np.uint8)
    out = normalize(a)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (a.astype(np.float64) - FAEMREG_MEAN) / FAEMREG_STD,
                               rtol=1e-5, atol=1e-6)
    t = normalize(torch.from_numpy(a))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6)


def test_normalize_scale_and_unit_range_warning(caplog):
    unit = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="hybridreg.models.autoencoder"):
        normalize(unit)
    assert "scale=255" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridreg.models.autoencoder"):
        scaled = normalize(unit, scale=255)
    assert caplog.text == ""
    np.testing.assert_allclose(scaled, (unit * 255 - FAEMREG_MEAN) / FAEMREG_STD, rtol=1e-5,
                               atol=1e-6)
