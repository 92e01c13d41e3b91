"""The hybrid method: learned field -> elastix B-spline refinement with feature channels.

Tiny in-memory networks (untrained or briefly fitted), 96 px phantom sections, elastix with
one thread.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridreg import elastix, synthetic
from hybridreg.methods import get_method
from hybridreg.methods.hybrid import HybridMethod, feature_maps, project_start
from hybridreg.metrics import endpoint_error
from hybridreg.models import FAEMRegNet, FeatureAutoencoder
from hybridreg.phantom import make_phantom
from hybridreg.warp import warp

torch.set_num_threads(1)
pytestmark = pytest.mark.elastix

AE_LAYERS = [[8, 3, 1], [8, 3, 2], [8, 3, 2]]


@pytest.fixture(scope="module")
def pair():
    ph = make_phantom(sections=2, shape_yx=(96, 96), seed=4)
    fixed = ph.stack[1].astype(np.float32)
    d = synthetic.random_deformation((96, 96), seed=11, max_rotation_deg=0.5,
                                     max_shift_px=2.0, elastic_px=2.0, max_scale=0.0,
                                     elastic_spacing_px=48.0)
    moving = synthetic.warp(fixed, d.forward, order=3)[0]
    return fixed, moving, d.recovery


def _nets():
    torch.manual_seed(0)
    net = FAEMRegNet.from_preset("tiny-pyramid")
    ae = FeatureAutoencoder(AE_LAYERS, feature_relu=False)
    return net, ae


def test_feature_maps_are_on_the_section_grid(pair):
    fixed, moving, _ = pair
    _, ae = _nets()
    f, m = feature_maps(ae.eval(), fixed[:90, :93], moving[:90, :93], n_channels=2,
                        feature_stride=4)
    assert len(f) == len(m) == 2
    assert all(a.shape == (90, 93) and a.dtype == np.float32 for a in f + m)
    assert all(np.std(a) > 0 for a in f)
    # the same section gives the same channels
    f2, m2 = feature_maps(ae.eval(), fixed, fixed, n_channels=1)
    assert np.allclose(f2[0], m2[0], atol=1e-5)


def test_blank_sections_give_no_feature_channels():
    _, ae = _nets()
    blank = np.full((64, 64), 100.0, np.float32)
    assert feature_maps(ae.eval(), blank, blank, n_channels=2) == ([], [])


def test_hybrid_refines_the_learned_field(pair):
    fixed, moving, truth = pair
    net, ae = _nets()
    method = get_method("hybrid", model=net, features=ae, threads=1)
    assert isinstance(method, HybridMethod)
    res = method.register(fixed, moving)
    learned = res.info["learned_field"]
    assert res.field.shape == (2, 96, 96) and res.field.dtype == np.float32
    inner = (slice(None), slice(12, -12), slice(12, -12))
    e_learned = endpoint_error(learned[inner], truth[inner]).mean_px
    e_hybrid = endpoint_error(res.field[inner], truth[inner]).mean_px
    if res.info["fallback"] is None:
        # an untrained net is about the identity; the refinement does the work
        assert e_hybrid < 0.6 * e_learned
        maps = res.info["parameter_maps"]
        assert maps[0]["Metric"] == ["AdvancedNormalizedCorrelation"] * 3 + [
            "TransformBendingEnergyPenalty"]  # the default preset's penalty ran
        assert res.info["ncc_refined"] >= res.info["ncc_learned"]
        assert res.info["elastix"].initial_field is not None
    else:
        pytest.fail(f"the refinement fell back: {res.info['fallback']}")


@pytest.mark.parametrize("initial", ["resample", "external"])
def test_both_ways_of_starting_from_the_learned_field(pair, initial):
    """Resampling first and elastix's external initial transform give the same refinement;
    the result's warped section is its field applied to the moving one."""
    fixed, moving, truth = pair
    net, ae = _nets()
    method = HybridMethod(net, ae, threads=1, initial=initial, preset="fast")  # one stage
    assert method.config["initial"] == initial
    res = method.register(fixed, moving)
    assert res.info["fallback"] is None, res.info["fallback"]
    er = res.info["elastix"]
    assert er.initial_mode == initial
    np.testing.assert_array_equal(er.initial_field, res.info["start_field"])
    kinds = [m["Transform"][0] for m in er.transform_parameter_maps]
    assert kinds == (["BSplineTransform"] if initial == "resample"
                     else ["ExternalTransform", "BSplineTransform"])
    rewarped, valid = warp(moving, res.field, order=1)
    np.testing.assert_allclose(res.warped[valid], rewarped[valid], atol=1e-3)
    inner = (slice(None), slice(12, -12), slice(12, -12))
    e_learned = endpoint_error(res.info["learned_field"][inner], truth[inner]).mean_px
    e_hybrid = endpoint_error(res.field[inner], truth[inner]).mean_px
    assert e_hybrid < 0.6 * e_learned
    with pytest.raises(ValueError, match="initial"):
        HybridMethod(net, ae, initial="prewarp")


