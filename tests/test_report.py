"""hybridreg.report: the self-contained HTML report, its figures, and a real headless browser."""
from __future__ import annotations

import base64
import io as _io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import PhaseCorrelation
from hybridreg import compare, phantom, report

ROOT = Path(__file__).resolve().parents[1]
#: screenshots of the rendered report, kept for CI (git-ignored)
ARTIFACTS = ROOT / "test-artifacts"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Broken:
    name = "broken"

    def register(self, fixed, moving, **kw):
        raise RuntimeError("this method always fails")


def comparison(*, sections=5, size=64, deform=True, labels=True):
    ph = phantom.make_phantom(sections=sections, shape_yx=(size, size), seed=0)
    case = compare.make_case(ph.stack, labels=ph.labels if labels else None,
                             deform_seed=1 if deform else None, name="tiny phantom")
    return compare.compare_methods(case, [PhaseCorrelation(), Broken(), "no-such-method"])


@pytest.fixture(scope="module")
def small():
    return comparison()


def images(html: str) -> dict[str, bytes]:
    """figure key -> decoded PNG bytes, for every <img> of the report."""
    found = re.findall(r'<figure data-figure="([^"]+)"><img alt="[^"]*" '
                       r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return {key: base64.b64decode(data) for key, data in found}


def expected_figures(result) -> list[str]:
    ks = report.representative_sections(result)
    return (["curves"] + [f"overlay-{k}" for k in ks] + [f"jacobian-{ks[len(ks) // 2]}"]
            + ["xz", "time"])


def test_report_has_one_decodable_png_per_figure(small):
    from PIL import Image

    html = report.render_report(small)
    figs = images(html)
    assert list(figs) == expected_figures(small)
    assert html.count("<img") == len(figs)
    for key, png in figs.items():
        assert png.startswith(PNG_SIGNATURE), key
        img = Image.open(_io.BytesIO(png))
        img.verify()
        assert img.format == "PNG" and min(img.size) > 50, key


def test_report_is_self_contained(small):
    html = report.render_report(small)
    # no external resource of any kind: every src is a data URI, no links, no imports
    assert re.findall(r'src="(?!data:image/png;base64,)', html) == []
    for needle in ("http://", "https://", "<link", "@import", "url("):
        assert needle not in html, needle


def test_summary_table_names_every_method_and_the_reasons(small):
    html = report.render_report(small)
    table = re.search(r'<table id="summary">.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", table, re.S)
    assert [(cls, re.search(r"<td[^>]*>([^<]*)</td>", cells).group(1)) for cls, cells in rows] \
        == [("ok", "none"), ("ok", "phasecorr"), ("failed", "broken"),
            ("unavailable", "no-such-method")]
    epe = small.run("phasecorr").summary["epe_mean_px"]
    assert f"{epe:.2f}" in rows[1][1]  # the table shows the metrics' own numbers
    assert "this method always fails" in html and "unknown method" in html


def test_representative_sections_skip_the_fixed_one(small):
    ks = report.representative_sections(small)
    assert ks == sorted(set(ks)) and 1 <= min(ks) and max(ks) == 4 and len(ks) <= 3
    worst = max(small.run("none").rows[1:], key=lambda r: r["epe_mean_px"])["section"]
    assert worst in ks


def test_without_ground_truth_the_report_leaves_out_what_needs_it():
    result = comparison(sections=4, deform=False, labels=False)
    html = report.render_report(result)
    figs = images(html)
    assert list(figs) == expected_figures(result)
    table = re.search(r'<table id="summary">.*?</table>', html, re.S).group(0)
    assert "EPE" not in table and "Dice" not in table and "NCC prev" in table
    assert "no ground truth" in html


def test_figures_stay_small_on_big_sections():
    from PIL import Image

    result = comparison(sections=3, size=384, labels=False)
    figs = images(report.render_report(result))
    for key, png in figs.items():
        w, h = Image.open(_io.BytesIO(png)).size
        assert w <= 1000 and h <= 1200, (key, w, h)
    assert sum(len(p) for p in figs.values()) < 1_500_000


def test_write_report_refuses_to_overwrite(small, tmp_path):
    path = report.write_report(small, tmp_path / "r.html")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        report.write_report(small, path)
    assert path.read_bytes() == before
    report.write_report(small, path, overwrite=True)


# --- a real browser -----------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_a_headless_browser(small, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs Debian's chromium)")
    path = report.write_report(small, tmp_path / "report.html")
    url = path.resolve().as_uri()
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n = len(expected_figures(small))
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    assert f'data-images="{n}"' in body.group(1), body.group(1)
    assert f'data-images-ok="{n}"' in body.group(1), body.group(1)
    assert f"all {n} images loaded" in dom.stdout
    assert '<table id="summary">' in dom.stdout and "phasecorr" in dom.stdout

    shot = tmp_path / "report.png"
    res = subprocess.run(flags + ["--window-size=1280,3000", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 3000)
    assert np.asarray(img).std() > 10  # something rendered, not a blank page
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report_screenshot.png")
    shutil.copy(path, ARTIFACTS / "report.html")


def test_report_explains_itself_to_the_reader(small):
    """Issue 18 item 15: the flagged sections listed with why, every column explained,
    captions naming only what is drawn, the coarse maps' blocky det J explained, and the
    browser check kept out of the reader's sight."""
    html = report.render_report(small)
    flagged = re.search(r'<table id="flagged">.*?</table>', html, re.S).group(0)
    run = next(r for r in small.runs if r.name == "phasecorr")
    want = [row for row in run.alignment.table if row.get("flagged")]
    assert want  # the fixture's phase correlation flags sections
    for row in want:
        assert f"<td>{row['section']}</td>" in flagged
    assert "phasecorr" in flagged
    columns = re.search(r'<dl class="columns" id="columns">.*?</dl>', html, re.S).group(0)
    headers = re.findall(r"<th[^>]*>([^<]+)</th>",
                         re.search(r'<table id="summary">.*?</table>', html, re.S).group(0))
    for h in headers:
        assert f"<dt>{h}</dt>" in columns, h
    captions = re.findall(r'<figure data-figure="([^"]+)">.*?<figcaption>(.*?)</figcaption>',
                          html, re.S)
    for key, caption in captions:
        assert "broken" not in caption and "no-such-method" not in caption, key
        if key.startswith("overlay"):
            assert "none, phasecorr" in caption and "undeformed section" in caption
        if key.startswith("jacobian"):
            assert "nodes every 32 px" in caption and "blocky" in caption
    assert '<p class="meta" id="image-check" hidden>' in html


def test_register_names_its_final_metric(tmp_path, capsys):
    from hybridreg import cli, io

    ph = phantom.make_phantom(sections=2, shape_yx=(64, 64), seed=0)
    io.write_stack(tmp_path / "f.tif", ph.stack[:1])
    io.write_stack(tmp_path / "m.tif", ph.stack[1:])
    assert cli.main(["register", str(tmp_path / "f.tif"), str(tmp_path / "m.tif"), "--out",
                     str(tmp_path / "o.tif"), "--method", "learned"]) == 0
    out = capsys.readouterr().out
    assert "final metric" not in out
    assert "NCC of the warped section with the fixed one (higher is better)" in out
