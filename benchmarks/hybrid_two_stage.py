"""Study: the hybrid's smooth stage, then a flexible stage, on pairs with exact truth.

How the ``accurate`` preset's two stages and its detail threshold were chosen (issue 21), on
the training stacks only (ISBI 2012 train and vnc2013, three pairs each, the pairs of
bench_pairs.py). Per pair: the learned field low-passed at 32 px; stage 1, a 32 px B-spline
with a bending-energy penalty of weight ``W1``; stage 2, the same grid with weight ``W2``
started from stage 1. Printed: each stage's endpoint error, the NCC after each stage, and
the ratio of the dissimilarities ``(1 - NCC2) / (1 - NCC1)``, which separates a section's
own copy (small: the flexible stage explains almost everything left) from a neighbour
(close to 1: what is left is content change).

    .venv/bin/python benchmarks/hybrid_two_stage.py --out benchmarks/results/hybrid_two_stage.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hybridreg import elastix, io, metrics  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.methods.base import content_mask  # noqa: E402
from hybridreg.methods.hybrid import feature_maps, project_start  # noqa: E402
from hybridreg.methods.neural import ncc_metric  # noqa: E402
from hybridreg.warp import valid_mask  # noqa: E402

from bench_elastix import central_crop, run_meta, write_results  # noqa: E402
from bench_pairs import STACKS, make_pair, pair_sections  # noqa: E402


def stage_map(n: int, weight: float) -> dict:
    m = elastix.refinement_map(n, grid_spacing_px=32, resolutions=1, iterations=250,
                               samples=2048, bending_weight=weight,
                               weights=[1.0] + [0.5 / max(n - 1, 1)] * (n - 1))
    m["WriteResultImage"] = ["false"]
    m["FinalBSplineInterpolationOrder"] = ["1"]
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--w1", type=float, default=30000.0)
    ap.add_argument("--w2", type=float, default=100.0)
    ap.add_argument("--features", type=int, default=2, help="feature channels (0: none)")
    ap.add_argument("--stacks", nargs="+", default=["isbi-train", "vnc"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    hybrid = get_method("hybrid", threads=2)
    ae = hybrid.autoencoder() if args.features else None
    rows = []
    for stack in args.stacks:
        path, crop = STACKS[stack]
        raw = io.read_stack(path).data
        if crop:
            raw, _ = central_crop(raw, None, crop)
        mask = metrics.interior_mask(raw.shape[1:], margin_px=32)
        for kind in ("self", "neighbour"):
            for strength in ("mild", "strong"):
                for k in pair_sections(raw.shape[0], args.pairs):
                    fixed, moving, refs, truth = make_pair(raw, k, kind, strength, args.seed)
                    t = time.perf_counter()
                    u = hybrid.learned.predict_field(fixed, moving, references=refs)[0]
                    start = project_start(u, sigma_px=32)
                    fc, mc = (feature_maps(ae, fixed, moving, n_channels=args.features)
                              if ae is not None else ([], []))
                    fm = content_mask(fixed)
                    kw = {"fixed_mask": fm} if fm is not None else {}
                    r1 = elastix.register_pair(
                        fixed, moving, params=[stage_map(1 + len(fc), args.w1)],
                        initial_field=start, initial_mode="resample", fixed_channels=fc,
                        moving_channels=mc, threads=2, **kw)
                    n1 = ncc_metric(fixed, r1.warped, valid_mask(r1.field))
                    r2 = elastix.register_pair(
                        fixed, moving, params=[stage_map(1 + len(fc), args.w2)],
                        initial_field=r1.field, initial_mode="resample",
                        moving_resampled=r1.warped, fixed_channels=fc, moving_channels=mc,
                        threads=2, **kw)
                    n2 = ncc_metric(fixed, r2.warped, valid_mask(r2.field))
                    err = [float(np.hypot(*(f - truth))[mask].mean()) for f in (r1.field,
                                                                               r2.field)]
                    rows.append({"stack": stack, "kind": kind, "strength": strength, "k": k,
                                 "epe_stage1_px": err[0], "epe_stage2_px": err[1],
                                 "ncc_stage1": n1, "ncc_stage2": n2,
                                 "ratio": (1 - n2) / (1 - n1),
                                 "seconds": time.perf_counter() - t})
                    r = rows[-1]
                    print(f"{stack} {kind} {strength} k={k}: stage 1 {err[0]:.2f} px, stage 2 "
                          f"{err[1]:.2f} px, ratio {r['ratio']:.2f}", flush=True)
    if args.out:
        write_results(args.out, run_meta(w1=args.w1, w2=args.w2, features=args.features),
                      {"pairs": rows})


if __name__ == "__main__":
    main()
