"""Sections too large to hold: region reads, rendering and writing region by region.

Sections over ``hybridreg.io.WHOLE_SECTION_BYTES`` are never read whole: the tiles, the
coarse pass, the pair NCC, rendering and the writers read and write only the regions they
work on. Here the limit is lowered so that small stacks take that path, and every result is
compared with the whole-section path.
"""
from __future__ import annotations

import numpy as np
import pytest

import hybridreg.io.base as io_base
from hybridreg import io
from hybridreg.fields import MapGrid
from hybridreg.tiling import TiledMethod
from hybridreg.warp import render

from helpers import smooth_texture

RNG = np.random.default_rng(7)
STACK = (RNG.random((3, 150, 230)) * 60000).astype(np.uint16)


def _write_all(tmp_path):
    """The stack in every format hybridreg reads lazily, and TIFF layouts of other tools."""
    import SimpleITK as sitk
    import tifffile

    paths = []
    for name in ("s.tif", "s.ome.tif", "folder/", "s.h5", "s.zarr", "a.zarr:/g/x"):
        target = f"{tmp_path}/{name}"
        io.write_stack(target, STACK, spacing_xyz=(2.0, 2.0, 50.0))
        paths.append(target)
    tifffile.imwrite(tmp_path / "tiled.tif", STACK, tile=(64, 64), compression="zlib",
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "zlib.tif", STACK, compression="zlib",
                     photometric="minisblack", rowsperstrip=16)
    for name in ("s.mha", "s.nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(STACK), str(tmp_path / name))
    return paths + [str(tmp_path / n) for n in ("tiled.tif", "zlib.tif", "s.mha", "s.nrrd")]


KEYS = [(slice(10, 77), slice(33, 200)), 5, (slice(None), 7), (slice(None, None, 3),
        slice(10, 2, -2)), (Ellipsis, slice(4, 9)), (slice(140, 400), slice(-5, None)),
        (slice(20, 20), slice(None))]


def test_a_plane_reads_exactly_the_region_in_every_format(tmp_path):
    for path in _write_all(tmp_path):
        sections = io.read_stack(path, lazy=True).data
        plane = sections.plane(1)
        assert plane.shape == STACK.shape[1:] and plane.dtype == STACK.dtype
        for key in KEYS:
            np.testing.assert_array_equal(plane[key], STACK[1][key], err_msg=f"{path} {key}")
        np.testing.assert_array_equal(np.asarray(sections.plane(-1)), STACK[2])
        assert sections.reads == 0, f"{path}: a region read read the whole section"


def test_tiff_regions_read_only_their_bytes(tmp_path):
    """An uncompressed TIFF (ImageJ's layout, what hybridreg writes) is read row by row at
    the region's offsets; tiled and striped ones through their tiles or strips."""
    io.write_stack(str(tmp_path / "s.tif"), STACK, spacing_xyz=(1, 1, 1))
    sections = io.read_stack(str(tmp_path / "s.tif"), lazy=True).data
    sections.region(2, slice(3, 9), slice(100, 140))
    assert sections._source._layout[0] == "raw"


def test_bad_region_reads_name_the_file_and_region(tmp_path):
    io.write_stack(str(tmp_path / "s.tif"), STACK, spacing_xyz=(1, 1, 1))
    sections = io.read_stack(str(tmp_path / "s.tif"), lazy=True).data
    with pytest.raises(IndexError, match="out of range"):
        sections.plane(3)
    with pytest.raises(IndexError, match="too many indices"):
        sections.plane(0)[1, 2, 3]
    sections.region(2, slice(140, 150), slice(0, 10))
    with open(tmp_path / "s.tif", "r+b") as f:  # cut short while open: the last rows
        f.truncate(f.seek(0, 2) - STACK[2].nbytes // 2)
    with pytest.raises(io.StackError, match=r"s\.tif.*rows 140:150"):
        sections.region(2, slice(140, 150), slice(0, 10))


@pytest.mark.parametrize("order", [0, 1, 3])
def test_rendering_a_plane_equals_rendering_the_section(tmp_path, order):
    io.write_stack(str(tmp_path / "s.tif"), STACK, spacing_xyz=(2, 3, 1))
    plane = io.read_stack(str(tmp_path / "s.tif"), lazy=True).data.plane(1)
    grid = MapGrid(STACK.shape[1:], stride=16, spacing_xy=(2.0, 3.0), origin_xy=(5.0, -7.0))
    m = (np.random.default_rng(1).standard_normal((2,) + grid.node_shape) * 15).astype(
        np.float32)
    m[0] += 40.0  # some samples leave the section
    whole = render(STACK[1], m, grid, order=order)
    tol = 0 if order < 2 else 1e-6 * 60000  # cubic: prefiltered per region
    np.testing.assert_allclose(render(plane, m, grid, order=order, chunk_px=3000), whole,
                               atol=tol, rtol=0)
    np.testing.assert_allclose(render(plane, m, grid, order=order, rows=(40, 97),
                                      cols=(13, 180)), whole[40:97, 13:180], atol=tol, rtol=0)


@pytest.fixture
def regions_only(monkeypatch):
    """Every section of a lazy stack counts as too large to hold."""
    monkeypatch.setattr(io_base, "WHOLE_SECTION_BYTES", 1024)


def _textured_stack(shifts):
    img = smooth_texture((340, 300), seed=4, sigma=2.0)
    out = [np.roll(img, s, axis=(0, 1)) for s in shifts]
    return (np.stack(out)[:, 20:-20, 20:-20] * 250).astype(np.uint8)


def test_a_stack_of_large_sections_aligns_and_writes_region_by_region(tmp_path, regions_only):
    from hybridreg.outputs import write_stack_sections
    from hybridreg.stack import align_stack

    from test_tiling import Shift

    stack = _textured_stack([(0, 0), (3, -2), (5, 1), (4, 4)])
    io.write_stack(str(tmp_path / "in.tif"), stack, spacing_xyz=(1, 1, 1))
    lazy = io.read_stack(str(tmp_path / "in.tif"), lazy=True).data
    method = TiledMethod(Shift(), tile_px=128, overlap_px=32, coarse_px=128)
    held = align_stack(stack, method, neighbours=2, stride=16)
    regions = align_stack(lazy, method, neighbours=2, stride=16)
    assert lazy.reads == 0  # no section was read whole
    np.testing.assert_array_equal(regions.maps, held.maps)
    assert [p["ncc"] for p in regions.pairs] == [p["ncc"] for p in held.pairs]
    # the aligned stack, written a few chunks (zarr) or a band of tiles (TIFF) at a time
    for out in ("out.zarr", "out.tif"):
        write_stack_sections(str(tmp_path / out), regions.aligned, shape_zyx=stack.shape,
                             dtype=np.uint8, spacing_xyz=(1, 1, 1))
        back = io.read_stack(str(tmp_path / out))
        expected = io.cast_to_dtype(held.aligned, np.uint8)
        np.testing.assert_array_equal(back.data, expected, err_msg=out)
        assert back.spacing_xyz == (1.0, 1.0, 1.0)
    assert lazy.reads == 0
