"""Figures and the self-contained HTML report of a comparison (:mod:`hybridreg.compare`).

The report is one HTML file with no external resource: every figure is a PNG drawn with
matplotlib's Agg backend (no display, no pyplot state) and embedded as a base64 ``data:``
URI, so it opens offline and can be mailed or archived as it is. It holds:

- the summary table (one row per method, with the status and the reason of any method that
  failed or was unavailable) and the case and settings;
- per-section metric curves (endpoint error, neighbour NCC and SSIM, label overlap, folding,
  time);
- for a few representative sections, before (``none``) and after each method: a colour
  overlay of the section and its predecessor, their difference, and with
  ground truth the difference to the undeformed section;
- Jacobian-determinant maps of each method's field (and of the ground truth);
- a cross-section (xz) view of each aligned stack at a fixed row;
- the time per method.

Figures stay cheap on big stacks: images are subsampled by a stride to at most ``max_px``
pixels per side before drawing, only a few sections are drawn, and the xz view is one row.

A small inline script checks, when the page has loaded, that every image decoded
(``complete`` and ``naturalWidth > 0``) and writes the result into the page: the ``<body>``
attributes ``data-images`` and ``data-images-ok``, and the text of ``#image-check``
(``"all N images loaded"``). A headless browser can read it from the DOM.
"""
from __future__ import annotations

import base64
import html
import io as _io
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["representative_sections", "report_figures", "render_report", "write_report"]

log = logging.getLogger(__name__)

#: metric column -> (axis label, higher is better)
CURVES = {
    "epe_mean_px": ("endpoint error, mean (px)", False),
    "epe_away_px": ("endpoint error away from defects (px)", False),
    "defect_fraction": ("area under defects (fraction)", False),
    "ncc_prev": ("NCC to the previous section", True),
    "ssim_prev": ("SSIM to the previous section", True),
    "dice_mean": ("Dice against the undeformed labels", True),
    "dice_prev": ("Dice to the previous section's labels", True),
    "folding_fraction": ("folding fraction", False),
    "jac_min": ("min Jacobian determinant", True),
    "seconds": ("registration time (s)", False),
}

#: summary column -> (header, format)
SUMMARY_COLUMNS = {
    "method": ("method", "{}"),
    "status": ("status", "{}"),
    "epe_mean_px": ("EPE mean (px)", "{:.2f}"),
    "epe_p95_px": ("EPE p95 (px)", "{:.2f}"),
    "epe_away_px": ("EPE away from defects (px)", "{:.2f}"),
    "defect_fraction": ("defect area", "{:.3f}"),
    "ncc_prev": ("NCC prev", "{:.3f}"),
    "ssim_prev": ("SSIM prev", "{:.3f}"),
    "ncc_ref": ("NCC truth", "{:.3f}"),
    "dice_mean": ("Dice", "{:.3f}"),
    "pixel_agreement": ("label agreement", "{:.3f}"),
    "dice_prev": ("Dice prev", "{:.3f}"),
    "folding_fraction": ("folding", "{:.4f}"),
    "jac_min": ("min det J", "{:.3f}"),
    "flagged": ("flagged", "{:d}"),
    "total_seconds": ("time (s)", "{:.1f}"),
    "setup_seconds": ("warm-up (s)", "{:.1f}"),
    "seconds": ("s/section", "{:.2f}"),
}

_COLOURS = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
            "#e377c2", "#17becf", "#bcbd22"]


# --- helpers ------------------------------------------------------------------------------------

def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")


_DPI = 80


