"""Lazy reading (read_stack(lazy=True)): one section at a time, in every format."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from hybridreg.io import LazySections, StackError, read_stack, write_stack
from hybridreg.stack import align_stack

from helpers import PhaseCorrelation
from iohelpers import SPACING
from iohelpers import make_sections as make_stack


class ChunkReads:
    """Counts the chunk keys zarr reads from local stores (metadata excluded)."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        get = zarr.storage.LocalStore.get

        async def counting_get(store, key, *args, **kwargs):
            if not key.rsplit("/", 1)[-1].startswith((".z", "zarr.json")):
                self.keys.append(key)
            return await get(store, key, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)


def test_lazy_zarr_reads_only_the_sections_asked_for(tmp_path, monkeypatch):
    data = make_stack(z=6)
    write_stack(tmp_path / "vol.zarr", data, spacing_xyz=SPACING)
    reads = ChunkReads(monkeypatch)
    st = read_stack(tmp_path / "vol.zarr", lazy=True)
    assert isinstance(st.data, LazySections) and "lazy" in repr(st)
    assert st.data.shape == data.shape and st.data.dtype == np.uint8
    assert reads.keys == []  # opening reads metadata only
    np.testing.assert_array_equal(st.data[4], data[4])
    assert reads.keys == ["0/4/0/0"]  # one chunk: section 4
    np.testing.assert_array_equal(st.data[1:3, 2:5], data[1:3, 2:5])
    assert reads.keys == ["0/4/0/0", "0/1/0/0", "0/2/0/0"]
    assert st.data.reads == 3
    # a worker gets the path, not an open store, and reads for itself
    again = pickle.loads(pickle.dumps(st.data))
    np.testing.assert_array_equal(again[5], data[5])
    np.testing.assert_array_equal(np.asarray(again), data)


@pytest.mark.parametrize("kind", ["h5", "tif", "folder", "zarr-array"])
def test_lazy_reading_of_every_format_matches_eager(tmp_path, kind):
    data = make_stack(z=4, dtype=np.uint16)
    path = {"h5": f"{tmp_path / 'v.h5'}:/raw", "tif": tmp_path / "v.tif",
            "folder": f"{tmp_path / 'sections'}/", "zarr-array": f"{tmp_path / 'v.zarr'}:/a"}[kind]
    write_stack(path, data, spacing_xyz=SPACING)
    eager, lazy = read_stack(path), read_stack(path, lazy=True)
    assert isinstance(lazy.data, LazySections)
    assert lazy.spacing_xyz == eager.spacing_xyz == pytest.approx(SPACING)
    np.testing.assert_array_equal(lazy.data[2], data[2])
    assert lazy.data.reads == 1
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(lazy.data))), data)


def test_lazy_nan_is_found_when_read_and_refused_by_align(tmp_path):
    data = make_stack(z=4, dtype=np.float32)
    data[2, 3, 3] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["data"] = data
    st = read_stack(tmp_path / "nan.h5", lazy=True)  # nothing read yet: no error
    np.testing.assert_array_equal(st.data[1], data[1])
    with pytest.raises(StackError, match="NaN.*section 2"):
        st.data[2]
    with pytest.raises(ValueError, match="section 2 .*NaN"):
        align_stack(st.data, PhaseCorrelation())


def test_lazy_tiff_section_is_one_page(tmp_path):
    data = make_stack(z=3)
    tifffile.imwrite(tmp_path / "pages.tif", data, photometric="minisblack")
    st = read_stack(tmp_path / "pages.tif", lazy=True)
    np.testing.assert_array_equal(st.data[-1], data[2])
    with pytest.raises(IndexError, match="out of range"):
        st.data[3]
