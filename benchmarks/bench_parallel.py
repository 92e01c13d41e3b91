"""Benchmark: throughput with Dask workers, and drift along a long stack.

throughput
    `hybridreg align` (joint, em_rigid, --threads 1) on a deformed stack with a local Dask
    cluster of 1 and of 2 worker processes: sections per minute (wall time of the whole
    command, worker start-up and elastix loading included), and whether the fields are
    identical.
drift
    A long deformed phantom (default 100 sections) aligned sequentially (each section to the
    aligned one before it) and with the joint solve over independent pairs: mean endpoint error
    against the ground truth per block of sections, to show how error grows along the stack.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_parallel.py --out benchmarks/results/parallel.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridreg import io, metrics, phantom, synthetic  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.stack import align_stack  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def throughput(stack_path: Path, workers: int, tmp: Path, params: str) -> tuple[float, Path]:
    out = tmp / f"fields_{workers}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hybridreg.cli", "align", str(stack_path), "--params",
                    params, "--threads", "1", "--workers", str(workers), "--out",
                    str(tmp / f"aligned_{workers}.tif"), "--fields-out", str(out),
                    "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(DATA / "isbi2012_train_raw.tif"),
                    help="stack for the throughput test (deformed with --seed first)")
    ap.add_argument("--params", default="em_rigid")
    ap.add_argument("--sections", type=int, default=100, help="drift: phantom sections")
    ap.add_argument("--size", type=int, default=256, help="drift: phantom section size")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results: dict = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = io.read_stack(args.stack).data
        deformed = synthetic.deform_stack(raw, seed=args.seed)
        io.write_stack(tmp / "deformed.tif", deformed.stack)
        z = raw.shape[0]
        fields = {}
        for n in (1, 2):
            seconds, out = throughput(tmp / "deformed.tif", n, tmp, args.params)
            fields[n] = io.read_fields(out)[0]
            results[f"throughput_workers_{n}"] = {"seconds": round(seconds, 1),
                                                  "sections_per_minute": round(60 * z / seconds, 1)}
            print(f"{n} worker(s): {z} sections in {seconds:.1f} s = "
                  f"{60 * z / seconds:.1f} sections/min", flush=True)
        same = bool(np.array_equal(fields[1], fields[2]))
        results["identical_fields_1_vs_2_workers"] = same
        print(f"identical fields with 1 and 2 workers: {same}", flush=True)

    ph = phantom.make_phantom(sections=args.sections, shape_yx=(args.size, args.size), seed=1)
    d = synthetic.deform_stack(ph.stack, seed=args.seed)
    method = get_method("elastix", params=[args.params], threads=2)
    margin = args.size // 16
    curves = {}
    for mode in ("sequential", "joint"):
        t = time.perf_counter()
        r = align_stack(d.stack, method, mode=mode)
        rows = metrics.evaluate_stack(fields=r.fields, true_fields=d.fields, margin_px=margin)
        epe = np.array([row["epe_mean_px"] for row in rows])
        curves[mode] = epe
        results[f"drift_{mode}"] = {
            "epe_mean_px": round(float(epe[1:].mean()), 2),
            "epe_by_block_of_10": [round(float(epe[i:i + 10].mean()), 2)
                                   for i in range(0, len(epe), 10)],
            "seconds": round(time.perf_counter() - t, 1)}
        print(f"drift, {mode}: mean {epe[1:].mean():.2f} px; by blocks of 10 sections: "
              f"{results[f'drift_{mode}']['epe_by_block_of_10']}", flush=True)
    none = np.array([row["epe_mean_px"] for row in metrics.evaluate_stack(
        fields=np.zeros_like(d.fields), true_fields=d.fields, margin_px=margin)])
    results["drift_none"] = {"epe_mean_px": round(float(none[1:].mean()), 2)}
    print(f"drift, none: mean {none[1:].mean():.2f} px")
    if args.out:
        metrics.write_json({"command": " ".join(["python"] + sys.argv), "results": results},
                           args.out)
        print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
