"""OME-Zarr metadata: NGFF v0.4 written and read, foreign and v0.5 images read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from hybridreg.io import StackError, read_stack, write_stack

from iohelpers import SPACING
from iohelpers import make_sections as make_stack


def test_ome_zarr_metadata_round_trip(tmp_path):
    data = make_stack()
    store = tmp_path / "vol.zarr"
    write_stack(store, data, spacing_xyz=SPACING, unit="nanometer")
    attrs = json.loads((store / ".zattrs").read_text())
    assert json.loads((store / ".zgroup").read_text())["zarr_format"] == 2
    [ms] = attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [50.0, 4.0, 3.5]}]}]
    zarray = json.loads((store / "0" / ".zarray").read_text())
    assert zarray["chunks"] == [1, 32, 40]  # one section per chunk along z
    assert zarray["dimension_separator"] == "/"
    back = read_stack(store)
    np.testing.assert_array_equal(back.data, data)
    assert back.spacing_xyz == SPACING and back.unit == "nanometer"
    # unknown unit: left out of the axes; z spacing 1 unless given
    write_stack(tmp_path / "plain.zarr", data)
    ms = json.loads((tmp_path / "plain.zarr" / ".zattrs").read_text())["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"])
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]
    assert read_stack(tmp_path / "plain.zarr").unit is None


def test_reads_level_0_and_scale_of_a_foreign_ome_zarr(tmp_path):
    """NGFF v0.4 with a c axis of length 1, two levels and a multiscale-wide scale."""
    data = make_stack(z=3)
    store = tmp_path / "foreign.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=2)
    g.create_array("s0", data=data[None])
    g.create_array("s1", data=data[None, :, ::2, ::2])
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    g.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes,
        "datasets": [{"path": "s0", "coordinateTransformations": [
                         {"type": "scale", "scale": [1, 0.05, 0.004, 0.004]}]},
                     {"path": "s1", "coordinateTransformations": [
                         {"type": "scale", "scale": [1, 0.05, 0.008, 0.008]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 1, 1]}]}]
    for lazy in (False, True):
        st = read_stack(store, lazy=lazy)
        np.testing.assert_array_equal(np.asarray(st.data), data)
        assert st.spacing_xyz == pytest.approx((0.004, 0.004, 0.1))
        assert st.unit == "micrometer"


def test_reads_ome_zarr_v05(tmp_path):
    data = make_stack(z=2)
    store = tmp_path / "v05.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.create_array("0", data=data)
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [30.0, 2.0, 1.5]}]}]}]}
    st = read_stack(store)
    np.testing.assert_array_equal(st.data, data)
    assert st.spacing_xyz == (1.5, 2.0, 30.0)


@pytest.mark.parametrize("axes, shape, problem", [
    (["z", "x", "y"], (2, 8, 8), "end in y, x"),
    (["t", "z", "y", "x"], (2, 2, 8, 8), "length 1"),
])
def test_unsupported_ome_axes_are_refused(tmp_path, axes, shape, problem):
    store = tmp_path / "bad.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=2)
    g.create_array("0", shape=shape, dtype="uint8")
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in axes],
                               "datasets": [{"path": "0"}]}]
    with pytest.raises(StackError, match=problem):
        read_stack(store)
