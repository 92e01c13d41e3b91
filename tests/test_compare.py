"""hybridreg.compare and `hybridreg compare`: exact answers on tiny stacks, failures recorded."""
from __future__ import annotations

import csv
import json

import numpy as np

from hybridreg.stack import DenseFields
import pytest

from helpers import PhaseCorrelation, smooth_texture
from hybridreg import cli, compare, io, phantom
from hybridreg.methods import METHODS
from hybridreg.methods.base import RegistrationResult, check_pair
from hybridreg.methods.registry import accepts

#: a deformation of zero magnitude: the ground truth is the identity
NO_MOTION = dict(max_rotation_deg=0.0, max_shift_px=0.0, max_scale=0.0, elastic_px=0.0)


class Identity:
    """Finds no motion: the zero field."""

    name = "identity"
    config = {"method": "identity"}

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        fixed, moving, _ = check_pair(fixed, moving, references)
        return RegistrationResult(field=np.zeros((2,) + fixed.shape, np.float32),
                                  warped=moving.astype(np.float32))


class ShiftSearch:
    """Integer translation by exhaustive search (MSE on the interior): exact on rolled images."""

    name = "shiftsearch"

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        fixed, moving, _ = check_pair(fixed, moving, references)
        r, m = 6, 12
        inner = (slice(m, -m), slice(m, -m))
        best = min((float(np.mean((fixed[inner] - np.roll(moving, (-dy, -dx), (0, 1))[inner])
                                  ** 2)), dy, dx)
                   for dy in range(-r, r + 1) for dx in range(-r, r + 1))
        u = np.zeros((2,) + fixed.shape, np.float32)
        u[0], u[1] = best[2] * spacing_xy[0], best[1] * spacing_xy[1]
        return RegistrationResult(field=u, warped=moving)


class Broken:
    """Raises on every pair."""

    name = "broken"

    def register(self, fixed, moving, **kw):
        raise RuntimeError("this method always fails")


class StubMethod(PhaseCorrelation):
    """PhaseCorrelation built by name through get_method, for the command line."""

    name = "stub"

    def __init__(self, *, threads=None, shift=None):
        super().__init__()
        self.threads = threads


def tiny_phantom(sections=5, size=64, seed=0):
    return phantom.make_phantom(sections=sections, shape_yx=(size, size), seed=seed)


def shifted_case(shifts_yx):
    """A texture rolled by known integer shifts: the exact recovery field of each section."""
    base = (smooth_texture((64, 64), seed=3, sigma=1.5) * 200 + 20).astype(np.float32)
    z = len(shifts_yx)
    stack = np.stack([np.roll(base, s, axis=(0, 1)) for s in shifts_yx])
    truth = np.zeros((z, 2, 64, 64), np.float32)
    for k, (dy, dx) in enumerate(shifts_yx):
        # moving(q) = base(q - s): warped(p) = moving(p + s) = base(p)
        truth[k, 0], truth[k, 1] = dx, dy
    return compare.CompareCase(stack=stack, reference=np.repeat(base[None], z, axis=0),
                               true_fields=truth, deform_seed=0, name="rolled texture")


def test_identity_on_an_undeformed_stack_has_zero_error():
    ph = tiny_phantom()
    case = compare.make_case(ph.stack, labels=ph.labels, deform_seed=7, **NO_MOTION)
    assert case.has_truth and np.all(case.true_fields == 0)
    np.testing.assert_array_equal(case.stack, ph.stack)
    result = compare.compare_methods(case, [Identity()])
    assert [r.name for r in result.runs] == ["none", "identity"]
    for run in result.runs:
        assert run.status == "ok"
        s = run.summary
        assert s["epe_mean_px"] == 0.0 and s["epe_p95_px"] == 0.0
        assert s["folding_fraction"] == 0.0 and s["jac_min"] == pytest.approx(1.0)
        assert s["dice_mean"] == pytest.approx(1.0) and s["pixel_agreement"] == 1.0
        assert s["ncc_ref"] == pytest.approx(1.0)
        assert s["sections"] == 4  # section 0 left out of the means
        assert len(run.rows) == 5
    ident = result.run("identity")
    assert ident.summary["total_seconds"] > 0 and "seconds" in ident.rows[1]


