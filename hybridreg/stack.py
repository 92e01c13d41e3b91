"""Serial alignment of a whole stack with any registration method.

Two modes:

``mode="joint"`` (default)
    Every section is registered to its ``neighbours`` next sections, raw to raw; the pairs are
    independent of each other. All section fields are then found at once by
    :func:`hybridreg.joint.solve_joint`, which spreads the pairs' errors instead of chaining
    them, with a prior (weight ``prior``) that each section's own distortion is small. The
    aligned stack is on average where the raw sections were.
``mode="sequential"``
    Section 0 stays; section k (raw) is registered to the already-aligned section k-1 (and,
    with ``window > 1``, the ``window - 1`` aligned sections before it, as references). The
    field found maps the common grid straight to raw section k. This is the classic way and
    the one FAEMReg uses; it accumulates every pair's error along the stack (drift).

Parallel: in joint mode the pairs are independent tasks; with a ``dask.distributed`` client
(``client=``) they run on its workers, each worker process loading itk's elastix wrapping
(or the network) once, and their results are collected, checkpointed and solved here. A task
whose worker dies is rescheduled by Dask. Registrations are deterministic for a given method
configuration (fix the method's thread count), so 1 or N workers give the same output.

Resume: with a ``work_dir``, each pair's (or section's) field and table row are written there
atomically as soon as they are done; a later call with the same ``work_dir`` loads them
instead of registering again. Aligned sections are always computed from the stored float32
fields with :func:`hybridreg.warp.warp`, so an interrupted and resumed run gives output
identical to an uninterrupted one.

A registration that raises is not fatal: the pair is left out of the joint solve (sequential:
the section keeps the transform of the one before it) and flagged in the table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fields import validate_field
from .joint import pair_list, solve_joint
from .methods.base import Method
from .warp import warp

log = logging.getLogger(__name__)

__all__ = ["StackAlignment", "align_stack", "apply_fields", "save_alignment"]

#: pairs whose final weight in the joint solve falls below this are flagged
LOW_PAIR_WEIGHT = 0.2


@dataclass(frozen=True)
class StackAlignment:
    """Result of :func:`align_stack`.

    Attributes
    ----------
    aligned : ndarray, shape (Z, H, W), float32
    fields : ndarray, shape (Z, 2, H, W), float32
        Pull fields (physical units): ``aligned[k] = warp(stack[k], fields[k])``.
    table : list of dict
        One row per section: ``section``, ``seconds`` (registration time of the pairs whose
        moving section it is), ``metric``, ``flagged``, ``warnings``, and in joint mode
        ``pairs`` (how many pairs touch it) and ``min_pair_weight``.
    pairs : list of dict
        Joint mode: one row per pair (``fixed``, ``moving``, ``metric``, ``seconds``,
        ``residual_px``, ``weight``, ``warnings``); empty in sequential mode.
    spacing_xy, origin_xy : (float, float)
    order : int
        Interpolation order the aligned sections were resampled with.
    """

    aligned: np.ndarray
    fields: np.ndarray
    table: list
    pairs: list
    spacing_xy: tuple[float, float]
    origin_xy: tuple[float, float]
    order: int = 1


def apply_fields(stack: np.ndarray, fields: np.ndarray, *, spacing_xy=(1.0, 1.0),
                 order: int = 1) -> np.ndarray:
    """Warp every section with its field: ``out[k] = warp(stack[k], fields[k])``.

    ``order=0`` (nearest neighbour) keeps the dtype, for labels.
    """
    stack = np.asarray(stack)
    fields = np.asarray(fields)
    if stack.ndim != 3 or fields.shape != (stack.shape[0], 2) + stack.shape[1:]:
        expected = (stack.shape[0], 2) + stack.shape[1:] if stack.ndim == 3 else "(Z, 2, H, W)"
        raise ValueError(f"fields {fields.shape} do not match the stack {stack.shape}: "
                         f"expected {expected}")
    return np.stack([warp(stack[k], fields[k], spacing_xy=spacing_xy, order=order)[0]
                     for k in range(stack.shape[0])])


# --- resume ----------------------------------------------------------------------------------

def _fingerprint(stack: np.ndarray, method: Method, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(str(stack.shape).encode() + str(stack.dtype).encode())
    h.update(np.ascontiguousarray(stack).tobytes())
    h.update(json.dumps(getattr(method, "config", method.name), sort_keys=True,
                        default=str).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


class _WorkDir:
    """Checkpoints: ``<name>.mha`` (a field) and ``<name>.json`` (its row), one per item."""

    def __init__(self, path, fingerprint: str, spacing_xy, origin_xy):
        from . import io

        self.io = io
        self.path = Path(path)
        self.spacing_xy, self.origin_xy = spacing_xy, origin_xy
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        if manifest.exists():
            if json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
                raise ValueError(
                    f"work folder {self.path} holds a run of another stack, method or setting; "
                    f"use a fresh folder (or delete it) to start over")
        else:
            with io.atomic_output(manifest) as tmp:
                Path(tmp).write_text(json.dumps({"fingerprint": fingerprint}))

    def load(self, name: str):
        row_path = self.path / f"{name}.json"
        field_path = self.path / f"{name}.mha"
        if not (row_path.exists() and field_path.exists()):
            return None
        u, _, _ = self.io.read_field(field_path)
        return u, json.loads(row_path.read_text())

    def save(self, name: str, u: np.ndarray, row: dict) -> None:
        # the field first, the row last: a row on disk means the item is complete
        self.io.write_field(self.path / f"{name}.mha", u, spacing_xy=self.spacing_xy,
                            origin_xy=self.origin_xy, overwrite=True)
        with self.io.atomic_output(self.path / f"{name}.json", overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(row))


def _one_line(exc: Exception) -> str:
    """The most telling line of an error (elastix errors are whole logs)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return ln[len("Description:"):].strip()
    return lines[0] if lines else type(exc).__name__


