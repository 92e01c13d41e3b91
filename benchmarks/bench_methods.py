"""Benchmark: learned, ssEMnet, hybrid and elastix methods on stacks with a known deformation.

Every method runs in the same process on the same deformed stacks, on this machine:

- ``isbi2012_train_raw.tif`` deformed with seed 2026 (the classical benchmark of
  bench_elastix.py, with neurite labels); the learned weights saw this volume in training
  (undeformed, with other deformations);
- ``isbi2012_test_raw.tif`` deformed with seed 4242: held out, never seen in training;
- ``vnc2013_stack2_raw.tif`` (``--cases vnc``), central 512 x 512, seed 2026, as in the
  elastix benchmark.

Runs are ``method:mode`` (``mode`` sequential or joint, see hybridreg.stack); elastix runs
name their map, e.g. ``elastix/em_rigid:joint``; ``hybrid/external`` runs the hybrid with
``initial="external"``, ``hybrid/fast`` its fast preset; ``ssemnet/grid128`` runs ssEMnet
with ``grid_px=128``,
``ssemnet/nomatch`` with ``match_intensity=False``, ``ssemnet/full`` with the method's own
pyramid (4, 2, 1) instead of the benchmark's (8, 4, 2). Sequential
learned and hybrid runs see the 3 previously aligned sections (FAEMReg's window); joint runs
register raw neighbours. ``sequential+drift5`` is the sequential chain with
``drift_window=5``. Figures: mean and 95th-percentile endpoint error against the ground
truth on the interior (``--margin`` px), folding fraction, label agreement and Dice (where
labels exist), seconds per registered pair (wall time of the whole alignment, solve
included, divided by the pairs; the first pair pays for loading the network or elastix,
which happens before the clock starts).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_methods.py --out benchmarks/results/methods.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hybridreg import io, synthetic  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.stack import align_stack  # noqa: E402

# the same figures, crops and tables as the elastix benchmark
from bench_elastix import (central_crop, metric_cells, run_meta, summarize,  # noqa: E402
                           write_results)

DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

CASES = {
    "isbi-train": (DATA / "isbi2012_train_raw.tif", DATA / "isbi2012_train_neurite_ids.tif",
                   2026),
    "isbi-test": (DATA / "isbi2012_test_raw.tif", None, 4242),
    # the elastix benchmark's vnc2013 case: central 512 x 512, 20 sections, no labels (a
    # stack whose neighbours change less; its undeformed sections were in the training data)
    "vnc": (DATA / "vnc2013_stack2_raw.tif", None, 2026),
}
#: central crop of a case's sections (side in pixels)
CROPS = {"vnc": 512}
DEFAULT_RUNS = ["elastix/em_rigid:joint", "elastix/em_affine:joint",
                "elastix/em_rigid:sequential", "learned:sequential", "learned:joint",
                "ssemnet:joint", "hybrid:joint", "hybrid:sequential"]


def build(run: str, threads: int, model: str | None = None):
    """The method of a run spec (``method[/params][:mode]``), loaded and warmed up; the
    mode and its options are :func:`stack_options`'s."""
    spec = run.partition(":")[0]
    name, _, params = spec.partition("/")
    options = {"threads": threads}
    if model and name in ("learned", "hybrid"):
        options["model"] = model
    if name == "elastix":
        options["params"] = params.split("+") if params else ["em_affine", "em_bspline"]
    if name == "hybrid" and params:
        # hybrid/fast, hybrid/accurate: a preset; hybrid/external, hybrid/resample: how
        # elastix starts from the learned field (hybrid/fast+external: both)
        # study settings: w<bending weight>, s<start smoothing px>, g<grid px>, i<iterations>,
        # nofeat (no feature channels)
        study = {"w": ("refinement", "bending_weight"), "s": (None, "start_smoothing_px"),
                 "g": ("refinement", "grid_spacing_px"), "i": ("refinement", "iterations")}
        for part in params.split("+"):
            if part[:1] in study and part[1:].replace(".", "", 1).isdigit():
                group, key = study[part[:1]]
                value = float(part[1:]) if key != "iterations" else int(part[1:])
                if group:
                    options.setdefault(group, {})[key] = value
                else:
                    options[key] = value
            elif part == "nofeat":  # the section channel only
                options["features"] = False
            else:
                options["initial" if part in ("external", "resample") else "preset"] = part
    if name == "ssemnet":
        # without the full-resolution stage: 48.6 s -> 10.9 s for one 512 x 512 pair (one
        # thread), 0.18 -> 0.59 px on a section registered to its own deformed copy;
        # ssemnet/full keeps the method's own pyramid, full resolution last
        if params != "full":
            options["pyramid"] = (8, 4, 2)
        if params.startswith("grid"):  # ssemnet/grid128: control points 128 px apart
            options["grid_px"] = float(params[len("grid"):])
        elif params == "nomatch":  # ssemnet/nomatch: sections' grey values left as they are
            options["match_intensity"] = False
        elif params not in ("", "full"):
            raise SystemExit(f"unknown ssemnet run option {params!r} in {spec!r}")
    method = get_method(name, **options)
    # load the network / elastix before the clock starts
    warm = np.random.default_rng(0).uniform(0, 255, (64, 64)).astype(np.float32)
    try:
        method.register(warm, warm)
    except Exception:  # noqa: BLE001 - warming only
        pass
    return method


