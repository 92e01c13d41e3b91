"""Transform export: transformix chains reproduce elastix's results; ITK transform files.

The transformix command-line tests use the Debian program in /usr/bin and skip without it.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from elastix_cases import ORIGIN_XY, SPACING_XY, interior, read_mha, write_mha

from hybridreg import elastix as elx
from hybridreg import fields
from hybridreg.metrics import ncc

pytestmark = pytest.mark.elastix

TRANSFORMIX_BIN = shutil.which("transformix") or "/usr/bin/transformix"


needs_transformix = pytest.mark.skipif(
    not Path(TRANSFORMIX_BIN).is_file(),
    reason=f"elastix's transformix program ({TRANSFORMIX_BIN}) is not installed "
           f"(Debian package 'elastix')")


def run_transformix(tmp_path, chain_dir: Path, last: Path, moving, *, cwd=None):
    moving_path = tmp_path / "moving.mha"
    write_mha(moving_path, moving, spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY)
    out = tmp_path / "out"
    out.mkdir()
    tp = last.name if cwd is not None else str(last)
    proc = subprocess.run([TRANSFORMIX_BIN, "-in", str(moving_path), "-out", str(out),
                           "-tp", tp], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return read_mha(out / "result.mha")


@needs_transformix
@pytest.mark.parametrize("absolute_paths", [True, False])
def test_transformix_reproduces_plain_chain(chain_result, smooth_case, tmp_path,
                                            absolute_paths):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(chain_result, chain_dir, absolute_paths=absolute_paths)
    assert last == chain_dir / "TransformParameters.1.txt"
    text = last.read_text()
    link = str((chain_dir / "TransformParameters.0.txt").resolve()) if absolute_paths \
        else "TransformParameters.0.txt"
    assert f'(InitialTransformParametersFileName "{link}")' in text
    assert '(ResultImagePixelType "float")' in text
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"],
                             cwd=None if absolute_paths else chain_dir)
    assert result.dtype == np.float32
    assert ncc(result, chain_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result, chain_result.warped, atol=1e-3)


@needs_transformix
def test_transformix_reproduces_initial_field_chain(initial_result, smooth_case, tmp_path):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(initial_result, chain_dir)
    first = (chain_dir / "TransformParameters.0.txt").read_text()
    assert '(Transform "DeformationFieldTransform")' in first
    assert "(DeformationFieldInterpolationOrder 1)" in first
    field_path = chain_dir / "initial_field.mha"
    assert f'(DeformationFieldFileName "{field_path.resolve()}")' in first
    from hybridreg.io import read_field

    u, spacing, origin = read_field(field_path)
    np.testing.assert_allclose(u, smooth_case["initial"], atol=1e-6)
    assert tuple(spacing) == SPACING_XY and tuple(origin) == ORIGIN_XY
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"])
    assert ncc(result, initial_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result, initial_result.warped, atol=1e-3)


@needs_transformix
def test_transformix_reproduces_resampled_initial_field_chain(resampled_result, smooth_case,
                                                              tmp_path):
    chain_dir = tmp_path / "chain"
    last = elx.export_transformix_chain(resampled_result, chain_dir)
    # the B-spline acts first on the fixed points, the initial field after it
    assert '(Transform "BSplineTransform")' in \
        (chain_dir / "TransformParameters.0.txt").read_text()
    assert last == chain_dir / "TransformParameters.1.txt"
    assert '(Transform "DeformationFieldTransform")' in last.read_text()
    result = run_transformix(tmp_path, chain_dir, last, smooth_case["moving"])
    assert ncc(result, resampled_result.warped, mask=interior()) > 0.999
    np.testing.assert_allclose(result[interior()], resampled_result.warped[interior()],
                               atol=1e-2)


def test_write_itk_transform_round_trip(itk, initial_result, tmp_path):
    path = elx.write_itk_transform(tmp_path / "sub" / "section.h5", initial_result.transform)
    assert path.is_file()
    (back,) = itk.transformread(str(path))
    back = itk.DisplacementFieldTransform[itk.D, 2].cast(back)
    u, spacing, origin = fields.from_itk(back.GetDisplacementField())
    np.testing.assert_allclose(u, initial_result.field, atol=1e-6)
    assert spacing == SPACING_XY and origin == ORIGIN_XY


def test_a_field_written_without_itk_is_read_by_itk(tmp_path):
    """write_field_transform writes ITK's HDF5 transform layout with h5py: itk.transformread
    gives the same displacement field transform (values, spacing, origin, size)."""
    import itk

    from hybridreg.elastix.export import write_field_transform

    u = np.random.default_rng(0).normal(size=(2, 17, 23)).astype(np.float32)
    path = write_field_transform(tmp_path / "t.h5", u, spacing_xy=(32.0, 16.0),
                                 origin_xy=(5.0, -3.0))
    t = itk.transformread(str(path))[0]
    field = t.GetDisplacementField()
    np.testing.assert_array_equal(np.moveaxis(itk.array_from_image(field), -1, 0), u)
    assert tuple(field.GetSpacing()) == (32.0, 16.0)
    assert tuple(field.GetOrigin()) == (5.0, -3.0)
    assert tuple(itk.size(field)) == (23, 17)
    # the transform maps a point as the field says (pull: p -> p + u(p)), at a node
    p = (5.0 + 32.0 * 4, -3.0 + 16.0 * 2)
    q = t.TransformPoint(p)
    np.testing.assert_allclose(np.subtract(q, p), u[:, 2, 4], atol=1e-6)
