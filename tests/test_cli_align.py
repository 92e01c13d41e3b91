"""register / align / apply on the command line, checked with elastix's own transformix."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hybridreg import cli, io, metrics

pytestmark = pytest.mark.elastix

TRANSFORMIX = shutil.which("transformix")


def run(argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def deformed(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    assert run(["phantom", "--out", d / "ph.tif", "--labels-out", d / "lab.tif",
                "--sections", 4, "--size", 96, 96, "--seed", 1]) == 0
    assert run(["deform", d / "ph.tif", "--out", d / "def.tif", "--fields-out", d / "truth",
                "--labels", d / "lab.tif", "--labels-out", d / "deflab.tif", "--seed", 2,
                "--max-shift-px", 4, "--elastic-px", 2]) == 0
    return d


@pytest.fixture(scope="module")
def aligned(deformed):
    """The align command, run as a program (a fresh process, as users run it).

    In-process, an elastix run that follows other elastix registrations of the same process
    has been seen to diverge on these small (96 px) sections; see the known issues in
    benchmarks/RESULTS.md.
    """
    d = deformed
    subprocess.run([sys.executable, "-m", "hybridreg.cli", "align", str(d / "def.tif"),
                    "--params", "em_rigid", "--out", str(d / "aligned.tif"), "--fields-out",
                    str(d / "fields"), "--neighbours", "2", "--no-progress"], check=True)
    return d


def transformix(moving: np.ndarray, tp, out_dir):
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(moving.astype(np.float32)), str(out_dir / "in.mha"))
    subprocess.run([TRANSFORMIX, "-in", str(out_dir / "in.mha"), "-out", str(out_dir),
                    "-tp", str(tp)], check=True, capture_output=True)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "result.mha")))


def test_align_outputs(aligned):
    d = aligned
    f = d / "fields"
    assert [p.name for p in sorted(f.glob("section_*.mha"))] == [
        f"section_{k:04d}.mha" for k in range(4)]
    assert len(list(f.glob("section_*.h5"))) == 4
    with open(f / "sections.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["section"]) for r in rows] == [0, 1, 2, 3]
    assert not any(r["flagged"] == "True" for r in rows), rows
    assert not (f / "work").exists()  # checkpoints removed after a complete run
    out = io.read_stack(d / "aligned.tif").data
    assert out.shape == (4, 96, 96) and out.dtype == np.uint8


def test_apply_reproduces_the_aligned_stack(aligned, capsys):
    d = aligned
    assert run(["apply", d / "def.tif", "--fields", d / "fields", "--out", d / "again.tif"]) == 0
    np.testing.assert_array_equal(io.read_stack(d / "again.tif").data,
                                  io.read_stack(d / "aligned.tif").data)
    assert run(["apply", d / "deflab.tif", "--fields", d / "fields", "--out",
                d / "lab_aligned.tif", "--nearest"]) == 0
    lab = io.read_stack(d / "lab_aligned.tif").data
    assert lab.dtype == io.read_stack(d / "deflab.tif").data.dtype


@pytest.mark.skipif(TRANSFORMIX is None, reason="elastix's transformix program not installed")
def test_transformix_reproduces_every_section(aligned, tmp_path):
    d = aligned
    raw = io.read_stack(d / "def.tif").data.astype(np.float32)
    from hybridreg.outputs import read_transforms
    from hybridreg.warp import render

    maps, grid = read_transforms(d / "fields", shape_yx=(96, 96))
    assert grid.stride == 32 and maps.shape[2:] == (4, 4)  # the default: coarse maps
    for k in range(4):
        tp = d / "fields" / "transformix" / f"section_{k:04d}" / "TransformParameters.0.txt"
        result = transformix(raw[k], tp, tmp_path / f"s{k}")
        ours = render(raw[k], maps[k], grid)
        # transformix interpolates the map between its nodes as hybridreg does, and samples
        # the section by one rule up to its border pixels (issue 18, item 5)
        assert np.abs(result - ours).max() < 0.05, np.abs(result - ours).max()


def test_align_refuses_to_overwrite_and_resumes(aligned, capsys):
    d = aligned
    assert run(["align", d / "def.tif", "--params", "em_rigid", "--out", d / "aligned.tif",
                "--fields-out", d / "fields", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    (d / "fields" / "work").mkdir()
    assert run(["align", d / "def.tif", "--params", "em_rigid", "--out", d / "x.tif",
                "--fields-out", d / "fields", "--no-progress", "--overwrite"]) == 2
    assert "--resume" in capsys.readouterr().err
    (d / "fields" / "work").rmdir()
    # --resume after a complete run says so, and changes nothing (issue 18, item 8)
    before = (d / "aligned.tif").stat().st_mtime_ns
    assert run(["align", d / "def.tif", "--params", "em_rigid", "--out", d / "aligned.tif",
                "--fields-out", d / "fields", "--no-progress", "--resume"]) == 0
    assert "the run is complete" in capsys.readouterr().out
    assert (d / "aligned.tif").stat().st_mtime_ns == before


@pytest.mark.skipif(TRANSFORMIX is None, reason="elastix's transformix program not installed")
def test_register_exports_elastix_chain(deformed, tmp_path, capsys):
    d = deformed
    stack = io.read_stack(d / "def.tif").data
    io.write_stack(tmp_path / "fixed.tif", stack[:1])
    io.write_stack(tmp_path / "moving.tif", stack[1:2])
    assert run(["register", tmp_path / "fixed.tif", tmp_path / "moving.tif", "--params",
                "em_affine", "--out", tmp_path / "warped.tif", "--fields-out",
                tmp_path / "pair"]) == 0
    assert "transformix -in" in capsys.readouterr().out
    chain = sorted((tmp_path / "pair" / "transformix").glob("TransformParameters.*.txt"))
    result = transformix(stack[1], chain[-1], tmp_path / "tx")
    u, _, _ = io.read_field(tmp_path / "pair" / "section_0000.mha")
    from hybridreg.warp import warp

    ours = warp(stack[1].astype(np.float32), u, order=3)[0]
    mask = metrics.interior_mask((96, 96), margin_px=8)
    assert metrics.ncc(result, ours, mask=mask) > 0.999
    # register takes single sections
    assert run(["register", d / "def.tif", tmp_path / "moving.tif", "--out",
                tmp_path / "w2.tif"]) == 2
    assert "one section" in capsys.readouterr().err


INTERRUPTED_RUN = """
import sys
from hybridreg import io
from hybridreg.methods import get_method
from hybridreg.stack import align_stack

