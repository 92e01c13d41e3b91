"""Benchmark: what a coarse map's stride costs in accuracy (issue 16, the default stride).

Every transform of a stack is a coarse map (:class:`hybridreg.fields.MapGrid`): the dense
field a method finds for a pair is projected on nodes every S pixels (least squares) and is
bilinear between them. This measures, on the pair protocol of bench_pairs.py (same pairs,
same truth), each method's mean endpoint error with its dense field (S = 1) and with its map
at each stride, the mean distance between the map and the dense field (what the map loses),
and the folded fraction; next to it the bytes a map takes on disk per pixel (every file
:func:`hybridreg.outputs.save_alignment` writes for a section, measured on the maps found
here).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_stride.py --out benchmarks/results/stride.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hybridreg.fields import MapGrid  # noqa: E402

from bench_elastix import run_meta, write_results  # noqa: E402
from bench_methods import build  # noqa: E402
from bench_pairs import STACKS, load_stack, make_pair, pair_figures, pair_sections  # noqa: E402


def map_bytes(m: np.ndarray, grid: MapGrid) -> int:
    """Bytes of one section's map on disk, written as a stack alignment writes it
    (:func:`hybridreg.outputs.write_maps` and :func:`~hybridreg.outputs.write_transforms`):
    its ``.mha``, ``.h5``, transformix chain and the run's ``grid.json``."""
    from hybridreg.outputs import write_maps, write_transforms

    with tempfile.TemporaryDirectory() as tmp:
        write_maps(tmp, grid.quantize(m)[None], grid)
        write_transforms(tmp, 0, grid.quantize(m), grid=grid)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", nargs="+", default=["isbi-train", "vnc"], choices=list(STACKS))
    ap.add_argument("--kinds", nargs="+", default=["self", "neighbour"])
    ap.add_argument("--strengths", nargs="+", default=["mild", "strong"])
    ap.add_argument("--methods", nargs="+",
                    default=["elastix/em_affine+em_bspline", "learned", "hybrid"])
    ap.add_argument("--strides", nargs="+", type=int, default=[1, 8, 16, 24, 32, 48, 64])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    methods = {spec: build(spec, args.threads, None) for spec in args.methods}
    acc: dict = {}
    for stack_name in args.stacks:
        loaded = load_stack(stack_name, args.margin)
        if loaded is None:
            continue
        raw, mask = loaded
        for kind in args.kinds:
            for strength in args.strengths:
                for k in pair_sections(raw.shape[0], args.pairs):
                    fixed, moving, refs, truth = make_pair(raw, k, kind, strength, args.seed)
                    for spec, method in methods.items():
                        u = method.register(fixed, moving, references=refs).field
                        for s in args.strides:
                            grid = MapGrid(u.shape[1:], stride=s)
                            t = time.perf_counter()
                            m = grid.project(u)
                            d = grid.dense(m)
                            seconds = time.perf_counter() - t
                            row = pair_figures(d, truth, mask)
                            row["map_vs_dense_px"] = float(np.hypot(*(d - u))[mask].mean())
                            row["project_dense_s"] = seconds
                            if kind == "self" and strength == "mild" and k == pair_sections(
                                    raw.shape[0], args.pairs)[0]:
                                row["bytes_per_px"] = map_bytes(m, grid) / u[0].size
                            acc.setdefault((spec, s), []).append(row)
                print(f"{stack_name} {kind} done", flush=True)
    results = {}
    for (spec, s), rows in acc.items():
        out = {key: float(np.mean([r[key] for r in rows if key in r]))
               for key in rows[0] if key != "bytes_per_px"}
        b = [r["bytes_per_px"] for r in rows if "bytes_per_px" in r]
        out["bytes_per_px"] = float(np.mean(b)) if b else None
        out["pairs"] = len(rows)
        results[f"{spec} | S={s}"] = out
    print("\n| method | S | mean EPE px | p95 | map vs dense px | folded | bytes/px "
          "(.mha + .h5) |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        spec, s = key.split(" | ")
        print(f"| {spec} | {s[2:]} | {r['epe_mean_px']:.3f} | {r['epe_p95_px']:.2f} | "
              f"{r['map_vs_dense_px']:.3f} | {r['folded']:.1e} | "
              f"{r['bytes_per_px'] if r['bytes_per_px'] is None else round(r['bytes_per_px'], 4)} |")
    if args.out:
        write_results(args.out, run_meta(pairs_per_stack=args.pairs, seed=args.seed,
                                         margin_px=args.margin, strides=args.strides), results)


if __name__ == "__main__":
    main()