@pytest.mark.parametrize("preset", ["fast", "accurate"])
def test_a_pair_warps_the_moving_section_once_per_level(pair, monkeypatch, preset):
    """Once by the start, once by each refinement stage's result (fast: one stage; accurate:
    two), never twice by the same field (the resample start of a stage is the warp of the
    stage before)."""
    import hybridreg.warp

    fixed, moving, _ = pair
    net, ae = _nets()
    method = HybridMethod(net, ae, threads=1, preset=preset)
    real, fields_seen = hybridreg.warp.warp, []

    def counting(image, u, **kw):
        image = np.asarray(image)
        if any(np.array_equal(c, moving) for c in (image if image.ndim == 3 else [image])):
            fields_seen.append(np.array(u))
        return real(image, u, **kw)

    monkeypatch.setattr(hybridreg.warp, "warp", counting)
    res = method.register(fixed, moving)
    assert res.info["fallback"] is None, res.info["fallback"]
    assert len(fields_seen) == (2 if preset == "fast" else 3)
    np.testing.assert_array_equal(fields_seen[0], res.info["start_field"])
    assert not any(np.array_equal(a, b) for i, a in enumerate(fields_seen)
                   for b in fields_seen[i + 1:])
    kept = res.info["detail"] is None or res.info["detail"]["kept"]
    np.testing.assert_array_equal(fields_seen[-1 if kept else 1], res.field)
    assert "transform" not in vars(res.info["elastix"])


def test_failed_refinement_falls_back_and_flags(pair, monkeypatch):
    fixed, moving, _ = pair
    net, ae = _nets()
    method = HybridMethod(net, ae, threads=1)

    def boom(*a, **k):
        raise elastix.ElastixError("elastix said no")

    monkeypatch.setattr(elastix, "register_pair", boom)
    res = method.register(fixed, moving)
    assert res.info["fallback"].startswith("the refinement failed (ElastixError")
    assert any("kept the learned field" in w for w in res.warnings)
    assert np.array_equal(res.field, res.info["start_field"])
    assert "elastix" not in res.info


def test_worse_refinement_is_rejected(pair, monkeypatch):
    """A refinement that lowers the NCC (here: elastix's field replaced by a large shift)
    is not kept."""
    fixed, moving, _ = pair
    net, ae = _nets()
    method = HybridMethod(net, ae, threads=1)
    real = elastix.register_pair

    def worse(*a, **k):
        r = real(*a, **k)
        bad = r.field + np.array([7.0, -5.0], np.float32)[:, None, None]
        # a consistent result: its warped section is the moving one resampled with `bad`
        warped = warp(np.asarray(a[1], np.float32), bad, order=1)[0]
        return elastix.ElastixResult(**{**r.__dict__, "field": bad, "warped": warped})

    monkeypatch.setattr(elastix, "register_pair", worse)
    res = method.register(fixed, moving)
    assert "lowered the NCC" in res.info["fallback"]
    assert np.array_equal(res.field, res.info["start_field"])


def test_user_parameter_file_is_adapted(tmp_path):
    net, ae = _nets()
    # the shipped em_bspline carries a bending-energy penalty: elastix evaluates it with the
    # resample start (the default), not after an external initial transform
    kept = HybridMethod(net, ae, params="em_bspline", channel_weights=[1.0, 0.3, 0.2])
    assert kept.parameter_map["Metric"][3:] == ["TransformBendingEnergyPenalty"]
    assert kept.parameter_map["Metric3Weight"] == ["1000.0"]
    assert len(kept.parameter_map["ImageSampler"]) == 4
    assert not kept.adapt_warnings
    method = HybridMethod(net, ae, params="em_bspline", channel_weights=[1.0, 0.3, 0.2],
                          initial="external")
    m = method.parameter_map
    assert "TransformBendingEnergyPenalty" not in m["Metric"]
    assert "ImageSampler1NumberOfSpatialSamples" not in m  # the penalty's count went with it
    assert len(m["Metric"]) == 3 and m["Registration"] == [
        "MultiMetricMultiResolutionRegistration"]
    assert [m[f"Metric{i}Weight"][0] for i in range(3)] == ["1.0", "0.3", "0.2"]
    assert len(m["FixedImagePyramid"]) == 3 and len(m["Interpolator"]) == 3
    assert any("removed transform penalties" in w for w in method.adapt_warnings)
    original = elastix.parameter_maps("em_bspline")[0]
    # everything else stays the user's
    assert m["FinalGridSpacingInVoxels"] == original["FinalGridSpacingInVoxels"]
    assert m["MaximumNumberOfIterations"] == original["MaximumNumberOfIterations"]
    with pytest.raises(ValueError, match="channel_weights"):
        HybridMethod(net, ae, channel_weights=[1.0])
    with pytest.raises(ValueError, match="chain"):
        elastix.adapt_refinement_map(["em_affine", "em_bspline"], 2)


