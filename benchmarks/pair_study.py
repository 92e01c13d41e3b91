"""Per-pair study: how close each method and combination gets between real EM neighbours.

Every stack protocol registers *neighbouring* sections, whose content differs; this study
measures that step alone, on the held-out stack. The deformed section ``k``
(``isbi2012_test_raw.tif``, seed 4242, as in ``bench_methods.py``) is registered to the
*undeformed* section ``k - offset``:

- offset 1: its real neighbour (what a stack alignment sees; content changes);
- offset 0: its own undeformed copy (no content change: the method's accuracy alone).

The learned network and the hybrid see the two undeformed sections before the fixed one as
their older references. Variants:

- ``learned``: the shipped network's field; ``learned, affine part``: the least-squares
  affine of that field on the interior;
- ``hybrid``: the shipped hybrid method (learned field, then its B-spline refinement on the
  section and two feature channels);
- ``em_affine``: the shipped elastix map; ``affine-light``: the same map with 3 resolutions,
  250 iterations and 2048 samples;
- ``learned -> X``: elastix map X started from the learned field
  (``SetExternalInitialTransform``); ``learned affine -> X``: from its affine part;
- ``bspline128``: the hybrid's one-channel B-spline refinement map with a 128 px grid.

EPE in pixels on the interior (margin 32 px); "size" is the mean field magnitude over the
true one's (above 1: the method overestimates the deformation); s/pair the wall time (learned included where
it starts a variant), this machine, 2 threads.

    .venv/bin/python benchmarks/pair_study.py --out benchmarks/results/pair_study.json
    .venv/bin/python benchmarks/pair_study.py --variants learned --model ft.safetensors
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

from hybridreg import elastix, io, metrics, synthetic  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.methods.base import content_mask  # noqa: E402

from bench_elastix import run_meta, write_results  # noqa: E402

DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def affine_part(u: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The least-squares affine field of ``u`` over ``mask`` (pixels or physical units)."""
    h, w = u.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    design = np.stack([xx[mask], yy[mask], np.ones(int(mask.sum()))], 1)
    out = np.empty_like(u)
    for c in range(2):
        coef, *_ = np.linalg.lstsq(design, u[c][mask].astype(np.float64), rcond=None)
        out[c] = coef[0] * xx + coef[1] * yy + coef[2]
    return out


def chain_model(pair_px: float, none_px: float, n: int) -> tuple[float, float]:
    """Expected mean endpoint error over a stack of ``n`` sections, section 0 undeformed,
    when each section's true displacement is independent Gaussian (mean magnitude
    ``none_px``) and each neighbour pair is measured with independent Gaussian errors (mean
    magnitude ``pair_px``): (sequential Kalman filter, joint least-squares smoother).

    Per component, a 2D Gaussian of variance v has mean magnitude sqrt(pi v / 2). The filter
    sees only the sections before; the smoother all pairs and the zero-mean prior, which
    is what ``hybridreg.joint`` solves. Both are optimal for this model, so a real chain of
    such measurements does no better.
    """
    def var(mag):
        return mag ** 2 * 2 / np.pi

    def mag(v):
        return float(np.sqrt(np.pi * v / 2))

    v, s2 = var(none_px), var(pair_px)
    diff = np.zeros((n - 1, n))
    diff[np.arange(n - 1), np.arange(n - 1)] = -1
    diff[np.arange(n - 1), np.arange(1, n)] = 1
    a = np.eye(n) / v + diff.T @ diff / s2
    a = a[1:, 1:]  # section 0 is known
    joint = float(np.diag(np.linalg.inv(a)).mean())
    p, acc = 0.0, []
    for _ in range(1, n):
        p = v * (p + s2) / (v + p + s2)
        acc.append(p)
    return mag(float(np.mean(acc))), mag(joint)


