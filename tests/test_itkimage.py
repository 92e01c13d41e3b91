"""numpy <-> ITK and SimpleITK images (hybridreg.itkimage): grids, layouts, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import checks, itkimage
from hybridreg.itkimage import section_from_itk, section_to_itk


def test_section_itk_round_trip():
    import itk

    section = np.arange(35, dtype=np.float32).reshape(5, 7)
    img = section_to_itk(section, spacing_xy=(3.5, 4.0), origin_xy=(10.0, -5.0))
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)  # (x, y) = (W, H)
    assert img.GetPixel([6, 1]) == section[1, 6]  # ITK index (x, y) = array [y, x]
    assert tuple(img.TransformIndexToPhysicalPoint([2, 3])) == (10.0 + 2 * 3.5, -5.0 + 3 * 4.0)
    assert np.allclose(np.asarray(img.GetDirection()), np.eye(2))
    arr, spacing, origin = section_from_itk(img)
    np.testing.assert_array_equal(arr, section)
    assert arr.dtype == np.float32
    assert spacing == (3.5, 4.0) and origin == (10.0, -5.0)
    u8 = section_to_itk(np.arange(16, dtype=np.uint8).reshape(4, 4), dtype=None)
    assert section_from_itk(u8)[0].dtype == np.uint8
    with pytest.raises(ValueError, match=r"2D array \(H, W\)"):
        section_to_itk(np.zeros((2, 4, 4)))
    assert isinstance(itk.image_from_array(arr), type(img))


def test_vector_and_3d_images_keep_layout_and_grid():
    u = np.random.default_rng(0).standard_normal((5, 7, 2))
    img = itkimage.to_itk(u, spacing=(2.0, 3.0), origin=(1.0, -1.0), is_vector=True)
    assert img.GetNumberOfComponentsPerPixel() == 2
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)
    arr, spacing, origin = itkimage.from_itk(img, dimension=2)
    np.testing.assert_array_equal(arr, u)
    assert spacing == (2.0, 3.0) and origin == (1.0, -1.0)
    vol = np.zeros((4, 5, 6), np.float32)
    img3 = itkimage.to_itk(vol, spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 5.0))
    assert tuple(img3.GetLargestPossibleRegion().GetSize()) == (6, 5, 4)
    assert np.allclose(np.asarray(img3.GetDirection()), np.eye(3))
    with pytest.raises(ValueError, match="3D image needs 3 spacing"):
        itkimage.to_itk(vol, spacing=(1.0, 1.0), origin=(0.0, 0.0))


def test_other_directions_and_dimensions_are_refused():
    import itk

    img = section_to_itk(np.zeros((4, 4), np.float32))
    img.SetDirection(itk.matrix_from_array(np.array([[0.0, 1.0], [1.0, 0.0]])))
    with pytest.raises(ValueError, match="fixed section has a non-identity direction"):
        itkimage.from_itk(img, what="fixed section")
    with pytest.raises(ValueError, match="expected a 3D image"):
        itkimage.from_itk(section_to_itk(np.zeros((4, 4))), what="stack", dimension=3)
    assert itkimage.is_itk_image(img) and not itkimage.is_itk_image(np.zeros((4, 4)))


def test_simpleitk_images_round_trip():
    u = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
    img = itkimage.to_sitk(u, spacing=(0.5, 2.0), origin=(3.0, 4.0), is_vector=True)
    assert img.GetDirection() == (1.0, 0.0, 0.0, 1.0)
    arr, spacing, origin = itkimage.from_sitk(img)
    np.testing.assert_array_equal(arr, u)
    assert spacing == (0.5, 2.0) and origin == (3.0, 4.0)


def test_xy_pairs_are_checked():
    assert checks.as_xy([1, 2.5], "origin_xy") == (1.0, 2.5)
    assert checks.as_spacing_xy((4, 4)) == (4.0, 4.0)
    with pytest.raises(TypeError, match="spacing_xy must be a pair"):
        checks.as_spacing_xy(3.0)
    with pytest.raises(ValueError, match="got 3 values"):
        checks.as_xy((1, 2, 3), "origin_xy")
    with pytest.raises(ValueError, match="finite"):
        checks.as_xy((1, float("nan")), "origin_xy")
    with pytest.raises(ValueError, match="positive"):
        checks.as_spacing_xy((1, 0))
