import pytest
import torch

from hybridreg.models import SpatialTransformer


def _ramp(h=6, w=9):
    return torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)


@pytest.mark.parametrize("align_corners", [True, False])
def test_constant_x_shift_pulls_from_the_right(align_corners):
    moving = torch.randn(2, 3, 8, 12)
    u = torch.zeros(2, 2, 8, 12)
    u[:, 0] = 2.0
    warped, valid = SpatialTransformer(align_corners=align_corners)(moving, u)
    assert warped.shape == moving.shape and valid.shape == (2, 1, 8, 12)
    torch.testing.assert_close(warped[..., :-2], moving[..., 2:], atol=1e-5, rtol=0)
    assert valid[..., :-2].all() and not valid[..., -2:].any()


def test_constant_y_shift_pulls_from_below():
    moving = _ramp()
    u = torch.zeros(1, 2, 6, 9)
    u[:, 1] = 1.0
    warped, valid = SpatialTransformer()(moving, u)
    torch.testing.assert_close(warped[..., :-1, :], moving[..., 1:, :], atol=1e-5, rtol=0)
    assert not valid[..., -1, :].any()


def test_identity_and_padding_modes():
    moving = _ramp()
    zero = torch.zeros(1, 2, 6, 9)
    warped, valid = SpatialTransformer()(moving, zero)
    # grid_sample's normalised coordinates round in float32: equal to ~1e-6 relative
    torch.testing.assert_close(warped, moving, atol=1e-4, rtol=1e-6)
    assert valid.all()
    u = torch.zeros(1, 2, 6, 9)
    u[:, 0] = 3.0
    border, _ = SpatialTransformer(padding_mode="border")(moving, u)
    zeros, _ = SpatialTransformer(padding_mode="zeros")(moving, u)
    torch.testing.assert_close(border[..., -1], moving[..., -1])  # clamped at the edge
    assert torch.all(zeros[..., -1] == 0)


def test_gradients_flow_to_image_and_field():
    moving = torch.randn(1, 1, 10, 10, requires_grad=True)
    u = torch.full((1, 2, 10, 10), 0.3, requires_grad=True)
    warped, _ = SpatialTransformer()(moving, u)
    warped.square().sum().backward()
    assert moving.grad is not None and u.grad is not None
    assert u.grad.abs().sum() > 0


def test_options_are_validated_and_recorded():
    st = SpatialTransformer(align_corners=False, padding_mode="zeros")
    assert st.config == {"align_corners": False, "mode": "bilinear", "padding_mode": "zeros"}
    with pytest.raises(ValueError, match="padding_mode"):
        SpatialTransformer(padding_mode="wrap")
    with pytest.raises(TypeError, match="align_corners"):
        SpatialTransformer(align_corners=None)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        st(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