def _register(method: Method, fixed, moving, refs, *, shape_yx, spacing_xy, origin_xy, what):
    """Run one registration; never raises: a failure comes back as (None, row)."""
    t0 = time.perf_counter()
    warnings: list[str] = []
    metric = None
    u = None
    try:
        res = method.register(fixed, moving, references=refs, spacing_xy=spacing_xy,
                              origin_xy=origin_xy)
        u = validate_field(res.field, name=f"field of {what}", shape_yx=shape_yx)
        metric = res.metric
        warnings += list(res.warnings)
    except Exception as exc:  # one bad section must not end a long run
        log.warning("%s: %s failed (%s: %s)", what, method.name, type(exc).__name__, exc)
        warnings.append(f"registration failed: {type(exc).__name__}: {_one_line(exc)}")
    seconds = round(time.perf_counter() - t0, 4)
    row = {"metric": None if metric is None else float(metric), "seconds": seconds,
           "ncc": None if u is None else _pair_ncc(fixed, moving, u, spacing_xy),
           "failed": u is None, "warnings": "; ".join(warnings)}
    return u, row


def _pair_ncc(fixed, moving, u, spacing_xy) -> float | None:
    """NCC of the fixed section and the registered moving one, on content both share."""
    from .methods.base import content_mask
    from .metrics import ncc

    warped, valid = warp(moving, u, spacing_xy=spacing_xy)
    mask = valid
    for section in (fixed, warped):
        m = content_mask(section)
        if m is not None:
            mask = mask & m
    if mask.sum() < 16:
        return None
    value = ncc(fixed, warped, mask=mask)
    return None if not np.isfinite(value) else round(float(value), 5)


