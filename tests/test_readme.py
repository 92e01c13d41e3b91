"""Every shell example of the README runs, and every alignment improves on no registration
(issue 18 item 16).

The README's blocks are menus of alternatives: each command runs in a folder holding the
inputs it names (made from a small phantom and its known deformation), after the outputs of
the one before it are removed (so that `apply` finds the fields an `align` just wrote).
Changes to the commands, all of them sizes: the phantom is 6 sections of 128 px (the README
says 16 of 256), and training runs 2 steps on 64 px crops.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridreg import io, weights

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.elastix]

#: The README's output paths an alignment writes, removed before the next command.
OUTPUTS = ("aligned.tif", "aligned.zarr", "fields", "aligned_labels.tif", "aligned_labels.zarr",
           "warped.tif", "pair", "f", "out", "cmp")


def readme_commands() -> list[str]:
    """The shell commands of the README's code blocks (continuations joined, comments off)."""
    text = (ROOT / "README.md").read_text()
    commands, in_block, shell = [], False, False
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, shell = not in_block, line.strip() == "```"
            continue
        if not (in_block and shell):
            continue
        line = pending + line
        pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] in ("hybridreg", "transformix", "mkdir"):
                commands.append(shlex.join(words))
    return commands


def test_the_readme_lists_its_examples():
    cmds = readme_commands()
    assert any(c.startswith("hybridreg align deformed.tif") for c in cmds)
    assert any(c.startswith("hybridreg compare") for c in cmds)
    assert not any("make" in c.split()[0] for c in cmds)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    for name in ("faemreg_compact", "feature_ae"):
        try:
            weights.default_weights(name)
        except weights.MissingWeightsError as exc:
            pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("readme_inputs")
    hr = [sys.executable, "-m", "hybridreg.cli"]
    subprocess.run(hr + ["phantom", "--out", str(d / "phantom.tif"), "--labels-out",
                         str(d / "labels.tif"), "--sections", "6", "--size", "128", "128",
                         "--seed", "0"], check=True, capture_output=True)
    subprocess.run(hr + ["deform", str(d / "phantom.tif"), "--out", str(d / "deformed.tif"),
                         "--fields-out", str(d / "truth"), "--labels", str(d / "labels.tif"),
                         "--labels-out", str(d / "deformed_labels.tif"), "--seed", "1"],
                   check=True, capture_output=True)
    subprocess.run(hr + ["deform", str(d / "phantom.tif"), "--out", str(d / "defects.tif"),
                         "--fields-out", str(d / "truth_defects"), "--seed", "1", "--defects",
                         "folds,cracks,debris", "--masks-out", str(d / "masks.tif")],
                   check=True, capture_output=True)
    deformed = io.read_stack(d / "deformed.tif").data
    io.write_stack(d / "fixed.tif", deformed[1:2])
    io.write_stack(d / "moving.tif", deformed[2:3])
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(deformed[2].astype(np.float32)), str(d / "moving.mha"))
    for name in ("raw.zarr", "big.zarr"):
        io.write_stack(d / name, deformed)
    io.write_stack(d / "labels.zarr", io.read_stack(d / "deformed_labels.tif").data)
    shutil.copy(d / "deformed.tif", d / "big.tif")
    shutil.copy(d / "phantom.tif", d / "stack.tif")
    shutil.copy(d / "phantom.tif", d / "my_aligned.tif")
    for folder in ("stacks", "aligned"):
        (d / folder).mkdir()
        shutil.copy(d / "phantom.tif", d / folder / "a.tif")
    shutil.copy(ROOT / "params" / "em_affine.txt", d / "my_affine.txt")
    shutil.copy(ROOT / "params" / "em_bspline.txt", d / "my_bspline.txt")
    shutil.copy(weights.default_weights("faemreg_compact"), d / "my_net.safetensors")
    return d


def _epe(fields_dir, truth_dir, shape) -> float:
    """Mean endpoint error (px, 16 px in from the edges, sections 1..) of a run's fields."""
    from hybridreg.fields import MapGrid
    from hybridreg.outputs import read_transforms

    maps, grid = read_transforms(fields_dir, shape_yx=shape)
    truth = np.asarray(io.read_fields(truth_dir)[0])
    errs = []
    for k in range(1, len(maps)):
        u = grid.dense(maps[k]) if isinstance(grid, MapGrid) else maps[k]
        e = np.sqrt(((u - truth[k]) ** 2).sum(axis=0))[16:-16, 16:-16]
        errs.append(float(e.mean()))
    return float(np.mean(errs))


def test_every_readme_example_runs_and_improves_on_no_registration(inputs, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(inputs, work)
    truth = np.asarray(io.read_fields(work / "truth")[0])
    shape = truth.shape[2:]
    none = float(np.mean([np.sqrt((truth[k] ** 2).sum(axis=0))[16:-16, 16:-16].mean()
                          for k in range(1, len(truth))]))
    ran = []
    for cmd in readme_commands():
        words = shlex.split(cmd)
        if words[0] == "transformix" and shutil.which("transformix") is None:
            continue
        if words[0] == "mkdir":
            (work / words[-1]).mkdir(parents=True, exist_ok=True)
            continue
        if words[:2] in (["hybridreg", "phantom"], ["hybridreg", "deform"]):
            continue  # the inputs above, made smaller
        if words[:2] in (["hybridreg", "align"], ["hybridreg", "register"],
                         ["hybridreg", "compare"]) and "--resume" not in words:
            for name in OUTPUTS:  # a menu of alternatives: each starts afresh
                target = work / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        if words[1:2] in (["train-features"], ["train"], ["finetune"]):
            words += ["--steps", "2", "--crop", "64", "--overwrite"]
        if words[0] == "hybridreg":
            words = [sys.executable, "-m", "hybridreg.cli"] + words[1:]
        words = [str(w) for w in words]
        if any("*" in w for w in words):  # the shell's glob
            words = [p for w in words for p in (sorted(str(x) for x in work.glob(w))
                                                 if "*" in w else [w])]
        proc = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append(cmd)
        if cmd.startswith("hybridreg align deformed.tif") or cmd.startswith(
                "hybridreg align big.tif") or cmd.startswith("hybridreg align raw.zarr"):
            epe = _epe(work / "fields", work / "truth", shape)
            assert epe < none, f"{cmd}: {epe:.2f} px, no registration {none:.2f} px"
        if cmd.startswith("hybridreg align defects.tif"):
            truth_d = np.asarray(io.read_fields(work / "truth_defects")[0])
            none_d = float(np.mean([np.sqrt((truth_d[k] ** 2).sum(axis=0))[16:-16, 16:-16]
                                    .mean() for k in range(1, len(truth_d))]))
            epe = _epe(work / "fields", work / "truth_defects", shape)
            assert epe < none_d, f"{cmd}: {epe:.2f} px, no registration {none_d:.2f} px"
        if cmd.startswith("hybridreg compare") and "--deform-seed" in cmd:
            doc = json.loads((work / "cmp" / "metrics.json").read_text())
            s = {x["method"]: x for x in doc["summaries"]}
            for name, row in s.items():
                if name != "none":
                    assert row["status"] == "ok", (name, row)
                    assert row["epe_mean_px"] < s["none"]["epe_mean_px"], (name, row)
    assert len(ran) >= 20, ran
