"""Joint alignment on Dask workers: same output with 1 or 2 workers, a killed worker survived."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from hybridreg import phantom
from hybridreg.stack import align_stack

from helpers import PhaseCorrelation

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def stack():
    section = phantom.make_phantom(sections=1, shape_yx=(64, 64), seed=2).stack[0]
    rng = np.random.default_rng(1)
    shifts = [(0, 0), (2, -1), (-3, 2), (1, 3), (-2, -2)]
    return np.stack([np.roll(section, (-dy, -dx), axis=(0, 1)) + rng.normal(0, 4, (64, 64))
                     for dx, dy in shifts]).astype(np.float32)


@contextlib.contextmanager
def cluster(n):
    """A client of a local cluster of ``n`` single-threaded worker processes."""
    with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c, distributed.Client(c) as client:
        yield client


class DiesOnce(PhaseCorrelation):
    """Kills its worker process the first time it registers pair 1-2 (a flag file marks it)."""

    def __init__(self, flag):
        super().__init__()
        self.flag = str(flag)

    def register(self, fixed, moving, **kwargs):
        if not os.path.exists(self.flag) and float(fixed.mean()) == self.target:
            Path(self.flag).write_text("died")
            os._exit(1)
        return super().register(fixed, moving, **kwargs)


def test_one_and_two_workers_give_the_serial_result(stack):
    serial = align_stack(stack, PhaseCorrelation(), neighbours=2)
    for n in (1, 2):
        with cluster(n) as client:
            r = align_stack(stack, PhaseCorrelation(), neighbours=2, client=client)
        assert np.array_equal(r.fields, serial.fields)
        assert np.array_equal(r.aligned, serial.aligned)
        assert [p["weight"] for p in r.pairs] == [p["weight"] for p in serial.pairs]


def test_a_killed_worker_is_survived(stack, tmp_path):
    serial = align_stack(stack, PhaseCorrelation(), neighbours=2)
    method = DiesOnce(tmp_path / "died")
    method.target = float(stack[1].mean())
    with cluster(2) as client:
        r = align_stack(stack, method, neighbours=2, client=client)
    assert (tmp_path / "died").exists()  # a worker really died mid-run
    assert np.array_equal(r.fields, serial.fields)


def test_sequential_mode_refuses_workers(stack):
    with pytest.raises(ValueError, match="mode='joint'"):
        align_stack(stack, PhaseCorrelation(), mode="sequential", client=object())


@pytest.mark.slow
@pytest.mark.elastix
def test_cli_elastix_one_and_two_workers_identical(tmp_path):
    from hybridreg import cli, io

    run = lambda argv: cli.main([str(a) for a in argv])  # noqa: E731
    assert run(["phantom", "--out", tmp_path / "ph.tif", "--sections", 4, "--size", 128, 128,
                "--seed", 3]) == 0
    assert run(["deform", tmp_path / "ph.tif", "--out", tmp_path / "def.tif", "--fields-out",
                tmp_path / "truth", "--seed", 4]) == 0
    out = {}
    for n in (1, 2):
        assert run(["align", tmp_path / "def.tif", "--params", "em_rigid", "--threads", 1,
                    "--workers", n, "--out", tmp_path / f"a{n}.tif", "--fields-out",
                    tmp_path / f"f{n}", "--no-progress"]) == 0
        out[n] = io.read_fields(tmp_path / f"f{n}")[0]
    assert np.array_equal(out[1], out[2])


class SlowOnWorkers(PhaseCorrelation):
    """Phase correlation that takes a while and leaves a trace: ``started-PID-N`` when a pair
    begins on a worker process, ``done-PID-N`` when it ends."""

    def __init__(self, trace, seconds=0.4):
        super().__init__()
        self.trace, self.seconds = str(trace), seconds

    def register(self, fixed, moving, **kwargs):
        import time
        import uuid

        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        Path(self.trace, f"started-{tag}").touch()
        time.sleep(self.seconds)
        res = super().register(fixed, moving, **kwargs)
        Path(self.trace, f"done-{tag}").touch()
        return res


def kill_a_busy_worker(trace: Path, stop, killed: list) -> None:
    """Once a pair has finished, SIGKILL a worker process in the middle of another pair."""
    import signal
    import time

    while not stop.is_set():
        names = {p.name for p in trace.iterdir()}
        if any(n.startswith("done-") for n in names):
            busy = [n[len("started-"):] for n in names if n.startswith("started-")
                    and f"done-{n[len('started-'):]}" not in names]
            if busy:
                os.kill(int(busy[0].split("-")[0]), signal.SIGKILL)
                killed.append(busy[0])
                return
        time.sleep(0.02)


def test_a_worker_killed_from_outside_mid_run_is_survived(stack, tmp_path):
    """SIGKILL (as the OOM killer or a lost node would) a worker while it registers a pair:
    Dask reschedules the pair on a live worker and the output is that of a serial run."""
    import threading

    serial = align_stack(stack, PhaseCorrelation(), neighbours=2)
    trace = tmp_path / "trace"
    trace.mkdir()
    killed: list = []
    stop = threading.Event()
    with cluster(2) as client:
        watcher = threading.Thread(target=kill_a_busy_worker, args=(trace, stop, killed))
        watcher.start()
        try:
            r = align_stack(stack, SlowOnWorkers(trace), neighbours=2, client=client)
        finally:
            stop.set()
            watcher.join()
    assert killed, "no worker was killed during the run"
    assert not (trace / f"done-{killed[0]}").exists()  # it died in the middle of a pair
    # every pair finished; the killed one again (and any result held by the dead worker)
    assert len(list(trace.glob("done-*"))) >= 7
    assert np.array_equal(r.fields, serial.fields)
    assert np.array_equal(r.aligned, serial.aligned)
    assert [row["flagged"] for row in r.table] == [row["flagged"] for row in serial.table]


class FailsOnPair(PhaseCorrelation):
    """Raises, like elastix on a section it cannot register, when pair (i, j) is asked."""

    def __init__(self, fixed_mean, moving_mean):
        super().__init__()
        self.fixed_mean, self.moving_mean = fixed_mean, moving_mean

    def register(self, fixed, moving, **kwargs):
        if (float(fixed.mean()), float(moving.mean())) == (self.fixed_mean, self.moving_mean):
            raise RuntimeError("itk::ExceptionObject\nDescription: elastix failed here")
        return super().register(fixed, moving, **kwargs)


def test_a_registration_failing_on_a_worker_is_flagged_and_the_stack_continues(stack):
    method = FailsOnPair(float(stack[1].mean()), float(stack[2].mean()))
    serial = align_stack(stack, method, neighbours=2)
    with cluster(2) as client:
        r = align_stack(stack, method, neighbours=2, client=client)
    [failed] = [p for p in r.pairs if (p["fixed"], p["moving"]) == (1, 2)]
    assert "registration failed: RuntimeError: elastix failed here" in failed["warnings"]
    assert failed["weight"] == 0.0
    assert r.table[1]["flagged"] and r.table[2]["flagged"]
    assert "pair 1-2: registration failed" in r.table[2]["warnings"]
    assert np.isfinite(r.fields).all()
    assert np.array_equal(r.fields, serial.fields)  # the same as without workers


def test_workers_read_a_lazy_stack_themselves(stack, tmp_path):
    from hybridreg import io

    io.write_stack(tmp_path / "stack.zarr", stack)
    lazy = io.read_stack(tmp_path / "stack.zarr", lazy=True).data
    serial = align_stack(stack, PhaseCorrelation(), neighbours=2)
    with cluster(2) as client:
        r = align_stack(lazy, PhaseCorrelation(), neighbours=2, client=client)
    # here: each section once, for the NaN check of a float stack; the pairs' sections were
    # read by the workers (here, they would add 2 reads per pair)
    assert lazy.reads == stack.shape[0]
    assert np.array_equal(r.fields, serial.fields)
    assert np.array_equal(np.asarray(r.aligned), serial.aligned)


@pytest.mark.slow
@pytest.mark.elastix
def test_elastix_failing_on_a_worker_is_flagged_and_the_stack_continues(tmp_path):
    """A real elastix error (one pair's optimisation diverges: a step size elastix is not
    allowed to estimate, 10^12), raised on a Dask worker: the pair is flagged in the tables
    and left out, every section is aligned. (A map elastix cannot run at all, such as an
    unknown transform, ends the run instead: tests/test_cli_align.py.)"""
    from hybridreg import synthetic
    from hybridreg.methods.elastix import ElastixMethod

    class FailsOnSection2(ElastixMethod):
        def __init__(self, target, **kwargs):
            super().__init__(**kwargs)
            self.target = target
            self.good_maps = self.parameter_maps

        def register(self, fixed, moving, **kwargs):
            bad = [dict(m, AutomaticParameterEstimation=["false"], SP_a=["1e12"])
                   for m in self.good_maps]
            self.parameter_maps = bad if float(moving.mean()) == self.target else self.good_maps
            return super().register(fixed, moving, **kwargs)

    ph = phantom.make_phantom(sections=4, shape_yx=(96, 96), seed=3)
    d = synthetic.deform_stack(ph.stack, seed=4, max_shift_px=4, elastic_px=1)
    raw = d.stack.astype(np.float32)
    method = FailsOnSection2(float(raw[2].mean()), params=["em_rigid"], threads=1)
    with cluster(2) as client:
        r = align_stack(raw, method, neighbours=2, client=client)
    failed = [p for p in r.pairs if p["moving"] == 2]
    assert failed and all(p["warnings"].startswith("registration failed") and
                          p["weight"] == 0.0 for p in failed), failed
    assert r.table[2]["flagged"] and "registration failed" in r.table[2]["warnings"]
    ok = [p for p in r.pairs if p["moving"] != 2]
    assert ok and not any(p["warnings"].startswith("registration failed") for p in ok)
    assert np.isfinite(r.fields).all() and r.aligned.shape == raw.shape


def test_compare_on_workers_gives_the_serial_comparison(stack):
    from hybridreg import compare

    case = compare.make_case(stack, deform_seed=3)
    serial = compare.compare_methods(case, [PhaseCorrelation()])
    with cluster(2) as client:
        parallel = compare.compare_methods(case, [PhaseCorrelation()], client=client)
    a, b = serial.run("phasecorr"), parallel.run("phasecorr")
    assert a.status == b.status == "ok"
    np.testing.assert_array_equal(np.asarray(a.fields), np.asarray(b.fields))
    assert [r["epe_mean_px"] for r in a.rows] == [r["epe_mean_px"] for r in b.rows]


def test_workers_render_and_write_the_zarr_sections(stack, tmp_path):
    """An OME-Zarr output written by the workers (each its own sections) is the one a single
    process writes; so is `apply --workers`."""
    from hybridreg import cli, io
    from hybridreg.outputs import save_alignment

    r = align_stack(stack, PhaseCorrelation())
    save_alignment(r, out=tmp_path / "one.zarr", fields_out=tmp_path / "f", transforms=False)
    with cluster(2) as client:
        save_alignment(r, out=tmp_path / "two.zarr", client=client)
    one = np.asarray(io.read_stack(tmp_path / "one.zarr").data)
    assert np.array_equal(one, np.asarray(io.read_stack(tmp_path / "two.zarr").data))
    assert not list(tmp_path.glob(".*.progress"))  # both complete
    io.write_stack(tmp_path / "raw.tif", stack)
    for name, extra in (("serial.zarr", []), ("workers.zarr", ["--workers", "2"])):
        assert cli.main(["apply", str(tmp_path / "raw.tif"), "--fields", str(tmp_path / "f"),
                         "--out", str(tmp_path / name), *extra]) == 0
    assert np.array_equal(np.asarray(io.read_stack(tmp_path / "serial.zarr").data),
                          np.asarray(io.read_stack(tmp_path / "workers.zarr").data))
    assert cli.main(["apply", str(tmp_path / "raw.tif"), "--fields", str(tmp_path / "f"),
                     "--out", str(tmp_path / "x.tif"), "--workers", "2"]) == 2


def test_cli_workers_print_no_dask_chatter(tmp_path):
    """`--workers 2` as a user runs it (issue 18 item 9): no Dask INFO lines, no dashboard on
    :8787, no "killing" at the end; only hybridreg's own lines."""
    import subprocess
    import sys

    from hybridreg import cli

    assert cli.main(["phantom", "--out", str(tmp_path / "ph.tif"), "--sections", "4",
                     "--size", "96", "96"]) == 0
    proc = subprocess.run([sys.executable, "-m", "hybridreg.cli", "align",
                           str(tmp_path / "ph.tif"), "--out", str(tmp_path / "a.tif"),
                           "--fields-out", str(tmp_path / "f"), "--method", "learned",
                           "--workers", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for chatter in ("INFO", "8787", "dashboard", "killing", "distributed."):
        assert chatter not in text, text
    assert "aligned 4 sections" in proc.stdout


class MaskFraction:
    """A method whose field says what masks it got: u_x = 10 x the kept fraction of the
    fixed mask, u_y of the moving one."""

    name = "mask-fraction"

    def register(self, fixed, moving, *, references=(), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None):
        from hybridreg.methods import RegistrationResult

        u = np.zeros((2,) + fixed.shape, np.float32)
        u[0] = 10.0 * float(np.mean(np.asarray(fixed_mask) != 0))
        u[1] = 10.0 * float(np.mean(np.asarray(moving_mask) != 0))
        return RegistrationResult(field=u, warped=np.asarray(moving, np.float32))


def test_masks_reach_the_pairs_on_workers(stack, tmp_path):
    """align --masks on Dask workers (issue 17): the same result as one process, with the
    masks sent with each pair, or read by the workers from a lazily read mask stack."""
    from hybridreg import io

    masks = np.full(stack.shape, 255, np.uint8)
    for k in range(len(stack)):
        masks[k, :, : 8 * (k + 1)] = 0  # a different kept fraction per section
    serial = align_stack(stack, MaskFraction(), neighbours=2, masks=masks)
    plain = align_stack(stack, MaskFraction(), neighbours=2, masks=np.full_like(masks, 255))
    assert not np.array_equal(np.asarray(serial.maps), np.asarray(plain.maps))
    io.write_stack(tmp_path / "s.tif", stack)
    io.write_stack(tmp_path / "m.tif", masks)
    lazy = io.read_stack(tmp_path / "s.tif", lazy=True).data
    lazy_masks = io.read_stack(tmp_path / "m.tif", lazy=True).data
    with cluster(2) as client:
        sent = align_stack(stack, MaskFraction(), neighbours=2, masks=masks, client=client)
        read = align_stack(lazy, MaskFraction(), neighbours=2, masks=lazy_masks,
                           client=client)
    assert np.array_equal(np.asarray(sent.maps), np.asarray(serial.maps))
    assert np.array_equal(np.asarray(read.maps), np.asarray(serial.maps))
