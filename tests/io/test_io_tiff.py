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


def test_ome_tiff_is_written_with_its_physical_sizes(tmp_path):
    """A `.ome.tif` path gets OME-TIFF (OME-XML PhysicalSizeX/Y/Z), read back with its
    spacing, eagerly, lazily, and from a lazy stack written page by page (issue 18,
    item 12)."""
    from hybridreg.fields import MapGrid
    from hybridreg.stack import AlignedSections

    a = (np.random.default_rng(0).random((3, 20, 30)) * 255).astype(np.uint8)
    write_stack(tmp_path / "s.ome.tif", a, spacing_xyz=(4.0, 4.5, 50.0))
    with tifffile.TiffFile(tmp_path / "s.ome.tif") as tif:
        assert tif.is_ome and not tif.is_imagej
    for lazy in (False, True):
        s = read_stack(tmp_path / "s.ome.tif", lazy=lazy)
        assert s.spacing_xyz == (4.0, 4.5, 50.0)
        np.testing.assert_array_equal(np.asarray(s.data), a)
    grid = MapGrid((20, 30), stride=8)
    sections = AlignedSections(a, np.zeros((3, 2) + grid.node_shape, np.float32), grid,
                               dtype=np.uint8)
    write_stack(tmp_path / "lazy.ome.tiff", sections, spacing_xyz=(4.0, 4.5, 50.0))
    back = read_stack(tmp_path / "lazy.ome.tiff")
    assert back.spacing_xyz == (4.0, 4.5, 50.0)
    np.testing.assert_array_equal(back.data, a)


@pytest.mark.parametrize("layout", ["imagej", "ome", "pages", "shaped", "zlib"])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_truncated_tiff_is_an_error_naming_what_is_missing(tmp_path, layout, lazy):
    """A copy cut short (half of the last section missing) is not read as a shorter stack."""
    import tifffile

    from hybridreg import io

    stack = (np.random.default_rng(0).random((3, 60, 80)) * 255).astype(np.uint8)
    path = tmp_path / ("s.ome.tif" if layout == "ome" else "s.tif")
    if layout in ("imagej", "ome"):
        io.write_stack(str(path), stack, spacing_xyz=(1, 1, 1))
    else:
        kw = {"pages": {"metadata": None}, "shaped": {},
              "zlib": {"metadata": None, "compression": "zlib"}}[layout]
        tifffile.imwrite(path, stack, photometric="minisblack", **kw)
    np.testing.assert_array_equal(np.asarray(io.read_stack(str(path), lazy=lazy).data), stack)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - stack[2].nbytes // 2)
    with pytest.raises(io.StackError, match=r"s(\.ome)?\.tif'.*truncated or damaged.*"
                                            r"(announces 3 sections|missing|ends at byte|"
                                            r"invalid page offset)"):
        io.read_stack(str(path), lazy=lazy)
