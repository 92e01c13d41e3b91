"""Training data: intensity scaling, section crops, registration windows and their known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import smooth_stack

from hybridreg.models import FAEMREG_MEAN, FAEMREG_STD
from hybridreg.training import StackSampler, eight_bit_scaling
from hybridreg.warp import valid_mask, warp, warp_torch


# --- intensities -------------------------------------------------------------------------------

def test_eight_bit_scaling_per_dtype():
    assert eight_bit_scaling(np.zeros((2, 8, 8), np.uint8)) == (1.0, 0.0)
    assert eight_bit_scaling(np.linspace(0, 1, 128).reshape(2, 8, 8)) == (255.0, 0.0)
    assert eight_bit_scaling(np.linspace(3, 250, 128).reshape(2, 8, 8)) == (1.0, 0.0)
    # 12-bit data in uint16: its percentiles go to 0 and 255, not 65535 to 255
    x = np.linspace(1000, 5000, 20000).astype(np.uint16).reshape(2, 100, 100)
    gain, offset = eight_bit_scaling(x)
    lo, hi = np.percentile(x, [0.1, 99.9])
    assert gain * lo + offset == pytest.approx(0.0, abs=1e-6)
    assert gain * hi + offset == pytest.approx(255.0, abs=1e-6)


def test_sections_shape_dtype_and_normalisation():
    stack = np.full((3, 40, 40), 178, np.uint8)
    x = StackSampler(stack, crop=32).sections(5, rng=np.random.default_rng(0))
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (178 - FAEMREG_MEAN) / FAEMREG_STD))
    # uint16 and float versions of the same data normalise alike (up to the percentile map)
    ramp = np.tile(np.linspace(0, 255, 40), (3, 40, 1))
    x8 = StackSampler(ramp.astype(np.float32), crop=40, augment=False).sections(
        1, rng=np.random.default_rng(0))
    assert float(x8.min()) == pytest.approx(-FAEMREG_MEAN / FAEMREG_STD, abs=1e-5)
    assert float(x8.max()) == pytest.approx((255 - FAEMREG_MEAN) / FAEMREG_STD, abs=1e-5)
    x16 = StackSampler((ramp * 100).astype(np.uint16), crop=40, augment=False).sections(
        1, rng=np.random.default_rng(0))
    assert torch.allclose(x16, x8, atol=0.05)


def test_sections_are_flipped_rotated_crops_of_one_section():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 256, (2, 36, 36), dtype=np.uint8)
    norm = (stack.astype(np.float32) - FAEMREG_MEAN) / FAEMREG_STD
    x = StackSampler(stack, crop=32).sections(12, rng=np.random.default_rng(2)).numpy()
    ops_seen = set()
    for img in x[:, 0]:
        found = None
        for z in range(2):
            for y in range(5):
                for xx in range(5):
                    crop = norm[z, y:y + 32, xx:xx + 32]
                    for op in range(8):
                        c = crop[:, ::-1] if op >= 4 else crop
                        if np.array_equal(np.rot90(c, op % 4), img):
                            found = op
        assert found is not None, "a sample is no flipped/rotated crop of a section"
        ops_seen.add(found)
    assert len(ops_seen) > 1  # augmentation happens


def test_sections_respect_exclude():
    stack = np.stack([np.full((40, 40), 10 * k, np.uint8) for k in range(5)])
    x = StackSampler(stack, crop=32, exclude=[1, 3]).sections(
        40, rng=np.random.default_rng(0)).numpy()
    drawn = {int(round(v * FAEMREG_STD + FAEMREG_MEAN)) // 10 for v in x[:, 0, 0, 0]}
    assert drawn <= {0, 2, 4} and len(drawn) == 3


def test_sampler_validates_inputs():
    with pytest.raises(ValueError, match="larger than the sections"):
        StackSampler(np.zeros((3, 20, 20), np.uint8), crop=32)
    with pytest.raises(ValueError, match=r"\(Z, H, W\)"):
        StackSampler(np.zeros((20, 20), np.uint8), crop=16)
    with pytest.raises(ValueError, match="every section is excluded"):
        StackSampler(np.zeros((2, 20, 20), np.uint8), crop=16, exclude=[0, 1])
    with pytest.raises(ValueError, match="no window"):
        StackSampler(np.zeros((3, 20, 20), np.uint8), crop=16).windows(1, references=3)


# --- windows and their known answer -------------------------------------------------------------

def test_windows_shapes_order_and_exclude():
    # section k is constant 20 * k: references must be k-3, k-2, k-1 (oldest first), moving k
    stack = np.stack([np.full((64, 64), 20 * k, np.uint8) for k in range(8)])
    s = StackSampler(stack, crop=32, exclude={0: [5]})
    w = s.windows(16, references=3, rng=np.random.default_rng(0))
    assert w["references"].shape == (16, 3, 32, 32) and w["references"].dtype == torch.float32
    assert w["moving"].shape == (16, 1, 32, 32) and w["moving"].dtype == torch.float32
    assert w["truth"].shape == (16, 2, 32, 32) and w["truth"].dtype == torch.float32
    assert w["valid"].shape == (16, 1, 32, 32) and w["valid"].dtype == torch.bool
    level = (w["moving"][:, 0].mean(dim=(1, 2)) * FAEMREG_STD + FAEMREG_MEAN) / 20
    refs = (w["references"].mean(dim=(2, 3)) * FAEMREG_STD + FAEMREG_MEAN) / 20
    k = torch.round(level)
    assert torch.allclose(level, k, atol=1e-3)
    assert torch.allclose(refs, k[:, None] - torch.tensor([3.0, 2.0, 1.0]), atol=1e-3)
    # section 5 is excluded: no window contains it (moving in 3..7 needs 5 outside k-3..k)
    assert set(k.int().tolist()) <= {3, 4} and len(set(k.int().tolist())) == 2
    # the truth is a real deformation, not zero
    assert float(w["truth"].abs().mean()) > 1.0


def test_windows_truth_restores_the_undeformed_section():
    s = StackSampler(smooth_stack(), crop=48, reference_jitter_px=0.0, seed=0)
    w = s.windows(4, references=2, rng=np.random.default_rng(5), debug=True)
    moving, truth, valid, original = (w[k].numpy() for k in
                                      ("moving", "truth", "valid", "original"))
    assert valid.mean() > 0.3
    for b in range(4):
        v = valid[b, 0]
        restored, _ = warp(moving[b, 0], truth[b])
        err = np.abs(restored - original[b, 0])[v]
        before = np.abs(moving[b, 0] - original[b, 0])[v]
        assert err.max() < 0.05, "warp(moving, truth) does not restore the section"
        assert before.mean() > 10 * err.mean()
        # the contract's direction and channel order matter: a swapped field fails
        wrong, _ = warp(moving[b, 0], truth[b, ::-1].copy())
        assert np.abs(wrong - original[b, 0])[v].mean() > 5 * err.mean()
    # the torch warp (used in training) agrees
    restored_t, _ = warp_torch(w["moving"], w["truth"])
    diff = (restored_t - w["original"]).abs()[w["valid"]]
    assert float(diff.max()) < 0.05
    # without jitter the references are the exact aligned crops (smooth stack: nonconstant)
    assert w["references"].shape == (4, 2, 48, 48)


def test_windows_no_borders_when_the_section_is_large_enough():
    # 128 px sections, crop 32: the margin fits, so every pixel whose recovery lands in the
    # crop is valid
    s = StackSampler(smooth_stack(z=4, shape=(128, 128)), crop=32, seed=0)
    assert 32 + 2 * s.margin <= 128
    w = s.windows(6, references=3, rng=np.random.default_rng(0))
    for b in range(6):
        assert np.array_equal(w["valid"][b, 0].numpy(), valid_mask(w["truth"][b].numpy()))
    # sections too small for the margin: valid excludes what came from outside
    small = StackSampler(smooth_stack(z=4, shape=(40, 40)), crop=32, seed=0)
    w = small.windows(6, references=3, rng=np.random.default_rng(0))
    fewer = 0
    for b in range(6):
        vm = valid_mask(w["truth"][b].numpy())
        v = w["valid"][b, 0].numpy()
        assert not np.any(v & ~vm)
        fewer += int(v.sum() < vm.sum())
    assert fewer > 0


def test_windows_are_deterministic_per_rng_and_jitter_moves_references():
    stack = smooth_stack(z=5, shape=(64, 64))
    s = StackSampler(stack, crop=32, reference_jitter_px=1.5, augment=False)
    a = s.windows(1, rng=np.random.default_rng(7))
    b = s.windows(1, rng=np.random.default_rng(7))
    for key in a:
        assert torch.equal(a[key], b[key])
    # the jitter is drawn after the crop and the deformation: same window without it
    still = StackSampler(stack, crop=32, reference_jitter_px=0.0, augment=False).windows(
        1, rng=np.random.default_rng(7))
    assert torch.equal(still["moving"], a["moving"]) and torch.equal(still["truth"],
                                                                      a["truth"])
    # without jitter the references are exact crops of consecutive aligned sections
    norm = (stack.astype(np.float32) - FAEMREG_MEAN) / FAEMREG_STD
    ref0 = still["references"][0, 0].numpy()
    hits = [(z, y, x) for z in range(5) for y in range(33) for x in range(33)
            if np.array_equal(norm[z, y:y + 32, x:x + 32], ref0)]
    assert len(hits) == 1
    z, y, x = hits[0]
    for j in range(3):
        assert np.array_equal(still["references"][0, j].numpy(),
                              norm[z + j, y:y + 32, x:x + 32])
    # with it, they move by a little: different, but close
    diff = (a["references"] - still["references"]).abs()
    assert float(diff.mean()) > 1e-3
    assert float(diff.mean()) < 0.5 * float((a["moving"] - still["references"][:, 2:]).abs().mean())
