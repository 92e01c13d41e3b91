"""Tests for hybridreg.io: stacks and fields in and out of files."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import zarr

from hybridreg import io
from hybridreg.io import (Stack, StackError, atomic_output, field_path, read_field,
                          read_fields, read_stack, section_from_itk, section_to_itk,
                          write_field, write_fields, write_stack)

DTYPES = [np.uint8, np.uint16, np.float32]
SPACING = (3.5, 4.0, 50.0)


def make_stack(dtype, shape=(3, 5, 7), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def esc(path) -> str:
    return re.escape(str(path))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def check_stack(stack: Stack, data: np.ndarray, spacing=SPACING):
    assert isinstance(stack, Stack)
    assert stack.data.dtype == data.dtype
    assert stack.data.shape == data.shape
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing_xyz == pytest.approx(spacing, rel=1e-7)


# --- round trips ------------------------------------------------------------------------------

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


@pytest.mark.parametrize("dtype", DTYPES)
def test_folder_round_trip(tmp_path, dtype):
    data = make_stack(dtype)
    out = tmp_path / "sections"
    write_stack(f"{out}/", data, spacing_xyz=SPACING)
    assert listing(out) == ["section_0000.tif", "section_0001.tif", "section_0002.tif"]
    check_stack(read_stack(out), data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".h5", ".hdf5:/group/raw"])
def test_hdf5_round_trip(tmp_path, dtype, suffix):
    data = make_stack(dtype)
    spec = f"{tmp_path / 'vol'}{suffix}"
    write_stack(spec, data, spacing_xyz=SPACING)
    check_stack(read_stack(spec), data)


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
    else:  # a bare store: an OME-Zarr image (tests/test_zarr.py checks its metadata)
        scale = stored.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert scale[0]["scale"] == list(SPACING[::-1])


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


def test_zarr_second_array_in_existing_store(tmp_path):
    store = tmp_path / "vol.zarr"
    a, b = make_stack(np.uint16, seed=1), make_stack(np.uint16, seed=2)
    write_stack(f"{store}:/raw", a)
    write_stack(f"{store}:/deep/group/b", b, spacing_xyz=SPACING)
    np.testing.assert_array_equal(read_stack(f"{store}:/raw").data, a)
    check_stack(read_stack(f"{store}:/deep/group/b"), b)
    assert not [n for n in os.listdir(store / "deep" / "group") if n.startswith(".")]


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


def test_tiff_dpi_resolution_is_not_spacing(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, make_stack(np.uint8), photometric="minisblack",
                     resolution=(72, 72))  # unit: inch (a dpi default)
    assert read_stack(path).spacing_xyz == (1.0, 1.0, 1.0)


def test_write_stack_takes_spacing_from_stack(tmp_path):
    stack = Stack(make_stack(np.float32), spacing_xyz=SPACING)
    write_stack(tmp_path / "s.tif", stack)
    check_stack(read_stack(tmp_path / "s.tif"), stack.data)


def test_folder_natural_sort_and_png(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in (10, 2, 1, 33):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 6), k * 1000, np.uint16)),
                        str(folder / f"section_{k}.png"))
    (folder / "notes.txt").write_text("not an image")
    stack = read_stack(folder)
    assert stack.data.dtype == np.uint16
    assert stack.data[:, 0, 0].tolist() == [1000, 2000, 10000, 33000]


# --- bad inputs -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(StackError, match=esc(path) + ".*no such file"):
        read_stack(path)


def test_missing_hdf5_dataset_names_existing(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((2, 4, 4), np.uint8)
        f["labels/cells"] = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(StackError, match=esc(path) + ".*no dataset '/aligned'.*'/raw'"):
        read_stack(f"{path}:/aligned")
    with pytest.raises(StackError, match=esc(path) + ".*2 datasets.*'/labels/cells'"):
        read_stack(path)


def test_missing_zarr_array_names_existing(tmp_path):
    store = tmp_path / "v.zarr"
    write_stack(f"{store}:/raw", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(StackError, match=esc(store) + ".*no array '/x'.*'/raw'"):
        read_stack(f"{store}:/x")


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


def test_rgb_tiff(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(StackError, match=esc(path) + ".*colour.*RGB.*grayscale"):
        read_stack(path)


def test_colour_png_in_folder(tmp_path):
    (tmp_path / "f").mkdir()
    path = tmp_path / "f" / "s0.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 3), np.uint8), isVector=True),
                    str(path))
    with pytest.raises(StackError, match=esc(path) + ".*colour.*grayscale"):
        read_stack(tmp_path / "f")


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


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackError, match=esc(tmp_path / "empty") + ".*empty stack.*no images"):
        read_stack(tmp_path / "empty")


def test_folder_sections_of_different_shapes(tmp_path):
    for k, shape in enumerate([(5, 7), (5, 7), (6, 7)]):
        tifffile.imwrite(tmp_path / f"s{k}.tif", np.zeros(shape, np.uint8))
    with pytest.raises(StackError, match=esc(tmp_path / "s2.tif")
                       + r".*\(6, 7\).*s0\.tif.*\(5, 7\)"):
        read_stack(tmp_path)


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


# --- overwrite, inputs, atomicity -------------------------------------------------------------

def test_overwrite_refused(tmp_path):
    path = tmp_path / "s.tif"
    first, second = make_stack(np.uint8, seed=1), make_stack(np.uint8, seed=2)
    write_stack(path, first)
    with pytest.raises(StackError, match=esc(path) + ".*already exists.*overwrite=True"):
        write_stack(path, second)
    np.testing.assert_array_equal(read_stack(path).data, first)
    write_stack(path, second, overwrite=True)
    np.testing.assert_array_equal(read_stack(path).data, second)
    assert listing(tmp_path) == ["s.tif"]


def test_folder_overwrite_only_replaces_image_folders(tmp_path):
    out = tmp_path / "out"
    write_stack(f"{out}/", make_stack(np.uint8, shape=(3, 4, 4)))
    write_stack(out, make_stack(np.uint8, shape=(2, 4, 4)), overwrite=True)
    assert listing(out) == ["section_0000.tif", "section_0001.tif"]
    (out / "notes.txt").write_text("precious")
    with pytest.raises(StackError, match=esc(out) + ".*notes.txt.*refusing"):
        write_stack(out, make_stack(np.uint8), overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"


def test_writing_onto_input_refused_even_with_overwrite(tmp_path):
    path = tmp_path / "in.tif"
    data = make_stack(np.uint16)
    write_stack(path, data)
    stack = read_stack(path)
    for inputs in ([path], [str(path)], [stack]):
        with pytest.raises(StackError, match=esc(path) + ".*overwrite the input"):
            write_stack(path, data * 0, overwrite=True, inputs=inputs)
    np.testing.assert_array_equal(read_stack(path).data, data)
    folder = tmp_path / "sections"
    write_stack(f"{folder}/", data)
    with pytest.raises(StackError, match="overwrite the input.*" + esc(folder)):
        write_stack(folder / "inside.tif", data, overwrite=True, inputs=[folder])
    h5 = tmp_path / "v.h5"
    write_stack(f"{h5}:/raw", data)
    with pytest.raises(StackError, match="overwrite the input"):
        write_stack(h5, data, overwrite=True, inputs=[f"{h5}:/raw"])


def _partial_then_fail(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tifffile, "imwrite", _partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_stack(tmp_path / "s.tif", make_stack(np.uint8))
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.tif"
    old = make_stack(np.uint8)
    write_stack(path, old)
    monkeypatch.setattr(tifffile, "imwrite", _partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_stack(path, old + 1, overwrite=True)
    monkeypatch.undo()
    assert listing(tmp_path) == ["s.tif"]
    np.testing.assert_array_equal(read_stack(path).data, old)


def test_failed_folder_write_midway_leaves_nothing(tmp_path, monkeypatch):
    real, calls = tifffile.imwrite, []

    def fail_on_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            _partial_then_fail(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_stack(f"{tmp_path / 'out'}/", make_stack(np.uint8, shape=(5, 4, 4)))
    assert len(calls) == 3
    assert listing(tmp_path) == []


def test_atomic_output(tmp_path):
    final = tmp_path / "sub" / "r.txt"
    with atomic_output(final) as tmp:
        assert tmp.parent == final.parent and tmp.suffix == ".txt" and not tmp.exists()
        tmp.write_text("done")
    assert final.read_text() == "done"
    with pytest.raises(RuntimeError):
        with atomic_output(final, overwrite=True) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert final.read_text() == "done" and listing(final.parent) == ["r.txt"]
    with pytest.raises(StackError, match=esc(final) + ".*nothing was written"):
        with atomic_output(final, overwrite=True):
            pass
    with pytest.raises(StackError, match=esc(final) + ".*already exists"):
        with atomic_output(final):
            pass


# --- fields -----------------------------------------------------------------------------------

def make_field(shape_yx=(5, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(2, *shape_yx)).astype(np.float32)


def test_field_path():
    assert field_path("d", 0).as_posix() == "d/section_0000.mha"
    assert field_path("d", 42).name == "section_0042.mha"
    assert field_path("d", 12345).name == "section_12345.mha"
    with pytest.raises(ValueError):
        field_path("d", -1)


def test_field_round_trip_and_itk_reads_it(tmp_path):
    import itk

    u = make_field()
    path = tmp_path / "f.mha"
    write_field(path, u, spacing_xy=(3.5, 4.0), origin_xy=(10.0, -5.0))
    v, spacing, origin = read_field(path)
    assert v.dtype == np.float32 and v.shape == (2, 5, 7)
    np.testing.assert_array_equal(v, u)
    assert spacing == (3.5, 4.0) and origin == (10.0, -5.0)
    img = itk.imread(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 2
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)  # (x, y)
    np.testing.assert_array_equal(np.moveaxis(itk.array_from_image(img), -1, 0), u)
    assert tuple(img.GetSpacing()) == (3.5, 4.0) and tuple(img.GetOrigin()) == (10.0, -5.0)
    with pytest.raises(StackError, match=esc(path) + ".*already exists"):
        write_field(path, u)


def test_fields_round_trip_and_checks(tmp_path):
    fields = np.stack([make_field(seed=k) for k in range(3)])
    out = tmp_path / "fields"
    write_fields(out, fields, spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5))
    assert listing(out) == ["section_0000.mha", "section_0001.mha", "section_0002.mha"]
    got, spacing, origin = read_fields(out)
    np.testing.assert_array_equal(got, fields)
    assert spacing == (2.0, 3.0) and origin == (1.0, 1.5)
    with pytest.raises(StackError, match=esc(out / "section_0000.mha") + ".*already exists"):
        write_fields(out, fields, spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5))
    # overwrite with fewer fields removes the stale ones
    write_fields(out, fields[:2], spacing_xy=(2.0, 3.0), origin_xy=(1.0, 1.5), overwrite=True)
    assert read_fields(out)[0].shape == (2, 2, 5, 7)
    write_field(field_path(out, 1), fields[1], spacing_xy=(2.0, 9.0), origin_xy=(1.0, 1.5),
                overwrite=True)
    with pytest.raises(StackError, match=esc(out / "section_0001.mha") + ".*grid.*differs"):
        read_fields(out)
    write_field(field_path(out, 3), fields[0])
    (out / "section_0001.mha").unlink()
    with pytest.raises(StackError, match=esc(out) + ".*not contiguous.*section 1 is missing"):
        read_fields(out)


def test_bad_fields(tmp_path):
    with pytest.raises(StackError, match=esc(tmp_path / "f.mha") + r".*\(2, H, W\)"):
        write_field(tmp_path / "f.mha", np.zeros((3, 4, 4), np.float32))
    nan = make_field()
    nan[1, 2, 2] = np.nan
    with pytest.raises(StackError, match=esc(tmp_path / "f.mha") + ".*NaN"):
        write_field(tmp_path / "f.mha", nan)
    with pytest.raises(StackError, match=esc(tmp_path / "f.nii") + ".*mha"):
        write_field(tmp_path / "f.nii", make_field())
    scalar = tmp_path / "scalar.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(scalar))
    with pytest.raises(StackError, match=esc(scalar) + ".*1 components"):
        read_field(scalar)
    with pytest.raises(StackError, match=esc(tmp_path / "none") + ".*no such folder"):
        read_fields(tmp_path / "none")
    assert listing(tmp_path) == ["scalar.mha"]


def test_failed_field_write_leaves_nothing(tmp_path, monkeypatch):
    def partial(image, path, *args):
        open(path, "wb").write(b"half")
        raise RuntimeError("itk write failed")

    monkeypatch.setattr(sitk, "WriteImage", partial)
    with pytest.raises(RuntimeError, match="itk write failed"):
        write_field(tmp_path / "f.mha", make_field())
    assert listing(tmp_path) == []


# --- ITK sections -----------------------------------------------------------------------------

def test_section_itk_round_trip():
    import itk

    section = make_stack(np.float32, shape=(5, 7))
    img = section_to_itk(section, spacing_xy=(3.5, 4.0), origin_xy=(10.0, -5.0))
    assert tuple(img.GetLargestPossibleRegion().GetSize()) == (7, 5)  # (x, y) = (W, H)
    assert img.GetPixel([6, 1]) == section[1, 6]  # ITK index (x, y) = array [y, x]
    assert tuple(img.TransformIndexToPhysicalPoint([2, 3])) == (10.0 + 2 * 3.5, -5.0 + 3 * 4.0)
    assert np.allclose(np.asarray(img.GetDirection()), np.eye(2))
    arr, spacing, origin = section_from_itk(img)
    np.testing.assert_array_equal(arr, section)
    assert arr.dtype == np.float32
    assert spacing == (3.5, 4.0) and origin == (10.0, -5.0)
    u8 = section_to_itk(make_stack(np.uint8, (4, 4)), dtype=None)
    assert section_from_itk(u8)[0].dtype == np.uint8
    with pytest.raises(ValueError, match=r"2D array \(H, W\)"):
        section_to_itk(np.zeros((2, 4, 4)))
    assert isinstance(itk.image_from_array(arr), type(img))


def test_import_is_lazy():
    code = ("import sys, hybridreg.io; "
            "print(sorted(m for m in ('itk', 'SimpleITK', 'torch', 'tifffile', 'h5py', 'zarr') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    assert io.__all__ and all(hasattr(io, name) for name in io.__all__)
