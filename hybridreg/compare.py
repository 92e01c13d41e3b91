"""Run several registration methods on the same case and collect their metrics.

A *case* (:class:`CompareCase`) is the stack every method aligns, with whatever is known about
it: with a deformation seed, the stack is a synthetically deformed copy of the input
(:func:`hybridreg.synthetic.deform_stack`) and the exact ground truth is known (recovery
fields, the undeformed stack and labels); without one, the stack is used as it is and only
what needs no ground truth is measured.

:func:`compare_methods` aligns the case's stack with each method
(:func:`hybridreg.stack.align_stack`, the same mode and settings for all), and measures every
result with :func:`hybridreg.metrics.evaluate_stack`:

- ``epe_mean_px``, ``epe_p95_px``: endpoint error against the ground truth (deformed cases);
- ``ncc_prev``, ``ssim_prev``: similarity of neighbouring aligned sections;
- ``ncc_ref``, ``mse_ref``: similarity to the undeformed section (deformed cases);
- ``dice_mean``, ``pixel_agreement``: labels warped with the method's fields (nearest
  neighbour) against the undeformed labels (deformed cases with labels);
- ``dice_prev``, ``agreement_prev``: warped labels against the previous section's warped
  labels (any case with labels: 3D label ids are consistent across sections);
- ``jac_min``, ``folding_fraction``: the fields' Jacobian determinant;
- ``seconds``: registration time per section; the summary adds ``total_seconds``, the wall
  time of the whole alignment, and ``setup_seconds``, the time of one small warm-up
  registration before it (loading libraries and networks, kept out of the alignment's time).

A baseline run ``"none"`` (the identity: the stack as given) comes first.

A method that cannot be built (unknown name, missing weights, a bad option) is recorded as
``"unavailable"``, one whose alignment or evaluation raises as ``"failed"``, each with the
reason; the other methods run regardless. :func:`write_comparison` writes ``metrics.csv``
(one row per method and section), ``metrics.json`` and the HTML report
(:mod:`hybridreg.report`).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field as dc_field
from typing import Mapping, Sequence

import numpy as np

from .methods.registry import ALL_METHODS
from .outputs import BASELINE, check_outputs, jsonable, planned_outputs, write_comparison

__all__ = [
    "ALL_METHODS",
    "CompareCase",
    "MethodRun",
    "Comparison",
    "make_case",
    "compare_methods",
    "planned_outputs",
    "check_outputs",
    "write_comparison",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True, eq=False)
class CompareCase:
    """The stack every method aligns, and what is known about it.

    Attributes
    ----------
    stack : ndarray, shape (Z, H, W)
        The stack the methods align (the deformed copy for a deformed case).
    spacing_xy : (float, float)
        Grid spacing; fields are in these physical units.
    reference : ndarray, shape (Z, H, W), or None
        The undeformed stack (deformed cases).
    true_fields : ndarray, shape (Z, 2, H, W), float32, or None
        Ground-truth recovery fields, physical units (deformed cases):
        ``warp(stack[k], true_fields[k]) == reference[k]``.
    labels : ndarray of int, shape (Z, H, W), or None
        Labels of ``stack`` (deformed along, nearest neighbour, in a deformed case).
    labels_ref : ndarray of int, shape (Z, H, W), or None
        Labels of ``reference`` (deformed cases with labels).
    deform_seed : int or None
    name : str
        Where the stack came from, for the report.
    deformation : dict
        The deformation magnitudes passed to :func:`hybridreg.synthetic.deform_stack`.
    """

    stack: np.ndarray
    spacing_xy: tuple[float, float] = (1.0, 1.0)
    reference: np.ndarray | None = None
    true_fields: np.ndarray | None = None
    labels: np.ndarray | None = None
    labels_ref: np.ndarray | None = None
    deform_seed: int | None = None
    name: str = "stack"
    deformation: dict = dc_field(default_factory=dict)

    @property
    def has_truth(self) -> bool:
        return self.true_fields is not None

    def describe(self) -> dict:
        """JSON-ready description (shapes, seed, what is known)."""
        z, h, w = self.stack.shape
        return {"name": self.name, "sections": z, "shape_yx": [h, w],
                "dtype": str(self.stack.dtype), "spacing_xy": list(self.spacing_xy),
                "deform_seed": self.deform_seed, "deformation": dict(self.deformation),
                "ground_truth": self.has_truth, "labels": self.labels is not None}


@dataclass(frozen=True, eq=False)
class MethodRun:
    """One method's result on a case.

    Attributes
    ----------
    name : str
    status : {"ok", "failed", "unavailable"}
    reason : str
        Why it failed or is unavailable ("" when ok).
    options : dict
        The options the method was built with.
    rows : list of dict
        Per-section metrics (empty unless ok).
    summary : dict
        ``method``, ``status``, the means of :func:`hybridreg.metrics.summarize` (section 0
        left out), ``total_seconds`` (the alignment), ``setup_seconds`` (a warm-up
        registration before it, loading libraries) and ``flagged`` (sections the alignment
        flagged).
    aligned : ndarray, shape (Z, H, W), float32, or None
    fields : ndarray, shape (Z, 2, H, W), float32, or None
        Recovery (pull) fields, physical units.
    alignment : hybridreg.stack.StackAlignment or None
        The full alignment (tables of pairs and warnings); None for the baseline.
    """

    name: str
    status: str
    reason: str = ""
    options: dict = dc_field(default_factory=dict)
    rows: list = dc_field(default_factory=list)
    summary: dict = dc_field(default_factory=dict)
    aligned: np.ndarray | None = None
    fields: np.ndarray | None = None
    alignment: object | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, eq=False)
class Comparison:
    """The result of :func:`compare_methods`: the case and one run per method.

    Attributes
    ----------
    case : CompareCase
    runs : list of MethodRun
        The baseline (``"none"``) first, then the methods in the order given.
    margin_px : int
        Pixels left out at each edge in every metric.
    settings : dict
        Stack mode and its settings, machine, date.
    masks : ndarray of uint8, shape (Z, H, W), or None
        The defect masks of ``case.stack`` the methods aligned with (elastix's convention).
    """

    case: CompareCase
    runs: list
    margin_px: int
    settings: dict = dc_field(default_factory=dict)
    masks: np.ndarray | None = None

    def run(self, name: str) -> MethodRun:
        """The run of method ``name``."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no run named {name!r}; runs: {', '.join(r.name for r in self.runs)}")

    @property
    def summaries(self) -> list[dict]:
        """One summary row per run, the baseline first."""
        return [dict(r.summary) for r in self.runs]

    def section_rows(self) -> list[dict]:
        """Per-section rows of every run that has them, with a leading ``method`` column."""
        return [{"method": r.name, **row} for r in self.runs for row in r.rows]

    def to_json(self) -> dict:
        """Everything but the arrays, JSON-ready (NaN become null in :func:`write_json`)."""
        return {
            "case": self.case.describe(),
            "settings": {**self.settings, "margin_px": self.margin_px},
            "methods": [{"name": r.name, "status": r.status, "reason": r.reason,
                         "options": jsonable(r.options)} for r in self.runs],
            "summaries": self.summaries,
            "sections": {r.name: r.rows for r in self.runs},
        }


