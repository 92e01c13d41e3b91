"""Loading itk's elastix wrapping: not at import, once per process, with the Pool threader."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hybridreg import elastix as elx

pytestmark = pytest.mark.elastix


def test_import_does_not_load_itk():
    code = ("import sys, hybridreg.elastix; "
            "assert 'itk' not in sys.modules, 'importing hybridreg.elastix imported itk'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loader_selects_pool_threader_once(itk):
    assert elx.load_itk() is itk
    assert itk.MultiThreaderBase.GetGlobalDefaultThreader() == \
        itk.MultiThreaderBaseEnums.Threader_Pool
