"""Benchmark: elastix parameter maps on a serial-EM stack with a known synthetic deformation.

The stack (by default ISBI 2012's training volume, ../shared/data) is deformed with
hybridreg.synthetic (fixed seed; rotation up to 2 degrees, shift up to 12 px, elastic up to
6 px), and each map is measured against the ground truth in up to three protocols:

pair
    Each deformed section k is registered to the *undeformed* section k-1: how well one pair
    is recovered when the reference is right (adjacent sections still differ in content).
sequential
    The deformed stack is aligned section by section, each to the aligned one before it
    (hybridreg.stack, mode="sequential"): pair errors add up along the stack.
joint
    The deformed stack is aligned with hybridreg.stack's joint solve (raw-to-raw pairs over
    --neighbours sections, --prior).

Figures: mean and 95th-percentile endpoint error against the ground-truth recovery fields
(interior: --margin px from the edges, where the truth samples inside the deformed section),
folding fraction, label agreement (neurite ids warped with the fields, nearest neighbour,
against the undeformed ids: pixel agreement and mean Dice), seconds per registered pair.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_elastix.py --out benchmarks/results/elastix_isbi.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridreg import io, metrics, synthetic  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.stack import align_stack  # noqa: E402

DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

#: name -> params chain
MAPS = {
    "itk-default-bspline": ["bspline"],
    "em_rigid": ["em_rigid"],
    "em_affine": ["em_affine"],
    "em_bspline": ["em_bspline"],
    "em_affine+em_bspline": ["em_affine", "em_bspline"],
    "refine_bspline_1ch": ["refine_bspline_1ch"],
}


def summarize(fields, truth, labels_def, labels_ref, margin, seconds):
    rows = metrics.evaluate_stack(fields=fields, true_fields=truth, labels=labels_def,
                                  labels_ref=labels_ref, margin_px=margin)
    s = metrics.summarize(rows)  # section 0 (undeformed) left out
    keep = ("epe_mean_px", "epe_p95_px", "folding_fraction", "pixel_agreement", "dice_mean")
    out = {k: s.get(k) for k in keep}
    out["seconds_per_pair"] = seconds
    out["epe_per_section"] = [round(r["epe_mean_px"], 2) for r in rows]
    return out


def central_crop(raw, labels, size: int):
    """The central ``size x size`` pixels of every section of ``raw`` (and ``labels``)."""
    h, w = raw.shape[1:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return (raw[:, y0:y0 + size, x0:x0 + size],
            None if labels is None else labels[:, y0:y0 + size, x0:x0 + size])


def metric_cells(r: dict, *, folding: str, seconds: str) -> str:
    """The table cells of a :func:`summarize` row, EPE mean to s/pair ("-" where absent)."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return (f"{fmt(r['epe_mean_px'], '.2f')} | {fmt(r['epe_p95_px'], '.2f')} | "
            f"{fmt(r['folding_fraction'], folding)} | {fmt(r['pixel_agreement'], '.3f')} | "
            f"{fmt(r['dice_mean'], '.3f')} | {fmt(r['seconds_per_pair'], seconds)}")


def run_meta(**extra) -> dict:
    """The JSON's ``meta``: the command line, ``extra``, the machine and the date."""
    return {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            **extra,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}


def in_fresh_process(script, *args, cwd=ROOT) -> dict:
    """Run ``python script ARGS`` in a fresh process under ``/usr/bin/time -f %M``: the JSON
    of its last line of output, with ``peak_rss_gb`` (that process's peak RSS, 10^9 bytes).
    A failure prints the end of its stderr and exits with its code."""
    import json
    import subprocess

    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, str(script),
                           *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["peak_rss_gb"] = round(int(proc.stderr.strip().splitlines()[-1]) * 1024 / 1e9, 3)
    return row


def write_results(path, meta: dict, results: dict) -> None:
    """The benchmark's JSON: ``{"meta": ..., "results": ...}``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metrics.write_json({"meta": meta, "results": results}, path)
    print(f"results -> {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(DATA / "isbi2012_train_raw.tif"))
    ap.add_argument("--labels", default=str(DATA / "isbi2012_train_neurite_ids.tif"),
                    help="instance labels of the stack ('' for none)")
    ap.add_argument("--sections", type=int, default=None, help="first N sections only")
    ap.add_argument("--crop", type=int, default=None, help="central CROP x CROP px only")
    ap.add_argument("--seed", type=int, default=2026, help="deformation seed")
    ap.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    ap.add_argument("--stack-maps", nargs="*", default=["itk-default-bspline", "em_rigid", "em_affine",
                                                         "em_affine+em_bspline"],
                    help="maps also run in the sequential and joint protocols")
    ap.add_argument("--neighbours", type=int, default=1)
    ap.add_argument("--prior", type=float, default=0.3)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    raw = io.read_stack(args.stack).data
    labels = io.read_stack(args.labels).data if args.labels else None
    if args.crop:
        raw, labels = central_crop(raw, labels, args.crop)
    if args.sections:
        raw = raw[:args.sections]
        labels = None if labels is None else labels[:args.sections]
    t0 = time.perf_counter()
    d = synthetic.deform_stack(raw, labels=labels, seed=args.seed)
    print(f"{Path(args.stack).name}: {raw.shape}, deformed with seed {args.seed} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    z = raw.shape[0]
    ref = raw.astype(np.float32)
    moving = d.stack.astype(np.float32)
    results = {"none": summarize(np.zeros_like(d.fields), d.fields, d.labels, labels,
                                 args.margin, 0.0)}
    print(f"none: {results['none']['epe_mean_px']:.2f} px", flush=True)
    for name in args.maps:
        method = get_method("elastix", params=MAPS[name], threads=args.threads)
        # pair protocol: deformed k onto the undeformed k-1
        fields = np.zeros_like(d.fields)
        t = time.perf_counter()
        for k in range(1, z):
            fields[k] = method.register(ref[k - 1], moving[k]).field
        sec = (time.perf_counter() - t) / (z - 1)
        results[f"{name} | pair"] = summarize(fields, d.fields, d.labels, labels, args.margin,
                                              sec)
        print(f"{name} | pair: {results[f'{name} | pair']['epe_mean_px']:.2f} px, "
              f"{sec:.2f} s/pair", flush=True)
        if name not in args.stack_maps:
            continue
        for mode in ("sequential", "joint"):
            t = time.perf_counter()
            r = align_stack(moving, method, mode=mode, neighbours=args.neighbours,
                            prior=args.prior)
            n_pairs = max(1, len(r.pairs) if mode == "joint" else z - 1)
            sec = (time.perf_counter() - t) / n_pairs
            key = f"{name} | {mode}" + (f" (neighbours {args.neighbours}, prior {args.prior})"
                                        if mode == "joint" else "")
            results[key] = summarize(r.fields, d.fields, d.labels, labels, args.margin, sec)
            print(f"{key}: {results[key]['epe_mean_px']:.2f} px, {sec:.2f} s/pair", flush=True)

    meta = run_meta(stack=Path(args.stack).name, shape=list(raw.shape), seed=args.seed,
                    crop=args.crop, neighbours=args.neighbours, prior=args.prior,
                    margin_px=args.margin, threads=args.threads)
    print()
    print("| method | protocol | EPE mean (px) | EPE p95 (px) | folding | label agreement | "
          "Dice | s/pair |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        method, _, protocol = key.partition(" | ")
        print(f"| {method} | {protocol or '-'} | "
              f"{metric_cells(r, folding='.4f', seconds='.2f')} |")
    if args.out:
        write_results(args.out, meta, results)


if __name__ == "__main__":
    main()