def _similarity_weights(rows: dict) -> dict:
    """Confidence per pair from its NCC after registration, relative to comparable pairs.

    ``(ncc / reference)^2`` clipped to [0, 1]. The reference is the 75th percentile of the NCC
    of the pairs *at the same distance* (sections further apart are less alike, so a pair two
    sections apart is compared with other such pairs), and the 75th percentile rather than the
    median because one bad section touches up to 2 x neighbours pairs, which in a short stack
    is most of them. A pair that matched as well as is typical keeps weight 1; one that
    matched nothing (a blank or noise section) drops towards 0.
    """
    by_distance: dict = {}
    for (i, j), r in rows.items():
        if r.get("ncc") is not None:
            by_distance.setdefault(abs(j - i), []).append(r["ncc"])
    reference = {dist: float(np.percentile(v, 75)) for dist, v in by_distance.items()
                 if len(v) >= 2 and np.percentile(v, 75) > 0}
    if not reference:
        return {}
    weights = {}
    for (i, j), r in rows.items():
        dist = abs(j - i)
        # too few pairs at this distance (a short stack, a bad section): the nearest distance's
        ref = reference.get(dist) or reference[min(reference, key=lambda e: (abs(e - dist), e))]
        # no NCC at all: a section without any content to match (blank, saturated)
        weights[(i, j)] = (float(np.clip(r["ncc"] / ref, 0.0, 1.0)) ** 2
                           if r.get("ncc") is not None else 0.0)
    return weights


# --- alignment -------------------------------------------------------------------------------

