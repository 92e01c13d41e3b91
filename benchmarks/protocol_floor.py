"""What the stack protocols reach with ideal pair registrations: the floor of the benchmark.

The stack benchmarks (bench_elastix.py, bench_methods.py) deform every section of a
*published* stack with its own synthetic deformation and score a method against those
deformations alone: the published alignment counts as the truth. Every stack protocol
registers neighbours, and published neighbours are not identical (their content changes, and
where the published alignment has residual misalignments, so does their position).

This script replaces the registration of each pair by an oracle and runs the protocols of
hybridreg.stack on the oracle's fields, on the same deformed stacks (same seeds):

- ``exact``: the pair field that undoes the two synthetic deformations exactly, as if
  published neighbours were identical: ``v_ij = F_i o R_j`` (``F`` forward, ``R`` recovery
  fields of the truth);
- ``exact + <map>``: the same, with the motion that ``<map>`` (an elastix map, or
  ``hybrid`` / ``learned``) finds between the two *undeformed, published* sections in
  between: ``v_ij = F_i o M_ij o R_j``. A method that recovered the synthetic deformation
  perfectly and otherwise saw what ``<map>`` sees between published neighbours.

Protocols: ``joint`` (hybridreg.joint.solve_joint with align's defaults: one neighbour, prior
0.3, robust weights, the same interior mask; no similarity weights), ``sequential`` (the
chain ``u_k = u_{k-1} o v_{k-1,k}``, anchored at section 0 as hybridreg.stack's sequential
mode is), ``sequential + drift 5`` (hybridreg.stack.drift_corrected), ``joint, anchor 0``
(the joint solve with section 0 pinned to the identity: the sequential mode's assumption;
the benchmarks never deform section 0) and, for reference, ``..., best prior``: the lowest
error over a grid of priors, chosen *with* the truth (an oracle no method has).

    .venv/bin/python benchmarks/protocol_floor.py --out benchmarks/results/protocol_floor.json
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

from hybridreg import fields as F, io, metrics, synthetic  # noqa: E402
from hybridreg.joint import solve_joint  # noqa: E402
from hybridreg.stack import drift_corrected  # noqa: E402

from bench_elastix import central_crop, run_meta, summarize, write_results  # noqa: E402
from bench_methods import CASES, CROPS, build  # noqa: E402

PRIORS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def neighbour_motion(raw: np.ndarray, spec: str, threads: int) -> list[np.ndarray]:
    """``M_{k-1,k}`` for every k: the pull field ``spec`` finds from published section k-1
    (fixed) to published section k (moving)."""
    method = build(spec, threads)
    out = []
    for k in range(1, raw.shape[0]):
        out.append(method.register(raw[k - 1], raw[k]).field.astype(np.float32))
    return out


def oracle_pairs(d, motion) -> dict:
    """``(k-1, k) -> F_{k-1} o M o R_k`` (``M`` zero when ``motion`` is None)."""
    pairs = {}
    for k in range(1, d.fields.shape[0]):
        inner = d.fields[k] if motion is None else F.compose(motion[k - 1], d.fields[k])
        pairs[(k - 1, k)] = F.compose(d.forward_fields[k - 1], inner)
    return pairs


def protocols(pairs: dict, z: int, shape_yx, score) -> dict:
    h, w = shape_yx
    mask = metrics.interior_mask((h, w), margin_px=max(1, min(h, w) // 16))
    out = {}
    for anchor, name in ((None, "joint"), (0, "joint, anchor 0")):
        by_prior = {prior: score(solve_joint(pairs, z, prior=prior, mask=mask,
                                             anchor=anchor).fields)
                    for prior in PRIORS}
        out[name] = by_prior[0.3]
        best = min(PRIORS, key=lambda p: by_prior[p]["epe_mean_px"])
        out[f"{name}, best prior"] = dict(by_prior[best], prior=best)
    seq = np.zeros((z, 2, h, w), np.float32)
    for k in range(1, z):
        seq[k] = F.compose(seq[k - 1], pairs[(k - 1, k)])
    out["sequential"] = score(seq)
    out["sequential + drift 5"] = score(drift_corrected(seq, 5))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--motion", nargs="*", default=["elastix/em_affine", "hybrid"],
                    help="methods whose published-neighbour motion is added to the exact "
                         "pairs, as bench_methods.py names them: elastix/<map>[+<map>], "
                         "learned, hybrid, ...")
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    results = {}
    for case in args.cases:
        path, labels_path, seed = CASES[case]
        raw = io.read_stack(path).data
        if case in CROPS:
            raw, _ = central_crop(raw, None, CROPS[case])
        raw = raw.astype(np.float32)
        d = synthetic.deform_stack(raw, seed=seed)
        z = raw.shape[0]

        def score(u):
            return summarize(u, d.fields, None, None, args.margin, None)

        none = score(np.zeros_like(d.fields))
        results[f"{case} | none"] = none
        print(f"{case}: {raw.shape}, seed {seed}; none {none['epe_mean_px']:.2f} px", flush=True)
        for spec in [None] + list(args.motion):
            t = time.perf_counter()
            motion = None if spec is None else neighbour_motion(raw, spec, args.threads)
            label = "exact" if spec is None else f"exact + {spec}"
            if motion is not None:
                mask = metrics.interior_mask(raw.shape[1:], margin_px=args.margin)
                size = [metrics.endpoint_error(m, np.zeros_like(m), mask=mask).mean_px
                        for m in motion]
                results[f"{case} | {spec} between published neighbours"] = {
                    "motion_mean_px": float(np.mean(size)),
                    "motion_median_px": float(np.median(size)),
                    "motion_per_pair_px": [round(float(s), 2) for s in size]}
                print(f"  {spec}: published-neighbour motion mean {np.mean(size):.2f} px, "
                      f"median {np.median(size):.2f} px ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            for proto, r in protocols(oracle_pairs(d, motion), z, raw.shape[1:],
                                      score).items():
                key = f"{case} | {label} | {proto}"
                results[key] = r
                extra = f" (prior {r['prior']})" if "prior" in r else ""
                print(f"  {label}, {proto}: {r['epe_mean_px']:.2f} px (p95 "
                      f"{r['epe_p95_px']:.2f}){extra}", flush=True)

    print()
    print("| stack | pairs | protocol | EPE mean (px) | EPE p95 (px) | of none |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        parts = key.split(" | ")
        if len(parts) != 3:
            continue
        case, label, proto = parts
        nm = results[f"{case} | none"]["epe_mean_px"]
        print(f"| {case} | {label} | {proto} | {r['epe_mean_px']:.2f} | {r['epe_p95_px']:.2f} "
              f"| {r['epe_mean_px'] / nm:.0%} |")
    if args.out:
        write_results(args.out, run_meta(margin_px=args.margin, threads=args.threads), results)


if __name__ == "__main__":
    main()
