"""Benchmark (issue 17): methods on stacks with section defects, with and without masks.

For every stack in ../shared/data (ISBI 2012 train and test, vnc2013's central 512 x 512), the
first ``--sections`` sections are deformed twice with the same seed
(:func:`hybridreg.synthetic.deform_stack`): once without defects ("clean") and once with
folds, cracks and debris (``--defect-fraction`` per section and kind; the same smooth
deformations, the defects on top, exact truth). Each method aligns (joint mode, the
defaults of ``hybridreg align``):

- ``clean``: the clean stack;
- ``defects``: the stack with defects, no masks;
- ``true``: with the generator's defect masks (``--masks``);
- ``auto``: with masks from :func:`hybridreg.defects.detect_defects` (``--masks auto``).

Figures, on the sections with a defect only, at pixels farther than ``--away`` px from any
defect and ``--margin`` px from the edges (the same pixels in every run): mean endpoint error
against the truth (``away``); the ratio to the clean run's on the same pixels; the fraction
of those pixels where the Jacobian folds; the alignment's wall time. The detector's pixel
precision and recall (against the true masks, inside the deformed sections' content: the
empty space around a deformed section is blank too, and the detector finds it) close the
table.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_defects.py --out benchmarks/results/defects.json
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

from hybridreg import io, synthetic  # noqa: E402
from hybridreg.defects import detect_defects  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402
from hybridreg.metrics import interior_mask, jacobian_stats  # noqa: E402
from hybridreg.stack import align_stack  # noqa: E402

from bench_elastix import central_crop, run_meta, write_results  # noqa: E402
from bench_methods import CASES, CROPS  # noqa: E402

RUNS = ("clean", "defects", "true", "auto")


def away_mask(case, k: int, away: int, margin: int) -> np.ndarray:
    """Pixels of section k farther than ``away`` px from its defects and ``margin`` from
    the edges."""
    from scipy import ndimage

    far = ndimage.distance_transform_edt(case.masks[k] != 0) > away
    return far & interior_mask(far.shape, margin_px=margin)


def epe_map(u, truth):
    return np.sqrt(((np.asarray(u, np.float64) - truth) ** 2).sum(axis=0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--methods", nargs="+", default=["elastix", "learned", "hybrid"])
    ap.add_argument("--sections", type=int, default=10)
    ap.add_argument("--defect-fraction", type=float, default=0.5)
    ap.add_argument("--away", type=int, default=32)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    results, detector = {}, {}
    for case_name in args.cases:
        path, _, seed = CASES[case_name]
        raw = io.read_stack(path).data
        if case_name in CROPS:
            raw, _ = central_crop(raw, None, CROPS[case_name])
        raw = raw[:args.sections]
        clean = synthetic.deform_stack(raw, seed=seed)
        bad = synthetic.deform_stack(raw, seed=seed, defects=synthetic.DEFECTS,
                                     defect_fraction=args.defect_fraction)
        hit = [k for k in range(len(raw)) if bad.defects[k]]
        t = time.perf_counter()
        auto = np.stack([detect_defects(s) for s in bad.stack])
        t_detect = (time.perf_counter() - t) / len(raw)
        from scipy import ndimage

        tp = fp = fn = 0
        for k in range(len(raw)):
            det, true = auto[k] == 0, bad.masks[k] == 0
            content = ndimage.binary_erosion(bad.valid[k], iterations=4)
            tp += int((det & true & content).sum())
            fp += int((det & ~true & content).sum())
            fn += int((~det & true & content).sum())
        detector[case_name] = {"precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn),
                               "seconds_per_section": t_detect}
        print(f"{case_name}: {raw.shape}, seed {seed}; defects in sections {hit}; detector "
              f"precision {detector[case_name]['precision']:.3f} recall "
              f"{detector[case_name]['recall']:.3f}", flush=True)
        where = {k: away_mask(bad, k, args.away, args.margin) for k in hit}
        for name in args.methods:
            method = get_method(name, threads=args.threads)
            warm = np.random.default_rng(0).uniform(0, 255, (64, 64)).astype(np.float32)
            try:
                method.register(warm, warm)
            except Exception:  # noqa: BLE001 - warming only
                pass
            base = None
            for run in RUNS:
                stack = clean.stack if run == "clean" else bad.stack
                masks = {"true": bad.masks, "auto": auto}.get(run)
                truth = clean.fields if run == "clean" else bad.fields
                t = time.perf_counter()
                r = align_stack(stack, method, masks=masks)
                sec = time.perf_counter() - t
                fields = r.fields
                err = [float(epe_map(fields[k], truth[k])[where[k]].mean()) for k in hit]
                all_err = []
                fold = []
                for k in hit:
                    m = interior_mask(truth.shape[2:], margin_px=args.margin)
                    all_err.append(float(epe_map(fields[k], truth[k])[m].mean()))
                    fold.append(jacobian_stats(np.asarray(fields[k]),
                                               mask=where[k])["folding_fraction"])
                row = {"away_epe_px": float(np.mean(err)), "interior_epe_px":
                       float(np.mean(all_err)), "folding_away": float(np.max(fold)),
                       "seconds": sec, "away_epe_per_section": [round(e, 3) for e in err],
                       "flagged": [row["section"] for row in r.table if row["flagged"]]}
                if run == "clean":
                    base = row
                row["ratio_to_clean"] = row["away_epe_px"] / base["away_epe_px"]
                row["time_ratio_to_defects"] = (
                    sec / results[f"{case_name} | {name} | defects"]["seconds"]
                    if run in ("true", "auto") else None)
                results[f"{case_name} | {name} | {run}"] = row
                print(f"{case_name} | {name} | {run}: away {row['away_epe_px']:.3f} px "
                      f"(x{row['ratio_to_clean']:.3f} of clean), interior "
                      f"{row['interior_epe_px']:.3f}, folding {row['folding_away']:.5f}, "
                      f"{sec:.1f} s", flush=True)

    print()
    print("| stack | method | clean (px) | defects, no masks | true masks | auto masks | "
          "time, true / auto vs no masks | folding away from defects |")
    print("|---|---|---|---|---|---|---|---|")
    for case_name in args.cases:
        for name in args.methods:
            r = {run: results[f"{case_name} | {name} | {run}"] for run in RUNS}
            cells = [f"{r['clean']['away_epe_px']:.2f}"] + [
                f"{r[x]['away_epe_px']:.2f} (x{r[x]['ratio_to_clean']:.2f})"
                for x in ("defects", "true", "auto")]
            print(f"| {case_name} | {name} | " + " | ".join(cells)
                  + f" | {r['true']['time_ratio_to_defects']:.2f} / "
                  f"{r['auto']['time_ratio_to_defects']:.2f} | "
                  f"{max(x['folding_away'] for x in r.values()):.5f} |")
    print()
    print("| stack | detector precision | recall | s/section |")
    print("|---|---|---|---|")
    for case_name, d in detector.items():
        print(f"| {case_name} | {d['precision']:.3f} | {d['recall']:.3f} | "
              f"{d['seconds_per_section']:.2f} |")
    if args.out:
        write_results(args.out, run_meta(sections=args.sections, away_px=args.away,
                                         margin_px=args.margin, threads=args.threads,
                                         defect_fraction=args.defect_fraction),
                      {"runs": results, "detector": detector})


if __name__ == "__main__":
    main()
