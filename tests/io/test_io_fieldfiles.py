"""Displacement-field files (.mha): round trips through ITK, grids, bad fields."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg.io import (StackError, field_path, read_field, read_fields, write_field,
                          write_fields)

from iohelpers import esc, listing


def make_field(shape_yx=(5, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(2, *shape_yx)).astype(np.float32)


def test_field_path():
    assert field_path("d", 0).as_posix() == "d/section_0000.mha"
    assert field_path("d", 42).name == "section_0042.mha"
    assert field_path("d", 12345).name == "section_12345.mha"
    with pytest.raises(ValueError):
        field_path("d", -1)


def test_field_round_trip_and_itk_reads_it(tmp_path):
    import itk

    u = make_field()
    path = tmp_path / "f.mha"
    write_field(path, u, spacing_xy=(3.5, 4.0), origin_xy=(10.0, -5.0))
    v, spacing, origin = read_field(path)
    assert v.dtype == np.float32 and v.shape == (2, 5, 7)
    np.testing.assert_array_equal(v, u)
    assert spacing == (3.5, 4.0) and origin == (10.0, -5.0)
    img = itk.imread(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 2
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)  # (x, y)
    np.testing.assert_array_equal(np.moveaxis(itk.array_from_image(img), -1, 0), u)
    assert tuple(img.GetSpacing()) == (3.5, 4.0) and tuple(img.GetOrigin()) == (10.0, -5.0)
    with pytest.raises(StackError, match=esc(path) + ".*already exists"):
        write_field(path, u)


def test_fields_round_trip_and_checks(tmp_path):
    fields = np.stack([make_field(seed=k) for k in range(3)])
    out = tmp_path / "fields"
    write_fields(out, fields, spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5))
    assert listing(out) == ["section_0000.mha", "section_0001.mha", "section_0002.mha"]
    got, spacing, origin = read_fields(out)
    np.testing.assert_array_equal(got, fields)
    assert spacing == (2.0, 3.0) and origin == (1.0, 1.5)
    with pytest.raises(StackError, match=esc(out / "section_0000.mha") + ".*already exists"):
        write_fields(out, fields, spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5))
    # overwrite with fewer fields removes the stale ones
    write_fields(out, fields[:2], spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5), overwrite=True)
    assert read_fields(out)[0].shape == (2, 2, 5, 7)
    write_field(field_path(out, 1), fields[1], spacing_xy=(2.0, 9.0), origin_xy=(1.0, 1.5),
                overwrite=True)
    with pytest.raises(StackError, match=esc(out / "section_0001.mha") + ".*grid.*differs"):
        read_fields(out)
    write_field(field_path(out, 3), fields[0])
    (out / "section_0001.mha").unlink()
    with pytest.raises(StackError, match=esc(out) + ".*not contiguous.*section 1 is missing"):
        read_fields(out)


def test_bad_fields(tmp_path):
    with pytest.raises(StackError, match=esc(tmp_path / "f.mha") + r".*\(2, H, W\)"):
        write_field(tmp_path / "f.mha", np.zeros((3, 4, 4), np.float32))
    nan = make_field()
    nan[1, 2, 2] = np.nan
    with pytest.raises(StackError, match=esc(tmp_path / "f.mha") + ".*NaN"):
        write_field(tmp_path / "f.mha", nan)
    with pytest.raises(StackError, match=esc(tmp_path / "f.nii") + ".*mha"):
        write_field(tmp_path / "f.nii", make_field())
    scalar = tmp_path / "scalar.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(scalar))
    with pytest.raises(StackError, match=esc(scalar) + ".*1 components"):
        read_field(scalar)
    with pytest.raises(StackError, match=esc(tmp_path / "none") + ".*no such folder"):
        read_fields(tmp_path / "none")
    assert listing(tmp_path) == ["scalar.mha"]


def test_failed_field_write_leaves_nothing(tmp_path, monkeypatch):
    def partial(image, path, *args):
        open(path, "wb").write(b"half")
        raise RuntimeError("itk write failed")

    monkeypatch.setattr(sitk, "WriteImage", partial)
    with pytest.raises(RuntimeError, match="itk write failed"):
        write_field(tmp_path / "f.mha", make_field())
    assert listing(tmp_path) == []