# --- the case ---------------------------------------------------------------------------------

def make_case(stack: np.ndarray, *, spacing_xy=(1.0, 1.0), labels: np.ndarray | None = None,
              deform_seed: int | None = None, name: str = "stack",
              **magnitudes) -> CompareCase:
    """Build the case the methods are compared on.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W)
        The input stack.
    spacing_xy : (float, float)
        Its grid spacing.
    labels : ndarray of int, shape (Z, H, W), optional
        Instance labels of ``stack`` (ids consistent across sections).
    deform_seed : int, optional
        Deform every section but the first with :func:`hybridreg.synthetic.deform_stack`
        (this seed); the methods then align the deformed copy and the input is the ground
        truth. Without it the stack is used as it is (no endpoint error).
    name : str
        A name for the report (e.g. the input path).
    **magnitudes
        Deformation magnitudes for :func:`hybridreg.synthetic.deform_stack`
        (``max_shift_px``, ``elastic_px``, ...); only with ``deform_seed``.

    Returns
    -------
    CompareCase
    """
    from .checks import as_spacing_xy

    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (Z, H, W), got {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"comparing alignments needs at least 2 sections, got {arr.shape[0]}")
    spacing = as_spacing_xy(spacing_xy)
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != arr.shape:
            raise ValueError(f"labels have shape {lab.shape}, the stack {arr.shape}")
        if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
            raise ValueError(f"labels must be an integer stack, got dtype {lab.dtype}")
    if deform_seed is None:
        if magnitudes:
            raise ValueError(f"deformation magnitudes {sorted(magnitudes)} need deform_seed")
        return CompareCase(stack=arr, spacing_xy=spacing, labels=lab, name=name)
    from .synthetic import deform_stack

    t0 = time.perf_counter()
    d = deform_stack(arr, seed=int(deform_seed), labels=lab, spacing_xy=spacing, **magnitudes)
    log.info("deformed %d sections with seed %d in %.1f s", arr.shape[0], deform_seed,
             time.perf_counter() - t0)
    return CompareCase(stack=d.stack, spacing_xy=spacing, reference=arr, true_fields=d.fields,
                       labels=d.labels, labels_ref=lab, deform_seed=int(deform_seed),
                       name=name, deformation=dict(magnitudes))


