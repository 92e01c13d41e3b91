"""Learned against iterative registration on a stack with a known deformation.

    python examples/learned_vs_iterative.py [STACK.tif] [--sections N] [--seed S]

Deforms the stack (default: the built-in phantom) with random affine + elastic
deformations whose exact inverses are known, aligns it with the learned network
(sequentially, as FAEMReg does), with elastix (the joint solve) and with the hybrid, and
prints each method's endpoint error, folding and time per section. For the full report
with figures use `hybridreg compare`.
"""
import argparse
import time

import numpy as np

from hybridreg import io, phantom, synthetic
from hybridreg.fields import folding_fraction
from hybridreg.methods import get_method
from hybridreg.metrics import endpoint_error
from hybridreg.stack import align_stack

RUNS = [("learned", {}, "sequential"),
        ("elastix", {"params": "em_rigid"}, "joint"),
        ("hybrid", {}, "joint")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stack", nargs="?", help="an aligned stack (default: the phantom)")
    ap.add_argument("--sections", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026, help="seed of the deformation")
    args = ap.parse_args()
    if args.stack:
        stack = io.read_stack(args.stack).data[:args.sections]
    else:
        stack = phantom.make_phantom(sections=args.sections, shape_yx=(256, 256),
                                     seed=0).stack
    case = synthetic.deform_stack(stack, seed=args.seed)
    m = 16
    inner = (slice(None), slice(m, -m), slice(m, -m))

    def epe(fields):
        return np.mean([endpoint_error(f[inner], t[inner]).mean_px
                        for f, t in zip(fields[1:], case.fields[1:])])

    print(f"{'method':<10}{'mode':<12}{'EPE (px)':>10}{'folding':>10}{'s/section':>11}")
    print(f"{'none':<10}{'-':<12}{epe(np.zeros_like(case.fields)):>10.2f}")
    for name, options, mode in RUNS:
        t = time.perf_counter()
        res = align_stack(case.stack, get_method(name, **options), mode=mode)
        per = (time.perf_counter() - t) / (len(stack) - 1)
        fold = np.mean([folding_fraction(f) for f in res.fields[1:]])
        print(f"{name:<10}{mode:<12}{epe(res.fields):>10.2f}{fold:>10.4f}{per:>11.2f}")


if __name__ == "__main__":
    main()
