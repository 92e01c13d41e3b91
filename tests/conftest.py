"""Shared fixtures: seeded synthetic images and fields, the shared real-data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

#: The real EM stacks (never copied into the repository); tests skip when absent.
SHARED_DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared EM data folder {SHARED_DATA} not present")
    return SHARED_DATA
