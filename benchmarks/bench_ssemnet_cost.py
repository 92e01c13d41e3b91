"""Benchmark: ssEMnet's cost and accuracy against where the moving section is warped.

ssEMnet as published warps the moving *section* at every optimisation step and encodes it
again (``warp_stride=1``): at 1024^2 the full-resolution stage runs the autoencoder's first
layer (128 channels, 5x5, full resolution) forward and backward 20 times. ``warp_stride=s``
runs the moving section's first encoder layers (up to stride ``s``) once per pyramid stage
and warps their output instead; the loss, the map and the pyramid are unchanged.

Pairs as in ``bench_pairs.py`` (a section against its own deformed copy, ``self``, and
against its deformed neighbour, ``neighbour``; ``mild`` and ``strong`` deformations, exact
truth), on vnc at its full 1024^2 and on isbi-train (512^2). Every variant runs in its own
process under ``/usr/bin/time -f %M`` (peak RSS), two threads, the method's own pyramid
(4, 2, 1).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_ssemnet_cost.py --out benchmarks/results/ssemnet_cost.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {"image": 1, "w2": 2, "w4": 4}
#: stack -> (file name, central crop or None, sections)
STACKS = {"vnc-1024": ("vnc2013_stack2_raw.tif", None, [8]),
          "isbi-train": ("isbi2012_train_raw.tif", None, [10, 20])}


def run_variant(variant: str, threads: int, seed: int) -> dict:
    from bench_pairs import DATA, STRENGTHS, make_pair, pair_figures

    from hybridreg import io, metrics
    from hybridreg.methods import get_method

    method = get_method("ssemnet", threads=threads, warp_stride=VARIANTS[variant])
    rows = []
    for stack, (name, _, ks) in STACKS.items():
        path = DATA / name
        if not path.is_file():
            print(f"{stack}: {path} not found, skipped", file=sys.stderr)
            continue
        raw = io.read_stack(path).data
        mask = metrics.interior_mask(raw.shape[1:], margin_px=32)
        for k in ks:
            for kind in ("self", "neighbour"):
                for strength in STRENGTHS:
                    fixed, moving, refs, truth = make_pair(raw, k, kind, strength, seed)
                    t0 = time.perf_counter()
                    res = method.register(fixed, moving, references=refs)
                    seconds = time.perf_counter() - t0
                    rows.append({"stack": stack, "k": k, "kind": kind, "strength": strength,
                                 "seconds": round(seconds, 2),
                                 **pair_figures(res.field, truth, mask)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"variant": variant, "warp_stride": VARIANTS[variant], "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ssemnet_cost.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.threads, args.seed)))
        return 0
    from bench_elastix import in_fresh_process  # here: the measured processes skip it

    out = []
    for v in args.variants:
        res = in_fresh_process(__file__, "--one", v, "--threads", args.threads,
                               "--seed", args.seed)
        out.append(res)
        for stack in STACKS:
            rows = [r for r in res["rows"] if r["stack"] == stack]
            if rows:
                print(f"{v:6s} {stack:11s} s/pair {np.mean([r['seconds'] for r in rows]):6.1f}  "
                      f"EPE {np.mean([r['epe_mean_px'] for r in rows]):.3f} px  "
                      f"peak {res['peak_rss_gb']:.2f} GB", flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "variants": out},
                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
