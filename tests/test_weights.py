"""The shipped default weights: they load, are what their model cards say, and register.

Fast: one 256 px phantom pair with a known deformation; the networks are small.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridreg import synthetic, weights
from hybridreg.metrics import endpoint_error
from hybridreg.methods import get_method
from hybridreg.models import (FAEMRegPyramidNet, FeatureAutoencoder, load_model,
                              read_metadata)
from hybridreg.phantom import make_phantom

torch.set_num_threads(1)


def _shipped(name):
    try:
        return weights.default_weights(name)
    except weights.MissingWeightsError as exc:  # a checkout without the weights files
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pair():
    """Phantom section 1 deformed as the benchmarks deform (seed never used in training),
    registered onto itself undeformed: the recovery field is the exact answer."""
    ph = make_phantom(sections=4, shape_yx=(256, 256), seed=7)
    d = synthetic.random_deformation((256, 256), seed=99)
    fixed = ph.stack[2].astype(np.float32)
    moving = synthetic.warp(fixed, d.forward, order=3)[0]
    refs = [ph.stack[0].astype(np.float32), ph.stack[1].astype(np.float32)]
    return fixed, moving, refs, d.recovery


INNER = (slice(None), slice(24, -24), slice(24, -24))


@pytest.mark.parametrize("name, cls", [("faemreg_compact", FAEMRegPyramidNet),
                                       ("feature_ae", FeatureAutoencoder)])
def test_shipped_weights_load_and_have_a_model_card(name, cls):
    path = _shipped(name)
    model = load_model(path)
    assert type(model) is cls
    meta = read_metadata(path)["metadata"]
    assert meta["complete"] and meta["steps"] > 0
    card = path.with_suffix(".md").read_text()
    for must in ("Recipe", "benchmarks/train_default_weights.py", "Figures"):
        assert must in card
    assert "isbi2012_test_raw" not in json.dumps(meta["data"])  # held out
    assert path.stat().st_size < 10e6


def test_shipped_network_beats_the_identity(pair):
    _shipped("faemreg_compact")
    fixed, moving, refs, truth = pair
    res = get_method("learned").register(fixed, moving, references=refs)
    e = endpoint_error(res.field[INNER], truth[INNER]).mean_px
    e0 = endpoint_error(np.zeros_like(truth[INNER]), truth[INNER]).mean_px
    assert e0 > 4.0
    assert e < 0.5 * e0


def test_shipped_ssemnet_beats_the_identity(pair):
    _shipped("feature_ae")
    fixed, moving, _, truth = pair
    res = get_method("ssemnet").register(fixed, moving)
    e = endpoint_error(res.field[INNER], truth[INNER]).mean_px
    e0 = endpoint_error(np.zeros_like(truth[INNER]), truth[INNER]).mean_px
    assert e < 0.5 * e0