def test_without_features_one_channel(pair):
    fixed, moving, _ = pair
    net, _ = _nets()
    method = HybridMethod(net, False, threads=1)
    assert method.autoencoder() is None
    assert method.parameter_map["Metric"] == ["AdvancedNormalizedCorrelation",
                                              "TransformBendingEnergyPenalty"]
    res = method.register(fixed, moving)
    assert res.field.shape == (2, 96, 96)


def test_presets_start_and_refinement():
    """accurate: the learned field low-passed, a 32 px grid with a bending penalty; fast: the
    learned field as it is, the earlier 64 px / 1 level / 50 iterations map."""
    net, ae = _nets()
    accurate, fast = HybridMethod(net, ae), HybridMethod(net, ae, preset="fast")
    assert accurate.preset == "accurate" and accurate.start_smoothing_px == 32.0
    m = accurate.parameter_map
    assert m["FinalGridSpacingInVoxels"] == ["32.0", "32.0"]
    assert m["Metric"][-1] == "TransformBendingEnergyPenalty" and len(m["Metric"]) == 4
    f = fast.parameter_map
    assert fast.start_smoothing_px == 0.0 and "TransformBendingEnergyPenalty" not in f["Metric"]
    assert (f["FinalGridSpacingInVoxels"], f["NumberOfResolutions"],
            f["MaximumNumberOfIterations"]) == (["64.0", "64.0"], ["1"], ["50"])
    assert fast.config["preset"] == "fast" and accurate.config != fast.config
    external = HybridMethod(net, ae, initial="external")
    assert "TransformBendingEnergyPenalty" not in external.parameter_map["Metric"]
    assert any("bending-energy penalty" in w for w in external.adapt_warnings)
    with pytest.raises(ValueError, match="unknown preset"):
        HybridMethod(net, ae, preset="fastest")
    with pytest.raises(ValueError, match="start_smoothing_px"):
        HybridMethod(net, ae, start_smoothing_px=-1)
    with pytest.raises(ValueError, match="refinement options"):
        HybridMethod(net, ae, params="em_bspline", refinement={"iterations": 10})
    options = HybridMethod(net, ae, refinement={"iterations": 10, "bending_weight": 0.0})
    assert options.parameter_map["MaximumNumberOfIterations"] == ["10"]
    assert "TransformBendingEnergyPenalty" not in options.parameter_map["Metric"]


def test_project_start_keeps_the_smooth_part():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    smooth = np.stack([3.0 + 0.02 * xx, -2.0 + 0.01 * yy])  # affine: kept by the low-pass
    noisy = smooth + rng.normal(0, 1.0, smooth.shape).astype(np.float32)
    assert project_start(noisy, sigma_px=0) is noisy
    out = project_start(noisy, sigma_px=8)
    inner = (slice(None), slice(24, -24), slice(24, -24))
    assert np.abs(out - smooth)[inner].mean() < 0.1 * np.abs(noisy - smooth)[inner].mean()
    np.testing.assert_allclose(project_start(np.full((2, 16, 16), 2.5, np.float32),
                                             sigma_px=4), 2.5, atol=1e-5)


def test_accurate_start_is_the_low_passed_learned_field(pair):
    fixed, moving, _ = pair
    net, ae = _nets()
    res = HybridMethod(net, ae, threads=1).register(fixed, moving)
    np.testing.assert_allclose(res.info["start_field"],
                               project_start(res.info["learned_field"], sigma_px=32.0))
    fast = HybridMethod(net, ae, threads=1, preset="fast").register(fixed, moving)
    assert fast.info["start_field"] is fast.info["learned_field"]
    assert fast.info["detail"] is None


def test_detail_stage_is_kept_on_a_sections_own_copy_only(pair):
    """The detail stage removes most of the dissimilarity left on a deformed copy of the
    fixed section (kept); against a different section it cannot (not kept)."""
    fixed, moving, truth = pair
    net, ae = _nets()
    method = HybridMethod(net, ae, threads=1)
    res = method.register(fixed, moving)
    d = res.info["detail"]
    assert d["kept"] and d["ratio"] <= method.detail_threshold, d
    er = res.info["elastix"]
    # the kept stage started from the first stage's result: the exported chain is the
    # detail B-spline, then that field, and reproduces the total
    assert er.initial_mode == "resample" and er.initial_field is not None
    assert not np.array_equal(er.initial_field, res.info["start_field"])
    inner = (slice(None), slice(12, -12), slice(12, -12))
    assert endpoint_error(res.field[inner], truth[inner]).mean_px < 0.5 * endpoint_error(
        res.info["start_field"][inner], truth[inner]).mean_px
    other = make_phantom(sections=2, shape_yx=(96, 96), seed=9).stack[1].astype(np.float32)
    res2 = method.register(fixed, other)
    assert res2.info["fallback"] is None, res2.info["fallback"]
    assert res2.info["detail"]["kept"] is False, res2.info["detail"]
    with pytest.raises(ValueError, match="detail_threshold"):
        HybridMethod(net, ae, detail_threshold=0)
    assert HybridMethod(net, ae, detail=False).detail_map is None
    assert HybridMethod(net, ae, params="em_bspline").detail_map is None
