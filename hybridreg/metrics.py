"""Registration metrics: image similarity, endpoint error, Jacobian statistics, label overlap.

Fields follow :mod:`hybridreg.fields` (pull, ``(2, H, W)``, physical units with
``spacing_xy``). Endpoint errors are reported in pixels (``*_px``): each component is divided
by its spacing before the norm is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .fields import folding_fraction, jacobian_determinant, to_pixels, validate_field
from .outputs import write_json, write_table_csv  # re-exported; their home is outputs
from .warp import valid_mask, warp

__all__ = [
    "interior_mask",
    "ncc",
    "mse",
    "ssim",
    "EndpointError",
    "endpoint_error",
    "jacobian_stats",
    "label_overlap",
    "evaluate_stack",
    "summarize",
    "write_table_csv",
    "write_json",
]


def _mask_or_all(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask has shape {mask.shape}, expected {tuple(shape)}")
    return mask


def _pair_of_images(a, b, name_a="a", name_b="b"):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")
    if a.ndim != 2:
        raise ValueError(f"expected 2D sections (H, W), got shape {a.shape}")
    return a, b


def interior_mask(shape_yx: Sequence[int], *, margin_px: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask that is True at least ``margin_px`` pixels from every edge."""
    h, w = (int(s) for s in shape_yx)
    m = int(margin_px)
    if m < 0 or 2 * m >= min(h, w):
        raise ValueError(f"margin_px={margin_px} leaves no interior in a {h}x{w} section")
    mask = np.zeros((h, w), dtype=bool)
    mask[m:h - m, m:w - m] = True
    return mask


def ncc(a: np.ndarray, b: np.ndarray, *, mask=None) -> float:
    """Normalised cross-correlation of two sections over ``mask`` (global, in [-1, 1]).

    Returns NaN when either image is constant on the mask.
    """
    a, b = _pair_of_images(a, b)
    m = _mask_or_all(mask, a.shape)
    x = a[m] - a[m].mean()
    y = b[m] - b[m].mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def mse(a: np.ndarray, b: np.ndarray, *, mask=None) -> float:
    """Mean squared intensity difference over ``mask``."""
    a, b = _pair_of_images(a, b)
    m = _mask_or_all(mask, a.shape)
    return float(np.mean((a[m] - b[m]) ** 2)) if m.any() else float("nan")


