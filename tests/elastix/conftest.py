"""Fixtures of the elastix tests: itk loaded once, a fixed section, a smooth case, results.

elastix is loaded once per test session (``hybridreg.elastix.load_itk``); the registrations
that several test modules check (a chain, an external and a resampled initial field) run once.
"""
from __future__ import annotations

import pytest
from elastix_cases import (ORIGIN_XY, SHAPE_YX, SHIFT_PX, SPACING_XY, deform, em_like,
                           fewer_iterations, gaussian_bump, shift_field)

from hybridreg import elastix as elx
from hybridreg import fields


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def itk():
    return elx.load_itk()


@pytest.fixture(scope="session")
def fixed():
    return em_like(SHAPE_YX, seed=1)


@pytest.fixture(scope="session")
def smooth_case(fixed):
    """A shift of (3, -2) px plus two smooth bumps, in physical units on a non-unit grid."""
    bump_a = gaussian_bump(SHAPE_YX, centre_xy=(70, 55), sigma_px=25, amplitude_px=(2.0, 1.5))
    bump_b = gaussian_bump(SHAPE_YX, centre_xy=(35, 80), sigma_px=20, amplitude_px=(-2.0, 1.5))
    shift = fields.to_pixels(shift_field(SHAPE_YX, SHIFT_PX, SPACING_XY), SPACING_XY)
    u_true = fields.to_physical(shift + bump_a + bump_b, SPACING_XY)
    moving = deform(fixed, u_true, spacing_xy=SPACING_XY)
    # A coarse "network" estimate: the shift and one bump, missing the other.
    initial = fields.to_physical(shift + bump_b, SPACING_XY)
    return {"moving": moving, "u_true": u_true, "initial": initial}


@pytest.fixture(scope="session")
def chain_result(itk, fixed, smooth_case):
    """em_affine followed by em_bspline (fewer iterations to keep the test short)."""
    maps = fewer_iterations(["em_affine", "em_bspline"], 150)
    return elx.register_pair(fixed, smooth_case["moving"], params=maps, spacing_xy=SPACING_XY,
                             origin_xy=ORIGIN_XY, threads=2)


@pytest.fixture(scope="session")
def initial_result(itk, fixed, smooth_case):
    """refine_bspline_1ch from an external initial field."""
    return elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                             spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                             initial_field=smooth_case["initial"], threads=2)


@pytest.fixture(scope="session")
def resampled_result(itk, fixed, smooth_case):
    """The same refinement with the moving section resampled by the initial field first."""
    return elx.register_pair(fixed, smooth_case["moving"], params="refine_bspline_1ch",
                             spacing_xy=SPACING_XY, origin_xy=ORIGIN_XY,
                             initial_field=smooth_case["initial"], threads=2,
                             initial_mode="resample")
