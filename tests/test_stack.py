"""Stack alignment: accuracy against ground truth, resume, failures, outputs."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import io, metrics, phantom, synthetic
from hybridreg.stack import align_stack, apply_fields, save_alignment

from helpers import PhaseCorrelation


class Interrupting(PhaseCorrelation):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def register(self, *args, **kwargs):
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().register(*args, **kwargs)


class FailingOnce(PhaseCorrelation):
    def register(self, fixed, moving, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("elastix exploded")
        self.calls -= 1
        return super().register(fixed, moving, **kwargs)


@pytest.fixture(scope="module")
def shifted_stack():
    """One phantom section, shifted by known integer translations, with independent noise.

    (Real and phantom neighbours differ in content; here only the shifts differ, so the
    stack machinery can be checked exactly.)
    """
    section = phantom.make_phantom(sections=1, shape_yx=(96, 96), seed=4).stack[0]
    rng = np.random.default_rng(0)
    shifts = [(0, 0), (3, -2), (-4, 1), (2, 5), (-1, -3), (4, 2)]
    stack = np.stack([np.roll(section, (-dy, -dx), axis=(0, 1)) + rng.normal(0, 5, (96, 96))
                      for (dx, dy) in shifts]).astype(np.float32)
    return stack, np.array(shifts, float)


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_translations_recovered(shifted_stack, mode):
    stack, shifts = shifted_stack
    r = align_stack(stack, PhaseCorrelation(), mode=mode, prior=1e-6)
    est = r.fields[:, :, 48, 48]
    if mode == "joint":  # on average where the raw sections were
        np.testing.assert_allclose(est, -(shifts - shifts.mean(0)), atol=1.0)
    else:  # section 0 stays
        np.testing.assert_allclose(est, -shifts, atol=1.0)
    assert len(r.table) == 6 and not any(row["flagged"] for row in r.table)


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_resume_gives_identical_output(shifted_stack, tmp_path, mode):
    stack, _ = shifted_stack
    full = align_stack(stack, PhaseCorrelation(), mode=mode, neighbours=2)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        align_stack(stack, Interrupting(after=3), mode=mode, neighbours=2, work_dir=work)
    rest = PhaseCorrelation()
    resumed = align_stack(stack, rest, mode=mode, neighbours=2, work_dir=work)
    total = 9 if mode == "joint" else 5  # pairs with 2 neighbours in 6 sections / sections
    assert rest.calls == total - 3  # nothing already done is redone
    assert np.array_equal(resumed.aligned, full.aligned)
    assert np.array_equal(resumed.fields, full.fields)
    # a work folder of another run is refused
    with pytest.raises(ValueError, match="another stack"):
        align_stack(stack[:4], PhaseCorrelation(), mode=mode, neighbours=2, work_dir=work)


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_a_failing_registration_is_flagged_not_fatal(shifted_stack, mode):
    stack, _ = shifted_stack
    r = align_stack(stack, FailingOnce(), mode=mode)
    flagged = [row for row in r.table if row["flagged"]]
    assert flagged and "elastix exploded" in flagged[0]["warnings"]
    assert r.aligned.shape == stack.shape and np.isfinite(r.fields).all()


class LinearPhaseCorrelation(PhaseCorrelation):
    """Its ``warped`` is the moving section resampled linearly with its field, as promised."""

    warped_order = 1

    def register(self, fixed, moving, **kwargs):
        import dataclasses

        from hybridreg.warp import warp

        r = super().register(fixed, moving, **kwargs)
        warped = warp(np.asarray(moving, np.float32), r.field, order=1)[0]
        return dataclasses.replace(r, warped=warped)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("stride", [1, 16])
def test_sequential_chain_reuses_only_a_promised_resampling(shifted_stack, monkeypatch, order,
                                                             stride):
    import hybridreg.stack as stack_module

    stack, _ = shifted_stack
    calls = []
    real_render = stack_module.render
    monkeypatch.setattr(stack_module, "render",
                        lambda *a, **k: calls.append(1) or real_render(*a, **k))
    # PhaseCorrelation's `warped` is the moving section itself (it promises nothing): the
    # chain resamples; LinearPhaseCorrelation's is reused where the chain's order is its own
    # and the transforms are dense (a coarse map is not the method's own field)
    for method, reused in ((PhaseCorrelation(), False),
                           (LinearPhaseCorrelation(), order == 1 and stride == 1)):
        calls.clear()
        r = align_stack(stack, method, mode="sequential", order=order, stride=stride)
        assert len(calls) == (0 if reused else len(stack) - 1)
        np.testing.assert_array_equal(apply_fields(stack, r.fields, order=order), r.aligned)


def test_apply_and_save(shifted_stack, tmp_path):
    stack, _ = shifted_stack
    r = align_stack(stack, PhaseCorrelation())
    np.testing.assert_array_equal(apply_fields(stack, r.fields), r.aligned)
    save_alignment(r, out=tmp_path / "aligned.tif", fields_out=tmp_path / "f", transforms=False)
    from hybridreg.outputs import read_transforms

    back, grid = read_transforms(tmp_path / "f")
    assert grid == r.grid
    np.testing.assert_array_equal(back, r.maps)
    np.testing.assert_array_equal(apply_fields(stack, back, grid=grid), r.aligned)
    assert (tmp_path / "f" / "sections.csv").exists() and (tmp_path / "f" / "pairs.csv").exists()
    with pytest.raises(ValueError, match="do not match"):
        apply_fields(stack[:2], r.fields)


@pytest.mark.elastix
def test_elastix_joint_alignment_lowers_endpoint_error():
    """A deformed phantom stack: joint elastix alignment ends closer to the truth.

    Bound: adjacent phantom sections differ (cells shift, start and end), so even a perfect
    pairwise registration is a few pixels off; we ask for a clear gain over doing nothing
    (at most 75% of its endpoint error), not for sub-pixel accuracy.
    """
    from hybridreg.methods import get_method

    ph = phantom.make_phantom(sections=5, shape_yx=(160, 160), seed=3, cell_size_px=28,
                              drift_px=1.5)
    d = synthetic.deform_stack(ph.stack, seed=5, max_rotation_deg=1.5, max_shift_px=8,
                               elastic_px=3, elastic_spacing_px=64)
    method = get_method("elastix", params=["em_affine"], threads=2)
    r = align_stack(d.stack, method, neighbours=2, prior=0.3)

    def epe(f):
        rows = metrics.evaluate_stack(fields=f, true_fields=d.fields, margin_px=16)
        return metrics.summarize(rows, skip_first=False)["epe_mean_px"]

    none, aligned = epe(np.zeros_like(d.fields)), epe(r.fields)
    assert aligned < 0.75 * none, (aligned, none)


class _BiasedShift:
    """Registers nothing: returns the field of the section before plus a constant bias, the
    way a method with a small systematic error drifts along a sequential chain."""

    name = "biased"

    def __init__(self, bias=(0.5, -0.25)):
        self.bias = np.asarray(bias, np.float32).reshape(2, 1, 1)
        self.k = 0

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        from hybridreg.methods import RegistrationResult

        self.k += 1
        field = np.broadcast_to(self.bias * self.k, (2,) + fixed.shape).astype(np.float32)
        return RegistrationResult(field=field, warped=moving.astype(np.float32))


def test_drift_window_removes_a_linear_drift():
    from hybridreg.stack import drift_corrected

    stack = np.random.default_rng(0).uniform(0, 255, (12, 32, 32)).astype(np.float32)
    plain = align_stack(stack, _BiasedShift(), mode="sequential")
    assert np.allclose(plain.fields[11, 0], 5.5)          # the drift has grown along z
    fixed = align_stack(stack, _BiasedShift(), mode="sequential", drift_window=5)
    # a linear drift is removed exactly where the window is centred (2 .. 9)
    assert np.abs(fixed.fields[2:10]).max() < 1e-5
    assert np.abs(fixed.fields).max() < np.abs(plain.fields).max() / 4
    assert np.array_equal(fixed.fields, drift_corrected(plain.fields, 5))
    # the aligned sections follow the corrected fields
    from hybridreg.warp import warp

    assert np.allclose(fixed.aligned[7], warp(stack[7], fixed.fields[7])[0])
    with pytest.raises(ValueError, match="drift_window"):
        align_stack(stack, _BiasedShift(), mode="joint", drift_window=5)
    with pytest.raises(ValueError, match="drift_window"):
        align_stack(stack, _BiasedShift(), mode="sequential", drift_window=1)


def test_anchor_keeps_its_section_and_the_others_follow(shifted_stack):
    stack, shifts = shifted_stack
    for prior in (1e-6, 0.0):  # with an anchor the prior may be 0
        r = align_stack(stack, PhaseCorrelation(), anchor=2, prior=prior)
        assert np.abs(r.fields[2]).max() < 1e-3
        np.testing.assert_allclose(r.fields[:, :, 48, 48], -(shifts - shifts[2]), atol=1.0)
    # negative indices count from the end, as in Python
    last = align_stack(stack, PhaseCorrelation(), anchor=-1, prior=1e-6)
    np.testing.assert_allclose(last.fields[:, :, 48, 48], -(shifts - shifts[-1]), atol=1.0)
    # the sequential mode keeps section 0: anchor 0 is what it does anyway
    seq = align_stack(stack, PhaseCorrelation(), mode="sequential", anchor=0)
    np.testing.assert_allclose(seq.fields[:, :, 48, 48], -shifts, atol=1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"anchor": 6}, "not a section"),
    ({"anchor": -7}, "not a section"),
    ({"anchor": 1.0}, "section index"),
    ({"anchor": True}, "section index"),
    ({"anchor": 2, "mode": "sequential"}, "keeps section 0"),
    ({"prior": 0.0}, "prior must be > 0"),
    ({"prior": -1.0, "anchor": 0}, "prior must be > 0"),
])
def test_bad_anchor_or_prior_is_refused_before_registering(shifted_stack, kwargs, match):
    stack, _ = shifted_stack
    method = PhaseCorrelation()
    with pytest.raises(ValueError, match=match):
        align_stack(stack, method, **kwargs)
    assert method.calls == 0


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_a_one_section_stack_is_kept_with_a_warning(shifted_stack, caplog, mode):
    """Nothing to align it to: the identity, and a warning that says so (issue 18 item 4)."""
    stack, _ = shifted_stack
    method = PhaseCorrelation()
    with caplog.at_level("WARNING", logger="hybridreg.stack"):
        r = align_stack(stack[:1], method, mode=mode)
    assert "holds one section" in caplog.text
    assert method.calls == 0 and not np.any(r.fields)
    np.testing.assert_array_equal(r.aligned[0], stack[0])


def test_a_refused_resume_says_what_differs(shifted_stack, tmp_path):
    """The work folder of another run is refused, naming the part that differs: the stack,
    a setting, or a method option (issue 18 item 8)."""
    stack, _ = shifted_stack
    work = tmp_path / "work"
    align_stack(stack, PhaseCorrelation(), neighbours=2, work_dir=work)
    with pytest.raises(ValueError, match=r"another stack.*\(the stack's sections differ\)"):
        align_stack(stack[::-1].copy(), PhaseCorrelation(), neighbours=2, work_dir=work)
    with pytest.raises(ValueError, match=r"\(setting\(s\) neighbours differ\)"):
        align_stack(stack, PhaseCorrelation(), neighbours=1, work_dir=work)
    other = PhaseCorrelation()
    other.config = {"method": "phasecorr", "upsample": 4}
    with pytest.raises(ValueError, match=r"\(method option\(s\) upsample differ\)"):
        align_stack(stack, other, neighbours=2, work_dir=work)
    # the same run resumes
    align_stack(stack, PhaseCorrelation(), neighbours=2, work_dir=work)


@pytest.mark.parametrize("mode, unit, other", [("joint", "pair", "section"),
                                               ("sequential", "section", "pair")])
def test_progress_counts_what_it_says(shifted_stack, capsys, mode, unit, other):
    """Joint alignment counts pairs, sequential alignment sections (issue 18 item 9)."""
    import re

    stack, _ = shifted_stack
    align_stack(stack, PhaseCorrelation(), mode=mode, progress=True)
    err = capsys.readouterr().err
    assert re.search(rf"{unit}/s|s/{unit}", err), err  # the rate, either way round
    assert not re.search(rf"{other}/s|s/{other}", err), err


@pytest.mark.parametrize("window", [2, 5])
def test_drift_correction_is_the_moving_mean_in_place_on_disk(tmp_path, window):
    """The sweep along z (held window, blocks of rows) equals the centred moving mean
    written out naively, also in place on maps on disk."""
    from hybridreg.stack import MapStack, drift_corrected

    f = np.random.default_rng(1).normal(0, 3, (9, 2, 6, 5)).astype(np.float32)
    lo, hi = (window - 1) // 2, window // 2
    want = np.stack([f[k] - f[max(0, k - lo):k + hi + 1].mean(axis=0) for k in range(9)])
    np.testing.assert_allclose(drift_corrected(f, window), want, atol=1e-5)
    disk = MapStack(f.shape, tmp_path)
    disk[:] = f
    assert drift_corrected(disk, window, out=disk) is disk
    np.testing.assert_allclose(np.asarray(disk), want, atol=1e-5)


class _MaskedShift(PhaseCorrelation):
    """Phase correlation that takes elastix's masks and records what each pair got."""

    name = "masked-shift"

    def __init__(self):
        super().__init__()
        self.seen = {}

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None):
        from hybridreg.methods.base import checked_mask

        key = (int((fixed_mask != 0).sum()), int((moving_mask != 0).sum()))
        checked_mask(fixed_mask, fixed.shape, "fixed_mask", warn=False)  # may refuse
        checked_mask(moving_mask, moving.shape, "moving_mask", warn=False)
        self.seen[key] = True
        return super().register(fixed, moving, references=references, spacing_xy=spacing_xy,
                                origin_xy=origin_xy)


