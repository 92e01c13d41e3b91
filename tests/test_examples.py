"""The examples run as scripts (slow: they use the shipped weights on 256 px phantoms)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridreg import weights

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.elastix]


@pytest.fixture(autouse=True)
def _need_weights():
    for name in ("faemreg_compact", "feature_ae"):
        try:
            weights.default_weights(name)
        except weights.MissingWeightsError as exc:
            pytest.skip(str(exc))


def run(script, *args, cwd):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)],
                         cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_itk_style(tmp_path):
    out = run("itk_style.py", "--out", tmp_path / "o", cwd=tmp_path)
    assert (tmp_path / "o" / "result.mha").is_file()
    assert (tmp_path / "o" / "resampled_by_itk.mha").is_file()
    assert "endpoint error" in out


@pytest.mark.skipif(shutil.which("transformix") is None, reason="no transformix program")
def test_parameter_file_workflow(tmp_path):
    out = run("parameter_file_workflow.py", "--out", tmp_path / "o", cwd=tmp_path)
    assert "kept your transform penalties: ['TransformBendingEnergyPenalty']" in out
    line = [ln for ln in out.splitlines() if "transformix reproduces" in ln]
    if not line:
        pytest.fail(f"no transformix comparison in the output:\n{out}")
    assert float(line[0].split("difference|")[1].split()[0]) < 1.0


def test_learned_vs_iterative(tmp_path):
    out = run("learned_vs_iterative.py", "--sections", 4, cwd=tmp_path)
    for name in ("none", "learned", "elastix", "hybrid"):
        assert any(ln.startswith(name) for ln in out.splitlines()), out
