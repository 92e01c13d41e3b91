"""The command line, end to end; ground truth checked with ITK's own resampling."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hybridreg import cli, io, metrics


def run(argv) -> int:
    return cli.main([str(a) for a in argv])


def itk_restore(deformed: np.ndarray, field_file) -> np.ndarray:
    """Apply a saved .mha field with ITK alone: imread, DisplacementFieldTransform, resample."""
    import itk

    stored = itk.imread(str(field_file))  # ITK Python reads float vector images only
    assert type(stored) is itk.Image[itk.Vector[itk.F, 2], 2]
    # DisplacementFieldTransform[itk.D, 2] needs float64: convert, keeping the grid
    field = itk.image_from_array(itk.array_from_image(stored).astype(np.float64), is_vector=True)
    field.SetSpacing(stored.GetSpacing())
    field.SetOrigin(stored.GetOrigin())
    field.SetDirection(stored.GetDirection())
    transform = itk.DisplacementFieldTransform[itk.D, 2].New()
    transform.SetDisplacementField(field)
    img = itk.image_from_array(deformed.astype(np.float32))
    img.SetSpacing(field.GetSpacing())
    img.SetOrigin(field.GetOrigin())
    res = itk.ResampleImageFilter[type(img), type(img)].New(
        Input=img, Transform=transform, ReferenceImage=img, UseReferenceImage=True)
    res.Update()
    return itk.array_from_image(res.GetOutput())


def check_restored(original_file, deformed_file, fields_dir, margin):
    original = io.read_stack(original_file).data
    deformed = io.read_stack(deformed_file).data
    assert deformed.shape == original.shape
    assert np.array_equal(deformed[0], original[0])  # section 0 is left as it is
    files = sorted(fields_dir.glob("section_*.mha"))
    assert [f.name for f in files] == [f"section_{k:04d}.mha" for k in range(len(original))]
    true_fields, _, _ = io.read_fields(fields_dir)
    for k in range(1, len(original)):
        restored = itk_restore(deformed[k], files[k])
        mask = (metrics.interior_mask(original.shape[1:], margin_px=margin)
                & hybridreg_valid(true_fields[k]))
        before = metrics.ncc(deformed[k], original[k], mask=mask)
        after = metrics.ncc(restored, original[k], mask=mask)
        assert after > 0.99, (k, before, after)
        assert before < 0.9


def hybridreg_valid(u):
    from hybridreg.warp import valid_mask

    return valid_mask(u, margin_px=1)


def test_phantom_deform_restored_by_itk(tmp_path, capsys):
    ph, lab = tmp_path / "ph.tif", tmp_path / "lab.tif"
    assert run(["phantom", "--out", ph, "--labels-out", lab, "--sections", 4,
                "--size", 96, 112, "--seed", 2]) == 0
    assert io.read_stack(ph).data.shape == (4, 96, 112)
    assert run(["deform", ph, "--out", tmp_path / "def.tif", "--fields-out", tmp_path / "truth",
                "--labels", lab, "--labels-out", tmp_path / "deflab.tif", "--seed", 7]) == 0
    check_restored(ph, tmp_path / "def.tif", tmp_path / "truth", margin=12)
    deflab = io.read_stack(tmp_path / "deflab.tif").data
    assert np.issubdtype(deflab.dtype, np.integer)
    assert set(np.unique(deflab)) <= set(np.unique(io.read_stack(lab).data))
    capsys.readouterr()
    # metrics of doing nothing: a real endpoint error, written as CSV and JSON
    assert run(["metrics", tmp_path / "def.tif", "--reference", ph, "--truth", tmp_path / "truth",
                "--labels", tmp_path / "deflab.tif", "--reference-labels", lab,
                "--margin", 12, "--csv", tmp_path / "m.csv", "--json", tmp_path / "m.json"]) == 0
    out = capsys.readouterr().out
    assert "epe_mean_px" in out and "dice_mean" in out
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 1 + 4


def test_isbi_deform_restored_by_itk(tmp_path, shared_data):
    raw = io.read_stack(shared_data / "isbi2012_train_raw.tif").data[:3]
    crop = tmp_path / "isbi3.tif"
    io.write_stack(crop, raw)
    assert run(["deform", crop, "--out", tmp_path / "def.tif", "--fields-out",
                tmp_path / "truth", "--seed", 11]) == 0
    check_restored(crop, tmp_path / "def.tif", tmp_path / "truth", margin=24)


def test_deform_refuses_to_overwrite(tmp_path, capsys):
    ph = tmp_path / "ph.tif"
    run(["phantom", "--out", ph, "--sections", 2, "--size", 32, 32])
    before = ph.read_bytes()
    assert run(["deform", ph, "--out", ph, "--fields-out", tmp_path / "t", "--seed", 1]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert ph.read_bytes() == before
    assert run(["phantom", "--out", ph, "--sections", 2, "--size", 32, 32]) == 2
    assert "exists" in capsys.readouterr().err
    assert run(["deform", tmp_path / "missing.tif", "--out", tmp_path / "o.tif",
                "--fields-out", tmp_path / "t", "--seed", 1]) == 2
    assert "missing.tif" in capsys.readouterr().err


#: every subcommand (the help tests of align, register, apply and the training commands
#: were copies of this one in their own files)
COMMANDS = ["phantom", "deform", "defects", "metrics", "register", "align", "apply",
            "train-features", "train", "finetune", "compare", "demo"]


def test_the_command_list_is_complete():
    import argparse

    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: hybridreg " + command in capsys.readouterr().out


def test_console_script_and_lazy_import():
    out = subprocess.run([sys.executable, "-m", "hybridreg.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "phantom" in out and "deform" in out
    code = ("import sys, hybridreg, hybridreg.fields, hybridreg.warp, hybridreg.metrics, "
            "hybridreg.io, hybridreg.phantom, hybridreg.synthetic, hybridreg.stack, "
            "hybridreg.methods; "
            "print(sorted(m for m in ('itk', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "[]"


def test_demo_runs_without_methods(tmp_path, capsys):
    assert run(["demo", "--out", tmp_path / "demo", "--sections", 4, "--size", 64,
                "--methods"]) == 0
    out = capsys.readouterr().out
    assert "none" in out and "epe_mean_px" in out
    assert (tmp_path / "demo" / "metrics.json").exists()


@pytest.mark.elastix
def test_demo_with_elastix_beats_doing_nothing(tmp_path, capsys):
    import json

    assert run(["demo", "--out", tmp_path / "demo", "--sections", 4, "--size", 128,
                "--no-progress"]) == 0
    summaries = json.loads((tmp_path / "demo" / "metrics.json").read_text())["summaries"]
    by_name = {s["method"]: s for s in summaries}
    assert by_name["elastix"]["epe_mean_px"] < by_name["none"]["epe_mean_px"]
    assert (tmp_path / "demo" / "aligned_elastix.tif").exists()


def test_hybrid_preset_option():
    parser = cli.build_parser()
    args = parser.parse_args(["register", "f.tif", "m.tif", "--out", "o.tif",
                              "--method", "hybrid", "--preset", "fast"])
    method = cli._method(args)
    assert method.preset == "fast" and method.detail_map is None
    args = parser.parse_args(["register", "f.tif", "m.tif", "--out", "o.tif",
                              "--method", "hybrid"])
    assert cli._method(args).preset == "accurate"
    args = parser.parse_args(["register", "f.tif", "m.tif", "--out", "o.tif",
                              "--method", "elastix", "--preset", "fast"])
    with pytest.raises(cli.CLIError, match="--preset is for --method hybrid"):
        cli._method(args)


def test_quiet_and_log_file(tmp_path, capsys):
    """-q prints nothing but errors; --log FILE keeps the INFO log with times, before or
    after the command's name (issue 18, item 14)."""
    log = tmp_path / "run.log"
    assert run(["phantom", "--out", tmp_path / "p.tif", "--sections", 3, "--size", 32, 32,
                "-q", "--log", log]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    text = log.read_text()
    assert "INFO" in text and "wrote" in text and "phantom" in text
    # an error: on stderr (one line) and in the log file
    assert run(["-q", "--log", log, "phantom", "--out", tmp_path / "p.tif", "--sections", 3,
                "--size", 32, 32]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "exists" in err and err.count("\n") == 1
    assert "error" in log.read_text().splitlines()[-1]
    # without -q the summary is printed
    assert run(["phantom", "--out", tmp_path / "q.tif", "--sections", 3, "--size", 32, 32]) == 0
    assert capsys.readouterr().out


def test_align_checks_outputs_and_models_before_any_work(tmp_path, capsys):
    """An output onto the input, or a corrupt --model, is one line and exit 2 before any
    work: no work folder is left to block the corrected rerun (issue 18, item 7)."""
    import shutil

    from hybridreg.methods.learned import LearnedMethod

    assert run(["phantom", "--out", tmp_path / "p.tif", "--sections", 3, "--size", 64, 64]) == 0
    fields = tmp_path / "fields"
    before = (tmp_path / "p.tif").read_bytes()
    for out, fields_out in ((tmp_path / "p.tif", fields),
                            (tmp_path / "a.tif", tmp_path / "p.tif")):
        capsys.readouterr()
        assert run(["align", tmp_path / "p.tif", "--out", out, "--fields-out", fields_out,
                    "--method", "learned", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "would overwrite the input" in err and err.count("\n") == 1
        assert not fields.exists() and (tmp_path / "p.tif").read_bytes() == before
    # a model file of zeroed bytes, and one cut short
    model = LearnedMethod().model_path
    for name, data in (("zero.safetensors", bytes(model.stat().st_size)),
                       ("cut.safetensors", model.read_bytes()[:model.stat().st_size // 2])):
        (tmp_path / name).write_bytes(data)
        assert run(["align", tmp_path / "p.tif", "--out", tmp_path / "a.tif", "--fields-out",
                    fields, "--method", "learned", "--model", tmp_path / name,
                    "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert name in err and "corrupt or truncated" in err and err.count("\n") == 1
        assert not fields.exists() and not (tmp_path / "a.tif").exists()
    # the corrected command runs
    shutil.rmtree(fields, ignore_errors=True)
    assert run(["align", tmp_path / "p.tif", "--out", tmp_path / "a.tif", "--fields-out",
                fields, "--method", "learned", "--no-progress"]) == 0
    assert (tmp_path / "a.tif").exists() and not (fields / "work").exists()


def test_one_section_and_tiny_sections_are_warned_about(tmp_path, capsys):
    """A 1-section stack and 16 x 16 sections still run (exit 0) but say why the result
    cannot be trusted (issue 18, item 4)."""
    for sections, size in ((1, 64), (3, 16)):
        stack = tmp_path / f"p{sections}_{size}.tif"
        assert run(["phantom", "--out", stack, "--sections", sections, "--size", size,
                    size]) == 0
        capsys.readouterr()
        assert run(["align", stack, "--out", tmp_path / f"a{sections}_{size}.tif",
                    "--fields-out", tmp_path / f"f{sections}_{size}", "--method", "learned",
                    "--no-progress"]) == 0
        err = capsys.readouterr().err
        if sections == 1:
            assert "one section" in err and "nothing to align" in err
        else:
            assert "16x16 px are too small" in err
