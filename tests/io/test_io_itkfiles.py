"""Stacks in ITK's image formats (.mha/.mhd, .nrrd/.nhdr, .nii/.nii.gz): read, eagerly and
lazily, with spacing; vector images and rotated grids refused (issue 18, item 12)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import cli, io

sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def volume():
    return (np.random.default_rng(0).random((4, 30, 40)) * 255).astype(np.uint8)


@pytest.mark.parametrize("ext", [".mha", ".mhd", ".nrrd", ".nii", ".nii.gz"])
def test_itk_images_are_stacks_with_their_spacing(tmp_path, volume, ext):
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((2.0, 3.0, 50.0))
    path = tmp_path / f"stack{ext}"
    sitk.WriteImage(img, str(path))
    eager = io.read_stack(path)
    assert eager.data.dtype == np.uint8 and eager.spacing_xyz == (2.0, 3.0, 50.0)
    np.testing.assert_array_equal(eager.data, volume)
    lazy = io.read_stack(path, lazy=True)
    assert lazy.data.shape == volume.shape and lazy.spacing_xyz == (2.0, 3.0, 50.0)
    for k in (0, 3):
        np.testing.assert_array_equal(np.asarray(lazy.data[k]), volume[k])


def test_a_2d_image_is_one_section(tmp_path, volume):
    sitk.WriteImage(sitk.GetImageFromArray(volume[0]), str(tmp_path / "one.nrrd"))
    s = io.read_stack(tmp_path / "one.nrrd")
    assert s.data.shape == (1, 30, 40)
    np.testing.assert_array_equal(s.data[0], volume[0])


def test_vector_images_and_rotated_grids_are_refused(tmp_path, volume):
    field = sitk.GetImageFromArray(np.zeros((30, 40, 2), np.float32), isVector=True)
    sitk.WriteImage(field, str(tmp_path / "field.mha"))
    with pytest.raises(io.StackError, match="2 components per pixel"):
        io.read_stack(tmp_path / "field.mha")
    img = sitk.GetImageFromArray(volume)
    img.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "rotated.nii.gz"))
    with pytest.raises(io.StackError, match="non-identity direction"):
        io.read_stack(tmp_path / "rotated.nii.gz", lazy=True)


def test_the_cli_takes_an_itk_image_stack(tmp_path, volume):
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((2.0, 3.0, 50.0))
    sitk.WriteImage(img, str(tmp_path / "s.nrrd"))
    assert cli.main(["deform", str(tmp_path / "s.nrrd"), "--out", str(tmp_path / "d.tif"),
                     "--fields-out", str(tmp_path / "t"), "--seed", "1"]) == 0
    out = io.read_stack(tmp_path / "d.tif")
    assert out.data.shape == volume.shape and out.spacing_xyz[:2] == (2.0, 3.0)
