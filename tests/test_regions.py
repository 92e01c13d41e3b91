"""Sections too large to hold: region reads, rendering and writing region by region.

Sections over ``hybridreg.io.WHOLE_SECTION_BYTES`` are never read whole: the tiles, the
coarse pass, the pair NCC, rendering and the writers read and write only the regions they
work on. Here the limit is lowered so that small stacks take that path, and every result is
compared with the whole-section path.
"""
from __future__ import annotations

from pathlib import Path

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


# --- the joint solve and the maps, out of memory --------------------------------------------

@pytest.mark.parametrize("mode", ["joint", "node-weights", "sequential"])
def test_maps_on_disk_and_a_blocked_solve_give_the_in_memory_result(tmp_path, monkeypatch,
                                                                     mode):
    """Past MAPS_IN_MEMORY_BYTES every pair's and section's map (and node weights) lives on
    disk and the joint solve runs a few rows of nodes at a time: the same maps, the same
    outputs, and a resumed run the same again."""
    import hybridreg.joint as joint
    import hybridreg.stack as stack_mod
    from hybridreg.outputs import read_transforms
    from hybridreg.outputs import save_alignment
    from hybridreg.stack import MapStack, align_stack

    from test_tiling import Shift

    stack = _textured_stack([(0, 0), (3, -2), (5, 1), (4, 4), (6, 2)])
    kw = {"joint": {"neighbours": 2}, "node-weights": {"neighbours": 2, "node_weights": True},
          "sequential": {"drift_window": 3}}[mode]
    mode = "sequential" if mode == "sequential" else "joint"
    held = align_stack(stack, Shift(), mode=mode, stride=8, **kw)
    monkeypatch.setattr(stack_mod, "MAPS_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(joint, "SOLVE_BLOCK_BYTES", 1)  # one row of nodes a block
    disk = align_stack(stack, Shift(), mode=mode, stride=8, work_dir=tmp_path / "work", **kw)
    assert isinstance(disk.maps, MapStack) and disk.maps.path.startswith(str(tmp_path))
    np.testing.assert_allclose(np.asarray(disk.maps), held.maps, atol=2 ** -8, rtol=0)
    np.testing.assert_allclose(disk.aligned, held.aligned, atol=0.05)
    save_alignment(disk, out=str(tmp_path / "out.tif"), fields_out=tmp_path / "tf",
                   spacing_xyz=(1, 1, 1), dtype=np.uint8)
    maps, grid = read_transforms(tmp_path / "tf")
    np.testing.assert_array_equal(maps, np.asarray(disk.maps))
    if kw.get("node_weights"):  # resumed: every pair and its node weights from the folder
        assert len(list((tmp_path / "work").glob("*.confidence.npy"))) == 7
        again = align_stack(stack, Shift(), mode=mode, stride=8, work_dir=tmp_path / "work",
                            **kw)
        np.testing.assert_array_equal(np.asarray(again.maps), np.asarray(disk.maps))
    # without a work folder the maps go to a temporary folder, removed with them
    temp = align_stack(stack, Shift(), mode=mode, stride=8, **kw)
    folder = Path(temp.maps.path).parent
    assert folder.exists()
    del temp
    import gc

    gc.collect()
    assert not folder.exists()


def test_the_joint_solve_by_blocks_equals_the_whole_solve():
    from scipy import ndimage

    from hybridreg.joint import solve_joint

    rng = np.random.default_rng(0)
    z, h, w = 6, 40, 33
    pairs = {}
    for i in range(z):
        for j in range(i + 1, min(z, i + 3)):
            v = np.stack([ndimage.gaussian_filter(rng.standard_normal((h, w)), 4) * 30
                          for _ in range(2)]).astype(np.float32)
            v[0] += 3 * (j - i)
            pairs[(i, j)] = v
    pairs[(1, 2)] = pairs[(1, 2)] * 5 + 20  # a bad pair: the robust weights must agree
    whole = solve_joint(pairs, z, spacing_xy=(2.0, 3.0), stride=8)
    for max_bytes in (30000, 1):
        blocks = solve_joint(pairs, z, spacing_xy=(2.0, 3.0), stride=8, max_bytes=max_bytes)
        np.testing.assert_allclose(blocks.fields, whole.fields, atol=1e-4, rtol=0)
        for p in pairs:
            assert blocks.pair_weight[p] == pytest.approx(whole.pair_weight[p], abs=1e-6)
            assert blocks.pair_residual_px[p] == pytest.approx(whole.pair_residual_px[p],
                                                               abs=1e-4)
    assert whole.pair_weight[(1, 2)] < 0.1 < min(whole.pair_weight[p] for p in pairs
                                                  if p != (1, 2))
