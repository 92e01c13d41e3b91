"""A lazy stack aligned into zarr section by section, interrupted and resumed (library and CLI)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import cli, io, phantom
from hybridreg.io import LazySections, StackError, read_stack, write_stack
from hybridreg.stack import AlignedSections, align_stack, apply_fields, save_alignment

from helpers import PhaseCorrelation


@pytest.fixture(scope="module")
def shifted():
    """Five shifted copies of a phantom section (uint8), and the shifts."""
    section = phantom.make_phantom(sections=1, shape_yx=(48, 48), seed=2).stack[0]
    shifts = [(0, 0), (2, -1), (-3, 2), (1, 3), (-2, -2)]
    return np.stack([np.roll(section, (-dy, -dx), axis=(0, 1)) for dx, dy in shifts])


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

    monkeypatch.setattr(cli, "_method", lambda args, sample=None: PhaseCorrelation())
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