def test_a_known_shift_is_recovered_exactly():
    case = shifted_case([(0, 0), (3, -2), (5, 1), (2, 4)])
    result = compare.compare_methods(case, [ShiftSearch()], mode="sequential")
    none, pc = result.runs
    assert none.summary["epe_mean_px"] == pytest.approx(
        np.mean([np.hypot(3, 2), np.hypot(5, 1), np.hypot(2, 4)]), abs=1e-4)
    assert pc.summary["epe_mean_px"] == pytest.approx(0.0, abs=1e-4)
    assert pc.summary["ncc_ref"] == pytest.approx(1.0, abs=1e-4)
    assert pc.summary["ncc_prev"] > none.summary["ncc_prev"]


def test_without_a_deform_seed_there_is_no_endpoint_error_but_the_rest():
    ph = tiny_phantom()
    case = compare.make_case(ph.stack, labels=ph.labels)
    assert not case.has_truth and case.reference is None
    result = compare.compare_methods(case, [Identity()])
    row = result.run("identity").rows[2]
    assert "epe_mean_px" not in row and "dice_mean" not in row
    for key in ("ncc_prev", "ssim_prev", "dice_prev", "agreement_prev", "folding_fraction",
                "seconds"):
        assert key in row, key
    # identity on the stack as given: neighbour metrics equal the baseline's
    assert row["ncc_prev"] == pytest.approx(result.run("none").rows[2]["ncc_prev"])


def test_label_overlap_of_identical_sections_is_one():
    labels = np.repeat(tiny_phantom(sections=1).labels, 4, axis=0)
    stack = np.repeat(tiny_phantom(sections=1).stack, 4, axis=0)
    result = compare.compare_methods(compare.make_case(stack, labels=labels), [Identity()])
    for row in result.run("identity").rows[1:]:
        assert row["dice_prev"] == pytest.approx(1.0) and row["agreement_prev"] == 1.0


def test_failing_and_unavailable_methods_are_recorded_and_the_others_run():
    case = compare.make_case(tiny_phantom(sections=4).stack, deform_seed=1)
    result = compare.compare_methods(
        case, ["no-such-method", Broken(), "learned", PhaseCorrelation()],
        options={"learned": {"model": "/nonexistent/net.safetensors"}})
    status = {r.name: (r.status, r.reason) for r in result.runs}
    assert status["no-such-method"][0] == "unavailable"
    assert "unknown method 'no-such-method'" in status["no-such-method"][1]
    assert status["learned"][0] == "unavailable"
    assert "/nonexistent/net.safetensors" in status["learned"][1]
    assert status["broken"][0] == "failed"
    assert "this method always fails" in status["broken"][1]
    assert status["phasecorr"][0] == "ok"
    assert result.run("phasecorr").summary["epe_mean_px"] < result.run("none").summary[
        "epe_mean_px"]
    summaries = {s["method"]: s for s in result.summaries}
    assert summaries["broken"]["status"] == "failed" and "reason" in summaries["broken"]


def test_missing_default_weights_make_a_method_unavailable(monkeypatch, tmp_path):
    import hybridreg.weights as weights

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)  # nothing installed there
    case = compare.make_case(tiny_phantom(sections=3).stack)
    result = compare.compare_methods(case, ["learned", "ssemnet", Identity()])
    for name in ("learned", "ssemnet"):
        run = result.run(name)
        assert run.status == "unavailable"
        assert run.reason.startswith("MissingWeightsError")
    assert result.run("identity").ok


