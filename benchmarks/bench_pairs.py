"""Benchmark: methods on single pairs with exact truth (the pair protocol of issue 21).

Stack benchmarks tie (their joint solve has a floor close to every method), so methods are
compared here on single pairs. For each stack in ../shared/data and each section ``k`` of a
few (``--pairs`` per stack, evenly spread, with two older sections before them):

- ``self``: fixed = section k, moving = section k warped by a known random deformation
  (``hybridreg.synthetic.random_deformation``): the truth is exact;
- ``neighbour``: fixed = section k, moving = section k + 1 warped the same way: the content
  changes as in a stack; the truth is exact up to the published alignment.

Two strengths: ``mild`` (the library's default magnitudes, ``synthetic.MAGNITUDES``) and
``strong`` (rotation 4 deg, shift 20 px, scale 4%, elastic 14 px). The deformation of a pair
depends only on (stack, k, strength), so every method sees the same pairs. The learned and
hybrid methods get sections k-2 and k-1 as their older references.

Figures per cell (stack, kind, strength) and method: mean endpoint error on the interior
(``--margin`` px) averaged over the pairs, the 95th percentile of the pixel errors, the
folded fraction of the interior (Jacobian determinant <= 0), and the seconds per pair (wall
time of ``register``, this machine, ``--threads``). All methods run in one process, so their
time ratios hold. Method specs are as in bench_methods.py (``elastix/em_affine``,
``elastix/em_affine+em_bspline`` = elastix's default chain, ``learned``, ``ssemnet`` with
the benchmark's pyramid (8, 4, 2), ``hybrid`` = the default preset, ``hybrid/fast``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_pairs.py --out benchmarks/results/pairs.json
    .venv/bin/python benchmarks/bench_pairs.py --stacks isbi-train vnc --pairs 3 \\
        --methods elastix/em_affine+em_bspline hybrid
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

from hybridreg import fields, io, metrics, synthetic  # noqa: E402
from hybridreg.warp import warp  # noqa: E402

from bench_elastix import central_crop, run_meta, write_results  # noqa: E402
from bench_methods import build  # noqa: E402

DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

#: stack name -> (file, central crop side in px or None)
STACKS = {
    "isbi-train": (DATA / "isbi2012_train_raw.tif", None),
    "isbi-test": (DATA / "isbi2012_test_raw.tif", None),
    "vnc": (DATA / "vnc2013_stack2_raw.tif", 512),
}
STRENGTHS = {
    "mild": dict(synthetic.MAGNITUDES),
    "strong": {**synthetic.MAGNITUDES, "max_rotation_deg": 4.0, "max_shift_px": 20.0,
               "max_scale": 0.04, "elastic_px": 14.0},
}
KINDS = ("self", "neighbour")
DEFAULT_METHODS = ["elastix/em_affine", "elastix/em_affine+em_bspline", "learned", "ssemnet",
                   "hybrid", "hybrid/fast"]


def pair_sections(z: int, n: int) -> list[int]:
    """``n`` sections k, evenly spread, with k - 2 >= 0 and k + 1 < z."""
    ks = np.linspace(2, z - 2, n).round().astype(int)
    return sorted(set(int(k) for k in ks))


def make_pair(raw: np.ndarray, k: int, kind: str, strength: str, seed: int):
    """``(fixed, moving, references, truth)`` of one pair (float32, truth in pixels)."""
    shape = raw.shape[1:]
    rng = np.random.default_rng([seed, k, list(STRENGTHS).index(strength)])
    d = synthetic.random_deformation(shape, rng=rng, **STRENGTHS[strength])
    source = raw[k] if kind == "self" else raw[k + 1]
    # as synthetic.deform_stack does: warped, then back to the stack's grey-value type
    moving = io.cast_to_dtype(warp(source.astype(np.float32), d.forward, order=3)[0],
                              raw.dtype)
    refs = [raw[k - 2].astype(np.float32), raw[k - 1].astype(np.float32)]
    return raw[k].astype(np.float32), moving.astype(np.float32), refs, d.recovery


def load_stack(stack_name: str, margin: int):
    """``(raw, interior mask)`` of one of :data:`STACKS` (its central crop), or None (with a
    line saying so) when its file is not there."""
    path, crop = STACKS[stack_name]
    if not path.is_file():
        print(f"{stack_name}: {path} not found, skipped")
        return None
    raw = io.read_stack(path).data
    if crop:
        raw, _ = central_crop(raw, None, crop)
    return raw, metrics.interior_mask(raw.shape[1:], margin_px=margin)


def pair_figures(u: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    err = np.hypot(*(u - truth))[mask]
    det = fields.jacobian_determinant(u)[mask]
    return {"epe_mean_px": float(err.mean()), "epe_p95_px": float(np.percentile(err, 95)),
            "folded": float(np.mean(det <= 0))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--strengths", nargs="+", default=list(STRENGTHS), choices=list(STRENGTHS))
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--pairs", type=int, default=6, help="pairs per stack (default 6)")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="network of learned and hybrid")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    methods = {spec: build(spec, args.threads, args.model) for spec in args.methods}
    results: dict = {}
    for stack_name in args.stacks:
        loaded = load_stack(stack_name, args.margin)
        if loaded is None:
            continue
        raw, mask = loaded
        ks = pair_sections(raw.shape[0], args.pairs)
        for kind in args.kinds:
            for strength in args.strengths:
                cell = f"{stack_name} | {kind} | {strength}"
                rows: dict[str, list] = {"none": []}
                for k in ks:
                    fixed, moving, refs, truth = make_pair(raw, k, kind, strength, args.seed)
                    rows["none"].append({**pair_figures(np.zeros_like(truth), truth, mask),
                                         "seconds": 0.0})
                    for spec, method in methods.items():
                        t = time.perf_counter()
                        res = method.register(fixed, moving, references=refs)
                        seconds = time.perf_counter() - t
                        rows.setdefault(spec, []).append(
                            {**pair_figures(res.field, truth, mask), "seconds": seconds,
                             "fallback": bool(res.info.get("fallback")),
                             # the hybrid's detail stage: 1 kept, 0 not (or none ran)
                             "detail_kept": bool((res.info.get("detail") or {}).get("kept"))})
                results[cell] = {
                    spec: {key: float(np.mean([r[key] for r in v])) for key in v[0]}
                    | {"epe_per_pair": [round(r["epe_mean_px"], 3) for r in v]}
                    for spec, v in rows.items()}
                print(f"{cell}: " + ", ".join(
                    f"{s} {r['epe_mean_px']:.2f}" for s, r in results[cell].items()),
                    flush=True)

    specs = ["none"] + list(methods)
    print("\nmean EPE px (p95) per cell; folded fraction where > 0; s/pair last row\n")
    print("| stack | kind | strength | " + " | ".join(specs) + " |")
    print("|---|---|---|" + "---|" * len(specs))
    for cell, res in results.items():
        cells = []
        for s in specs:
            r = res[s]
            text = f"{r['epe_mean_px']:.2f} ({r['epe_p95_px']:.1f})"
            if r["folded"] > 0:
                text += f" F{r['folded']:.1e}"
            cells.append(text)
        print(f"| {' | '.join(cell.split(' | '))} | " + " | ".join(cells) + " |")
    secs = {s: float(np.mean([res[s]["seconds"] for res in results.values()])) for s in specs}
    print("| s/pair | | | " + " | ".join(f"{secs[s]:.3f}" for s in specs) + " |")
    if args.out:
        write_results(args.out, run_meta(pairs_per_stack=args.pairs, seed=args.seed,
                                         margin_px=args.margin), results)


if __name__ == "__main__":
    main()
