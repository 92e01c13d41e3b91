"""read_stack and write_stack: dispatch by path, and the checks every format shares."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from hybridreg.io import Stack, StackError, read_stack, write_stack

from iohelpers import SPACING, check_stack, esc, listing, make_stack


def test_2d_inputs_give_one_section(tmp_path):
    img = make_stack(np.uint16, shape=(5, 7))
    path = tmp_path / "page.tif"
    tifffile.imwrite(path, img)  # plain TIFF, no ImageJ metadata
    stack = read_stack(path)
    assert stack.data.shape == (1, 5, 7)
    np.testing.assert_array_equal(stack.data[0], img)
    assert stack.spacing_xyz == (1.0, 1.0, 1.0)
    write_stack(tmp_path / "out.h5", img)
    assert read_stack(tmp_path / "out.h5").data.shape == (1, 5, 7)


def test_write_stack_takes_spacing_from_stack(tmp_path):
    stack = Stack(make_stack(np.float32), spacing_xyz=SPACING)
    write_stack(tmp_path / "s.tif", stack)
    check_stack(read_stack(tmp_path / "s.tif"), stack.data)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(StackError, match=esc(path) + ".*no such file"):
        read_stack(path)


@pytest.mark.parametrize("name", ["bad.tif", "bad.h5", "folder/bad.png",
                                  "bad.zarr/zarr.json"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x00garbage{" * 16)
    target = path.parent if name.startswith(("folder", "bad.zarr")) else path
    named = target if name.startswith("bad.zarr") else path
    with pytest.raises(StackError, match=esc(named) + ".*(corrupt|not a readable)"):
        read_stack(target)


def test_rgb_array_refused_on_write(tmp_path):
    with pytest.raises(StackError, match=esc(tmp_path / "o.tif") + ".*colour.*grayscale"):
        write_stack(tmp_path / "o.tif", np.zeros((8, 9, 3), np.uint8))


def test_4d_data(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["d"] = np.zeros((2, 2, 5, 6), np.uint8)
    with pytest.raises(StackError, match=esc(path) + ".*not a 2D.*4D.*" + esc((2, 2, 5, 6))):
        read_stack(path)
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, np.zeros((2, 2, 5, 6), np.uint8), photometric="minisblack")
    with pytest.raises(StackError, match=esc(tif) + ".*4D.*" + esc((2, 2, 5, 6))):
        read_stack(tif)


@pytest.mark.parametrize("shape,problem", [((0, 5, 7), "0 sections"),
                                           ((2, 0, 7), "zero-size sections")])
def test_empty_stack(tmp_path, shape, problem):
    path = tmp_path / "e.h5"
    with h5py.File(path, "w") as f:
        f["d"] = np.zeros(shape, np.uint8)
    with pytest.raises(StackError, match=esc(path) + ".*empty stack.*" + problem):
        read_stack(path)


def test_nan_names_first_bad_section(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[2, 1, 1] = np.nan
    data[3, 0, 0] = np.inf
    path = tmp_path / "n.h5"
    with h5py.File(path, "w") as f:
        f["d"] = data
    with pytest.raises(StackError, match=esc(path) + ".*NaN or infinite.*section 2"):
        read_stack(path)
    tifffile.imwrite(tmp_path / "s_1.tif", data[0])
    tifffile.imwrite(tmp_path / "s_2.tif", data[3])
    with pytest.raises(StackError, match="NaN or infinite.*section 1.*s_2.tif"):
        read_stack(tmp_path)


@pytest.mark.parametrize("dtype", [bool, np.complex64, np.int64])
def test_unsupported_dtype(tmp_path, dtype):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["d"] = np.zeros((2, 4, 4), dtype)
    name = np.dtype(dtype).name
    with pytest.raises(StackError, match=esc(path) + f".*unsupported dtype {name}"):
        read_stack(path)
    with pytest.raises(StackError, match=esc(tmp_path / "o.tif") + f".*unsupported dtype {name}"):
        write_stack(tmp_path / "o.tif", np.zeros((2, 4, 4), dtype))


def test_unknown_formats(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(StackError, match=esc(tmp_path / "x.png") + ".*unknown stack format"):
        read_stack(tmp_path / "x.png")
    with pytest.raises(StackError, match=esc(tmp_path / "out") + ".*output format"):
        write_stack(tmp_path / "out", np.zeros((1, 4, 4), np.uint8))
    assert listing(tmp_path) == ["x.png"]