stack = io.read_stack(sys.argv[1])
inner = get_method("elastix", params=["em_rigid"], threads=1)


class StopAfterOnePair:
    name, config, calls = inner.name, inner.config, 0

    def register(self, *args, **kwargs):
        if self.calls == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        self.calls += 1
        return inner.register(*args, **kwargs)


try:
    align_stack(stack.data, StopAfterOnePair(), spacing_xy=stack.spacing_xyz[:2],
                work_dir=sys.argv[2])
except KeyboardInterrupt:
    sys.exit(0)
sys.exit("was not interrupted")
"""


def test_align_resume_gives_the_uninterrupted_output(deformed):
    d = deformed

    def align(fields, *extra):
        subprocess.run([sys.executable, "-m", "hybridreg.cli", "align", str(d / "def.tif"),
                        "--params", "em_rigid", "--threads", "1", "--out",
                        str(d / f"{fields}.tif"), "--fields-out", str(d / fields),
                        "--no-progress", *extra], check=True)

    align("straight")
    (d / "resumed").mkdir()
    subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, str(d / "def.tif"),
                    str(d / "resumed" / "work")], check=True)
    assert len(list((d / "resumed" / "work").glob("pair_*.json"))) == 1  # one pair was done
    align("resumed", "--resume")
    np.testing.assert_array_equal(io.read_fields(d / "resumed")[0],
                                  io.read_fields(d / "straight")[0])
    np.testing.assert_array_equal(io.read_stack(d / "resumed.tif").data,
                                  io.read_stack(d / "straight.tif").data)
    assert not (d / "resumed" / "work").exists()


def test_align_anchor_keeps_that_section(deformed, capsys):
    d = deformed
    subprocess.run([sys.executable, "-m", "hybridreg.cli", "align", str(d / "def.tif"),
                    "--params", "em_rigid", "--threads", "1", "--anchor", "2", "--out",
                    str(d / "anchored.tif"), "--fields-out", str(d / "anchored"),
                    "--no-progress"], check=True)
    fields = io.read_fields(d / "anchored")[0]
    assert fields.shape[0] == 4
    assert np.abs(fields[2]).max() < 1e-3 and np.abs(fields[[1, 3]]).max() > 0.5
    # refused before any registration, with the reason
    assert run(["align", d / "def.tif", "--params", "em_rigid", "--anchor", 4, "--out",
                d / "bad.tif", "--fields-out", d / "bad", "--no-progress"]) != 0
    assert "anchor 4 is not a section" in capsys.readouterr().err


def test_align_refuses_a_run_over_the_memory_limit_before_it_starts(deformed, tmp_path,
                                                                     capsys):
    d = deformed
    out, fields = tmp_path / "a.tif", tmp_path / "f"
    # learned's baseline alone (the network loaded) is over 0.2 GB
    assert run(["align", d / "def.tif", "--method", "learned", "--out", out, "--fields-out",
                fields, "--memory-limit", "0.2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "memory limit of 0.2 GB" in err and "--memory-limit" in err
    assert not out.exists() and not fields.exists()
    # a given tile that fits is used
    assert run(["align", d / "def.tif", "--method", "learned", "--tile", "64", "--out", out,
                "--fields-out", fields, "--memory-limit", "1", "--no-progress"]) == 0


def test_align_writes_dense_fields_on_request(deformed, tmp_path):
    d = deformed
    assert run(["align", d / "def.tif", "--params", "em_rigid", "--out", tmp_path / "a.tif",
                "--fields-out", tmp_path / "f", "--dense-fields", "--stride", "16",
                "--no-progress"]) == 0
    from hybridreg.outputs import read_transforms
    from hybridreg.stack import DenseFields

    maps, grid = read_transforms(tmp_path / "f")
    assert grid.stride == 16 and maps.shape[2:] == grid.node_shape
    dense, spacing, _ = io.read_fields(tmp_path / "f" / "dense")
    assert dense.shape == (len(maps), 2, 96, 96)
    np.testing.assert_allclose(dense, np.asarray(DenseFields(maps, grid)), atol=1e-6)


def test_a_parameter_file_elastix_cannot_run_is_one_line_and_blocks_nothing(deformed, tmp_path,
                                                                           capsys):
    """A component that does not exist, or a value of the wrong kind: exit 2 with one line
    that names the cause, for elastix and for the hybrid (no silent fallback to the learned
    field), and no work folder left behind (issue 18, item 6)."""
    d = deformed
    bad = {"component": ('(Optimizer "NoSuchOptimizer")', "'NoSuchOptimizer' does not exist"),
           "value": ('(Optimizer "AdaptiveStochasticGradientDescent")\n'
                     '(NumberOfResolutions "banana")', "'banana' of NumberOfResolutions")}
    for name, (lines, said) in bad.items():
        params = tmp_path / f"{name}.txt"
        params.write_text('(Transform "BSplineTransform")\n'
                          '(Metric "AdvancedNormalizedCorrelation")\n'
                          f'(MaximumNumberOfIterations 20)\n{lines}\n')
        for method in ("elastix", "hybrid"):
            capsys.readouterr()
            fields = tmp_path / f"f_{name}_{method}"
            assert run(["align", d / "def.tif", "--out", tmp_path / f"a_{name}_{method}.tif",
                        "--fields-out", fields, "--method", method, "--params", params,
                        "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert said in err and err.count("\n") == 1, (name, method, err)
            assert not fields.exists()
    # a file elastix cannot parse: one line too
    params = tmp_path / "unparsable.txt"
    params.write_text('(Transform "BSplineTransform"\n')
    assert run(["align", d / "def.tif", "--out", tmp_path / "a.tif", "--fields-out",
                tmp_path / "f", "--params", params, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unparsable.txt" in err and "not between brackets" in err and err.count("\n") == 1


@pytest.mark.skipif(TRANSFORMIX is None, reason="elastix's transformix program not installed")
@pytest.mark.parametrize("method", ["learned", "hybrid"])
def test_register_chain_reproduces_the_result_up_to_the_border(tmp_path, method):
    """One rendering rule (issue 18, item 5): the chain `register --fields-out` writes runs in
    transformix to hybridreg's own result on the whole section, border pixels included, and
    with linear interpolation even when the user's B-spline file asks for cubic. Run as a
    program (elastix in a fresh process). Before: 24 px border strips differed by up to 218
    grey values, and the hybrid's chain resampled with the file's cubic order."""
    from scipy import ndimage

    from hybridreg import phantom

    ph = phantom.make_phantom(sections=2, shape_yx=(160, 160), seed=0)
    moved = ndimage.shift(ph.stack[1].astype(np.float32), (4, -3), order=1, mode="nearest")
    io.write_stack(tmp_path / "f.tif", ph.stack[:1].astype(np.float32))
    io.write_stack(tmp_path / "m.tif", moved[None])
    cubic = tmp_path / "cubic.txt"  # the shipped refinement file says order 3
    cubic.write_text((cli.Path(__file__).parents[1] / "params" / "refine_bspline_1ch.txt")
                     .read_text())
    extra = ["--params", str(cubic)] if method == "hybrid" else []
    subprocess.run([sys.executable, "-m", "hybridreg.cli", "register", str(tmp_path / "f.tif"),
                    str(tmp_path / "m.tif"), "--out", str(tmp_path / "out.tif"),
                    "--fields-out", str(tmp_path / "f"), "--method", method, *extra],
                   check=True, capture_output=True)
    ours = io.read_stack(tmp_path / "out.tif").data[0]
    assert ours.dtype == np.float32
    chain = sorted((tmp_path / "f" / "transformix").glob("TransformParameters.*.txt"))
    for tp in chain:
        assert "(FinalBSplineInterpolationOrder 1)" in tp.read_text(), tp
    theirs = transformix(moved, chain[-1], tmp_path / "tx")
    assert (ours == 0).mean() > 0.01  # the section moved: there is a border to get right
    np.testing.assert_allclose(theirs, ours, atol=0.05, rtol=0)


def test_register_takes_masks_in_elastix_s_convention(tmp_path, capsys):
    """Issue 17 items 1 and 8 (register): --fixed-mask excludes a defect from elastix's
    similarity; masks the method cannot take, of another size, or keeping little of the
    section (inverted?) are said before any work. Run as a program (elastix in a fresh
    process)."""
    from scipy import ndimage

    def tex(seed):
        f = ndimage.gaussian_filter(np.random.default_rng(seed).random((128, 128)), 3)
        return ((f - f.min()) / (f.max() - f.min()) * 255).astype(np.float32)

    fixed = tex(0)
    moving = ndimage.shift(fixed, (2, -3), order=1, mode="nearest")
    fixed[:, :64] = tex(1)[:, :64]  # the fixed section's left half is a defect
    mask = np.full((128, 128), 255, np.uint8)
    mask[:, :64] = 0
    io.write_stack(tmp_path / "f.tif", fixed[None])
    io.write_stack(tmp_path / "m.tif", moving[None])
    io.write_stack(tmp_path / "mask.tif", mask[None])
    io.write_stack(tmp_path / "small.tif", mask[None, :64])
    inverted = np.where(mask > 0, 0, 255).astype(np.uint8)
    inverted[:, 60:64] = 255
    io.write_stack(tmp_path / "inv.tif", inverted[None, :, :])
    err = {}
    for tag, extra in (("masked", ["--fixed-mask", str(tmp_path / "mask.tif")]), ("plain", [])):
        subprocess.run([sys.executable, "-m", "hybridreg.cli", "register",
                        str(tmp_path / "f.tif"), str(tmp_path / "m.tif"), "--out",
                        str(tmp_path / f"{tag}.tif"), "--fields-out", str(tmp_path / tag),
                        "--params", "em_affine", "--threads", "1", *extra],
                       check=True, capture_output=True)
        u = io.read_fields(tmp_path / tag)[0][0][:, 32:-32, 72:-8]
        err[tag] = float(np.abs(u - np.array([-3.0, 2.0])[:, None, None]).mean())
    assert err["masked"] < 0.05 and err["masked"] < 0.5 * err["plain"], err
    base = ["register", tmp_path / "f.tif", tmp_path / "m.tif", "--out", tmp_path / "x.tif"]
    assert run(base + ["--method", "learned", "--fixed-mask", tmp_path / "mask.tif"]) == 0
    assert run(base + ["--moving-mask", tmp_path / "small.tif"]) == 2
    assert "is 128x64 (W x H), the sections 128x128" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "hybridreg.cli", "register",
                           str(tmp_path / "f.tif"), str(tmp_path / "m.tif"), "--out",
                           str(tmp_path / "y.tif"), "--params", "em_rigid", "--fixed-mask",
                           str(tmp_path / "inv.tif")], capture_output=True, text=True)
    assert "keeps only 50% of the section" not in proc.stderr  # half is not "mostly zero"
    assert proc.returncode == 0
    mostly_zero = np.zeros((128, 128), np.uint8)
    mostly_zero[:, 40:60] = 255  # 16% kept: the defect's mask, inverted by mistake
    io.write_stack(tmp_path / "inv2.tif", mostly_zero[None])
    proc = subprocess.run([sys.executable, "-m", "hybridreg.cli", "register",
                           str(tmp_path / "f.tif"), str(tmp_path / "m.tif"), "--out",
                           str(tmp_path / "z.tif"), "--params", "em_rigid", "--fixed-mask",
                           str(tmp_path / "inv2.tif")], capture_output=True, text=True)
    assert "nonzero = tissue to use, zero = excluded; is it inverted?" in proc.stderr


def test_align_takes_a_mask_stack(tmp_path, capsys):
    """Issue 17 items 1 and 8 (align): `--masks` with deform's defect masks runs the joint
    alignment with each pair's masks (and the sequential one); a mask stack of another shape
    names both, and --node-weights outside the joint mode is refused, before any work."""
    assert run(["phantom", "--out", tmp_path / "ph.tif", "--sections", 4, "--size", 96, 96,
                "--seed", 2]) == 0
    assert run(["deform", tmp_path / "ph.tif", "--out", tmp_path / "d.tif", "--fields-out",
                tmp_path / "t", "--seed", 3, "--defects", "folds,debris", "--defect-fraction",
                1, "--masks-out", tmp_path / "m.tif"]) == 0
    proc = subprocess.run([sys.executable, "-m", "hybridreg.cli", "align",
                           str(tmp_path / "d.tif"), "--masks", str(tmp_path / "m.tif"),
                           "--params", "em_rigid", "--threads", "1", "--out",
                           str(tmp_path / "a.tif"), "--fields-out", str(tmp_path / "f"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert io.read_stack(tmp_path / "a.tif").data.shape == (4, 96, 96)
    masks = io.read_stack(tmp_path / "m.tif").data
    io.write_stack(tmp_path / "m3.tif", masks[:3])
    base = ["align", tmp_path / "d.tif", "--out", tmp_path / "b.tif", "--fields-out",
            tmp_path / "g", "--no-progress"]
    capsys.readouterr()
    assert run(base + ["--masks", tmp_path / "m3.tif"]) == 2
    assert "holds 3 sections of 96x96 (W x H), the stack" in capsys.readouterr().err
    assert run(base + ["--mode", "sequential", "--node-weights"]) == 2
    assert "--node-weights needs --mode joint" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    # the sequential mode takes the masks too, and the joint one node weights
    for extra in (["--mode", "sequential"], ["--node-weights"]):
        assert run(base + ["--masks", tmp_path / "m.tif", "--method", "learned",
                           "--overwrite"] + extra) == 0
        assert io.read_stack(tmp_path / "b.tif").data.shape == (4, 96, 96)
