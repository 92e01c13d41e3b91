import pytest
import torch

from hybridreg.models import (FAEMREG_FEATURE_WEIGHTS, downsample_mask, feature_similarity,
                              loss_drop_fraction, ncc_loss, smoothness, ssemnet_masked_loss)


def test_feature_similarity_values():
    warped = torch.full((2, 1, 3, 4), 2.0)
    refs = [torch.zeros(2, 1, 3, 4)] * 3
    assert float(feature_similarity(refs, warped.clone(), kind="mse",
                                    weights=[1, 1, 1])) == pytest.approx(12.0)
    weighted = feature_similarity(refs, warped, FAEMREG_FEATURE_WEIGHTS)
    assert float(weighted) == pytest.approx(4.0 * sum(FAEMREG_FEATURE_WEIGHTS))
    # Frobenius per sample: sqrt(12 pixels * 4) averaged over the batch
    frob = feature_similarity(refs[0], warped, kind="frobenius")
    assert float(frob) == pytest.approx(48 ** 0.5, rel=1e-5)
    assert float(feature_similarity([warped], warped)) == 0.0


def test_feature_similarity_mask_and_downsampled_mask():
    warped = torch.zeros(1, 1, 3, 4)
    ref = torch.zeros(1, 1, 3, 4)
    ref[..., 0, 0] = 10.0  # one bad feature pixel
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 0, 0] = False
    assert float(feature_similarity([ref], warped, mask=mask)) == 0.0
    # an image-grid mask (40 x 52, features at 1/16) with one invalid pixel in that cell
    img_mask = torch.ones(1, 1, 40, 52, dtype=torch.bool)
    img_mask[..., 5, 7] = False
    assert torch.equal(downsample_mask(img_mask, 16), mask)
    assert float(feature_similarity([ref], warped, mask=img_mask)) == 0.0
    with pytest.raises(ValueError, match="downsample_mask"):
        feature_similarity([ref], warped, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_feature_similarity_validates():
    f = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="2 weights for 1"):
        feature_similarity([f], f, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"features_fixed_list\[0\]"):
        feature_similarity([torch.zeros(1, 1, 3, 5)], f)


@pytest.mark.parametrize("window", [None, 5])
def test_ncc_exact_values(window, smooth):
    a = smooth(2, 32, 32, seed=3)
    assert float(ncc_loss(a, a, window=window)) == pytest.approx(0.0, abs=1e-4)
    assert float(ncc_loss(a, 2 * a + 3, window=window)) == pytest.approx(0.0, abs=1e-4)
    assert float(ncc_loss(a, -a, window=window)) == pytest.approx(2.0, abs=1e-4)
    b = smooth(2, 32, 32, seed=4)
    assert 0.5 < float(ncc_loss(a, b, window=window)) < 1.5


@pytest.mark.parametrize("window", [None, 5])
def test_ncc_mask_ignores_outside(window, smooth):
    a = smooth(1, 32, 32, seed=3)
    b = a.clone()
    b[..., :, 20:] = torch.randn(1, 1, 32, 12)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., :, :20] = True
    assert float(ncc_loss(a, b, window=window)) > 0.05
    assert float(ncc_loss(a, b, mask, window=window)) == pytest.approx(0.0, abs=1e-4)


def test_smoothness_values():
    assert float(smoothness(torch.full((1, 2, 8, 8), 3.0))) == 0.0
    u = torch.zeros(1, 2, 8, 8)
    u[:, 0] = 0.5 * torch.arange(8.0)  # u_x = x / 2
    # l1: (mean |dx u| = (0.5 + 0) / 2, mean |dy u| = 0) / 2
    assert float(smoothness(u)) == pytest.approx(0.125)
    assert float(smoothness(u, penalty="l2")) == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="penalty"):
        smoothness(u, penalty="l3")


def test_ssemnet_loss_drop_and_valid_mask():
    # errors 1..8 (squared differences of sqrt values)
    err = torch.arange(1.0, 9.0).view(1, 1, 2, 4)
    diff = err.sqrt().requires_grad_(True)
    assert float(ssemnet_masked_loss(diff.detach(), None, 0.0)) == pytest.approx(4.5)
    loss = ssemnet_masked_loss(diff, None, 0.5)  # keeps 1..4
    assert float(loss.detach()) == pytest.approx(2.5)
    loss.backward()
    g = diff.grad.view(-1)
    assert torch.all(g[:4] > 0) and torch.all(g[4:] == 0)  # dropped pixels get no gradient
    valid = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    valid[..., 0, 0] = False  # the smallest error warped in from outside
    assert float(ssemnet_masked_loss(err.sqrt(), valid, 0.0)) == pytest.approx(5.0)
    # 7 valid pixels: floor(0.5 * 7) = 3 dropped, keeps 2, 3, 4, 5
    assert float(ssemnet_masked_loss(err.sqrt(), valid, 0.5)) == pytest.approx(3.5)
    assert float(ssemnet_masked_loss(err.sqrt(), valid, 0.5, error="absolute")) == \
        pytest.approx(sum(v ** 0.5 for v in (2, 3, 4, 5)) / 4, rel=1e-6)
    none = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    assert float(ssemnet_masked_loss(err, none, 0.5)) == 0.0
    with pytest.raises(ValueError, match="drop_fraction"):
        ssemnet_masked_loss(err, None, 1.0)


def test_loss_drop_schedule():
    assert [loss_drop_fraction(i) for i in range(4)] == [0.5, 0.25, 0.125, 0.0625]
    assert loss_drop_fraction(5, initial=0.4, halve_every=2) == pytest.approx(0.1)


def test_mask_on_an_image_grid_not_a_multiple_of_the_stride():
    """A 50 x 66 image mask on features at stride 16 (4 x 5): the factor is 16, not 13.

    Rows 0-25 are valid: at stride 16 only feature row 0 is wholly inside them (error 1); a
    factor of 13 would also keep row 1 (error 3), giving (1 + 9) / 2 = 5.
    """
    from hybridreg.models.losses import feature_similarity

    feats = torch.zeros(1, 1, 4, 5)
    warped = torch.ones(1, 1, 4, 5)
    warped[..., 1, :] = 3.0
    mask = torch.zeros(1, 1, 50, 66, dtype=torch.bool)
    mask[..., :26, :] = True
    loss = feature_similarity([feats], warped, [1.0], mask=mask)
    assert torch.isclose(loss, torch.tensor(1.0)), loss
