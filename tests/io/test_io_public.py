"""The public surface of hybridreg.io: lazy import, __all__."""
from __future__ import annotations

import subprocess
import sys

from hybridreg import io


def test_import_is_lazy():
    code = ("import sys, hybridreg.io; "
            "print(sorted(m for m in ('itk', 'SimpleITK', 'torch', 'tifffile', 'h5py', 'zarr') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    assert io.__all__ and all(hasattr(io, name) for name in io.__all__)