def test_bad_requests_are_refused_with_a_message():
    case = compare.make_case(tiny_phantom(sections=3).stack)
    with pytest.raises(ValueError, match="listed twice"):
        compare.compare_methods(case, ["elastix", "elastix"])
    with pytest.raises(ValueError, match="baseline"):
        compare.compare_methods(case, ["none"])
    with pytest.raises(ValueError, match="'learned'.*not among"):
        compare.compare_methods(case, ["elastix"], options={"learned": {"model": "x"}})
    with pytest.raises(ValueError, match="labels have shape"):
        compare.make_case(np.zeros((3, 16, 16)), labels=np.zeros((2, 16, 16), int))
    with pytest.raises(ValueError, match="at least 2 sections"):
        compare.make_case(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="need deform_seed"):
        compare.make_case(np.zeros((3, 16, 16)), max_shift_px=3)


def test_threads_go_to_methods_that_take_them(monkeypatch):
    monkeypatch.setitem(METHODS, "stub", "test_compare:StubMethod")
    case = compare.make_case(tiny_phantom(sections=3).stack)
    result = compare.compare_methods(case, ["stub"], threads=3)
    assert result.run("stub").options == {"threads": 3}
    assert accepts("elastix", "threads")
    assert not accepts("no-such-method", "threads")