def light_affine() -> dict:
    m = dict(elastix.parameter_maps("em_affine")[0])
    m.update({"NumberOfResolutions": ["3"], "MaximumNumberOfIterations": ["250"],
              "NumberOfSpatialSamples": ["2048"], "WriteResultImage": ["false"],
              "AutomaticTransformInitialization": ["false"]})
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(DATA / "isbi2012_test_raw.tif"))
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--offsets", type=int, nargs="+", default=[1, 0])
    ap.add_argument("--step", type=int, default=2, help="every STEP-th section from 3")
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None,
                    help="registration network of learned and hybrid (default: shipped)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="only these variants (names as in the table), e.g. learned")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    raw = io.read_stack(args.stack).data
    d = synthetic.deform_stack(raw, seed=args.seed)
    mask = metrics.interior_mask(raw.shape[1:], margin_px=args.margin)
    net = {"model": args.model} if args.model else {}
    learned = get_method("learned", threads=args.threads, **net)
    hybrid = get_method("hybrid", threads=args.threads, **net)
    em_affine = elastix.parameter_maps("em_affine")
    light = light_affine()
    bspline128 = elastix.refinement_map(1, grid_spacing_px=128)
    hybrid.register(raw[0], d.stack[1])  # load the networks before the clock starts

    def epe(u, k):
        return metrics.endpoint_error(u, d.fields[k], mask=mask).mean_px

    def size_ratio(u, k):
        return float(np.hypot(*u)[mask].mean() / np.hypot(*d.fields[k])[mask].mean())

    def wanted(name):
        return args.variants is None or name in args.variants

    results = {}
    for off in args.offsets:
        rows: dict[str, list] = {}

        def record(name, k, u, seconds):
            rows.setdefault(name, []).append((epe(u, k), seconds, size_ratio(u, k)))

        for k in range(3, raw.shape[0], args.step):
            fixed = raw[k - off].astype(np.float32)
            moving = d.stack[k].astype(np.float32)
            refs = [raw[k - off - 2], raw[k - off - 1]]
            fm = content_mask(fixed)
            kw = {"fixed_mask": fm} if fm is not None else {}

            t = time.perf_counter()
            u_l = learned.register(fixed, moving, references=refs).field
            t_l = time.perf_counter() - t
            record("learned", k, u_l, t_l)
            t = time.perf_counter()
            u_la = affine_part(u_l, mask)
            t_la = t_l + time.perf_counter() - t
            record("learned, affine part", k, u_la, t_la)
            if wanted("hybrid"):
                t = time.perf_counter()
                record("hybrid", k, hybrid.register(fixed, moving, references=refs).field,
                       time.perf_counter() - t)
            for name, maps, init, t0 in (
                    ("em_affine", em_affine, None, 0.0),
                    ("affine-light", [light], None, 0.0),
                    ("affine-light -> bspline128", [light, bspline128], None, 0.0),
                    ("learned -> affine-light", [light], u_l, t_l),
                    ("learned -> bspline128", [bspline128], u_l, t_l),
                    ("learned affine -> affine-light", [light], u_la, t_la)):
                if not wanted(name):
                    continue
                t = time.perf_counter()
                r = elastix.register_pair(fixed, moving, params=maps, initial_field=init,
                                          threads=args.threads, **kw)
                record(name, k, r.field, t0 + time.perf_counter() - t)
            print(f"offset {off}, section {k}: "
                  + ", ".join(f"{n} {v[-1][0]:.2f}" for n, v in rows.items()), flush=True)
        rows = {n: v for n, v in rows.items() if wanted(n)}
        none = [epe(np.zeros_like(d.fields[k]), k) for k in range(3, raw.shape[0], args.step)]
        results[f"offset {off}"] = {
            "none": {"epe_mean_px": float(np.mean(none))},
            **{n: {"epe_mean_px": float(np.mean([e for e, _, _ in v])),
                   "epe_median_px": float(np.median([e for e, _, _ in v])),
                   "seconds_per_pair": float(np.mean([s for _, s, _ in v])),
                   "size_ratio": float(np.mean([r for _, _, r in v])),
                   "epe_per_pair": [round(e, 2) for e, _, _ in v]} for n, v in rows.items()}}

    print()
    print("| variant | " + " | ".join(f"{o} EPE mean (median) px" for o in results)
          + " | s/pair |")
    print("|---|" + "---|" * len(results) + "---|")
    names = list(next(iter(results.values())))
    for n in names:
        cells = []
        for res in results.values():
            r = res[n]
            cells.append(f"{r['epe_mean_px']:.2f}" + (
                f" ({r['epe_median_px']:.2f}; size x{r['size_ratio']:.2f})"
                if "epe_median_px" in r else ""))
        sec = next(iter(results.values()))[n].get("seconds_per_pair")
        print(f"| {n} | " + " | ".join(cells) + f" | {'-' if sec is None else f'{sec:.3f}'} |")
    if 1 in args.offsets:
        none_px = results["offset 1"]["none"]["epe_mean_px"]
        print(f"\nGaussian chain model ({raw.shape[0]} sections, none {none_px:.2f} px): "
              "per-pair error -> sequential filter / joint smoother")
        measured = {n: r["epe_mean_px"] for n, r in results["offset 1"].items() if n != "none"}
        for label, pair_px in [(f"{p} px", float(p)) for p in (1, 2, 3, 4, 5)] + \
                list(measured.items()):
            f, j = chain_model(pair_px, none_px, raw.shape[0])
            print(f"  {label}: {pair_px:.2f} -> {f:.2f} / {j:.2f} px")
    if args.out:
        write_results(args.out, run_meta(sections=list(range(3, raw.shape[0], args.step))),
                      results)


if __name__ == "__main__":
    main()
