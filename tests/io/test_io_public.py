"""The public surface of hybridreg.io: lazy import, __all__, sections as ITK images."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hybridreg import io
from hybridreg.io import section_from_itk, section_to_itk

from iohelpers import make_stack


def test_section_itk_round_trip():
    import itk

    section = make_stack(np.float32, shape=(5, 7))
    img = section_to_itk(section, spacing_xy=(3.5, 4.0), origin_xy=(10.0, -5.0))
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)  # (x, y) = (W, H)
    assert img.GetPixel([6, 1]) == section[1, 6]  # ITK index (x, y) = array [y, x]
    assert tuple(img.TransformIndexToPhysicalPoint([2, 3])) == (10.0 + 2 * 3.5, -5.0 + 3 * 4.0)
    assert np.allclose(np.asarray(img.GetDirection()), np.eye(2))
    arr, spacing, origin = section_from_itk(img)
    np.testing.assert_array_equal(arr, section)
    assert arr.dtype == np.float32
    assert spacing == (3.5, 4.0) and origin == (10.0, -5.0)
    u8 = section_to_itk(make_stack(np.uint8, (4, 4)), dtype=None)
    assert section_from_itk(u8)[0].dtype == np.uint8
    with pytest.raises(ValueError, match=r"2D array \(H, W\)"):
        section_to_itk(np.zeros((2, 4, 4)))
    assert isinstance(itk.image_from_array(arr), type(img))


def test_import_is_lazy():
    code = ("import sys, hybridreg.io; "
            "print(sorted(m for m in ('itk', 'SimpleITK', 'torch', 'tifffile', 'h5py', 'zarr') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    assert io.__all__ and all(hasattr(io, name) for name in io.__all__)