# --- methods ----------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    """``Type: message`` on one line (elastix errors are whole logs: their description)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln[len("Description:"):].strip() for ln in lines
                 if ln.startswith("Description:")), lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _build_methods(methods, options, threads, stack=None, intensity="auto"):
    """[(name, method or None, options, reason)] in order; never raises for one method."""
    from .methods.registry import accepts, get_method, with_intensity

    built = []
    names = []
    for m in methods:
        if isinstance(m, str):
            name = m.strip()
            if not name:
                raise ValueError("empty method name in methods")
        elif hasattr(m, "register") and isinstance(getattr(m, "name", None), str):
            name = m.name
        else:
            raise TypeError(f"methods must be names or method objects with .name and "
                            f".register, got {type(m).__name__}")
        if name == BASELINE:
            raise ValueError(f"{BASELINE!r} is the baseline (no registration), always run; "
                             f"it is not a method name")
        if name in names:
            raise ValueError(f"method {name!r} is listed twice")
        names.append(name)
        built.append((name, m))
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"options given for {', '.join(map(repr, unknown))}, which is not "
                         f"among the methods compared ({', '.join(names) or 'none'})")
    out = []
    for name, m in built:
        opts = dict(options.get(name, {}))
        if not isinstance(m, str):
            if opts:
                raise ValueError(f"options for {name!r} cannot be applied to a method object; "
                                 f"build it with them")
            out.append((name, m, opts, ""))
            continue
        if threads is not None and "threads" not in opts and accepts(name, "threads"):
            opts["threads"] = int(threads)
        if stack is not None:
            opts, imap = with_intensity(name, opts, stack, intensity)
            if imap is not None:
                log.info("%s: intensities %s", name, imap.note)
        try:
            out.append((name, get_method(name, **opts), opts, ""))
        except Exception as exc:  # missing weights, unknown name, bad option
            reason = _reason(exc)
            log.warning("method %s is unavailable: %s", name, reason)
            out.append((name, None, opts, reason))
    return out


# --- measuring --------------------------------------------------------------------------------

def _evaluate(case: CompareCase, aligned, fields, *, margin_px: int, seconds=None,
              masks=None) -> list:
    from .metrics import evaluate_stack, interior_mask, label_overlap
    from .stack import apply_fields

    rows = evaluate_stack(
        aligned=aligned, reference=case.reference, fields=fields, true_fields=case.true_fields,
        labels=case.labels if case.labels_ref is not None else None,
        labels_ref=case.labels_ref, spacing_xy=case.spacing_xy, margin_px=margin_px,
        seconds=seconds, masks=masks)
    if case.labels is not None:
        warped = apply_fields(case.labels, fields, spacing_xy=case.spacing_xy, order=0)
        mask = interior_mask(case.stack.shape[1:], margin_px=margin_px)
        for k in range(1, len(rows)):
            lo = label_overlap(warped[k], warped[k - 1], mask=mask)
            rows[k]["dice_prev"] = lo["dice_mean"]
            rows[k]["agreement_prev"] = lo["pixel_agreement"]
    return rows