def test_write_comparison_and_nothing_is_overwritten(tmp_path):
    ph = tiny_phantom(sections=4)
    case = compare.make_case(ph.stack, labels=ph.labels, deform_seed=2)
    result = compare.compare_methods(case, [PhaseCorrelation(), Broken()])
    out = tmp_path / "report"
    written = compare.write_comparison(result, out, save_aligned=True)
    for key in ("csv", "json", "report", "aligned_phasecorr"):
        assert written[key].is_file(), key
    assert io.read_stack(out / "aligned_phasecorr.tif").data.dtype == ph.stack.dtype
    from hybridreg.outputs import read_transforms

    maps, grid = read_transforms(out / "fields_phasecorr")
    np.testing.assert_allclose(maps, result.run("phasecorr").alignment.maps)
    np.testing.assert_allclose(np.asarray(DenseFields(maps, grid)),
                               np.asarray(result.run("phasecorr").fields))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["section"]) for r in rows] == [
        (m, str(k)) for m in ("none", "phasecorr") for k in range(4)]
    doc = json.loads((out / "metrics.json").read_text())
    assert [m["status"] for m in doc["methods"]] == ["ok", "ok", "failed"]
    assert doc["case"]["deform_seed"] == 2 and doc["case"]["ground_truth"] is True
    assert doc["summaries"][1]["epe_mean_px"] == pytest.approx(
        result.run("phasecorr").summary["epe_mean_px"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="metrics.csv exists"):
        compare.write_comparison(result, out, save_aligned=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    compare.write_comparison(result, out, save_aligned=True, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


# --- the command line ---------------------------------------------------------------------------

def run(argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture
def phantom_files(tmp_path):
    ph = tiny_phantom(sections=4)
    io.write_stack(tmp_path / "stack.tif", ph.stack)
    io.write_stack(tmp_path / "labels.tif", ph.labels.astype(np.uint16))
    return tmp_path / "stack.tif", tmp_path / "labels.tif"


def test_cli_compare_reports_every_method(tmp_path, phantom_files, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, "stub", "test_compare:StubMethod")
    stack, labels = phantom_files
    report = tmp_path / "cmp"
    args = ["compare", stack, "--methods", "stub,learned", "--labels", labels,
            "--deform-seed", 3, "--model", "learned=/nonexistent.safetensors",
            "--option", "stub.shift=[1, 2]", "--report", report, "--no-progress"]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "stub" in out and "unavailable" in out and "/nonexistent.safetensors" in out
    assert f"report: {(report / 'report.html').resolve()}" in out
    doc = json.loads((report / "metrics.json").read_text())
    by_name = {m["name"]: m for m in doc["methods"]}
    assert by_name["stub"]["options"] == {"shift": [1, 2]}
    assert by_name["learned"]["status"] == "unavailable"
    summaries = {s["method"]: s for s in doc["summaries"]}
    for key in ("epe_mean_px", "dice_mean", "dice_prev", "ssim_prev", "total_seconds"):
        assert summaries["stub"][key] is not None, key
    # an existing report is never replaced without --overwrite
    assert run(args) == 2
    assert "exists" in capsys.readouterr().err
    assert run(args + ["--overwrite"]) == 0


def test_cli_compare_refuses_bad_options(tmp_path, phantom_files, capsys):
    stack, _ = phantom_files
    base = ["compare", stack, "--report", tmp_path / "r", "--no-progress"]
    assert run(base + ["--methods", "elastix", "--model", "learned=x.safetensors"]) == 2
    assert "not in --methods" in capsys.readouterr().err
    assert run(base + ["--methods", "elastix", "--option", "elastix-threads=2"]) == 2
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err
    assert run(base + ["--methods", "elastix,elastix"]) == 2
    assert "twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.elastix
def test_cli_compare_with_elastix(tmp_path, phantom_files, capsys):
    stack, _ = phantom_files
    assert run(["compare", stack, "--methods", "elastix", "--params", "em_rigid",
                "--threads", 1, "--deform-seed", 1, "--report", tmp_path / "r",
                "--no-progress"]) == 0
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    s = {x["method"]: x for x in doc["summaries"]}
    assert s["elastix"]["status"] == "ok"
    assert s["elastix"]["epe_mean_px"] < s["none"]["epe_mean_px"]
    assert doc["methods"][1]["options"] == {"params": ["em_rigid"], "threads": 1}


def test_demo_without_methods_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(["demo", "--out", out, "--sections", 3, "--size", 64, "--methods",
                "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "none" in text and f"report: {(out / 'report.html').resolve()}" in text
    for name in ("phantom.tif", "deformed.tif", "labels.tif", "deformed_labels.tif",
                 "metrics.csv", "metrics.json", "report.html"):
        assert (out / name).is_file(), name
    truth, _, _ = io.read_fields(out / "truth")
    assert truth.shape == (3, 2, 64, 64) and np.any(truth[1] != 0)
    assert run(["demo", "--out", out, "--sections", 3, "--size", 64, "--methods"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(["demo", "--out", out, "--sections", 3, "--size", 64, "--methods",
                "--overwrite", "--no-progress"]) == 0


def test_compare_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hybridreg compare" in out and "--deform-seed" in out


@pytest.mark.slow
def test_all_four_methods_run_through_compare(tmp_path, phantom_files, capsys):
    """Every shipped method, with tiny untrained networks: compare runs and reports each."""
    torch = pytest.importorskip("torch")
    from hybridreg.models import FAEMRegNet, FeatureAutoencoder, save_model

    torch.manual_seed(0)
    net = save_model(FAEMRegNet.from_preset("tiny-pyramid"), tmp_path / "net.safetensors")
    ae = save_model(FeatureAutoencoder([[8, 3, 1], [8, 3, 2], [8, 3, 2]], feature_relu=False),
                    tmp_path / "ae.safetensors")
    stack, labels = phantom_files
    assert run(["compare", stack, "--labels", labels, "--deform-seed", 1, "--report",
                tmp_path / "r", "--params", "em_rigid", "--threads", 1,
                "--model", f"learned={net}", "--model", f"ssemnet={ae}",
                "--model", f"hybrid={net}", "--option", f"hybrid.features=\"{ae}\"",
                "--option", "ssemnet.iterations=5", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [(m["name"], m["status"]) for m in doc["methods"]] == [
        ("none", "ok"), ("elastix", "ok"), ("learned", "ok"), ("ssemnet", "ok"),
        ("hybrid", "ok")]
    html = (tmp_path / "r" / "report.html").read_text()
    for name in ("elastix", "learned", "ssemnet", "hybrid"):
        assert f">{name}</td>" in html


def test_cli_compare_takes_the_options_register_and_align_take(tmp_path, phantom_files,
                                                                capsys, monkeypatch):
    """Issue 18 item 11: methods by spaces or commas, a section range and a crop (read by
    region), --spacing, --device, --drift-window, --tile and --intensity on compare."""
    monkeypatch.setitem(METHODS, "stub", "test_compare:StubMethod")
    stack, labels = phantom_files  # 4 sections of 64 x 64
    report = tmp_path / "r"
    assert run(["compare", stack, "--methods", "stub", "learned", "--labels", labels,
                "--sections", "1:4", "--crop", 8, 4, 48, 40, "--spacing", 2, 3,
                "--device", "cpu", "--mode", "sequential", "--drift-window", 3,
                "--tile", 32, "--intensity", "percentiles", "--report", report,
                "--no-progress"]) == 0
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["case"]["sections"] == 3 and doc["case"]["shape_yx"] == [40, 48]
    assert doc["case"]["spacing_xy"] == [2.0, 3.0]
    assert "sections 1:4, rows 4:44, columns 8:56" in doc["case"]["name"]
    assert doc["settings"]["drift_window"] == 3
    assert doc["settings"]["tile"]["tile_px"] == 32
    by_name = {m["name"]: m for m in doc["methods"]}
    assert set(by_name) == {"none", "stub", "learned"}
    assert by_name["learned"]["status"] == "ok", by_name["learned"]
    assert by_name["learned"]["options"]["device"] == "cpu"
    assert "device" not in by_name["stub"]["options"]  # stub takes no device
    assert by_name["learned"]["options"]["intensity_scale"] != 1.0  # percentiles of uint8
    # the same by commas
    assert run(["compare", stack, "--methods", "stub,learned", "--report", tmp_path / "c",
                "--no-progress"]) == 0
    assert {m["name"] for m in json.loads((tmp_path / "c" / "metrics.json").read_text())[
        "methods"]} == {"none", "stub", "learned"}
    capsys.readouterr()
    assert run(["compare", stack, "--methods", "stub", "--crop", 0, 0, 65, 10, "--report",
                tmp_path / "x", "--no-progress"]) == 2
    assert "--crop 0 0 65 10 is not inside the 64x64" in capsys.readouterr().err
    assert run(["compare", stack, "--methods", "stub", "--sections", "7:9", "--report",
                tmp_path / "x", "--no-progress"]) == 2
    assert "selects no section" in capsys.readouterr().err


def test_cli_register_and_align_take_spacing_and_device(tmp_path, phantom_files, capsys):
    from hybridreg import io as hio

    stack, _ = phantom_files
    assert run(["align", stack, "--method", "learned", "--spacing", 4, 5, "--device", "cpu",
                "--out", tmp_path / "a.tif", "--fields-out", tmp_path / "f",
                "--no-progress"]) == 0
    assert hio.read_stack(tmp_path / "a.tif").spacing_xyz[:2] == (4.0, 5.0)
    from hybridreg.outputs import read_transforms

    assert read_transforms(tmp_path / "f")[1].spacing_xy == (4.0, 5.0)
    hio.write_stack(tmp_path / "one.tif", hio.read_stack(stack).data[:1])
    assert run(["register", tmp_path / "one.tif", tmp_path / "one.tif", "--method", "elastix",
                "--device", "cuda", "--out", tmp_path / "r.tif"]) == 2
    assert "--device is for the learned, ssemnet and hybrid methods" in capsys.readouterr().err
    assert run(["align", stack, "--method", "learned", "--spacing", 1, "--out",
                tmp_path / "b.tif", "--fields-out", tmp_path / "g", "--no-progress"]) == 2
    assert "--spacing takes 2 or 3" in capsys.readouterr().err
