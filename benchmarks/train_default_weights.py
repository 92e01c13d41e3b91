"""Train hybridreg's shipped default weights (hybridreg/weights/) on ../shared/data.

Two models, each written with its model card (``<name>.md``) beside it:

- ``feature_ae``: :func:`hybridreg.training.train_features` on ISBI 2012 train and vnc2013;
- ``faemreg_compact``: :func:`hybridreg.training.train_registration`, the ``compact``
  preset, on vnc2013 and the consistent runs of ISBI 2012 train.

``isbi2012_test_raw.tif`` is never trained on: it is the held-out stack of the benchmarks
(it is used here only for the logged validation endpoint error, never to choose anything).

ISBI 2012 train is published with 12-27 px jumps between 9 pairs of adjacent sections
(benchmarks/isbi_neighbour_motion.py). The registration loss treats the published stack as
aligned, so a window spanning a jump would teach the network to ignore a real 20 px offset
between its references; sections 10, 17, 18, 19, 24 and 25 are excluded, which leaves the
windows inside the consistent runs 0-9, 11-16, 20-23 and 26-29.

Usage::

    .venv/bin/python benchmarks/train_default_weights.py registration --out DIR [--steps N]
    .venv/bin/python benchmarks/train_default_weights.py features --out DIR [--steps N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ISBI_TRAIN = DATA / "isbi2012_train_raw.tif"
ISBI_TEST = DATA / "isbi2012_test_raw.tif"
VNC = DATA / "vnc2013_stack2_raw.tif"
#: ISBI 2012 train: sections next to the published jumps (see the module docstring)
ISBI_JUMPS = (10, 17, 18, 19, 24, 25)

#: Synthetic deformation of the training windows: wider than the benchmark's (shift 12 px,
#: rotation 2 deg, scale 0.02 on whole 512 px sections) so that a crop sees the local
#: displacements a whole section has far from its centre.
TRAIN_DEFORMATION = {"max_rotation_deg": 3.0, "max_shift_px": 20.0, "max_scale": 0.03,
                     "elastic_px": 6.0, "elastic_spacing_px": 64.0}
#: ``--deformation``: ``wide`` (the above, phases 1 and 2) or ``default``
#: (:data:`hybridreg.synthetic.MAGNITUDES`, what ``hybridreg deform``, ``compare`` and
#: ``finetune`` draw by default)
DEFORMATIONS = {"wide": TRAIN_DEFORMATION, "default": None}


def _card(path: Path, *, title: str, command: str, log_, extra: str) -> None:
    from hybridreg.models import read_metadata

    meta = read_metadata(path)
    md = meta.get("metadata", {})
    opts = md.get("options", {})
    last = md.get("final_losses", {})
    lines = [
        f"# {title}", "",
        f"File: `{path.name}` ({path.stat().st_size / 1e6:.2f} MB, safetensors, architecture "
        f"`{meta['class']}` with its config in the header; loaded with "
        f"`hybridreg.models.load_model`, never by pickle).", "",
        "## Recipe", "",
        f"- Made by: `{command}`",
        f"- Function: `{md.get('recipe')}`; steps {md.get('steps')}, "
        f"{md.get('seconds', 0) / 60:.1f} min on {md.get('device')} "
        f"({platform.processor() or platform.machine()}, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}).",
        f"- Data: {', '.join(Path(d).name if os.path.sep in str(d) else str(d) for d in md.get('data', []))}.",
        f"- Options: `{json.dumps({k: v for k, v in opts.items() if k not in ('out',)}, sort_keys=True)}`",
        "", "## Figures", "",
        f"- Final training losses (mean of the last log interval): `{json.dumps(last)}`",
        extra, "",
        "## History (sampled)", "", "| step | " + " | ".join(sorted(
            k for k in (md.get("history") or [{}])[-1] if k != "step")) + " |",
    ]
    hist = md.get("history") or []
    keys = sorted(k for k in (hist[-1] if hist else {}) if k != "step")
    lines.append("|---" * (len(keys) + 1) + "|")
    for h in hist:
        lines.append(f"| {h.get('step')} | " + " | ".join(
            f"{h[k]:.4g}" if isinstance(h.get(k), (int, float)) else str(h.get(k, ""))
            for k in keys) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["features", "registration"])
    ap.add_argument("--out", type=Path, required=True, help="folder for the weights")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--crop", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", type=Path,
                    help="registration: continue from this network (a second, lower-rate "
                         "phase); its recipe is recorded in the new file's metadata")
    ap.add_argument("--deformation", choices=sorted(DEFORMATIONS), default="wide",
                    help="registration: the synthetic deformations of the training windows "
                         "(default: wide, as phases 1 and 2 of the shipped network)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from hybridreg import training

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/train_default_weights.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    if args.what == "features":
        out = args.out / "feature_ae.safetensors"
        log_ = training.train_features(
            # linear features: with FAEMReg's ReLU on its one-channel 1/16 bottleneck the
            # features died at once here (loss flat at the data variance, 2.17, for 200
            # steps at lr 1e-3), and a dead bottleneck passes no gradient to the encoder
            [ISBI_TRAIN, VNC], out=out, feature_relu=False, crop=args.crop or 96,
            batch=args.batch or 8,
            steps=args.steps or 1500, lr=args.lr or 1e-3, seed=0, device=args.device,
            resume=args.resume, progress=True)
        _card(out, title="feature_ae: the shipped feature autoencoder", command=command,
              log_=log_, extra="- Loss: mean squared reconstruction error, normalised units "
              "(FAEMReg's mean 144.6, std 33.4). For scale: a run with FAEMReg's ReLU on the one-channel bottleneck stayed at 2.17 for 200 steps, the error of reconstructing every crop as a constant (dead features). Time measured with other training jobs sharing the 2 cores.")
    else:
        out = args.out / "faemreg_compact.safetensors"
        log_ = training.train_registration(
            [VNC, ISBI_TRAIN], out=out, preset=None if args.init else "compact",
            init=args.init, references=3,
            crop=args.crop or 192, batch=args.batch or 8, steps=args.steps or 5000,
            lr=args.lr or 1e-3, lr_schedule="cosine", seed=0, device=args.device,
            weights=training.LossWeights(feature=0.0, smooth=0.1, epe=1.0),
            deformation=DEFORMATIONS[args.deformation], reference_jitter_px=1.5,
            exclude={1: list(ISBI_JUMPS)}, validation=[ISBI_TEST], validation_every=500,
            checkpoint_every=250, log_every=50, resume=args.resume, progress=True)
        ev = training.evaluate_registration(out, [ISBI_TEST], n=32, crop=512, references=3,
                                            seed=7, device="cpu")
        _card(out, title="faemreg_compact: the shipped network of the `learned` method",
              command=command, log_=log_,
              extra=(f"- Held-out ISBI 2012 test, 32 windows of 512 x 512 with the "
                     f"benchmark's deformation (seed 7): endpoint error "
                     f"{ev['epe_px']:.2f} px against {ev['identity_epe_px']:.2f} px for no "
                     f"registration (single windows of 3 references jittered by up to 1.5 px, as "
                     f"in training; whole-stack figures are in benchmarks/RESULTS.md)."))
    print(f"{out}: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
