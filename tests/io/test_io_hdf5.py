"""HDF5 stacks: round trips, ilastik spacing, datasets in existing files."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from hybridreg.io import StackError, read_stack, write_stack

from iohelpers import DTYPES, SPACING, check_stack, esc, listing, make_stack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".h5", ".hdf5:/group/raw"])
def test_hdf5_round_trip(tmp_path, dtype, suffix):
    data = make_stack(dtype)
    spec = f"{tmp_path / 'vol'}{suffix}"
    write_stack(spec, data, spacing_xyz=SPACING)
    check_stack(read_stack(spec), data)


def test_hdf5_ilastik_spacing_and_float64(tmp_path):
    path = tmp_path / "ilastik.h5"
    data = make_stack(np.float64)
    with h5py.File(path, "w") as f:
        f.create_dataset("exported_data", data=data).attrs["element_size_um"] = (50.0, 4.0, 3.5)
    stack = read_stack(path)  # bare path: the file holds exactly one dataset
    assert stack.data.dtype == np.float32
    np.testing.assert_allclose(stack.data, data, rtol=1e-6)
    assert stack.spacing_xyz == (3.5, 4.0, 50.0)


def test_hdf5_second_dataset_in_existing_file_keeps_first(tmp_path):
    raw, aligned = make_stack(np.uint8, seed=1), make_stack(np.uint8, seed=2)
    file = tmp_path / "vol.h5"
    write_stack(f"{file}:/raw", raw)
    # writing another dataset into the input's file is allowed: it does not overwrite /raw
    write_stack(f"{file}:/aligned", aligned, inputs=[f"{file}:/raw"])
    np.testing.assert_array_equal(read_stack(f"{file}:/raw").data, raw)
    np.testing.assert_array_equal(read_stack(f"{file}:/aligned").data, aligned)
    with pytest.raises(StackError, match=esc(file) + ".*already exists"):
        write_stack(f"{file}:/aligned", raw)
    write_stack(f"{file}:/aligned", raw, overwrite=True)
    np.testing.assert_array_equal(read_stack(f"{file}:/aligned").data, raw)
    assert listing(tmp_path) == ["vol.h5"]


def test_missing_hdf5_dataset_names_existing(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((2, 4, 4), np.uint8)
        f["labels/cells"] = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(StackError, match=esc(path) + ".*no dataset '/aligned'.*'/raw'"):
        read_stack(f"{path}:/aligned")
    with pytest.raises(StackError, match=esc(path) + ".*2 datasets.*'/labels/cells'"):
        read_stack(path)