def _png(fig) -> bytes:
    """The figure as a 256-colour PNG (a third of the size of matplotlib's RGBA PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image  # matplotlib's own dependency

    FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256,
                                                  method=Image.Quantize.FASTOCTREE)
    out = _io.BytesIO()
    img.save(out, format="png", optimize=True)
    return out.getvalue()


def _stride(shape_yx, max_px: int) -> int:
    return max(1, math.ceil(max(shape_yx) / max(1, int(max_px))))


def _finite(v) -> bool:
    return (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _colour(i: int) -> str:
    return _COLOURS[i % len(_COLOURS)]


def _ok_runs(comparison):
    return [r for r in comparison.runs if r.ok and r.aligned is not None]


def _map_stride(comparison) -> int | None:
    """The node spacing (px) of the methods' coarse maps, where the runs kept one."""
    for r in comparison.runs:
        grid = getattr(getattr(r, "alignment", None), "grid", None)
        if grid is not None:
            return int(grid.stride)
    return None


def _intensity_range(stack: np.ndarray, step: int) -> tuple[float, float]:
    sample = np.asarray(stack[:, ::step, ::step], dtype=np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _subsample(img: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th pixel, smoothed first (Gaussian, sigma ``step / 2``) against aliasing."""
    img = np.asarray(img, np.float32)
    if step > 1:
        from scipy import ndimage

        img = ndimage.gaussian_filter(img, step / 2.0, mode="nearest", truncate=2.5)
    return img[::step, ::step]


def _norm(img, lo, hi):
    return np.clip((np.asarray(img, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _panel(ax, img, title, **kw):
    ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def representative_sections(comparison, *, n: int = 3) -> list[int]:
    """Up to ``n`` sections (never 0) to draw: the worst under the baseline, the middle one,
    the last one, in stack order.

    The worst is the largest endpoint error with ground truth, else the lowest NCC to the
    previous section; with defect masks, the section with the largest defect area comes
    first.
    """
    z = comparison.case.stack.shape[0]
    if z < 2 or n < 1:
        return []
    candidates = []
    base = comparison.runs[0].rows if comparison.runs else []
    key, sign = ("epe_mean_px", 1.0) if comparison.case.has_truth else ("ncc_prev", -1.0)
    scored = [(sign * r[key], r["section"]) for r in base
              if r.get("section", 0) > 0 and _finite(r.get(key))]
    damaged = [(r["defect_fraction"], r["section"]) for r in base
               if r.get("section", 0) > 0 and (r.get("defect_fraction") or 0) > 0]
    if damaged:
        candidates.append(max(damaged)[1])
    if scored:
        candidates.append(max(scored)[1])
    candidates += [max(1, z // 2), z - 1]
    chosen = []
    for k in candidates:
        if k not in chosen:
            chosen.append(int(k))
    return sorted(chosen[:n])


# --- figures ----------------------------------------------------------------------------------

def curve_metrics(comparison) -> list[str]:
    """The metrics of :data:`CURVES` that some run measured on a section after the first."""
    runs = [r for r in comparison.runs if r.rows]
    return [m for m in CURVES if any(_finite(row.get(m)) for r in runs for row in r.rows
                                     if row.get("section", 0) > 0)]


def figure_curves(comparison) -> bytes | None:
    """Per-section metric curves, one panel per metric, one line per method."""
    from matplotlib.ticker import MaxNLocator

    metrics = curve_metrics(comparison)
    if not metrics:
        return None
    cols = 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / cols)
    fig = _figure(6.2 * cols, 3.0 * nrows + 0.4)  # drawn at the page's full width
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        label, _ = CURVES[m]
        for i, r in enumerate(comparison.runs):
            pts = [(row["section"], row[m]) for row in r.rows
                   if row.get("section", 0) > 0 and _finite(row.get(m))]
            if not pts:
                continue
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", ms=3, lw=1.2, color=_colour(i), label=r.name,
                    ls="--" if r.name == "none" else "-")
        ax.set_title(label, fontsize=11)
        ax.set_xlabel("section", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    # one legend for all panels, above them, in type large enough to read
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 6),
               fontsize=11, frameon=False)
    return _png(fig)


def figure_overlays(comparison, k: int, *, max_px: int = 192) -> bytes:
    """Section ``k`` against ``k - 1`` before (``none``) and after each method.

    One row per method; columns: a colour overlay (section k-1 magenta, section k green:
    grey where they agree), their difference, and with ground truth the difference of
    section k to the undeformed section k. Differences share one symmetric range, set by the
    baseline's.
    """
    case = comparison.case
    z, h, w = case.stack.shape
    if not 1 <= k < z:
        raise ValueError(f"section {k} has no previous section in a {z}-section stack")
    step = _stride((h, w), max_px)
    lo, hi = _intensity_range(case.stack, step)
    runs = _ok_runs(comparison)
    truth = case.reference is not None
    ncols = 3 if truth else 2
    sub_h, sub_w = math.ceil(h / step), math.ceil(w / step)
    scale = float(np.clip(150.0 / max(sub_h, sub_w), 1.0, 2.0))  # small images drawn larger
    panel_w, panel_h = sub_w * scale / _DPI, sub_h * scale / _DPI
    fig = _figure(ncols * (panel_w + 0.1) + 0.3, len(runs) * (panel_h + 0.3) + 0.1)
    axes = fig.subplots(len(runs), ncols, squeeze=False)
    images = []
    for r in runs:
        prev = _norm(_subsample(r.aligned[k - 1], step), lo, hi)
        cur = _norm(_subsample(r.aligned[k], step), lo, hi)
        ref = _norm(_subsample(case.reference[k], step), lo, hi) if truth else None
        images.append((r.name, prev, cur, ref))
    base = images[0]
    spread = float(np.percentile(np.abs(base[2] - base[1]), 99)) if images else 0.5
    spread = float(np.clip(spread, 0.05, 1.0))
    titles = [f"{k - 1} magenta, {k} green", f"section {k} - {k - 1}", f"{k} - truth"]
    for row, (name, prev, cur, ref), r in zip(axes, images, runs):
        _panel(row[0], np.stack([prev, cur, prev], axis=-1), "")
        _panel(row[1], cur - prev, "", cmap="RdBu_r", vmin=-spread, vmax=spread)
        if truth:
            _panel(row[2], cur - ref, "", cmap="RdBu_r", vmin=-spread, vmax=spread)
        row[0].set_ylabel(name, fontsize=9)
        if getattr(comparison, "masks", None) is not None:
            _outline_defects(row, comparison, r, (k - 1, k), step)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=8)
    return _png(fig)


def figure_jacobians(comparison, k: int, *, max_px: int = 256) -> bytes | None:
    """Jacobian-determinant maps of section ``k``'s field, per method (and the truth).

    Diverging colours centred at 1 (no area change); folded pixels (det <= 0) in black.
    """
    from matplotlib.colors import TwoSlopeNorm

    from .fields import jacobian_determinant

    case = comparison.case
    h, w = case.stack.shape[1:]
    step = _stride((h, w), max_px)
    panels = []
    if case.true_fields is not None:
        panels.append(("truth", case.true_fields[k]))
    panels += [(r.name, r.fields[k]) for r in _ok_runs(comparison)
               if r.name != "none" and r.fields is not None]
    if not panels:
        return None
    dets = [jacobian_determinant(u, spacing_xy=case.spacing_xy) for _, u in panels]
    spread = max(0.05, max(float(np.percentile(np.abs(d - 1.0), 99.5)) for d in dets))
    norm = TwoSlopeNorm(vmin=1.0 - spread, vcenter=1.0, vmax=1.0 + spread)
    cols = min(5, len(panels))
    nrows = math.ceil(len(panels) / cols)
    panel_in = float(np.clip(min(h, w) / step / _DPI, 1.6, 2.4))
    fig = _figure(cols * (panel_in + 0.1) + 0.9, nrows * (panel_in + 0.45))
    axes = fig.subplots(nrows, cols, squeeze=False)
    im = None
    for ax, (name, _), det in zip(axes.flat, panels, dets):
        sub = det[::step, ::step]
        im = ax.imshow(sub, cmap="RdBu_r", norm=norm, interpolation="nearest")
        folded = sub <= 0
        if folded.any():
            overlay = np.zeros(sub.shape + (4,), np.float32)
            overlay[folded] = (0, 0, 0, 1)
            ax.imshow(overlay, interpolation="nearest")
        fold = float(np.mean(det <= 0))
        ax.set_title(f"{name}\nmin {det.min():.2f}, folding {fold:.4f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.8, label="det J")
    return _png(fig)


def figure_xz(comparison, *, row: int | None = None, thickness: int = 5,
              max_px: int = 384) -> bytes:
    """Cross-section (xz) of each aligned stack at a fixed row (default the middle one).

    Each panel is the mean of ``thickness`` rows around ``row`` (a thin slab: less noise,
    the same structures); sections run downwards, each drawn a few pixels tall so that
    short stacks show.
    """
    case = comparison.case
    z, h, w = case.stack.shape
    y = h // 2 if row is None else int(row)
    if not 0 <= y < h:
        raise ValueError(f"row {row} is outside sections of height {h}")
    rows = slice(max(0, y - thickness // 2), min(h, y + thickness // 2 + 1))
    step = _stride((w,), max_px)
    lo, hi = _intensity_range(case.stack, _stride((h, w), max_px))
    panels = []
    if case.reference is not None:
        panels.append(("truth (undeformed)", case.reference))
    panels += [(r.name, r.aligned) for r in _ok_runs(comparison)]
    width = math.ceil(w / step)
    repeat = max(1, round(width / (3 * z)))
    scale = float(np.clip(400.0 / width, 1.0, 3.0))
    width_in = width * scale / _DPI + 0.2
    height_in = z * repeat * scale / _DPI + 0.3
    fig = _figure(width_in, len(panels) * height_in)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, stack) in zip(axes, panels):
        slab = np.asarray(stack[:, rows, :], np.float32).mean(axis=1)
        if step > 1:  # against aliasing, along x only
            from scipy import ndimage

            slab = ndimage.gaussian_filter1d(slab, step / 2.0, axis=1, mode="nearest")
        xz = _norm(slab[:, ::step], lo, hi)
        _panel(ax, np.repeat(xz, repeat, axis=0), f"{name}: xz at rows {rows.start}-"
               f"{rows.stop - 1}", cmap="gray", vmin=0, vmax=1, aspect="auto")
    return _png(fig)


def figure_times(comparison) -> bytes | None:
    """Wall time of each method's whole alignment (bars), with seconds per section."""
    runs = [(i, r) for i, r in enumerate(comparison.runs)
            if r.name != "none" and _finite(r.summary.get("total_seconds"))]
    if not runs:
        return None
    fig = _figure(6.5, 0.45 * len(runs) + 1.0)
    ax = fig.subplots()
    names = [r.name for _, r in runs]
    totals = [float(r.summary["total_seconds"]) for _, r in runs]
    setups = [float(r.summary.get("setup_seconds") or 0.0) for _, r in runs]
    bars = ax.barh(names, totals, color=[_colour(i) for i, _ in runs], label="alignment")
    if any(setups):
        ax.barh(names, setups, left=totals, color="#cccccc", label="warm-up (loading)")
        ax.legend(fontsize=10, loc="lower right")
    for bar, (_, r), setup in zip(bars, runs, setups):
        per = r.summary.get("seconds")
        text = f" {r.summary['total_seconds']:.1f} s"
        text += f" ({per:.2f} s/section)" if _finite(per) else f" ({r.status})"
        if setup:
            text += f" + {setup:.1f} s warm-up"
        ax.text(bar.get_width() + setup, bar.get_y() + bar.get_height() / 2, text,
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_xlim(0, max(t + s for t, s in zip(totals, setups)) * 2.2 + 1e-3)
    ax.tick_params(labelsize=8)
    return _png(fig)


def _outline_defects(axes, comparison, run, sections, step: int) -> None:
    """Outline the defects of ``sections`` (yellow: the first, cyan: the second) where the
    run's fields take them, on every panel of its row."""
    from .warp import warp

    for k, colour in zip(sections, ("yellow", "cyan")):
        m = np.asarray(comparison.masks[k]) != 0
        if m.all():
            continue
        if run.name != "none" and run.fields is not None:
            m = warp(m.astype(np.float32), np.asarray(run.fields[k]),
                     spacing_xy=comparison.case.spacing_xy, order=0, cval=1.0)[0] > 0.5
        sub = _subsample((~m).astype(np.float32), step)
        for ax in axes:
            ax.contour(sub, levels=[0.5], colors=colour, linewidths=0.7)


def report_figures(comparison, *, sections: Sequence[int] | None = None,
                   max_px: int = 256) -> list[tuple[str, str, bytes]]:
    """Every figure of the report, in order: ``(key, caption, png_bytes)``.

    Keys: ``curves``, ``overlay-<k>`` per representative section, ``jacobian-<k>``, ``xz``,
    ``time``. Figures that have nothing to show (e.g. no method ran) are left out.
    """
    t0 = time.perf_counter()
    if sections is None:
        sections = representative_sections(comparison)
    figs = []
    png = figure_curves(comparison)
    if png is not None:
        figs.append(("curves", "Per-section metrics (section 0, the fixed one, left out). "
                     "none: the stack as given.", png))
    drawn = [r.name for r in _ok_runs(comparison)]
    after = [n for n in drawn if n != "none"]
    truth_col = comparison.case.reference is not None
    for k in sections:
        figs.append((f"overlay-{k}", f"Section {k} against section {k - 1}, one row each "
                     f"for: {', '.join(drawn)} (none: before any registration). Columns: "
                     f"the two sections overlaid (section {k - 1} magenta, section {k} green, "
                     f"grey where they agree), their difference"
                     + (f", and the difference of section {k} to the undeformed section "
                        f"{k}" if truth_col else "")
                     + ". Differences: red where the first is brighter, blue where darker, "
                     "on one range for all rows."
                     + (f" Outlined: the defects of section {k - 1} (yellow) and {k} (cyan), "
                        f"where each method's fields take them."
                        if getattr(comparison, "masks", None) is not None else ""),
                     figure_overlays(comparison, k, max_px=min(max_px, 192))))
    if sections and after:
        k = sections[len(sections) // 2]
        png = figure_jacobians(comparison, k, max_px=max_px)
        if png is not None:
            grid = _map_stride(comparison)
            figs.append((f"jacobian-{k}", f"Jacobian determinant of the fields of section "
                         f"{k}: " + (", ".join((["truth"] if comparison.case.true_fields
                                                is not None else []) + after))
                         + " (1: no area change; black: folded, det <= 0)."
                         + (f" The methods' transforms are coarse maps, nodes every {grid} px "
                            f"interpolated bilinearly: their det J varies smoothly within "
                            f"each {grid} px cell and changes slope at the nodes, so the maps "
                            f"look blocky at that scale; the truth is dense." if grid and
                            grid > 1 else ""), png))
    figs.append(("xz", "Cross-section (xz) of each aligned stack at the middle rows (a "
                 "5-row slab): a good alignment shows continuous structures along z.",
                 figure_xz(comparison, max_px=max(max_px, 384))))
    png = figure_times(comparison)
    if png is not None:
        warm = any(_finite(s.get("setup_seconds")) for s in comparison.summaries)
        figs.append(("time", "Time per method: the whole alignment (registration, joint "
                     "solve, warping)" + (", and the warm-up registration before it that "
                                          "loads the method's libraries or network (not part "
                                          "of the alignment's time)" if warm else "") + ".",
                     png))
    log.info("report figures in %.1f s", time.perf_counter() - t0)
    return figs


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em;
       color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
tr.unavailable td, tr.failed td { color: #a00; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure[data-figure="curves"] img, figure[data-figure="time"] img { width: 100%; }
dl.columns { font-size: 0.85em; color: #444; display: grid;
             grid-template-columns: max-content auto; gap: 2px 12px; }
dl.columns dt { font-weight: bold; } dl.columns dd { margin: 0; }
.reason { font-size: 0.85em; color: #a00; } .meta { font-size: 0.85em; color: #555; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-images-ok", String(ok.length));
  var el = document.getElementById("image-check");
  if (el) {
    el.textContent = ok.length === imgs.length ? "all " + imgs.length + " images loaded"
                                               : (imgs.length - ok.length) + " of " +
                                                 imgs.length + " images failed to load";
  }
});
"""


def _cell(column: str, value) -> str:
    _, fmt = SUMMARY_COLUMNS[column]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def _shown_columns(comparison) -> list[str]:
    """The summary columns the report shows: method, status and those with a value."""
    return [c for c in SUMMARY_COLUMNS if c in ("method", "status")
            or any(_finite(s.get(c)) for s in comparison.summaries)]


def _summary_table(comparison) -> str:
    summaries = comparison.summaries
    columns = _shown_columns(comparison)
    head = "".join(f'<th class="{"name" if c in ("method", "status") else ""}">'
                   f"{html.escape(SUMMARY_COLUMNS[c][0])}</th>" for c in columns)
    body = []
    for s in summaries:
        cells = "".join(f'<td class="{"name" if c in ("method", "status") else ""}">'
                        f"{_cell(c, s.get(c))}</td>" for c in columns)
        body.append(f'<tr class="{html.escape(str(s.get("status", "")))}">{cells}</tr>')
    reasons = [f"<li><b>{html.escape(r.name)}</b> ({html.escape(r.status)}): "
               f"{html.escape(r.reason)}</li>" for r in comparison.runs if r.reason]
    out = (f'<table id="summary"><thead><tr>{head}</tr></thead>'
           f'<tbody>{"".join(body)}</tbody></table>')
    if reasons:
        out += f'<ul class="reason" id="reasons">{"".join(reasons)}</ul>'
    return out


#: What each summary column means (the report explains the columns it shows).
COLUMN_MEANINGS = {
    "method": "the registration method; none: the stack as given",
    "status": "ok, failed (the reason below) or unavailable (e.g. missing weights)",
    "epe_mean_px": "endpoint error against the known deformation, mean over the interior "
                   "pixels and sections 1.. (px; lower is better)",
    "epe_p95_px": "its 95th percentile (px)",
    "epe_away_px": "with defect masks: the endpoint error on the sections with a defect, "
                   "farther than 32 px from any defect (px)",
    "defect_fraction": "with defect masks: the fraction of each section under its defects, "
                       "mean over sections 1..; every other metric leaves these pixels out",
    "ncc_prev": "normalised cross-correlation of each aligned section with the previous one "
                "(higher is better; neighbours differ, so 1 is not reached)",
    "ssim_prev": "structural similarity of each aligned section with the previous one",
    "ncc_ref": "NCC of each aligned section with the undeformed one (ground truth known)",
    "dice_mean": "Dice overlap of the labels warped with the fields against the undeformed "
                 "labels, mean over labels",
    "pixel_agreement": "fraction of pixels whose warped label equals the undeformed label",
    "dice_prev": "Dice of each section's warped labels against the previous section's",
    "folding_fraction": "fraction of pixels where the field folds (det J <= 0)",
    "jac_min": "the smallest Jacobian determinant of any field (below 0: folded)",
    "flagged": "sections the alignment flagged (see the table below)",
    "total_seconds": "wall time of the whole alignment (registration, joint solve, warping)",
    "setup_seconds": "one small registration before it that loads the method's libraries or "
                     "network (not in the time)",
    "seconds": "registration time per section",
}


def _column_meanings(comparison) -> str:
    items = "".join(f"<dt>{html.escape(SUMMARY_COLUMNS[c][0])}</dt>"
                    f"<dd>{html.escape(COLUMN_MEANINGS[c])}</dd>"
                    for c in _shown_columns(comparison) if c in COLUMN_MEANINGS)
    return f'<dl class="columns" id="columns">{items}</dl>'


def _flagged_table(comparison) -> str:
    """The sections each method's alignment flagged, with why."""
    rows = []
    for r in comparison.runs:
        table = getattr(getattr(r, "alignment", None), "table", None) or []
        for row in table:
            if row.get("flagged"):
                rows.append(f'<tr><td class="name">{html.escape(r.name)}</td>'
                            f'<td>{int(row["section"])}</td><td class="name">'
                            f'{html.escape(str(row.get("warnings") or ""))}</td></tr>')
    if not rows:
        return ('<h2>Flagged sections</h2><p class="meta" id="flagged">No method flagged a '
                'section.</p>')
    return ('<h2>Flagged sections</h2><table id="flagged"><thead><tr><th class="name">method'
            '</th><th>section</th><th class="name">why</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _meta(comparison) -> str:
    from . import __version__

    c = comparison.case.describe()
    s = comparison.settings
    truth = (f"synthetically deformed with seed {c['deform_seed']} (ground truth known)"
             if c["ground_truth"] else "used as given (no ground truth: no endpoint error)")
    items = [
        f"stack: {html.escape(str(c['name']))}, {c['sections']} sections of "
        f"{c['shape_yx'][0]} x {c['shape_yx'][1]} px ({html.escape(c['dtype'])}), spacing "
        f"{c['spacing_xy'][0]:g} x {c['spacing_xy'][1]:g}; {truth}",
        "labels: " + ("yes" if c["labels"] else "none"),
        "alignment: " + html.escape(", ".join(f"{k} {v}" for k, v in s.items()
                                              if v is not None and k in (
                                                  "mode", "neighbours", "prior", "window",
                                                  "threads"))),
        f"metrics on the interior ({comparison.margin_px} px from each edge); means leave "
        f"section 0 out",
        f"hybridreg {__version__}, {html.escape(str(s.get('machine', '')))}, "
        f"{html.escape(str(s.get('date', '')))}",
    ]
    return "<ul class=\"meta\">" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def render_report(comparison, *, title: str | None = None, sections: Sequence[int] | None = None,
                  max_px: int = 256) -> str:
    """The report as one self-contained HTML string.

    Parameters
    ----------
    comparison : hybridreg.compare.Comparison
    title : str, optional
        Default: ``"hybridreg compare: <case name>"``.
    sections : sequence of int, optional
        Sections to draw in the overlays (default :func:`representative_sections`).
    max_px : int
        Images are subsampled to at most this many pixels per side.
    """
    title = title or f"hybridreg compare: {comparison.case.name}"
    figures = report_figures(comparison, sections=sections, max_px=max_px)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>", _meta(comparison),
        # for a headless browser's check (data-images-ok), not for the reader
        '<p class="meta" id="image-check" hidden>images not checked yet</p>',
        "<h2>Summary</h2>", _summary_table(comparison), _column_meanings(comparison),
        _flagged_table(comparison),
    ]
    headings = {"curves": "Per-section metrics", "overlay": "Sections before and after",
                "jacobian": "Jacobian determinant", "xz": "Cross-section (xz)",
                "time": "Time per method"}
    seen = set()
    for key, caption, png in figures:
        kind = key.split("-")[0]
        if kind not in seen:
            parts.append(f"<h2>{headings[kind]}</h2>")
            seen.add(kind)
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure data-figure="{html.escape(key)}"><img alt="{html.escape(key)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                     f"</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(comparison, path, *, overwrite: bool = False, inputs: Sequence = (),
                 **options) -> Path:
    """Write :func:`render_report` to ``path`` atomically (:func:`hybridreg.io.atomic_output`).

    ``options`` go to :func:`render_report`. Returns the path.
    """
    from .io import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:  # refuses first
        text = render_report(comparison, **options)
        Path(tmp).write_text(text, encoding="utf-8")
    log.info("report: %s (%.1f MB)", path, len(text) / 1e6)
    return path
