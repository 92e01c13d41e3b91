"""Benchmark: the joint solve's memory against the number of sections and the map size.

Pair maps (smooth random fields plus a per-pair shift, one pair in 50 corrupted so that the
robust weights have work) are written to an on-disk :class:`hybridreg.stack.MapStack`, as
``align_stack`` keeps them past ``MAPS_IN_MEMORY_BYTES``; the solve then runs block by block
into another MapStack. Each case runs in a fresh subprocess under ``/usr/bin/time -f %M``
(peak RSS of that process: Python, torch and zarr imports included).

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_solve_memory.py \
        --cases 50x513 1000x513 100x3126 --out benchmarks/results/solve_memory.json

``ZxN``: Z sections with maps of N x N nodes (513: a 16384^2 section at stride 32; 3126:
100,000^2), one neighbour on each side (Z - 1 pairs).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_case(z: int, n: int, folder: str) -> dict:
    import numpy as np
    from scipy import ndimage

    from hybridreg.joint import solve_joint
    from hybridreg.stack import MapStack, _PairMap

    rng = np.random.default_rng(0)
    pairs = [(i, i + 1) for i in range(z - 1)]
    store = MapStack((len(pairs), 2, n, n), folder, "pairs.zarr")
    # one smooth pattern at 1/16 resolution, moved per pair: cheap to make at any size
    base = ndimage.zoom(rng.standard_normal((2, max(2, n // 16), max(2, n // 16))),
                        (1, n / max(2, n // 16), n / max(2, n // 16)), order=1)[:, :n, :n]
    t0 = time.perf_counter()
    for k, p in enumerate(pairs):
        m = (base * 2.0 + rng.normal(0, 3, (2, 1, 1))).astype(np.float32)
        if k % 50 == 25:
            m += 40.0  # a bad pair
        store[k] = m
    write_s = time.perf_counter() - t0
    del base, m
    import resource

    written_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out = MapStack((z, 2, n, n), folder, "maps.zarr")
    t0 = time.perf_counter()
    sol = solve_joint({p: _PairMap(store, k) for k, p in enumerate(pairs)}, z,
                      spacing_xy=(32.0, 32.0), stride=32, out=out)
    solve_s = time.perf_counter() - t0
    low = sum(1 for w in sol.pair_weight.values() if w < 0.5)
    return {"sections": z, "nodes": n, "pairs": len(pairs),
            "map_bytes_on_disk_gb": round((len(pairs) + z) * 2 * n * n * 4 / 1e9, 3),
            "write_s": round(write_s, 1), "solve_s": round(solve_s, 1),
            "peak_before_solve_gb": round(written_peak, 3),
            "down_weighted_pairs": low}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["50x513", "1000x513"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solve_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        z, n = (int(x) for x in args.one.split("x"))
        with tempfile.TemporaryDirectory(prefix="hybridreg-solve-") as folder:
            print(json.dumps(run_case(z, n, folder)))
        return 0
    from bench_elastix import in_fresh_process  # here: the measured processes skip it

    rows = []
    for case in args.cases:
        row = in_fresh_process(__file__, "--one", case)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