def ssim(a: np.ndarray, b: np.ndarray, *, mask=None, sigma: float = 1.5,
         data_range: float | None = None) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window ``sigma``), averaged on ``mask``.

    ``data_range`` defaults to the joint intensity range of ``a`` and ``b``.
    """
    a, b = _pair_of_images(a, b)
    m = _mask_or_all(mask, a.shape)
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min())) or 1.0
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def g(x):
        return ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=3.5)

    mu_a, mu_b = g(a), g(b)
    var_a = g(a * a) - mu_a ** 2
    var_b = g(b * b) - mu_b ** 2
    cov = g(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s[m].mean()) if m.any() else float("nan")


@dataclass(frozen=True)
class EndpointError:
    """Endpoint error statistics in pixels over a mask."""

    mean_px: float
    p95_px: float
    max_px: float


def endpoint_error(u: np.ndarray, u_true: np.ndarray, *, spacing_xy=(1.0, 1.0),
                   mask=None) -> EndpointError:
    """Endpoint error between an estimated and a ground-truth field, in pixels.

    Parameters
    ----------
    u, u_true : ndarray, shape (2, H, W)
        Pull fields in physical units on the same (fixed) grid.
    mask : ndarray of bool, shape (H, W), optional
        Where to measure (e.g. :func:`interior_mask`).
    """
    u = validate_field(u, name="u")
    u_true = validate_field(u_true, name="u_true", shape_yx=u.shape[1:])
    d = to_pixels(u - u_true, spacing_xy)
    e = np.sqrt(d[0].astype(np.float64) ** 2 + d[1].astype(np.float64) ** 2)
    e = e[_mask_or_all(mask, e.shape)]
    if e.size == 0:
        return EndpointError(float("nan"), float("nan"), float("nan"))
    return EndpointError(float(e.mean()), float(np.percentile(e, 95)), float(e.max()))


def jacobian_stats(u: np.ndarray, *, spacing_xy=(1.0, 1.0), mask=None) -> dict:
    """Jacobian-determinant statistics of ``p -> p + u(p)`` over ``mask``.

    Returns
    -------
    dict with keys ``jac_min``, ``jac_max``, ``jac_mean``, ``jac_std``, ``folding_fraction``.
    """
    det = jacobian_determinant(u, spacing_xy=spacing_xy)
    m = _mask_or_all(mask, det.shape)
    v = det[m]
    return {
        "jac_min": float(v.min()),
        "jac_max": float(v.max()),
        "jac_mean": float(v.mean()),
        "jac_std": float(v.std()),
        "folding_fraction": folding_fraction(u, spacing_xy=spacing_xy, mask=m),
    }


def label_overlap(labels: np.ndarray, labels_ref: np.ndarray, *, mask=None,
                  top_k: int | None = None) -> dict:
    """Overlap of instance labels after warping, against reference labels.

    Parameters
    ----------
    labels, labels_ref : ndarray of int, shape (H, W)
        0 is background/membrane and is ignored by the Dice.
    top_k : int, optional
        Average the Dice over the ``top_k`` most frequent reference labels only (FAEMReg uses
        the 50 most frequent); default all.

    Returns
    -------
    dict with ``dice_mean`` (mean Dice over reference labels) and ``pixel_agreement``
    (fraction of masked pixels whose labels are equal, background included).
    """
    a = np.asarray(labels)
    b = np.asarray(labels_ref)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"labels {a.shape} and labels_ref {b.shape} must be equal 2D shapes")
    m = _mask_or_all(mask, a.shape)
    a = a[m].astype(np.int64)
    b = b[m].astype(np.int64)
    agreement = float(np.mean(a == b)) if a.size else float("nan")
    ids, counts = np.unique(b[b != 0], return_counts=True)
    if top_k is not None:
        ids = ids[np.argsort(-counts, kind="stable")[:top_k]]
    if ids.size == 0:
        return {"dice_mean": float("nan"), "pixel_agreement": agreement}
    # sizes and intersections for all ids at once
    both = (a == b) & np.isin(b, ids)
    inter = np.bincount(np.searchsorted(ids, b[both]), minlength=ids.size)
    size_ref = np.bincount(np.searchsorted(ids, b[np.isin(b, ids)]), minlength=ids.size)
    in_a = np.isin(a, ids)
    size_a = np.bincount(np.searchsorted(ids, a[in_a]), minlength=ids.size)
    dice = 2.0 * inter / np.maximum(size_ref + size_a, 1)
    return {"dice_mean": float(dice.mean()), "pixel_agreement": agreement}


def evaluate_stack(*, aligned: np.ndarray | None = None, reference: np.ndarray | None = None,
                   fields: np.ndarray | None = None, true_fields: np.ndarray | None = None,
                   labels: np.ndarray | None = None, labels_ref: np.ndarray | None = None,
                   spacing_xy=(1.0, 1.0), margin_px: int = 16,
                   seconds: Sequence[float] | None = None, masks=None,
                   away_px: int = 32) -> list[dict]:
    """Per-section metrics of an aligned stack.

    Every input is optional; the table holds what can be computed from what is given.

    Parameters
    ----------
    aligned : ndarray, shape (Z, H, W)
        The aligned stack. Gives ``ncc_prev`` and ``ssim_prev`` (similarity to the previous
        aligned section) and, with ``reference``, ``ncc_ref``/``mse_ref``.
    reference : ndarray, shape (Z, H, W)
        The undeformed stack (ground truth), where known.
    fields : ndarray, shape (Z, 2, H, W)
        The estimated recovery fields (physical units). Gives Jacobian statistics and, with
        ``true_fields``, endpoint errors; with ``labels``, the labels are warped by them.
    true_fields : ndarray, shape (Z, 2, H, W)
        Ground-truth recovery fields. The measurement mask is the interior (``margin_px``)
        where the true field samples inside the deformed section.
    labels, labels_ref : ndarray of int, shape (Z, H, W)
        Labels of the deformed (unaligned) stack and of the reference; ``labels`` are warped
        with ``fields`` (nearest neighbour) and compared with ``labels_ref``.
    seconds : sequence of float, optional
        Time per section, copied into the table.
    masks : array-like, shape (Z, H, W), optional
        Defect masks of the unaligned stack (elastix's convention: nonzero = tissue). They
        are taken to the aligned grid with the true fields (else ``fields``); every metric
        then leaves out the defects' pixels, and the table adds ``defect_fraction`` (the
        section's area under its defects) and, on sections with a defect and with
        ``true_fields``, ``epe_away_px``: the endpoint error farther than ``away_px`` from
        any defect.

    Returns
    -------
    list of dict, one per section, with key ``section`` and the metrics.
    """
    arrays = [x for x in (aligned, reference, labels, labels_ref) if x is not None]
    arrays += [f[:, 0] for f in (fields, true_fields) if f is not None]
    if not arrays:
        raise ValueError("evaluate_stack needs at least one of aligned, reference, fields, "
                         "true_fields, labels")
    shape = np.shape(arrays[0])
    for x in arrays[1:]:
        if np.shape(x) != shape:
            raise ValueError(f"all stacks must have shape (Z, H, W) = {shape}; got {np.shape(x)}")
    z, h, w = shape
    base = interior_mask((h, w), margin_px=margin_px)
    rows = []
    spoiled = [None] * z
    for k in range(z if masks is not None else 0):
        m = np.asarray(masks[k]) != 0
        if m.all():
            continue
        to = true_fields if true_fields is not None else fields
        if to is not None:
            m = warp(m.astype(np.float32), to[k], spacing_xy=spacing_xy, order=0,
                     cval=1.0)[0] > 0.5
        spoiled[k] = ~m
    for k in range(z):
        row: dict = {"section": k}
        mask = base
        if true_fields is not None:
            mask = base & valid_mask(true_fields[k], spacing_xy=spacing_xy)
        if masks is not None:
            row["defect_fraction"] = 0.0 if spoiled[k] is None else float(spoiled[k].mean())
        if spoiled[k] is not None:
            mask = mask & ~spoiled[k]
        base_k = base  # for the similarity to section k - 1: neither section's defects
        for s in (spoiled[k], spoiled[k - 1] if k > 0 else None):
            if s is not None:
                base_k = base_k & ~s
        if fields is not None:
            if true_fields is not None:
                e = endpoint_error(fields[k], true_fields[k], spacing_xy=spacing_xy, mask=mask)
                row.update(epe_mean_px=e.mean_px, epe_p95_px=e.p95_px)
                if spoiled[k] is not None:
                    far = mask & (ndimage.distance_transform_edt(~spoiled[k]) > away_px)
                    if far.any():
                        row["epe_away_px"] = endpoint_error(
                            fields[k], true_fields[k], spacing_xy=spacing_xy,
                            mask=far).mean_px
            js = jacobian_stats(fields[k], spacing_xy=spacing_xy, mask=base)
            row.update(jac_min=js["jac_min"], folding_fraction=js["folding_fraction"])
        if aligned is not None:
            if reference is not None:
                row["ncc_ref"] = ncc(aligned[k], reference[k], mask=mask)
                row["mse_ref"] = mse(aligned[k], reference[k], mask=mask)
            if k > 0:
                row["ncc_prev"] = ncc(aligned[k], aligned[k - 1], mask=base_k)
                row["ssim_prev"] = ssim(aligned[k], aligned[k - 1], mask=base_k)
        if labels is not None and labels_ref is not None:
            lab = labels[k]
            if fields is not None:
                lab = warp(lab, fields[k], spacing_xy=spacing_xy, order=0)[0]
            row.update(label_overlap(lab, labels_ref[k], mask=mask))
        if seconds is not None:
            row["seconds"] = float(seconds[k])
        rows.append(row)
    return rows


def summarize(rows: Iterable[dict], *, skip_first: bool = True) -> dict:
    """Mean of every numeric column over sections (section 0, the fixed one, skipped).

    Returns
    -------
    dict mapping column name to the mean (NaN ignored), plus ``sections``.
    """
    rows = [r for r in rows if not (skip_first and r.get("section") == 0)]
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
    out: dict = {"sections": len(rows)}
    for key in keys:
        vals = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
        out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out