def stack_options(run: str) -> dict:
    """``mode`` and its options from a run spec: ``joint``, ``sequential``,
    ``sequential+drift5`` (drift_window 5)."""
    spec, _, mode = run.partition(":")
    mode, _, extra = (mode or "joint").partition("+")
    opts = {"mode": mode}
    if mode == "sequential":
        # the learned window holds 3 aligned sections, as FAEMReg's
        opts["window"] = 3 if spec.split("/")[0] in ("learned", "hybrid") else 1
    if extra.startswith("drift"):
        opts["drift_window"] = int(extra[len("drift"):])
    return opts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--sections", type=int, default=None, help="first N sections only")
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stride", type=int, default=None,
                    help="coarse-map stride of the alignments (default: align_stack's, 32; "
                         "1 = dense fields, as before issue 16)")
    ap.add_argument("--model", default=None,
                    help="registration network of the learned and hybrid runs (default: the "
                         "shipped weights), e.g. one from `hybridreg finetune`")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    results = {}
    for case in args.cases:
        path, labels_path, seed = CASES[case]
        raw = io.read_stack(path).data
        labels = io.read_stack(labels_path).data if labels_path else None
        if case in CROPS:
            raw, labels = central_crop(raw, labels, CROPS[case])
        if args.sections:
            raw = raw[:args.sections]
            labels = None if labels is None else labels[:args.sections]
        d = synthetic.deform_stack(raw, labels=labels, seed=seed)
        moving = d.stack
        z = raw.shape[0]
        results[f"{case} | none"] = summarize(np.zeros_like(d.fields), d.fields, d.labels,
                                             labels, args.margin, 0.0)
        print(f"{case}: {raw.shape}, seed {seed}; none "
              f"{results[f'{case} | none']['epe_mean_px']:.2f} px", flush=True)
        for run in args.runs:
            method = build(run, args.threads, args.model)
            opts = stack_options(run)
            if args.stride:
                opts["stride"] = args.stride
            mode = opts["mode"]
            t = time.perf_counter()
            r = align_stack(moving, method, **opts)
            n_pairs = max(1, len(r.pairs) if mode == "joint" else z - 1)
            sec = (time.perf_counter() - t) / n_pairs
            key = f"{case} | {run}"
            results[key] = summarize(np.asarray(r.fields), d.fields, d.labels, labels,
                                     args.margin, sec)
            results[key]["flagged"] = int(sum(bool(row.get("flagged")) for row in r.table))
            fallbacks = sum("kept the learned field" in (row.get("warnings") or "")
                            for row in (r.pairs or r.table))
            results[key]["fallbacks"] = int(fallbacks)
            print(f"{key}: {results[key]['epe_mean_px']:.2f} px (p95 "
                  f"{results[key]['epe_p95_px']:.2f}), folding "
                  f"{results[key]['folding_fraction']:.5f}, {sec:.3f} s/pair, "
                  f"fallbacks {fallbacks}", flush=True)

    meta = run_meta(margin_px=args.margin, threads=args.threads, model=args.model)

    print()
    print("| stack | method | EPE mean (px) | EPE p95 (px) | folding | label agreement | "
          "Dice | s/pair |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        case, _, run = key.partition(" | ")
        print(f"| {case} | {run} | {metric_cells(r, folding='.5f', seconds='.3f')} |")
    if args.out:
        write_results(args.out, meta, results)


if __name__ == "__main__":
    main()
