"""The oracle of benchmarks/protocol_floor.py: its pair fields follow the pair convention.

The benchmark's conclusions (RESULTS.md, "The floor of the stack protocols") rest on
``oracle_pairs`` giving the field a perfect registration of two deformed neighbours would
give; checked here on a stack whose sections are all the same image.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hybridreg import metrics, synthetic
from hybridreg.warp import warp

from helpers import smooth_texture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import protocol_floor  # noqa: E402


def _identical_sections(z=5, size=128):
    section = smooth_texture((size, size), seed=3, sigma=3.0)
    d = synthetic.deform_stack(np.repeat(section[None], z, axis=0), seed=11)
    return d, metrics.interior_mask((size, size), margin_px=24)


def test_exact_pairs_register_each_deformed_section_onto_the_previous():
    d, inner = _identical_sections()
    pairs = protocol_floor.oracle_pairs(d, None)
    assert sorted(pairs) == [(k - 1, k) for k in range(1, 5)]
    for (i, j), v in pairs.items():
        fixed, moving = d.stack[i], d.stack[j]
        before = np.abs(moving - fixed)[inner].mean()
        after = np.abs(warp(moving, v)[0] - fixed)[inner].mean()
        # a wrong convention (v's sign, composition order) leaves the sections misaligned
        assert after < 0.1 * before, (i, j, before, after)


def test_motion_between_published_neighbours_is_added_to_the_exact_pair():
    # published section k is the same texture seen 3 px further right than k-1, so the
    # motion between published neighbours is the pull field M = (-3, 0) px
    z, size, step = 5, 128, 3
    base = smooth_texture((size, size + step * z), seed=3, sigma=3.0)
    published = np.stack([base[:, step * k:step * k + size] for k in range(z)])
    d = synthetic.deform_stack(published, seed=11)
    inner = metrics.interior_mask((size, size), margin_px=24)
    motion = [np.stack([np.full((size, size), -float(step)), np.zeros((size, size))])
              .astype(np.float32)] * (z - 1)
    for name, pairs in (("with motion", protocol_floor.oracle_pairs(d, motion)),
                        ("without", protocol_floor.oracle_pairs(d, None))):
        for (i, j), v in pairs.items():
            fixed, moving = d.stack[i], d.stack[j]
            before = np.abs(moving - fixed)[inner].mean()
            after = np.abs(warp(moving, v)[0] - fixed)[inner].mean()
            if name == "with motion":
                assert after < 0.1 * before, (i, j, before, after)
            else:  # the exact pair alone misses the published 3 px
                assert after > 0.3 * before, (i, j, before, after)


def test_protocols_recover_the_truth_from_exact_pairs_sequentially():
    d, inner = _identical_sections()
    z, h, w = d.stack.shape

    def score(u):
        err = np.sqrt(((u - d.fields) ** 2).sum(1))[:, inner]
        return {"epe_mean_px": float(err[1:].mean())}

    none = score(np.zeros_like(d.fields))["epe_mean_px"]
    out = protocol_floor.protocols(protocol_floor.oracle_pairs(d, None), z, (h, w), score)
    assert {"joint", "joint, best prior", "joint, anchor 0", "joint, anchor 0, best prior",
            "sequential", "sequential + drift 5"} <= set(out)
    # section 0 is undeformed: the exact chain from it is the truth
    assert out["sequential"]["epe_mean_px"] < 0.05 * none
    # the joint solve's prior keeps part of the common distortion: worse, not useless
    assert out["joint, anchor 0, best prior"]["epe_mean_px"] < out["joint"]["epe_mean_px"]
    assert out["joint"]["epe_mean_px"] < none
