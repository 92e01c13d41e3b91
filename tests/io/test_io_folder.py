"""Image folders: round trips, natural order, PNG, shapes and overwriting."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from hybridreg.io import StackError, read_stack, write_stack

from iohelpers import DTYPES, SPACING, check_stack, esc, listing, make_stack


@pytest.mark.parametrize("dtype", DTYPES)
def test_folder_round_trip(tmp_path, dtype):
    data = make_stack(dtype)
    out = tmp_path / "sections"
    write_stack(f"{out}/", data, spacing_xyz=SPACING)
    assert listing(out) == ["section_0000.tif", "section_0001.tif", "section_0002.tif"]
    check_stack(read_stack(out), data)


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


def test_colour_png_in_folder(tmp_path):
    (tmp_path / "f").mkdir()
    path = tmp_path / "f" / "s0.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 3), np.uint8), isVector=True),
                    str(path))
    with pytest.raises(StackError, match=esc(path) + ".*colour.*grayscale"):
        read_stack(tmp_path / "f")


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


def test_folder_overwrite_only_replaces_image_folders(tmp_path):
    out = tmp_path / "out"
    write_stack(f"{out}/", make_stack(np.uint8, shape=(3, 4, 4)))
    write_stack(out, make_stack(np.uint8, shape=(2, 4, 4)), overwrite=True)
    assert listing(out) == ["section_0000.tif", "section_0001.tif"]
    (out / "notes.txt").write_text("precious")
    with pytest.raises(StackError, match=esc(out) + ".*notes.txt.*refusing"):
        write_stack(out, make_stack(np.uint8), overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"
