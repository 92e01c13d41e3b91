"""Joint alignment on Dask workers: same output with 1 or 2 workers, a killed worker survived."""
from __future__ import annotations

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


def cluster(n):
    c = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                 dashboard_address=None)
    return c, distributed.Client(c)


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
        c, client = cluster(n)
        try:
            r = align_stack(stack, PhaseCorrelation(), neighbours=2, client=client)
        finally:
            client.close()
            c.close()
        assert np.array_equal(r.fields, serial.fields)
        assert np.array_equal(r.aligned, serial.aligned)
        assert [p["weight"] for p in r.pairs] == [p["weight"] for p in serial.pairs]


def test_a_killed_worker_is_survived(stack, tmp_path):
    serial = align_stack(stack, PhaseCorrelation(), neighbours=2)
    method = DiesOnce(tmp_path / "died")
    method.target = float(stack[1].mean())
    c, client = cluster(2)
    try:
        r = align_stack(stack, method, neighbours=2, client=client)
    finally:
        client.close()
        c.close()
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
