"""Benchmark: peak memory of one registration per pixel, per method (issue 16).

The memory plan of ``hybridreg align`` (:func:`hybridreg.tiling.plan_tile`) needs what one
registration (a whole section, or one tile) costs in memory per pixel. For each method and
size, a fresh process loads the method, registers one small pair (the baseline: imports,
weights, itk's elastix wrapping), then one pair of ``size^2`` cut from real sections, and
reports its peak RSS (``ru_maxrss``) above the baseline, per pixel.

Usage (from the repository root)::

    .venv/bin/python benchmarks/memory_per_px.py --out benchmarks/results/memory_per_px.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

CHILD = r"""
import resource, sys, json, numpy as np
sys.path.insert(0, {root!r})
from hybridreg import io
from hybridreg.methods.registry import get_method
spec, size = {spec!r}, {size}
name, _, opt = spec.partition("/")
kw = dict(threads=2)
if name == "elastix" and opt:
    kw["params"] = opt.split("+")
m = get_method(name, **kw)
raw = io.read_stack({data!r}).data
def cut(k, n):
    reps = -(-n // raw.shape[1])
    return np.tile(raw[k], (reps, reps))[:n, :n].astype(np.float32)
m.register(cut(3, 128), cut(4, 128), references=[cut(1, 128), cut(2, 128)])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
f, g, refs = cut(3, size), cut(4, size), [cut(1, size), cut(2, size)]
inputs = (f.nbytes + g.nbytes + sum(r.nbytes for r in refs))
m.register(f, g, references=refs)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(base=base, peak=peak, inputs=inputs)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+",
                    default=["learned", "elastix/em_affine", "elastix", "hybrid", "ssemnet"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = str(DATA / "vnc2013_stack2_raw.tif")
    results = {}
    for spec in args.methods:
        for size in args.sizes:
            code = CHILD.format(root=str(ROOT), spec=spec, size=size, data=data)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                print(spec, size, "failed:", out.stderr[-500:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["bytes_per_px"] = (r["peak"] - r["base"]) / size ** 2
            results[f"{spec} | {size}"] = r
            print(f"{spec:22s} {size:5d}: base {r['base'] / 2**30:.2f} GiB, peak "
                  f"{r['peak'] / 2**30:.2f} GiB, {r['bytes_per_px']:.0f} B/px", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
