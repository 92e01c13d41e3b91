"""Writing a run's outputs (hybridreg.outputs): tables, JSON, JSON-ready values."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
