"""Helpers shared by the tests of hybridreg.io: seeded stacks, path escaping, listings."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from hybridreg.io import Stack

DTYPES = [np.uint8, np.uint16, np.float32]
SPACING = (3.5, 4.0, 50.0)


def make_stack(dtype, shape=(3, 5, 7), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def make_sections(z=5, shape=(32, 40), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (z,) + shape).astype(dtype)


def esc(path) -> str:
    return re.escape(str(path))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def check_stack(stack: Stack, data: np.ndarray, spacing=SPACING):
    assert isinstance(stack, Stack)
    assert stack.data.dtype == data.dtype
    assert stack.data.shape == data.shape
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing_xyz == pytest.approx(spacing, rel=1e-7)
