"""`hybridreg align --scheduler ADDRESS` on a Dask cluster started with Dask's own command
line: a scheduler and two workers, each a separate process (`dask scheduler`, `dask worker`),
as on a real cluster (docs/cluster.md). One worker is SIGKILLed in the middle of a pair (as
the OOM killer or a lost node would); its pairs are rescheduled on the other worker and the
aligned stack and the fields are bit-identical to those of a one-process run.

The learned method (threads 1) is deterministic and registers a 128 px pair in about 10 ms,
too fast to hit a worker mid-pair by polling. So the workers are started with a ``--preload``
script (a Dask worker option) that makes every pair wait ``PAIR_DELAY_S`` first and leave a
trace: ``started-PID-I-J-X`` when the pair begins on worker process PID, ``done-PID-I-J-X``
when it ends. The registration itself is hybridreg's, unchanged.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybridreg import io

distributed = pytest.importorskip("distributed")

SECTIONS = 12  # 11 pairs
PAIR_DELAY_S = 0.3
START_TIMEOUT_S = 90  # scheduler file written, both workers connected
RUN_TIMEOUT_S = 240  # one align run

#: The ``dask worker --preload`` script: HYBRIDREG_TEST_TRACE (a folder) and
#: HYBRIDREG_TEST_PAIR_DELAY (seconds) come from the worker's environment.
PRELOAD = '''
"""Every pair on this worker: a trace file when it starts and ends, a delay first."""
import os
import time
import uuid
from pathlib import Path

import hybridreg.stack as _stack

_TRACE = Path(os.environ["HYBRIDREG_TEST_TRACE"])
_DELAY = float(os.environ["HYBRIDREG_TEST_PAIR_DELAY"])


def _traced(*args, what, **kwargs):
    # what: "pair I-J"; the tag: PID-I-J-X (X tells apart two runs of one pair)
    tag = f"{os.getpid()}-{what.split()[-1]}-{uuid.uuid4().hex[:8]}"
    (_TRACE / f"started-{tag}").touch()
    time.sleep(_DELAY)
    out = _stack._untraced_register(*args, what=what, **kwargs)
    (_TRACE / f"done-{tag}").touch()
    return out


# tasks name hybridreg.stack._register_sections (or _register) by reference: the worker's
# copy of the module is the one they run, and _register_sections calls _register there.
# Dask imports a preload script more than once (it reloads it): wrap the original only.
if not hasattr(_stack, "_untraced_register"):
    _stack._untraced_register = _stack._register
_stack._register = _traced
'''


def dask_command(sub: str) -> list[str]:
    """``dask scheduler`` / ``dask worker``: the ``dask`` script of this Python's environment,
    else the same command as a module."""
    script = Path(sys.executable).with_name("dask")
    if script.is_file():
        return [str(script), sub]
    return [sys.executable, "-m", f"distributed.cli.dask_{sub}"]


def hybridreg(*args) -> list[str]:
    return [sys.executable, "-m", "hybridreg.cli", *map(str, args)]


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class DaskCLICluster:
    """A scheduler and workers, each a ``dask ...`` subprocess; :meth:`close` ends them all."""

    def __init__(self, root: Path):
        self.root = root
        self.scheduler_file = root / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.address = None

    def _spawn(self, name, argv, env=None):
        self.logs[name] = self.root / f"{name}.log"
        with open(self.logs[name], "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env,
                                                cwd=self.root)
        return self.procs[name]

    def logs_text(self) -> str:
        return "\n".join(f"--- {name} (exit {self.procs[name].poll()}):\n{tail(path)}"
                         for name, path in self.logs.items())

    def start(self, n_workers: int, *, env: dict, preload: Path) -> None:
        self._spawn("scheduler", dask_command("scheduler") + [
            "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1", "--port", "0",
            "--no-dashboard"], env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the file is written once the scheduler listens
            if self.scheduler_file.exists():
                try:
                    self.address = json.loads(self.scheduler_file.read_text())["address"]
                    break
                except (ValueError, KeyError):
                    pass  # being written
            if self.procs["scheduler"].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`dask scheduler` did not write {self.scheduler_file} within "
                            f"{START_TIMEOUT_S} s\n{self.logs_text()}")
            time.sleep(0.1)
        for k in range(n_workers):
            # --no-nanny: the subprocess is the worker process itself (SIGKILLing it kills
            # the worker, nothing restarts it, nothing is left behind)
            self._spawn(f"worker{k}", dask_command("worker") + [
                "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1",
                "--nthreads", "1", "--no-nanny", "--no-dashboard", "--death-timeout", "60",
                "--local-directory", str(self.root / f"worker{k}"), "--name", f"worker{k}",
                "--preload", str(preload)], env=env)
        try:
            with distributed.Client(scheduler_file=str(self.scheduler_file),
                                    timeout=START_TIMEOUT_S) as client:
                client.wait_for_workers(n_workers, timeout=START_TIMEOUT_S)
                pids = set(client.run(os.getpid).values())
        except (OSError, TimeoutError) as exc:
            pytest.fail(f"{n_workers} `dask worker` processes did not connect to the scheduler "
                        f"at {self.address} within {START_TIMEOUT_S} s ({exc!r})\n"
                        f"{self.logs_text()}")
        assert pids == self.worker_pids(), (pids, self.worker_pids())

    def worker_pids(self) -> set[int]:
        return {p.pid for name, p in self.procs.items() if name.startswith("worker")}

    def close(self) -> None:
        # workers first (they would otherwise try to reconnect), then the scheduler
        order = sorted(self.procs, key=lambda name: name == "scheduler")
        for name in order:
            if self.procs[name].poll() is None:
                self.procs[name].terminate()
        deadline = time.monotonic() + 15
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def dask_cli_cluster(tmp_path):
    cluster = DaskCLICluster(tmp_path / "cluster")
    cluster.root.mkdir()
    yield cluster
    cluster.close()


def pair_trace(trace: Path) -> tuple[set[str], set[str]]:
    """Tags of the pairs started and finished on the workers."""
    names = [p.name for p in trace.iterdir()]
    return ({n[len("started-"):] for n in names if n.startswith("started-")},
            {n[len("done-"):] for n in names if n.startswith("done-")})


def age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def run_and_kill_a_busy_worker(argv, *, cluster: DaskCLICluster, work: Path, trace: Path,
                               log: Path):
    """Run ``argv``; once a pair is checkpointed in ``work``, SIGKILL a worker process in
    the middle of another pair. Returns (exit code, the killed pair's tag, pairs finished
    when it was killed)."""
    killed = finished_then = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"align did not end within {RUN_TIMEOUT_S} s\n{tail(log)}\n"
                            f"{cluster.logs_text()}")
            if killed is None:
                finished = list(work.glob("pair_*.json")) if work.is_dir() else []
                started, done = pair_trace(trace)
                # a pair that began less than half its delay ago: still in the middle of it
                # when the signal lands
                busy = [t for t in started - done
                        if int(t.split("-")[0]) in cluster.worker_pids()
                        and age(trace / f"started-{t}") < PAIR_DELAY_S / 2]
                if finished and busy:
                    os.kill(int(busy[0].split("-")[0]), signal.SIGKILL)
                    killed, finished_then = busy[0], len(finished)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, killed, finished_then


def rows(path: Path, drop=("seconds",)) -> list[dict]:
    """A CSV table without its timing columns."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


