"""Writing a run's outputs (hybridreg.outputs): tables, JSON, JSON-ready values."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hybridreg import metrics, outputs


def test_tables_written(tmp_path):
    rows = [{"section": 0, "epe_mean_px": 0.0}, {"section": 1, "epe_mean_px": float("nan")}]
    outputs.write_table_csv(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        assert list(csv.DictReader(f))[1]["section"] == "1"
    outputs.write_json({"rows": rows}, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["epe_mean_px"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json"]


def test_jsonable_values():
    @dataclass
    class Opt:
        path: Path
        scale: float

    value = {"a": (1, np.float32(2.5)), 3: Opt(Path("/x/y"), float("inf")), "n": None,
             "obj": object}
    out = outputs.jsonable(value)
    assert out == {"a": [1, 2.5], "3": {"path": "/x/y", "scale": None}, "n": None,
                   "obj": repr(object)}
    json.dumps(out)  # valid JSON
    # the names metrics always had stay there, one implementation
    assert metrics.write_json is outputs.write_json
    assert metrics.write_table_csv is outputs.write_table_csv


@pytest.mark.skipif(shutil.which("transformix") is None,
                    reason="elastix's transformix program not installed")
def test_transformix_reproduces_a_4096_section_from_its_written_map(tmp_path):
    """A real-size section: the transformix chain of a coarse map (nodes every 32 px, the
    .mha the chain links to) gives hybridreg's own rendering (issue 16, item 2)."""
    import subprocess

    from hybridreg.fields import MapGrid, to_physical
    from hybridreg.outputs import write_maps, write_transforms
    from hybridreg.warp import render

    from helpers import smooth_field, smooth_texture

    shape, spacing, origin = (4096, 4096), (4.0, 4.0), (100.0, -50.0)
    grid = MapGrid(shape, stride=32, spacing_xy=spacing, origin_xy=origin)
    m = grid.quantize(to_physical(smooth_field(grid.node_shape, seed=5, amplitude_px=6.0),
                                  spacing))
    moving = (smooth_texture((512, 512), seed=6, sigma=1.5) * 255).astype(np.float32)
    moving = np.tile(moving, (8, 8))  # 4096^2 with structure at every scale
    write_maps(tmp_path / "f", m[None], grid)
    write_transforms(tmp_path / "f", 0, m, grid=grid)
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(moving)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(tmp_path / "in.mha"))
    tp = tmp_path / "f" / "transformix" / "section_0000" / "TransformParameters.0.txt"
    subprocess.run([shutil.which("transformix"), "-in", str(tmp_path / "in.mha"), "-out",
                    str(tmp_path), "-tp", str(tp)], check=True, capture_output=True)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "result.mha")))
    ours = render(moving, m, grid)
    diff = np.abs(theirs.astype(np.float64) - ours)  # up to the border pixels
    assert diff.max() < 0.05, diff.max()
    # and the files are small: the map and its .h5 under 1% of the uint8 section
    size = sum(p.stat().st_size for p in (tmp_path / "f").rglob("*") if p.is_file())
    assert size < 0.01 * moving.size, size
