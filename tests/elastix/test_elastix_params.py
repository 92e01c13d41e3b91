"""Elastix parameter maps: every accepted form, the refinement maps, the shipped files.

The elastix command-line tests use the Debian program in /usr/bin and skip without it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from elastix_cases import deform, em_like, shift_field, write_mha
from scipy import ndimage

from hybridreg import elastix as elx

pytestmark = pytest.mark.elastix

ELASTIX_BIN = shutil.which("elastix") or "/usr/bin/elastix"


def normalised(m: dict) -> dict:
    """A map with numbers compared as numbers."""
    def norm(v):
        try:
            return float(v)
        except ValueError:
            return v
    return {k: [norm(v) for v in vals] for k, vals in m.items()}


# --- parameter maps --------------------------------------------------------------------------

def test_parameter_object_accepts_every_form(itk, tmp_path):
    shipped = elx.shipped_parameter_files()
    assert {"em_rigid", "em_affine", "em_bspline", "refine_bspline_1ch", "refine_bspline_2ch",
            "refine_bspline_3ch"} <= set(shipped)
    path = elx.params_dir() / "em_affine.txt"
    by_name = elx.parameter_maps("em_affine")
    assert by_name == elx.parameter_maps(path) == elx.parameter_maps(str(path))
    assert by_name[0]["Transform"] == ["AffineTransform"]
    assert elx.parameter_maps("bspline")[0]["Transform"] == ["BSplineTransform"]
    po = elx.parameter_object({"Transform": "TranslationTransform", "NumberOfResolutions": 2,
                               "AutomaticTransformInitialization": True,
                               "Metric0Weight": 0.5})
    m = dict(po.GetParameterMap(0))
    assert m["NumberOfResolutions"] == ("2",)
    assert m["AutomaticTransformInitialization"] == ("true",)
    assert m["Metric0Weight"] == ("0.5",)
    chain = elx.parameter_object(["translation", po, ["em_affine", path]])
    assert chain.GetNumberOfParameterMaps() == 4
    assert [dict(chain.GetParameterMap(i))["Transform"][0] for i in range(4)] == [
        "TranslationTransform", "TranslationTransform", "AffineTransform", "AffineTransform"]


def test_parameter_object_errors(itk, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        elx.parameter_object(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        elx.parameter_object(["em_affine", str(missing)])
    with pytest.raises(ValueError, match="em_afine") as info:
        elx.parameter_object("em_afine")
    assert "em_affine" in str(info.value)  # lists what exists
    with pytest.raises(TypeError, match="int"):
        elx.parameter_object(3)
    with pytest.raises(TypeError, match="Transform"):
        elx.parameter_object({"Transform": object()})
    with pytest.raises(ValueError, match="no elastix parameter maps"):
        elx.parameter_object([])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_refinement_files_equal_refinement_map(itk, n):
    (from_file,) = elx.parameter_maps(f"refine_bspline_{n}ch")
    assert normalised(from_file) == normalised(elx.refinement_map(n))
    assert not set(from_file["Metric"]) & elx.TRANSFORM_PENALTIES
    for key in ("Metric", "FixedImagePyramid", "MovingImagePyramid", "Interpolator",
                "ImageSampler"):
        assert len(from_file[key]) == n, key
    assert [f"Metric{i}Weight" in from_file for i in range(n + 1)] == [True] * n + [False]


def test_refinement_map_options():
    m = elx.refinement_map(4, grid_spacing_px=24, weights=[1, 0.5, 0.5, 0.25], resolutions=3)
    assert len(m["Metric"]) == 4 and m["Metric3Weight"] == ["0.25"]
    assert m["FinalGridSpacingInVoxels"] == ["24.0", "24.0"]
    assert m["GridSpacingSchedule"] == ["4.0", "4.0", "2.0", "2.0", "1.0", "1.0"]
    assert m["ImagePyramidSchedule"] == ["4", "4", "2", "2", "1", "1"]
    with pytest.raises(ValueError, match="one entry per channel"):
        elx.refinement_map(2, weights=[1.0])
    with pytest.raises(ValueError, match="positive integer"):
        elx.refinement_map(0)
    # a bending-energy penalty after the image metrics, with its own sampler (em_bspline's)
    b = elx.refinement_map(2, bending_weight=300)
    assert b["Metric"] == ["AdvancedNormalizedCorrelation"] * 2 + [
        "TransformBendingEnergyPenalty"]
    assert b["Metric2Weight"] == ["300.0"] and b["ImageSampler2NumberOfSpatialSamples"] == ["1024"]
    # elastix: one interpolator, sampler and (with several images) pyramid per metric
    assert len(b["ImageSampler"]) == len(b["Interpolator"]) == len(b["FixedImagePyramid"]) == 3
    one = elx.refinement_map(1, bending_weight=300)  # one image: one pyramid, as em_bspline
    assert len(one["FixedImagePyramid"]) == 1 and len(one["Interpolator"]) == 2
    assert "TransformBendingEnergyPenalty" not in elx.refinement_map(2)["Metric"]
    with pytest.raises(ValueError, match="bending_weight"):
        elx.refinement_map(1, bending_weight=-1)


needs_elastix = pytest.mark.skipif(
    not Path(ELASTIX_BIN).is_file(),
    reason=f"the elastix program ({ELASTIX_BIN}) is not installed (Debian package 'elastix')")


# --- the parameter files in the elastix 5.0 command-line program ----------------------------

def run_elastix_cli(tmp_path, files, n_channels=1, *, iterations=None):
    fixed = em_like((80, 96), seed=5)
    moving = deform(fixed, shift_field((80, 96), (1.5, -1.0), (1.0, 1.0)))
    args = [ELASTIX_BIN]
    for i in range(n_channels):
        f, m = tmp_path / f"fixed{i}.mha", tmp_path / f"moving{i}.mha"
        write_mha(f, ndimage.gaussian_filter(fixed, i))
        write_mha(m, ndimage.gaussian_filter(moving, i))
        if n_channels == 1:
            args += ["-f", str(f), "-m", str(m)]
        else:
            args += [f"-f{i}", str(f), f"-m{i}", str(m)]
    for name in files:
        path = elx.params_dir() / f"{name}.txt"
        if iterations is not None:
            copy = tmp_path / path.name
            copy.write_text(re.sub(r"^\(MaximumNumberOfIterations .*\)$",
                                   f"(MaximumNumberOfIterations {iterations})",
                                   path.read_text(), flags=re.MULTILINE))
            path = copy
        args += ["-p", str(path)]
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(args + ["-out", str(out), "-threads", "2"], capture_output=True,
                          text=True, timeout=300)
    log_text = (out / "elastix.log").read_text(errors="replace") \
        if (out / "elastix.log").is_file() else ""
    assert proc.returncode == 0, log_text[-3000:] or proc.stdout[-3000:]
    assert len(list(out.glob("TransformParameters.*.txt"))) == len(files)
    assert len(re.findall(r"Final metric value", log_text)) == len(files)
    return out


@needs_elastix
def test_em_affine_runs_in_elastix_cli(tmp_path):
    out = run_elastix_cli(tmp_path, ["em_affine"])  # as shipped
    text = (out / "TransformParameters.0.txt").read_text()
    params = [float(v) for v in re.search(r"\(TransformParameters ([^)]*)\)", text)
              .group(1).split()]
    np.testing.assert_allclose(params[4:], [1.5, -1.0], atol=0.15)  # translation, +sign


@needs_elastix
@pytest.mark.parametrize("files, n_channels", [
    (["em_rigid"], 1),
    (["em_affine", "em_bspline"], 1),
    (["refine_bspline_1ch"], 1),
    (["refine_bspline_2ch"], 2),
    (["refine_bspline_3ch"], 3),
])
def test_parameter_files_run_in_elastix_cli(tmp_path, files, n_channels):
    run_elastix_cli(tmp_path, files, n_channels, iterations=20)


def test_adapted_map_warnings_are_returned_not_logged_twice(caplog):
    """The notes come back to the caller (the hybrid puts them in its result, the CLI prints
    them); logging them as warnings too printed every one twice (issue 18 item 9)."""
    with caplog.at_level("INFO", logger="hybridreg.elastix"):
        _, notes = elx.adapt_refinement_map("em_bspline", 2)
    assert any("removed transform penalties" in n for n in notes)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("removed transform penalties" in r.getMessage() for r in caplog.records)