def test_masks_reach_every_pair_and_a_fully_masked_section_is_flagged(tmp_path, caplog):
    """Issue 17 items 1, 5 and 8 (align): each pair's registration gets its two sections'
    masks; a section masked everywhere (or mostly) is skipped: its neighbours pair across it,
    its map is interpolated, it is flagged, and nothing crashes; shapes and methods that cannot take masks are
    refused before any work; masks keeping little of a section are warned about."""
    stack = np.random.default_rng(0).uniform(0, 255, (4, 40, 48)).astype(np.float32)
    masks = np.full(stack.shape, 255, np.uint8)
    for k in range(4):
        masks[k, :, : 4 * (k + 1)] = 0  # a different count of kept pixels per section
    method = _MaskedShift()
    align_stack(stack, method, masks=masks, neighbours=2, stride=8)
    kept = [int((masks[k] != 0).sum()) for k in range(4)]
    assert set(method.seen) == {(kept[i], kept[j]) for i in range(4)
                                for j in range(i + 1, min(4, i + 3))}
    masks[2] = 0  # section 2 lost: skipped, its neighbours registered across it
    caplog.clear()
    res = align_stack(stack, _MaskedShift(), masks=masks, neighbours=2, stride=8)
    assert {(p["fixed"], p["moving"]) for p in res.pairs} == {(0, 1), (0, 3), (1, 3)}
    assert res.table[2]["flagged"] and "skipped: its mask keeps 0%" in res.table[2]["warnings"]
    assert "interpolated from section(s) 1 and 3" in res.table[2]["warnings"]
    np.testing.assert_allclose(res.maps[2], 0.5 * (res.maps[1] + res.maps[3]),
                               atol=res.grid.quantum())  # (kept to the maps' quantum)
    assert "sections [2] are mostly masked" in caplog.text
    masks[2] = 255
    masks[1] = 0
    masks[1, :, 20:26] = 255  # 12% kept: skipped too
    masks[2] = 0
    masks[2, :, 20:26] = 255
    masks[3] = 0
    masks[3, :, 20:26] = 255  # three of four sections mostly masked: inverted masks?
    caplog.clear()
    res = align_stack(stack, _MaskedShift(), masks=masks, neighbours=2, stride=8)
    assert "3 of 4 sections keep under a quarter" in caplog.text and "inverted?" in caplog.text
    assert res.pairs == [] and np.all(np.asarray(res.maps) == 0)  # nothing to pair: no crash
    assert all(res.table[k]["flagged"] for k in (1, 2, 3))
    with pytest.raises(ValueError, match=r"the masks have shape \(4, 40, 40\), the stack "
                                         r"\(4, 40, 48\)"):
        align_stack(stack, _MaskedShift(), masks=masks[:, :, :40])
    with pytest.raises(ValueError, match="does not take masks"):
        align_stack(stack, PhaseCorrelation(), masks=masks)
    with pytest.raises(ValueError, match="max_skip must be an integer >= 0"):
        align_stack(stack, _MaskedShift(), masks=masks, max_skip=-1)


