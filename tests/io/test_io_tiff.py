"""Multi-page TIFF stacks: round trips, ImageJ spacing, colour refused."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hybridreg.io import StackError, read_stack, write_stack

from iohelpers import DTYPES, SPACING, check_stack, esc, make_stack


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiff_round_trip_keeps_dtype_and_spacing(tmp_path, dtype):
    data = make_stack(dtype)
    path = tmp_path / "stack.tif"
    write_stack(path, data, spacing_xyz=SPACING)
    stack = read_stack(path)
    check_stack(stack, data)
    assert stack.path == str(path)
    with tifffile.TiffFile(path) as tif:  # stored the ImageJ way, readable by Fiji
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 50.0
        assert len(tif.pages) == 3


def test_tiff_dpi_resolution_is_not_spacing(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, make_stack(np.uint8), photometric="minisblack",
                     resolution=(72, 72))  # unit: inch (a dpi default)
    assert read_stack(path).spacing_xyz == (1.0, 1.0, 1.0)


def test_rgb_tiff(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(StackError, match=esc(path) + ".*colour.*RGB.*grayscale"):
        read_stack(path)