def align_stack(stack: np.ndarray, method: Method, *, spacing_xy=(1.0, 1.0),
                origin_xy=(0.0, 0.0), mode: str = "joint", neighbours: int = 1,
                prior: float = 0.3, window: int = 1, work_dir=None, order: int = 1,
                progress: bool = False, client=None) -> StackAlignment:
    """Align a stack section by section with ``method``.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W)
    method : Method
        Any object with ``register(fixed, moving, references=..., spacing_xy=...,
        origin_xy=...)`` (see :mod:`hybridreg.methods`).
    spacing_xy, origin_xy : (float, float)
        The sections' grid; fields are in its physical units.
    mode : {"joint", "sequential"}
        See the module docstring.
    neighbours : int
        Joint mode: register each section to this many following sections.
    prior : float
        Joint mode: weight of the small-distortion prior (see :mod:`hybridreg.joint`).
    window : int
        Sequential mode: how many aligned sections the method sees (``window - 1`` older ones
        are passed as ``references``, oldest first).
    work_dir : path, optional
        Checkpoint folder for resuming.
    order : int
        Interpolation order of the aligned sections (1 = linear).
    progress : bool
        Show a progress bar (tqdm) on stderr.
    client : dask.distributed.Client, optional
        Joint mode: run the pair registrations on this client's workers.

    Returns
    -------
    StackAlignment
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must have shape (Z, H, W), got {stack.shape}")
    if stack.shape[0] < 1 or min(stack.shape[1:]) < 2:
        raise ValueError(f"stack {stack.shape} has no section to align")
    if np.issubdtype(stack.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(stack).all(axis=(1, 2)))
        if bad.size:
            raise ValueError(f"section {int(bad[0])} of the stack contains NaN or infinite "
                             f"values ({bad.size} section(s) in all); fill or mask them first")
    if mode not in ("joint", "sequential"):
        raise ValueError(f"mode must be 'joint' or 'sequential', got {mode!r}")
    if client is not None and mode != "joint":
        raise ValueError("parallel workers need mode='joint': sequential alignment registers "
                         "each section to the result of the one before it")
    if window < 1 or neighbours < 1:
        raise ValueError(f"window and neighbours must be >= 1, got {window} and {neighbours}")
    spacing_xy = tuple(float(s) for s in spacing_xy)
    origin_xy = tuple(float(o) for o in origin_xy)
    settings = {"mode": mode, "spacing_xy": spacing_xy, "origin_xy": origin_xy}
    settings.update({"neighbours": neighbours} if mode == "joint" else {"window": window})
    work = None
    if work_dir is not None:
        work = _WorkDir(work_dir, _fingerprint(stack, method, settings), spacing_xy, origin_xy)
    raw = stack.astype(np.float32, copy=False)
    run = _align_joint if mode == "joint" else _align_sequential
    kw = ({"neighbours": neighbours, "prior": prior, "client": client} if mode == "joint"
          else {"window": window})
    return run(raw, method, spacing_xy=spacing_xy, origin_xy=origin_xy, work=work, order=order,
               progress=progress, **kw)


def _bar(iterable, *, desc, progress, total=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="pair", total=total, disable=not progress)


def _align_sequential(raw, method, *, spacing_xy, origin_xy, work, order, progress, window):
    z, h, w = raw.shape
    fields = np.zeros((z, 2, h, w), np.float32)
    aligned = np.empty((z, h, w), np.float32)
    aligned[0] = raw[0]
    table = [{"section": 0, "metric": None, "seconds": 0.0, "flagged": False, "warnings": ""}]
    for k in _bar(range(1, z), desc=f"align ({method.name}, sequential)", progress=progress):
        name = f"section_{k:04d}"
        loaded = work.load(name) if work is not None else None
        if loaded is not None:
            fields[k], row = loaded
        else:
            refs = [aligned[j] for j in range(max(0, k - window), k - 1)]
            u, row = _register(method, aligned[k - 1], raw[k], refs, shape_yx=(h, w),
                               spacing_xy=spacing_xy, origin_xy=origin_xy,
                               what=f"section {k}")
            # a failed section keeps the transform of the one before it
            fields[k] = fields[k - 1] if u is None else u
            row = {"section": k, "metric": row["metric"], "seconds": row["seconds"],
                   "flagged": bool(row["warnings"]), "warnings": row["warnings"]}
            if work is not None:
                work.save(name, fields[k], row)
        table.append(row)
        aligned[k] = warp(raw[k], fields[k], spacing_xy=spacing_xy, order=order)[0]
    return StackAlignment(aligned=aligned, fields=fields, table=table, pairs=[],
                          spacing_xy=spacing_xy, origin_xy=origin_xy, order=order)


def _align_joint(raw, method, *, spacing_xy, origin_xy, work, order, progress, neighbours,
                 prior, client=None):
    z, h, w = raw.shape
    pair_fields: dict = {}
    pair_rows: dict = {}
    todo = []
    for (i, j) in pair_list(z, neighbours=neighbours):
        loaded = work.load(f"pair_{i:04d}_{j:04d}") if work is not None else None
        if loaded is None:
            todo.append((i, j))
        else:
            pair_fields[(i, j)], pair_rows[(i, j)] = loaded
    if len(todo) < len(pair_list(z, neighbours=neighbours)):
        log.info("resumed %d finished pairs", len(pair_list(z, neighbours=neighbours)) - len(todo))
    kwargs = {"shape_yx": (h, w), "spacing_xy": spacing_xy, "origin_xy": origin_xy}

    def finished(pair, u, row):
        if work is not None and u is not None:
            work.save(f"pair_{pair[0]:04d}_{pair[1]:04d}", u, row)
        if u is not None:
            pair_fields[pair] = u
        pair_rows[pair] = row

    desc = f"align ({method.name}, {neighbours} neighbour(s))"
    if client is None:
        for (i, j) in _bar(todo, desc=desc, progress=progress):
            finished((i, j), *_register(method, raw[i], raw[j], [], what=f"pair {i}-{j}",
                                        **kwargs))
    else:
        from dask.distributed import as_completed

        futures = {client.submit(_register, method, raw[i], raw[j], [], what=f"pair {i}-{j}",
                                 pure=False, **kwargs): (i, j) for (i, j) in todo}
        for fut in _bar(as_completed(futures), desc=desc, progress=progress,
                        total=len(futures)):
            finished(futures[fut], *fut.result())
    pair_rows = dict(sorted(pair_rows.items()))
    if z == 1:
        fields = np.zeros((1, 2, h, w), np.float32)
        solution = None
    elif not pair_fields:
        raise RuntimeError(f"every registration of the {z}-section stack failed; "
                           f"first error: {next(iter(pair_rows.values()))['warnings']}")
    else:
        from .metrics import interior_mask

        margin = max(1, min(h, w) // 16)
        similarity = _similarity_weights({p: r for p, r in pair_rows.items()
                                          if p in pair_fields})
        solution = solve_joint(pair_fields, z, prior=prior, spacing_xy=spacing_xy,
                               mask=interior_mask((h, w), margin_px=margin),
                               pair_weights=similarity)
        fields = solution.fields
    pairs = []
    for (i, j), row in pair_rows.items():
        ok = solution is not None and (i, j) in solution.pair_weight
        pairs.append({"fixed": i, "moving": j, "metric": row["metric"],
                      "ncc": row.get("ncc"), "seconds": row["seconds"],
                      "residual_px": solution.pair_residual_px[(i, j)] if ok else None,
                      "weight": solution.pair_weight[(i, j)] if ok else 0.0,
                      "warnings": row["warnings"]})
    table = []
    for k in range(z):
        touching = [p for p in pairs if k in (p["fixed"], p["moving"])]
        weights = [p["weight"] for p in touching]
        own = [p for p in touching if p["moving"] == k]
        warnings = [f"pair {p['fixed']}-{p['moving']}: {p['warnings']}"
                    for p in touching if p["warnings"]]
        # clean pairs end at weights of 0.45-1 (a pair two sections apart, a little less alike
        # and with a larger residual, at about 0.46 on a small phantom stack); pairs that
        # registered noise, a blank section or failed end below 0.1: flag below 0.2
        low = [f"pair {p['fixed']}-{p['moving']} down-weighted to {p['weight']:.2f}"
               for p in touching
               if p["weight"] < LOW_PAIR_WEIGHT and p["residual_px"] is not None]
        if z > 1 and not any(weights):
            warnings.append("no usable pair: the section stays where the prior puts it "
                            "(near its raw position)")
        table.append({
            "section": k,
            "metric": own[0]["metric"] if own else None,
            "seconds": round(sum(p["seconds"] for p in own), 4),
            "pairs": len(touching),
            "min_pair_weight": min(weights) if weights else None,
            "flagged": bool(warnings or low),
            "warnings": "; ".join(warnings + low),
        })
    aligned = np.stack([warp(raw[k], fields[k], spacing_xy=spacing_xy, order=order)[0]
                        for k in range(z)]).astype(np.float32)
    return StackAlignment(aligned=aligned, fields=fields, table=table, pairs=pairs,
                          spacing_xy=spacing_xy, origin_xy=origin_xy, order=order)


def save_alignment(result: StackAlignment, *, out=None, fields_out=None, transforms: bool = True,
                   overwrite: bool = False, inputs=(), dtype=None) -> None:
    """Write an alignment: the aligned stack, and the per-section transforms and tables.

    ``fields_out`` receives, for every section k:

    - ``section_kkkk.mha``: the field (the contract's on-disk form);
    - ``section_kkkk.h5``: the same as an ITK ``DisplacementFieldTransform`` (``transforms``);
    - ``transformix/section_kkkk/TransformParameters.0.txt``: a transformix chain that
      reproduces the aligned section (``transformix -in raw_section.mha -tp ...``);

    plus ``sections.csv`` (per section) and, in joint mode, ``pairs.csv``.

    Parameters
    ----------
    out : path, optional
        The aligned stack (any format :func:`hybridreg.io.write_stack` writes).
    dtype : numpy dtype, optional
        Cast the aligned stack to this (e.g. the input's uint8, rounded and clipped).
    inputs : sequence of paths
        Paths never to overwrite.
    """
    from . import io
    from .metrics import write_table_csv

    if out is not None:
        data = result.aligned if dtype is None else io.cast_to_dtype(result.aligned, dtype)
        io.write_stack(out, data, overwrite=overwrite, inputs=inputs)
    if fields_out is None:
        return
    fields_out = Path(fields_out)
    io.write_fields(fields_out, result.fields, spacing_xy=result.spacing_xy,
                    origin_xy=result.origin_xy, overwrite=overwrite)
    write_table_csv(result.table, fields_out / "sections.csv", overwrite=True)
    if result.pairs:
        write_table_csv(result.pairs, fields_out / "pairs.csv", overwrite=True)
    if not transforms:
        return
    from .elastix import export_field_chain, write_itk_transform
    from .fields import to_itk_transform

    for k, u in enumerate(result.fields):
        field_file = io.field_path(fields_out, k)
        write_itk_transform(field_file.with_suffix(".h5"),
                            to_itk_transform(u, spacing_xy=result.spacing_xy,
                                             origin_xy=result.origin_xy))
        export_field_chain(u, fields_out / "transformix" / field_file.stem,
                           spacing_xy=result.spacing_xy, origin_xy=result.origin_xy,
                           interpolation_order=result.order, field_file=field_file)