def test_align_on_a_dask_cli_cluster_survives_a_killed_worker_and_matches_one_process(
        tmp_path, dask_cli_cluster):
    stack = tmp_path / "def.tif"
    for argv in (hybridreg("phantom", "--out", tmp_path / "ph.tif", "--sections", SECTIONS,
                           "--size", 128, 128, "--seed", 1),
                 hybridreg("deform", tmp_path / "ph.tif", "--out", stack, "--fields-out",
                           tmp_path / "truth", "--seed", 2, "--max-shift-px", 4,
                           "--elastic-px", 2)):
        res = subprocess.run(argv, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout}{res.stderr}"
    align = ["--method", "learned", "--threads", 1, "--no-progress"]

    # the reference, in one process without Dask, runs meanwhile (most of its time goes into
    # loading itk to write the transforms)
    log_b = tmp_path / "align_B.log"
    with open(log_b, "wb") as out:
        one = subprocess.Popen(hybridreg("align", stack, "--out", tmp_path / "B.tif",
                                         "--fields-out", tmp_path / "FB", *align),
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        trace = tmp_path / "trace"
        trace.mkdir()
        preload = tmp_path / "slow_traced_pairs.py"
        preload.write_text(PRELOAD)
        env = dict(os.environ, HYBRIDREG_TEST_TRACE=str(trace),
                   HYBRIDREG_TEST_PAIR_DELAY=str(PAIR_DELAY_S))
        cluster = dask_cli_cluster
        cluster.start(2, env=env, preload=preload)
        fa = tmp_path / "FA"
        log = tmp_path / "align_A.log"
        rc, killed, finished_then = run_and_kill_a_busy_worker(
            hybridreg("align", stack, "--out", tmp_path / "A.tif", "--fields-out", fa,
                      "--scheduler", cluster.address, *align),
            cluster=cluster, work=fa / "work", trace=trace, log=log)
        rc_one = one.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if one.poll() is None:
            one.kill()
            one.wait()
    assert rc_one == 0, tail(log_b)
    output = f"{tail(log)}\n{cluster.logs_text()}"
    assert rc == 0, f"align --scheduler failed (exit {rc})\n{output}"
    assert killed is not None, (
        f"the run ended before a worker could be killed in the middle of a pair; make the "
        f"pairs slower (PAIR_DELAY_S) or the stack longer\n{output}")

    # the kill was mid-run and mid-pair, and the pair was registered again elsewhere
    n_pairs = SECTIONS - 1
    assert finished_then < n_pairs, (finished_then, n_pairs)
    pid, i, j, _ = killed.split("-")
    victim = next(p for name, p in cluster.procs.items() if p.pid == int(pid))
    assert victim.wait(timeout=10) == -signal.SIGKILL
    started, done = pair_trace(trace)
    assert killed not in done  # it died in the middle of its pair
    redone = [t for t in done if t.split("-")[1:3] == [i, j]]
    assert redone and all(t.split("-")[0] != pid for t in redone), (killed, sorted(done))
    # every pair finished on a worker (some twice: the dead worker's results are recomputed)
    assert {tuple(t.split("-")[1:3]) for t in done} == {
        (str(k), str(k + 1)) for k in range(n_pairs)}
    assert not (fa / "work").exists()  # a complete run removes its checkpoints

    # bit-identical to the one-process run
    a = io.read_stack(tmp_path / "A.tif").data
    b = io.read_stack(tmp_path / "B.tif").data
    assert a.shape == (SECTIONS, 128, 128) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    names = sorted(p.name for p in (tmp_path / "FB").glob("section_*.mha"))
    assert names == [f"section_{k:04d}.mha" for k in range(SECTIONS)]
    assert sorted(p.name for p in fa.glob("section_*.mha")) == names
    for name in names:
        ua, spacing_a, origin_a = io.read_field(fa / name)
        ub, spacing_b, origin_b = io.read_field(tmp_path / "FB" / name)
        assert np.array_equal(ua, ub), name
        assert (spacing_a, origin_a) == (spacing_b, origin_b), name
    for table in ("pairs.csv", "sections.csv"):
        assert rows(fa / table) == rows(tmp_path / "FB" / table), table
