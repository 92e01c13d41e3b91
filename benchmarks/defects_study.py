"""The studies behind issue 17's choices (benchmarks/RESULTS.md, "Defects and masks").

Subcommands (from the repository root, ``.venv/bin/python benchmarks/defects_study.py ...``):

- ``floor``: the joint solve fed the exact pair maps of ISBI 2012's training stack (10
  sections) with and without defects: the error away from the defects for split sections'
  prior factors 1, 0.3, 0 (``--factors``), with and without the part offsets;
- ``stack METHOD``: a method's stack alignment, clean against true masks, the sum over the
  defect sections of the away error and its ratio (``--mode sequential``: and without
  masks), for ``--split-prior`` and
  ``--margin-nodes`` (``hybridreg.stack.SPLIT_PRIOR``, ``hybridreg.defects.
  TRUST_MARGIN_NODES``);
- ``pairs METHOD``: the method's pair maps against the exact pair maps (clean, defects
  without masks, with masks), summed over the defect sections;
- ``node-weights METHOD``: align_stack with and without ``node_weights`` (per-node match
  confidence in the joint solve): clean, defects without masks, true masks, the sums over
  the defect sections of the away error (``--neighbours``);
- ``timing``: align_stack three times each without masks, with the true and the auto
  masks, alternating the order (hybrid on vnc2013, learned on ISBI test): medians;
- ``detect-size N``: :func:`hybridreg.defects.detect_defects` on an N x N section (one ISBI
  section tiled, a crack across it); run it under ``/usr/bin/time -f %M`` for the memory.

The cases are bench_defects.py's: the first 10 sections, the same seeds, vnc2013's central
512².
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

from hybridreg import defects, io, stack as stack_mod, synthetic  # noqa: E402
from hybridreg import fields as F  # noqa: E402
from hybridreg.fields import MapGrid  # noqa: E402

from bench_defects import away_mask, epe_map  # noqa: E402
from bench_elastix import central_crop  # noqa: E402
from bench_methods import CASES, CROPS  # noqa: E402


def load(case: str, n: int = 10):
    path, _, seed = CASES[case]
    raw = io.read_stack(path).data
    if case in CROPS:
        raw, _ = central_crop(raw, None, CROPS[case])
    raw = raw[:n]
    return (synthetic.deform_stack(raw, seed=seed),
            synthetic.deform_stack(raw, seed=seed, defects=synthetic.DEFECTS))


def floor(args):
    from hybridreg.joint import part_offsets, solve_joint

    clean, bad = load(args.case)
    z, h, w = bad.stack.shape
    grid = MapGrid((h, w), stride=32)
    split = [k for k in range(z) if defects.node_parts(bad.masks[k], grid)[1] > 1]
    hit = [k for k in range(1, z) if bad.defects[k]]
    for name, d in (("clean", clean), ("defects", bad)):
        pairs = {}
        for k in range(1, z):
            m = grid.project(F.compose(d.forward_fields[k - 1], d.fields[k]))
            if name == "defects":
                m = defects.trusted_map(m, d.masks[k - 1], d.masks[k], grid)
            pairs[(k - 1, k)] = m
        for factor in ([1.0] if name == "clean" else args.factors):
            sol = solve_joint(pairs, z, prior=0.3, spacing_xy=grid.node_spacing_xy, stride=32,
                              section_prior=[factor if k in split else 1.0 for k in range(z)])
            for offsets in ([False] if name == "clean" else [False, True]):
                f = np.array(sol.fields)
                if offsets:
                    for k in split:
                        f[k] += part_offsets(k, sol.fields, pairs, sol.pair_weight,
                                             defects.node_parts(d.masks[k], grid)[0],
                                             spacing_xy=grid.node_spacing_xy)
                err = [float(epe_map(grid.dense(f[k]), d.fields[k])[
                    away_mask(bad, k, 32, 32)].mean()) for k in hit]
                print(f"{name}: split prior x{factor}, part offsets {offsets}: "
                      f"{np.mean(err):.3f} px", flush=True)


def stack(args):
    from hybridreg.methods import get_method

    stack_mod.SPLIT_PRIOR = args.split_prior
    defects.TRUST_MARGIN_NODES = args.margin_nodes
    clean, bad = load(args.case)
    method = get_method(args.method, threads=2)
    sums = {}
    runs = (("clean", clean, None), ("true", bad, bad.masks))
    if args.mode == "sequential":
        runs += (("none", bad, None),)
    for name, d, masks in runs:
        f = stack_mod.align_stack(d.stack, method, masks=masks, mode=args.mode).fields
        sums[name] = sum(float(epe_map(f[k], d.fields[k])[away_mask(bad, k, 32, 32)].mean())
                         for k in range(1, len(d.stack)) if bad.defects[k])
    print(f"{args.case} {args.method} {args.mode}: split prior x{args.split_prior}, margin "
          f"{args.margin_nodes}: clean {sums['clean']:.2f}, true {sums['true']:.2f}, ratio "
          f"{sums['true'] / sums['clean']:.3f}"
          + (f"; no masks {sums['none']:.2f}, ratio {sums['none'] / sums['clean']:.3f}"
             if "none" in sums else ""))


def pairs(args):
    from hybridreg.methods import get_method

    defects.TRUST_MARGIN_NODES = args.margin_nodes
    clean, bad = load(args.case)
    z, h, w = bad.stack.shape
    grid = MapGrid((h, w), stride=32)
    method = get_method(args.method, threads=2)
    total = np.zeros(3)
    for k in range(1, z):
        if not bad.defects[k]:
            continue
        where = away_mask(bad, k, 32, 32)
        row = []
        for d, masks in ((clean, None), (bad, None), (bad, (bad.masks[k - 1], bad.masks[k]))):
            exact = F.compose(d.forward_fields[k - 1], d.fields[k])
            m, _ = stack_mod.register_map(method, d.stack[k - 1].astype(np.float32),
                                          d.stack[k].astype(np.float32), [], grid,
                                          masks=masks)
            row.append(float(epe_map(grid.dense(m), exact)[where].mean()))
        total += row
    print(f"{args.case} {args.method} margin {args.margin_nodes}: clean {total[0]:.2f}, "
          f"defects {total[1]:.2f}, masks {total[2]:.2f} px (sums over the defect sections)")


def node_weights(args):
    from hybridreg.methods import get_method

    clean, bad = load(args.case)
    method = get_method(args.method, threads=2)
    for weighted in (False, True):
        sums = {}
        for name, d, masks in (("clean", clean, None), ("none", bad, None),
                               ("true", bad, bad.masks)):
            f = stack_mod.align_stack(d.stack, method, masks=masks, neighbours=args.neighbours,
                                      node_weights=weighted).fields
            sums[name] = sum(float(epe_map(f[k], d.fields[k])[away_mask(bad, k, 32, 32)].mean())
                             for k in range(1, len(d.stack)) if bad.defects[k])
        print(f"{args.case} {args.method} neighbours {args.neighbours} node_weights "
              f"{weighted}: clean {sums['clean']:.2f}, no masks {sums['none']:.2f} "
              f"(x{sums['none'] / sums['clean']:.3f}), true masks {sums['true']:.2f} "
              f"(x{sums['true'] / sums['clean']:.3f})", flush=True)


def timing(args):
    from hybridreg.methods import get_method

    for case, name in (("vnc", "hybrid"), ("isbi-test", "learned")):
        _, bad = load(case)
        auto = np.stack([defects.detect_defects(s) for s in bad.stack])
        method = get_method(name, threads=2)
        method.register(bad.stack[0].astype(np.float32), bad.stack[1].astype(np.float32))
        runs = {"none": None, "true": bad.masks, "auto": auto}
        t = {k: [] for k in runs}
        for rep in range(3):
            for k in (["none", "true", "auto"] if rep % 2 == 0 else ["auto", "true", "none"]):
                s = time.perf_counter()
                stack_mod.align_stack(bad.stack, method, masks=runs[k])
                t[k].append(round(time.perf_counter() - s, 2))
        med = {k: float(np.median(v)) for k, v in t.items()}
        print(case, name, t, {k: round(v / med["none"], 2) for k, v in med.items()},
              flush=True)


def detect_size(args):
    n = args.n
    section = io.read_stack(CASES["isbi-train"][0]).data[0]
    big = np.tile(section, (-(-n // 512), -(-n // 512)))[:n, :n]
    big[n // 2 - 4:n // 2 + 4, :] = 0  # a crack across it
    t = time.perf_counter()
    m = defects.detect_defects(big)
    dt = time.perf_counter() - t
    print(json.dumps({"side": n, "seconds": round(dt, 1), "mpx_per_s": round(n * n / dt / 1e6, 2),
                      "crack_found": bool((m[n // 2 - 4:n // 2 + 4] == 0).all())}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("floor")
    p.add_argument("--case", default="isbi-train", choices=list(CASES))
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.3, 0.0])
    p.set_defaults(func=floor)
    for name, func in (("stack", stack), ("pairs", pairs)):
        p = sub.add_parser(name)
        p.add_argument("method")
        p.add_argument("--case", default="isbi-test", choices=list(CASES))
        p.add_argument("--margin-nodes", type=int, default=defects.TRUST_MARGIN_NODES)
        if name == "stack":
            p.add_argument("--split-prior", type=float, default=stack_mod.SPLIT_PRIOR)
            p.add_argument("--mode", default="joint", choices=["joint", "sequential"],
                           help="sequential: also the defect stack without masks")
        p.set_defaults(func=func)
    p = sub.add_parser("node-weights")
    p.add_argument("method")
    p.add_argument("--case", default="isbi-test", choices=list(CASES))
    p.add_argument("--neighbours", type=int, default=1)
    p.set_defaults(func=node_weights)
    sub.add_parser("timing").set_defaults(func=timing)
    p = sub.add_parser("detect-size")
    p.add_argument("n", type=int)
    p.set_defaults(func=detect_size)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
