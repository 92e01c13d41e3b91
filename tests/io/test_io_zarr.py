"""zarr stacks: round trips of OME-Zarr images and plain arrays, arrays in existing stores."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from hybridreg.io import StackError, read_stack, write_stack

from iohelpers import DTYPES, SPACING, check_stack, esc, make_stack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", ["", ":/group/aligned"])
def test_zarr_round_trip(tmp_path, dtype, inner):
    data = make_stack(dtype)
    spec = f"{tmp_path / 'vol.zarr'}{inner}"
    write_stack(spec, data, spacing_xyz=SPACING)
    check_stack(read_stack(spec), data)
    stored = zarr.open(str(tmp_path / "vol.zarr"), mode="r")
    if inner:  # a named array: a plain zarr array with a spacing_xyz attribute
        stored = stored[inner.lstrip(":/")]
        assert list(stored.attrs["spacing_xyz"]) == list(SPACING)
    else:  # a bare store: an OME-Zarr image (tests/io/test_io_ome_zarr.py checks its metadata)
        scale = stored.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert scale[0]["scale"] == list(SPACING[::-1])


def test_zarr_second_array_in_existing_store(tmp_path):
    store = tmp_path / "vol.zarr"
    a, b = make_stack(np.uint16, seed=1), make_stack(np.uint16, seed=2)
    write_stack(f"{store}:/raw", a)
    write_stack(f"{store}:/deep/group/b", b, spacing_xyz=SPACING)
    np.testing.assert_array_equal(read_stack(f"{store}:/raw").data, a)
    check_stack(read_stack(f"{store}:/deep/group/b"), b)
    assert not [n for n in os.listdir(store / "deep" / "group") if n.startswith(".")]


def test_missing_zarr_array_names_existing(tmp_path):
    store = tmp_path / "v.zarr"
    write_stack(f"{store}:/raw", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(StackError, match=esc(store) + ".*no array '/x'.*'/raw'"):
        read_stack(f"{store}:/x")