def test_sequential_chain_takes_masks_and_skips_lost_sections(shifted_stack, caplog):
    """Issue 17 in mode='sequential': each section is registered to the aligned one before
    it with that one's aligned mask (warped with its transform) and its own raw mask; a
    mostly masked section is registered across and its transform interpolated; after more
    than max_skip in a row the chain starts again."""
    stack, t = shifted_stack
    masks = np.full(stack.shape, 255, np.uint8)
    masks[:, 60:64, :] = 0  # a crack across every section
    method = _MaskedShift()
    res = align_stack(stack, method, masks=masks, mode="sequential", stride=8)
    # section 0 keeps its place; each later one is moved onto it (phase correlation)
    for k in range(1, 6):
        np.testing.assert_allclose(res.maps[k][:, 4, 5], -(t[k] - t[0]), atol=0.6)
    # the fixed masks were aligned ones: section k-1's crack moved with its transform
    # (pixels pulled from outside the section are excluded too), the moving ones raw
    assert len(method.seen) > 1
    assert all(moving == int((masks[0] != 0).sum()) for _, moving in method.seen)
    masks[2] = 0  # section 2 lost
    caplog.clear()
    res = align_stack(stack, _MaskedShift(), masks=masks, mode="sequential", stride=8)
    assert res.table[2]["flagged"] and "interpolated from section(s) 1 and 3" in \
        res.table[2]["warnings"]
    np.testing.assert_allclose(res.maps[3][:, 4, 5], -(t[3] - t[0]), atol=0.6)
    np.testing.assert_allclose(res.maps[2], 0.5 * (res.maps[1] + res.maps[3]),
                               atol=res.grid.quantum())
    np.testing.assert_allclose(res.aligned[3][20:50, 20:60], res.aligned[0][20:50, 20:60],
                               atol=25)
    masks[3] = 0  # sections 2 and 3 lost, max_skip 1: section 4 starts a new chain
    res = align_stack(stack, _MaskedShift(), masks=masks, mode="sequential", stride=8,
                      max_skip=1)
    assert np.all(np.asarray(res.maps[4]) == 0)
    assert "a new chain" in res.table[4]["warnings"] and res.table[4]["flagged"]
    np.testing.assert_allclose(res.maps[5][:, 4, 5], -(t[5] - t[4]), atol=0.6)
    assert "the chain starts again" in caplog.text
