"""One 4096^2 pair, tiled from real vnc2013 sections (5 and 6), through the hybrid.

    /usr/bin/time -f "peak RSS %M KB" .venv/bin/python benchmarks/hybrid_4k_pair.py accurate
    /usr/bin/time -f "peak RSS %M KB" .venv/bin/python benchmarks/hybrid_4k_pair.py fast
"""
import sys, time, numpy as np
from hybridreg import io, synthetic
from hybridreg.methods import get_method
from hybridreg.warp import warp
import os
from pathlib import Path
DATA = Path(os.environ.get('HYBRIDREG_SHARED_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))
raw = io.read_stack(DATA / 'vnc2013_stack2_raw.tif').data
fixed = np.tile(raw[5], (4, 4)).astype(np.float32)
d = synthetic.random_deformation(fixed.shape, rng=np.random.default_rng(1))
moving = warp(np.tile(raw[6], (4, 4)).astype(np.float32), d.forward, order=1)[0]
m = get_method('hybrid', threads=2, preset=sys.argv[1])
t = time.perf_counter()
r = m.register(fixed, moving)
e = np.hypot(*(r.field - d.recovery))[256:-256, 256:-256].mean()
print(f"{sys.argv[1]}: {time.perf_counter() - t:.1f} s, EPE {e:.2f} px, fallback {r.info['fallback']}, detail {r.info['detail']}")
