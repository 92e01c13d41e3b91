"""Sections that break registration: the stack run finishes, and says what happened."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import metrics, phantom, synthetic
from hybridreg.methods import get_method
from hybridreg.stack import align_stack


def test_nan_input_is_refused_with_the_section_named():
    stack = np.zeros((3, 16, 16), np.float32)
    stack[2, 4, 4] = np.nan
    with pytest.raises(ValueError, match="section 2 .*NaN"):
        align_stack(stack, get_method("elastix", params=["em_rigid"]))


@pytest.fixture(scope="module")
def deformed():
    ph = phantom.make_phantom(sections=5, shape_yx=(128, 128), seed=6, cell_size_px=28,
                              drift_px=1.5)
    return synthetic.deform_stack(ph.stack, seed=8, max_shift_px=5, elastic_px=2)


def bad_section(kind, shape, rng):
    if kind == "blank":
        return np.zeros(shape, np.float32)
    if kind == "saturated":
        return np.full(shape, 255.0, np.float32)
    if kind == "noise":
        return rng.uniform(0, 255, shape).astype(np.float32)
    raise ValueError(kind)


@pytest.mark.elastix
@pytest.mark.parametrize("kind", ["blank", "saturated", "noise", "masked"])
def test_a_bad_section_does_not_end_the_run(deformed, kind):
    stack = deformed.stack.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    if kind == "masked":  # a fold or crack: most of the section is empty
        stack[2, :, 40:] = 0
    else:
        stack[2] = bad_section(kind, stack.shape[1:], rng)
    # two neighbours: pairs that skip a bad section let the robust weights find it (with one,
    # the bad section's two pairs are the only link between the halves of the stack)
    r = align_stack(stack, get_method("elastix", params=["em_rigid"], threads=2), neighbours=2)
    assert r.fields.shape == deformed.fields.shape and np.isfinite(r.fields).all()
    assert r.aligned.shape == stack.shape
    # the good sections still end closer to the truth than doing nothing
    good = [k for k in range(1, 5) if k != 2]
    mask = metrics.interior_mask(stack.shape[1:], margin_px=16)
    err = [metrics.endpoint_error(r.fields[k], deformed.fields[k], mask=mask).mean_px
           for k in good]
    none = [metrics.endpoint_error(np.zeros_like(r.fields[k]), deformed.fields[k],
                                   mask=mask).mean_px for k in good]
    assert np.mean(err) < np.mean(none), (err, none)
    # whatever went wrong at section 2 is on record, not hidden
    row = r.table[2]
    failed = [p for p in r.pairs if 2 in (p["fixed"], p["moving"]) and p["warnings"]]
    assert row["flagged"] == bool(row["warnings"])
    if failed or kind != "masked":  # a section without tissue must not pass unnoticed
        assert row["flagged"], row