def _summary(name, status, rows, **extra) -> dict:
    from .metrics import summarize

    out = {"method": name, "status": status}
    if rows:
        out.update(summarize(rows))
    out.update(extra)
    return out


def _warm_up(method, case: CompareCase, *, size_px: int = 64) -> float:
    """Register one small central crop of sections 0 and 1 once, untimed by the comparison.

    The first registration of a method loads its libraries (itk's elastix wrapping takes over
    ten seconds) or its network; warming up keeps that out of the alignment's time, so
    methods are timed alike whatever order they run in. Returns the seconds it took (the
    ``setup_seconds`` of the summary). A failure here is ignored: the alignment reports it.
    """
    z, h, w = case.stack.shape
    c = min(size_px, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    crop = case.stack[:2, y0:y0 + c, x0:x0 + c].astype(np.float32)
    t0 = time.perf_counter()
    try:
        method.register(crop[0], crop[1], spacing_xy=case.spacing_xy)
    except Exception as exc:
        log.debug("warm-up of %s failed: %s", getattr(method, "name", method), _reason(exc))
    return time.perf_counter() - t0


def compare_methods(case: CompareCase, methods: Sequence, *,
                    options: Mapping[str, Mapping] | None = None, threads: int | None = None,
                    mode: str = "joint", neighbours: int = 1, prior: float = 0.3,
                    window: int = 1, margin_px: int | None = None,
                    progress: bool = False, client=None, intensity="auto",
                    drift_window: int = 0, tile: Mapping | None = None,
                    masks=None) -> Comparison:
    """Align ``case.stack`` with every method and measure the results.

    Parameters
    ----------
    case : CompareCase
        From :func:`make_case`.
    methods : sequence of str or method objects
        Names for :func:`hybridreg.methods.get_method` (``"elastix"``, ``"learned"``, ...) or
        objects with ``name`` and ``register`` (:class:`hybridreg.methods.Method`). May be
        empty: only the baseline is measured.
    options : mapping of method name to dict, optional
        Keyword options per method name, e.g. ``{"elastix": {"params": ["em_rigid"]},
        "learned": {"model": "net.safetensors"}}``.
    threads : int, optional
        CPU threads, given to every method whose constructor takes ``threads`` (unless its
        options set them).
    mode, neighbours, prior, window
        Stack alignment settings, the same for every method
        (:func:`hybridreg.stack.align_stack`).
    margin_px : int, optional
        Pixels left out at each edge in every metric; default ``min(H, W) // 16``.
    progress : bool
        Progress bars (tqdm, stderr) during the alignments.
    client : dask.distributed.Client, optional
        Joint mode: every method's pair registrations run on this client's workers.
    drift_window : int
        Sequential mode: the drift correction of :func:`hybridreg.stack.align_stack`.
    tile : mapping, optional
        Register over tiles: every method is wrapped in a
        :class:`hybridreg.tiling.TiledMethod` with these options (``tile_px``,
        ``overlap_px``, ``coarse``).
    intensity : str or (float, float)
        How the stack is put on the networks' 0-255 scale for the methods given by name
        that take ``intensity_scale`` (unless their options set it): see
        :func:`hybridreg.methods.intensity_map` (default ``"auto"``).
    masks : array-like, shape (Z, H, W), or "auto", optional
        Defect masks of ``case.stack`` (elastix's convention: nonzero = tissue), or
        ``"auto"`` for :class:`hybridreg.defects.DetectedMasks`: every method aligns with
        them (joint mode), and the metrics leave the defects out and add
        ``defect_fraction`` and ``epe_away_px`` (:func:`hybridreg.metrics.evaluate_stack`).

    Returns
    -------
    Comparison
        Never raises because one method fails: its run has status ``"failed"`` or
        ``"unavailable"`` and the reason.
    """
    from .stack import align_stack

    if not isinstance(case, CompareCase):
        raise TypeError(f"case must be a CompareCase (see make_case), got {type(case).__name__}")
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    options = {str(k): dict(v) for k, v in (options or {}).items()}
    z, h, w = case.stack.shape
    if margin_px is None:
        margin_px = max(1, min(h, w) // 16)
    margin_px = int(margin_px)
    if margin_px < 0 or 2 * margin_px >= min(h, w):
        raise ValueError(f"margin_px={margin_px} leaves no interior in {h}x{w} sections")
    if mode not in ("joint", "sequential"):
        raise ValueError(f"mode must be 'joint' or 'sequential', got {mode!r}")
    masks_arg = masks
    if isinstance(masks, str):
        from .defects import stack_masks

        masks = stack_masks(masks, case.stack)
    elif masks is not None and tuple(np.shape(masks)) != (z, h, w):
        raise ValueError(f"the masks have shape {tuple(np.shape(masks))}, the case's stack "
                         f"{(z, h, w)}: one mask per section, the same size")
    if masks is not None:
        masks = np.stack([np.asarray(masks[k]) for k in range(z)])  # the case is in memory
    built = _build_methods(list(methods), options, threads, case.stack, intensity)
    if tile:
        from .tiling import TiledMethod

        built = [(n, m if m is None else TiledMethod(m, **tile), o, r) for n, m, o, r in built]

    stack32 = case.stack.astype(np.float32, copy=False)
    zero = np.zeros((z, 2, h, w), np.float32)
    base_rows = _evaluate(case, stack32, zero, margin_px=margin_px, masks=masks)
    runs = [MethodRun(name=BASELINE, status="ok", rows=base_rows,
                      summary=_summary(BASELINE, "ok", base_rows, total_seconds=0.0,
                                       flagged=0),
                      aligned=stack32, fields=zero)]
    for name, method, opts, reason in built:
        if method is None:
            runs.append(MethodRun(name=name, status="unavailable", reason=reason, options=opts,
                                  summary=_summary(name, "unavailable", [], reason=reason)))
            continue
        setup = _warm_up(method, case)
        log.info("aligning %d sections with %s (%s)", z, name, mode)
        t0 = time.perf_counter()
        try:
            result = align_stack(case.stack, method, spacing_xy=case.spacing_xy, mode=mode,
                                 neighbours=neighbours, prior=prior, window=window,
                                 drift_window=drift_window, progress=progress,
                                 client=client if mode == "joint" else None, masks=masks)
            total = time.perf_counter() - t0
            rows = _evaluate(case, result.aligned, result.fields, margin_px=margin_px,
                             seconds=[r.get("seconds") or 0.0 for r in result.table],
                             masks=masks)
        except Exception as exc:  # one method must not end the comparison
            reason = _reason(exc)
            log.warning("method %s failed: %s", name, reason, exc_info=log.isEnabledFor(10))
            runs.append(MethodRun(name=name, status="failed", reason=reason, options=opts,
                                  summary=_summary(name, "failed", [], reason=reason,
                                                   total_seconds=time.perf_counter() - t0)))
            continue
        flagged = [r["section"] for r in result.table if r.get("flagged")]
        note = ""
        if flagged:
            note = f"flagged sections {flagged} (see the alignment table)"
            log.warning("%s: %s", name, note)
        runs.append(MethodRun(
            name=name, status="ok", reason=note, options=opts, rows=rows,
            summary=_summary(name, "ok", rows, total_seconds=total, setup_seconds=setup,
                             flagged=len(flagged)),
            aligned=result.aligned, fields=result.fields, alignment=result))
        log.info("%s: %.1f s", name, total)
    settings = {"mode": mode, "threads": threads,
                **({"neighbours": neighbours, "prior": prior} if mode == "joint"
                   else {"window": window, "drift_window": drift_window}),
                **({"tile": dict(tile)} if tile else {}),
                **({"masks": "given" if not isinstance(masks_arg, str) else masks_arg}
                   if masks is not None else {}),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d %H:%M")}
    return Comparison(case=case, runs=runs, margin_px=margin_px, settings=settings,
                      masks=masks)
