"""Section-by-section writing of OME-Zarr images: markers, resume, refused targets."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg.io import StackError, open_section_writer, read_stack, write_stack

from iohelpers import SPACING
from iohelpers import make_sections as make_stack


def test_section_writer_resumes_an_interrupted_store(tmp_path):
    data = make_stack(z=5)
    store = tmp_path / "out.zarr"
    w = open_section_writer(store, shape_zyx=data.shape, dtype=np.uint8, spacing_xyz=SPACING)
    for k in (0, 3):
        w.write(k, data[k])
    # the run dies here: the store says it is incomplete, and is not read as a stack
    assert w.missing() == [1, 2, 4]
    with pytest.raises(StackError, match="incomplete.*--resume"):
        read_stack(store)
    with pytest.raises(StackError, match="already exists"):
        open_section_writer(store, shape_zyx=data.shape, dtype=np.uint8)
    w = open_section_writer(store, shape_zyx=data.shape, dtype=np.uint8, spacing_xyz=SPACING,
                            resume=True)
    assert w.missing() == [1, 2, 4]  # the sections written before are kept
    with pytest.raises(StackError, match="not written yet"):
        w.close()
    for k in w.missing():
        w.write(k, data[k].astype(np.float32))  # cast back to the store's dtype
    w.close()
    straight = tmp_path / "straight" / "out.zarr"
    write_stack(straight, data, spacing_xyz=SPACING)
    np.testing.assert_array_equal(read_stack(store).data, data)
    for name in (".zattrs", ".zgroup", "0/.zarray"):  # the same store as written whole
        assert (store / name).read_text() == (straight / name).read_text()
    # another shape cannot be resumed: started over
    w = open_section_writer(store, shape_zyx=(2, 32, 40), dtype=np.uint8, resume=True)
    assert w.missing() == [0, 1]


def test_section_writer_refuses_bad_targets(tmp_path):
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(StackError, match="not a zarr store"):
        open_section_writer(tmp_path / "folder.zarr", shape_zyx=(2, 4, 4), dtype=np.uint8,
                            overwrite=True)
    with pytest.raises(StackError, match="bare 'store.zarr'"):
        open_section_writer(f"{tmp_path / 'x.zarr'}:/a", shape_zyx=(2, 4, 4), dtype=np.uint8)
    with pytest.raises(StackError, match="input"):
        open_section_writer(tmp_path / "in.zarr", shape_zyx=(2, 4, 4), dtype=np.uint8,
                            inputs=[tmp_path / "in.zarr"])
    w = open_section_writer(tmp_path / "w.zarr", shape_zyx=(2, 4, 4), dtype=np.float32)
    with pytest.raises(StackError, match="NaN"):
        w.write(0, np.full((4, 4), np.nan))
    with pytest.raises(StackError, match="shape"):
        w.write(0, np.zeros((4, 5)))
