"""Atomic output: nothing overwritten by accident, inputs never, failed writes leave nothing."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hybridreg.io import StackError, atomic_output, read_stack, write_stack

from iohelpers import esc, listing, make_stack


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """A writer that creates its file 0o600 (safetensors does) still gives the user's
    umask's mode, as any new file has (issue 18, item 17)."""
    import os

    import torch

    from hybridreg.models import FAEMRegNet, save_model

    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "a.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        torch.manual_seed(0)
        model = save_model(FAEMRegNet.from_preset("tiny"), tmp_path / "net.safetensors")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.bin").st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct(os.stat(model).st_mode & 0o777) == oct(0o666 & ~umask)
