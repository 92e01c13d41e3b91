"""zarr and OME-Zarr: lazy reading, NGFF metadata, section-by-section writing and resume."""
from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from hybridreg import cli, io, phantom
from hybridreg.io import LazySections, StackError, open_section_writer, read_stack, write_stack
from hybridreg.stack import AlignedSections, align_stack, apply_fields, save_alignment

from helpers import PhaseCorrelation

SPACING = (3.5, 4.0, 50.0)


def make_stack(z=5, shape=(32, 40), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (z,) + shape).astype(dtype)


@pytest.fixture(scope="module")
def shifted():
    """Five shifted copies of a phantom section (uint8), and the shifts."""
    section = phantom.make_phantom(sections=1, shape_yx=(48, 48), seed=2).stack[0]
    shifts = [(0, 0), (2, -1), (-3, 2), (1, 3), (-2, -2)]
    return np.stack([np.roll(section, (-dy, -dx), axis=(0, 1)) for dx, dy in shifts])


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


# --- OME-Zarr metadata ----------------------------------------------------------------------

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


# --- lazy reading ---------------------------------------------------------------------------

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


# --- section-by-section writing -------------------------------------------------------------

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


# --- alignment of a lazy stack into zarr ----------------------------------------------------

def test_lazy_alignment_into_zarr_equals_the_in_memory_one(shifted, tmp_path, monkeypatch):
    write_stack(tmp_path / "in.zarr", shifted, spacing_xyz=(2.0, 2.0, 40.0), unit="nanometer")
    eager = align_stack(shifted, PhaseCorrelation(), spacing_xy=(2.0, 2.0), neighbours=2)
    st = read_stack(tmp_path / "in.zarr", lazy=True)

    def never(*args, **kwargs):
        raise AssertionError("the whole stack was read at once")

    monkeypatch.setattr(LazySections, "__array__", never)
    r = align_stack(st.data, PhaseCorrelation(), spacing_xy=(2.0, 2.0), neighbours=2,
                    work_dir=tmp_path / "work")
    assert isinstance(r.aligned, AlignedSections)
    np.testing.assert_array_equal(r.fields, eager.fields)
    save_alignment(r, out=tmp_path / "aligned.zarr", dtype=np.uint8,
                   spacing_xyz=st.spacing_xyz, unit=st.unit)
    monkeypatch.undo()
    back = read_stack(tmp_path / "aligned.zarr")
    np.testing.assert_array_equal(back.data, io.cast_to_dtype(eager.aligned, np.uint8))
    assert back.spacing_xyz == (2.0, 2.0, 40.0) and back.unit == "nanometer"


def interrupt_writes(monkeypatch, *, after: int):
    """Make SectionWriter.write raise KeyboardInterrupt after ``after`` sections; returns the
    original method (to put back)."""
    write = io.SectionWriter.write
    calls = []

    def dies(self, k, section):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(k)
        write(self, k, section)

    monkeypatch.setattr(io.SectionWriter, "write", dies)
    return write


def test_interrupted_zarr_output_is_resumed_identically(shifted, tmp_path, monkeypatch):
    r = align_stack(shifted, PhaseCorrelation(), neighbours=2)
    save_alignment(r, out=tmp_path / "straight.zarr")
    write = interrupt_writes(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        save_alignment(r, out=tmp_path / "resumed.zarr")
    monkeypatch.undo()
    with pytest.raises(StackError, match="incomplete"):
        read_stack(tmp_path / "resumed.zarr")
    written = []
    monkeypatch.setattr(io.SectionWriter, "write",
                        lambda self, k, s: (written.append(k), write(self, k, s)))
    save_alignment(r, out=tmp_path / "resumed.zarr", resume=True)
    assert written == [2, 3, 4]  # only the sections the interruption left out
    np.testing.assert_array_equal(read_stack(tmp_path / "resumed.zarr").data,
                                  read_stack(tmp_path / "straight.zarr").data)


def test_cli_align_zarr_to_zarr_and_resume(shifted, tmp_path, monkeypatch, capsys):
    import functools

    from hybridreg import stack

    monkeypatch.setattr(cli, "_method", lambda args: PhaseCorrelation())
    # the ITK transform files are tested in test_cli_align; here they would only load itk
    monkeypatch.setattr(stack, "save_alignment",
                        functools.partial(stack.save_alignment, transforms=False))
    write_stack(tmp_path / "in.zarr", shifted, spacing_xyz=(1.0, 1.0, 30.0), unit="nanometer")

    def align(name, *extra):
        return cli.main(["align", str(tmp_path / "in.zarr"), "--out",
                         str(tmp_path / f"{name}.zarr"), "--fields-out",
                         str(tmp_path / name), "--neighbours", "2", "--no-progress", *extra])

    assert align("straight") == 0
    straight = read_stack(tmp_path / "straight.zarr")
    assert straight.data.dtype == np.uint8 and straight.spacing_xyz == (1.0, 1.0, 30.0)
    assert straight.unit == "nanometer"
    # killed while writing the aligned stack (after all pairs were registered)
    write = interrupt_writes(monkeypatch, after=2)
    assert align("resumed") == 130
    monkeypatch.setattr(io.SectionWriter, "write", write)
    assert (tmp_path / "resumed" / "work").is_dir()
    assert align("resumed") == 2  # not without --resume
    assert "--resume" in capsys.readouterr().err
    assert align("resumed", "--resume") == 0
    np.testing.assert_array_equal(read_stack(tmp_path / "resumed.zarr").data, straight.data)
    np.testing.assert_array_equal(io.read_fields(tmp_path / "resumed")[0],
                                  io.read_fields(tmp_path / "straight")[0])
    assert not (tmp_path / "resumed" / "work").exists()
    # a finished output is not replaced without --overwrite
    assert align("straight") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_apply_writes_zarr_section_by_section(shifted, tmp_path):
    write_stack(tmp_path / "in.zarr", shifted)
    r = align_stack(shifted, PhaseCorrelation(), neighbours=1)
    save_alignment(r, fields_out=tmp_path / "fields", transforms=False)
    assert cli.main(["apply", str(tmp_path / "in.zarr"), "--fields", str(tmp_path / "fields"),
                     "--out", str(tmp_path / "applied.zarr"), "--nearest"]) == 0
    np.testing.assert_array_equal(read_stack(tmp_path / "applied.zarr").data,
                                  apply_fields(shifted, r.fields, order=0))
