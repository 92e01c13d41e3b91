"""How far apart are adjacent sections of an already aligned stack, by registration?

Registers each section of the (undeformed, as published) stack to the previous one with a
parameter map and reports the mean displacement found on the interior: the "motion" a
pairwise method sees where the ground truth says there is none. Adjacent EM sections differ
in content, so this is the floor of any method that trusts neighbours alone.

    .venv/bin/python benchmarks/isbi_neighbour_motion.py [--params em_rigid]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridreg import io, metrics  # noqa: E402
from hybridreg.methods import get_method  # noqa: E402

DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(DATA / "isbi2012_train_raw.tif"))
    ap.add_argument("--params", nargs="+", default=["em_rigid"])
    ap.add_argument("--margin", type=int, default=32)
    args = ap.parse_args()
    raw = io.read_stack(args.stack).data.astype(np.float32)
    method = get_method("elastix", params=args.params, threads=2)
    mask = metrics.interior_mask(raw.shape[1:], margin_px=args.margin)
    motion = []
    for k in range(1, raw.shape[0]):
        u = method.register(raw[k - 1], raw[k]).field
        motion.append(metrics.endpoint_error(u, np.zeros_like(u), mask=mask).mean_px)
    print(f"{Path(args.stack).name}, {' + '.join(args.params)}: mean displacement between "
          f"adjacent aligned sections, px")
    print("per pair:", " ".join(f"{m:.1f}" for m in motion))
    print(f"mean {np.mean(motion):.2f}, median {np.median(motion):.2f}, max {np.max(motion):.2f} "
          f"(pair {int(np.argmax(motion))}-{int(np.argmax(motion)) + 1})")


if __name__ == "__main__":
    main()
