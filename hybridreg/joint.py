"""Joint solve of a stack's section transforms from pairwise fields.

Registering every section to its neighbours and chaining the fields along the stack adds up
every pair's error: adjacent EM sections differ, so each pair is a few pixels wrong (on ISBI
2012, a rigid registration of two adjacent, already aligned sections finds 3 px of "motion" on
average and up to 25 px), and a chain of 30 such pairs drifts further than the sections were
ever deformed. Instead, this module finds all section fields at once.

Model
    Unknown: the recovery field ``u_k`` of each section k on the common grid (the pull field
    with ``aligned_k(p) = raw_k(p + u_k(p))``). Each registered pair (i, j), ``v_ij`` with
    ``raw_i(p) ~ raw_j(p + v_ij(p))``, says ``u_j(p) = u_i(p) + v_ij(p + u_i(p))``. Each
    section's own distortion is independent of its neighbours' and small on average, which
    is the prior ``|u_k|^2`` with weight ``prior``. Per pixel, minimise::

        sum_pairs w_ij |u_j - u_i - v_ij(p + u_i)|^2  +  prior * sum_k |u_k|^2

    ``prior`` is the ratio (pair error variance) / (section distortion variance): small
    trusts the pairs, large keeps sections near where they were. With one neighbour and
    ``prior -> 0`` it is the chained composition (anchored at the mean); the prior turns the
    chain's drift into a first-order smoothing along z, subtracted (a principled form of the
    z high-pass of DESIGN.md). More neighbours on both sides average independent pair errors.

Solution
    The normal matrix is Z x Z, the same for every pixel, and banded (pairs couple sections
    a few apart), so each Gauss-Newton step is one banded Cholesky factorisation applied to
    all pixels by a forward and a backward sweep along z, holding a few sections at a time:
    time linear in the number of sections, memory independent of it. ``v_ij`` is re-sampled
    at ``p + u_i(p)`` between steps. Pairs are weighted robustly (Cauchy weights on each
    pair's mean residual), so one failed or ambiguous pair does not pull its sections away.

Per-node confidence
    A pair's map can be wrong in one place only: a defect of either section, content that
    matched poorly there. ``node_weights`` gives each pair a confidence ``c_ij(p)`` in
    [0, 1] per node, multiplied into its weight at that node, and each section's prior at a
    node is scaled by the mean confidence of its pairs there: confidence shifts trust
    between the pairs at a node (a section whose pair with one neighbour crosses a defect
    follows its other neighbours there) without moving the balance between the pairs and
    the prior (a section whose pairs are all unsure at a node keeps its usual one, and is not
    pulled to zero). The normal matrix then differs from node to node: each sweep factors it
    per node on its way forward, column by column along z (the band's columns held), and
    keeps the columns beside the eliminated rows for the backward sweep.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .fields import normalized_coords, validate_field

log = logging.getLogger(__name__)

__all__ = ["JointSolution", "solve_joint", "pair_list", "check_prior", "check_anchor"]


def pair_list(z: int, *, neighbours: int) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j <= i + neighbours``, of a stack of ``z`` sections."""
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    return [(i, j) for i in range(z) for j in range(i + 1, min(z, i + neighbours + 1))]


def check_prior(prior: float, anchor: int | None) -> None:
    """Raise ValueError unless ``prior > 0``, or ``>= 0`` with an ``anchor``.

    :func:`solve_joint`'s check, which :func:`hybridreg.stack.align_stack` runs before it
    registers any pair."""
    if prior < 0 or (prior == 0 and anchor is None):
        raise ValueError(f"prior must be > 0 (or 0 with an anchor section), got {prior}")


def check_anchor(z: int, anchor: int | None) -> None:
    """Raise ValueError unless ``anchor`` is None or a section ``0 <= anchor < z``.

    :func:`solve_joint`'s check, which :func:`hybridreg.stack.align_stack` runs before it
    registers any pair."""
    if anchor is not None and not 0 <= anchor < z:
        raise ValueError(f"anchor {anchor} is not a section of the {z}-section stack")


@dataclass(frozen=True)
class JointSolution:
    """Result of :func:`solve_joint`.

    Attributes
    ----------
    fields : ndarray or array on disk, shape (Z, 2, H, W), float32
        Recovery fields in physical units (``out`` when one was given).
    pair_residual_px : dict
        ``(i, j) -> mean residual in pixels`` of each pair at the solution.
    pair_weight : dict
        ``(i, j) -> robust weight`` in (0, 1]; small means the pair disagreed with the rest.
    """

    fields: np.ndarray
    pair_residual_px: dict
    pair_weight: dict


def _resample_block(v: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``v`` (P, 2, rows, w), rows of P pair maps, sampled bilinearly at the positions
    ``pos`` (P, 2, r, w) (x, y in ``v``'s node indices), the edge value past its edges.

    torch's ``grid_sample`` (``align_corners=True``, ``padding_mode="border"``): the values of
    ``scipy.ndimage.map_coordinates`` up to float32 rounding, and much faster.
    """
    import torch
    import torch.nn.functional as F

    # a map one node wide is constant along that axis: a repeated edge node keeps it so
    v = np.pad(v, ((0, 0), (0, 0), (0, int(v.shape[2] < 2)), (0, int(v.shape[3] < 2))),
               mode="edge")
    p, _, r, c = pos.shape
    grid = np.empty((p, r, c, 2), np.float32)
    grid[..., 0], grid[..., 1] = normalized_coords(pos[:, 0], pos[:, 1], v.shape[-2:],
                                                   align_corners=True)
    with torch.inference_mode():
        out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(v, np.float32)),
                            torch.from_numpy(grid), mode="bilinear", padding_mode="border",
                            align_corners=True)
    return out.numpy()


#: Bytes one block of the joint solve may take (the rows of nodes solved at once, for the
#: few sections and pairs of its sweep along z): the solve's memory at any section size and
#: number of sections.
SOLVE_BLOCK_BYTES = 256 << 20


def block_rows(band: int, pairs_per_step: int, w: int, *, max_bytes: int,
               per_node: bool = False) -> int:
    """Rows of nodes per block of :func:`solve_joint` under ``max_bytes``: per row, for the
    ``band + 1`` sections a sweep step holds, their current fields (float32), right-hand
    sides, eliminated and solved rows (float64), and each of the step's pair maps read (with
    as many rows again around the block), its targets and sample positions; ``per_node``
    (node weights): the factor's held columns, diagonals and each pair's weights too."""
    per_row = 2 * w * ((band + 1) * (4 + 8 + 8 + 8) + pairs_per_step * 4 * 5)
    if per_node:
        per_row += w * 8 * ((band + 1) * (band + 4) + 3 * pairs_per_step)
    return max(1, int(max_bytes) // per_row)


def _banded_cholesky(z: int, band: int, pairs, weight, prior: float, anchor):
    """The lower Cholesky factor of the normal matrix in LAPACK's banded form
    (``cb[d, k] = L[k + d, k]``): the matrix couples sections ``band`` apart at most."""
    from scipy.linalg import cholesky_banded

    ab = np.zeros((band + 1, z))
    ab[0] = prior  # a number, or one per section
    if anchor is not None:
        ab[0, anchor] += 1e6
    for (i, j) in pairs:
        wt = weight[(i, j)]
        ab[0, i] += wt
        ab[0, j] += wt
        ab[abs(j - i), min(i, j)] -= wt
    try:
        return cholesky_banded(ab, lower=True)
    except np.linalg.LinAlgError:
        raise ValueError("the joint solve is singular: a section has no pair with a weight "
                         "above 0 and the prior is 0; give prior > 0") from None


def solve_joint(pair_fields: Mapping[tuple[int, int], np.ndarray], z: int, *,
                prior: float = 0.3, spacing_xy=(1.0, 1.0), mask=None,
                robust_scale_px: float | None = None, iterations: int = 4,
                anchor: int | None = None,
                pair_weights: Mapping[tuple[int, int], float] | None = None,
                stride: int = 1, out=None, max_bytes: int | None = None,
                progress: bool = False, section_prior=None,
                node_weights: Mapping[tuple[int, int], np.ndarray] | None = None
                ) -> JointSolution:
    """Find every section's field from pairwise fields (see the module docstring).

    Pairs couple sections at most a few apart (``band``), so the normal matrix is banded:
    each step is a banded Cholesky factorisation (Z x band numbers) and, for every node, a
    forward sweep along z from the first section to the last and a backward sweep back,
    each holding the ``band + 1`` sections around the current one. A sweep runs over a
    block of node rows at a time (at most ``max_bytes``): each pair map is read twice per
    step (the forward sweep's targets, the backward sweep's residuals), and only in the
    rows the block's fields point into. Pair maps and the result may live on disk (zarr
    arrays): memory is one block at any section size and number of sections, time is
    linear in the number of sections, and the result is that of the dense solve.

    Parameters
    ----------
    pair_fields : mapping ``(i, j) -> array, shape (2, H, W)``
        Pull fields in physical units with ``raw_i(p) ~ raw_j(p + v_ij(p))`` (``raw_i`` fixed,
        ``raw_j`` moving), ``0 <= i, j < z``, ``i != j``: ndarrays or arrays read by
        slicing (zarr, HDF5), read a block at a time.
    z : int
        Number of sections.
    prior : float
        Weight of ``|u_k|^2`` (> 0 unless ``anchor`` is given).
    spacing_xy : (float, float)
    mask : ndarray of bool, shape (H, W), optional
        Where residuals are measured for the robust weights (default: all pixels).
    robust_scale_px : float, optional
        Cauchy scale of the pair weights in pixels; default twice the median pair residual
        (at least 1 px). ``0`` disables the robust weighting.
    iterations : int
        Gauss-Newton / reweighting steps.
    anchor : int, optional
        Pin this section to the identity (e.g. a section known to be undistorted).
    pair_weights : mapping ``(i, j) -> float`` in [0, 1], optional
        Prior confidence in each pair (e.g. from its similarity after registration),
        multiplied into the robust weights.
    stride : int
        The fields are coarse maps with nodes every ``stride`` section pixels
        (:class:`hybridreg.fields.MapGrid`; ``spacing_xy`` is then the nodes' spacing):
        residuals and ``robust_scale_px`` are in section pixels all the same.
    out : array, shape (Z, 2, H, W), optional
        Where to put the fields (e.g. a zarr array on disk); default a new ndarray. The
        forward sweep's float64 rows go to a scratch array beside it: in memory when they
        fit ``max_bytes``, else on disk (next to ``out`` when it has a ``path``, else in a
        temporary folder).
    max_bytes : int, optional
        Memory of one block; default :data:`SOLVE_BLOCK_BYTES`.
    progress : bool
        A progress bar over the sweeps' sections (stderr).
    section_prior : sequence of float, shape (Z,), optional
        Factors in [0, 1] on ``prior`` per section (default all 1).
    node_weights : mapping ``(i, j) -> array, shape (H, W)``, optional
        Each pair's confidence per node in [0, 1] (a pair left out: 1), read a block of rows
        at a time like the maps (see "Per-node confidence" in the module docstring). Pair
        residuals are then confidence-weighted means.

    Returns
    -------
    JointSolution

    Residuals (and so the robust weights) are those of each step's solution: ``u_j - u_i -
    v_ij(p + u_i)`` with ``v_ij`` sampled where the new ``u_i`` points.
    """
    if z < 1:
        raise ValueError(f"z must be >= 1, got {z}")
    check_prior(prior, anchor)
    check_anchor(z, anchor)
    if section_prior is not None:
        section_prior = np.asarray(section_prior, np.float64)
        if section_prior.shape != (z,) or not ((section_prior >= 0) & (section_prior <= 1)).all():
            raise ValueError(f"section_prior must be Z = {z} factors in [0, 1], got "
                             f"{section_prior!r}")
        prior = prior * section_prior
    if not pair_fields:
        raise ValueError("no pairs to solve from")
    pairs = sorted(pair_fields)
    shape = None
    for (i, j) in pairs:
        if not (0 <= i < z and 0 <= j < z) or i == j:
            raise ValueError(f"pair {(i, j)} is not a pair of distinct sections of 0..{z - 1}")
        v = pair_fields[(i, j)]
        if isinstance(v, np.ndarray):
            validate_field(v, name=f"field of pair {(i, j)}", shape_yx=shape)
        elif len(v.shape) != 3 or v.shape[0] != 2 or (shape and tuple(v.shape[1:]) != shape):
            raise ValueError(f"field of pair {(i, j)} has shape {tuple(v.shape)}, expected "
                             f"(2, H, W){' with (H, W) = ' + str(shape) if shape else ''}")
        shape = tuple(v.shape[1:])
    h, w = shape
    if node_weights is not None:
        node_weights = {p: c for p, c in node_weights.items() if p in pair_fields}
        for p, c in node_weights.items():
            if tuple(c.shape) != (h, w):
                raise ValueError(f"node weights of pair {p} have shape {tuple(c.shape)}, "
                                 f"the maps {(h, w)}")
        node_weights = node_weights or None
    m = np.ones((h, w), bool) if mask is None else np.asarray(mask, bool)
    if out is None:
        out = np.zeros((z, 2, h, w), np.float32)
    elif tuple(out.shape) != (z, 2, h, w):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(z, 2, h, w)}")
    prior_w = {p: 1.0 for p in pairs}
    if pair_weights is not None:
        for p, wt in pair_weights.items():
            if p in prior_w:
                if not 0.0 <= float(wt) <= 1.0:
                    raise ValueError(f"pair weight of {p} must be in [0, 1], got {wt}")
                prior_w[p] = float(wt)
    weight = dict(prior_w)
    resid = {p: 0.0 for p in pairs}
    # pairs by the first section of the sweep that needs them: a pair's target is made at
    # the lower of its two sections (forward) and its residual there too (backward)
    starting = {}
    for p in pairs:
        starting.setdefault(min(p), []).append(p)
    band = max(abs(j - i) for i, j in pairs)
    budget = max_bytes or SOLVE_BLOCK_BYTES
    per_node = node_weights is not None
    rows = min(h, block_rows(band, max(map(len, starting.values())), w, max_bytes=budget,
                             per_node=per_node))
    blocks = [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    # the eliminated rows (2 channels), and per node the factor's columns (band + 1)
    channels = 2 + (band + 1 if per_node else 0)
    scratch = _scratch((z, channels, h, w), out, in_memory=z * channels * h * w * 8 <= budget)
    if per_node:
        node = _NodeFactor(z, band, pairs, node_weights, np.broadcast_to(prior, (z,)), anchor)
    to_px = np.array([1.0 / spacing_xy[0], 1.0 / spacing_xy[1]], np.float32)[:, None, None]
    from tqdm.auto import tqdm

    bar = tqdm(total=max(1, iterations) * len(blocks) * 2 * z, desc="joint solve",
               unit="section", disable=not progress or len(blocks) * z < 200)
    for it in range(max(1, iterations)):
        cb = node.at(weight) if per_node else _banded_cholesky(z, band, pairs, weight, prior,
                                                               anchor)
        sums = {p: 0.0 for p in pairs}
        counts = {p: 0.0 for p in pairs}
        for r0, r1 in blocks:
            sweep = _Sweep(pair_fields, starting, cb, weight, to_px, r0, r1, h)
            sweep.forward(out, scratch, first=it == 0, bar=bar)
            for p, (s, n) in sweep.backward(out, scratch, m[r0:r1], bar=bar).items():
                sums[p] += s
                counts[p] += n
        resid = {p: sums[p] / max(1e-9, counts[p]) * stride if counts[p] > 0 else 0.0
                 for p in pairs}
        if robust_scale_px == 0:
            continue
        trusted = [resid[p] for p in pairs if prior_w[p] > 0.5] or list(resid.values())
        scale = robust_scale_px or max(1.0, 2.0 * float(np.median(trusted)))
        weight = {p: prior_w[p] / (1.0 + (resid[p] / scale) ** 2) for p in pairs}
    bar.close()
    low = {p: round(wt, 3) for p, wt in weight.items() if wt < 0.5}
    if low:
        log.info("joint solve: down-weighted pairs %s", low)
    return JointSolution(fields=out, pair_residual_px=resid, pair_weight=weight)


def _scratch(shape, out, *, in_memory: bool):
    """The forward sweep's float64 rows: an ndarray, or a zarr array on disk (beside
    ``out`` when it lives in a folder, else in a temporary folder removed with it)."""
    if in_memory:
        return np.empty(shape, np.float64)
    from pathlib import Path

    from .stack import MapStack

    folder = Path(out.path).parent if getattr(out, "path", None) else None
    return MapStack(shape, folder, "solve-scratch.zarr", dtype=np.float64, temporary=True)


class _Sweep:
    """One block of node rows ``[r0, r1)`` of one step of :func:`solve_joint`: the forward
    sweep (targets, right-hand sides, elimination) and the backward sweep (solution and
    residuals), each holding only the sections within ``band`` of the current one.

    ``cb``: the banded Cholesky factor of the normal matrix, the same at every node, or a
    :class:`_NodeFactor` (node weights), factored per node during the forward sweep, its
    columns kept in ``scratch`` beside the eliminated rows."""

    def __init__(self, pair_fields, starting, cb, weight, to_px, r0, r1, h):
        self.pair_fields, self.starting, self.cb = pair_fields, starting, cb
        self.weight, self.to_px, self.r0, self.r1, self.h = weight, to_px, r0, r1, h
        self.per_node = isinstance(cb, _NodeFactor)
        self.band = cb.band if self.per_node else cb.shape[0] - 1
        self.z = cb.z if self.per_node else cb.shape[1]

    def forward(self, out, scratch, *, first: bool, bar) -> None:
        """``scratch[k] = L^-1 rhs`` (node units) for the block's rows, k = 0 .. Z-1, with
        each pair's target ``v_ij(p + u_i(p))`` at the fields ``out`` holds."""
        r0, r1, cb = self.r0, self.r1, self.cb
        u = {}      # current fields of the sections the targets need (node units)
        rhs = {}    # right-hand sides not yet complete
        y = {}      # the last `band` eliminated rows
        cols = {}   # the factor's last `band` columns (cols[k][d] = L[k + d, k])
        node = cb.block(r0, r1, out.shape[3]) if self.per_node else None
        for k in range(self.z):
            todo = self.starting.get(k, [])
            if first:
                targets = {p: np.asarray(self.pair_fields[p][:, r0:r1], np.float32)
                           * self.to_px for p in todo}
            else:
                for i, _ in todo:
                    if i not in u:
                        u[i] = np.asarray(out[i, :, r0:r1], np.float32) * self.to_px
                targets = _sample(self.pair_fields, todo, u, self.to_px, r0, r1, self.h)
            wts = node.add(todo) if node is not None else self.weight
            for (i, j), t in targets.items():
                t = wts[(i, j)] * t.astype(np.float64)
                rhs[j] = rhs[j] + t if j in rhs else t
                rhs[i] = rhs[i] - t if i in rhs else -t
            cols[k] = node.column(k) if node is not None else cb[:, k]
            yk = rhs.pop(k, None)
            yk = np.zeros((2, r1 - r0, out.shape[3])) if yk is None else yk
            for d in range(1, min(self.band, k) + 1):
                yk -= cols[k - d][d] * y[k - d]
            yk /= cols[k][0]
            y[k] = yk
            y.pop(k - self.band, None)
            cols.pop(k - self.band, None)
            u.pop(k, None)
            scratch[k, 0:2, r0:r1] = yk
            if node is not None:
                scratch[k, 2:, r0:r1] = cols[k]
            bar.update(1)

    def backward(self, out, scratch, mask, *, bar) -> dict:
        """``out[k] = L^-T scratch`` for the block's rows, k = Z-1 .. 0; returns each pair's
        sum of residual lengths (node units) over ``mask`` and the number of nodes summed
        (both weighted by the pair's node weights, if any)."""
        r0, r1, cb = self.r0, self.r1, self.cb
        x = {}
        sums = {}
        count = float(mask.sum())
        for k in range(self.z - 1, -1, -1):
            if self.per_node:
                held = np.asarray(scratch[k, :, r0:r1], np.float64)
                xk, col = held[:2], held[2:]
            else:
                xk, col = np.asarray(scratch[k, 0:2, r0:r1], np.float64), cb[:, k]
            for d in range(1, min(self.band, self.z - 1 - k) + 1):
                xk -= col[d] * x[k + d]
            xk /= col[0]
            x[k] = xk
            x.pop(k + self.band + 1, None)
            out[k, :, r0:r1] = (xk / self.to_px).astype(np.float32)
            todo = self.starting.get(k, [])
            if todo:
                new = {i: x[i].astype(np.float32) for i, _ in todo}
                for (i, j), t in _sample(self.pair_fields, todo, new, self.to_px, r0, r1,
                                              self.h).items():
                    r = np.sqrt((((x[j] - x[i]).astype(np.float32) - t) ** 2).sum(axis=0))
                    c = self.cb.confidence((i, j), r0, r1) if self.per_node else None
                    if c is None:
                        sums[(i, j)] = (float(r[mask].sum()), count)
                    else:
                        sums[(i, j)] = (float((c * r)[mask].sum()), float(c[mask].sum()))
            bar.update(1)
        return sums


#: Where every pair of a section has confidence 0 at a node, its prior there is kept at this
#: fraction (the node's system stays positive definite).
MIN_NODE_PRIOR = 1e-3


class _NodeFactor:
    """The normal matrix of :func:`solve_joint` with node weights (it differs from node to
    node), factored per node along z during a forward sweep (:meth:`block`)."""

    def __init__(self, z, band, pairs, node_weights, prior, anchor, weight=None):
        self.z, self.band, self.pairs = z, band, pairs
        self.node_weights, self.prior, self.anchor = node_weights, prior, anchor
        self.weight = weight
        self.npairs = np.zeros(z)
        for i, j in pairs:
            self.npairs[i] += 1
            self.npairs[j] += 1

    def at(self, weight) -> "_NodeFactor":
        """This matrix with the pairs' (robust) weights ``weight``."""
        return _NodeFactor(self.z, self.band, self.pairs, self.node_weights, self.prior,
                           self.anchor, weight)

    def confidence(self, p, r0: int, r1: int):
        """Pair ``p``'s node weights on rows ``[r0, r1)``, float64, or None (all 1)."""
        c = self.node_weights.get(p)
        return None if c is None else np.clip(np.asarray(c[r0:r1], np.float64), 0.0, 1.0)

    def block(self, r0: int, r1: int, w: int) -> "_NodeColumns":
        return _NodeColumns(self, r0, r1, w)


class _NodeColumns:
    """The per-node factor of one block of rows, a column at a time along z: the diagonal
    and the couplings accumulate as the sweep reads each pair (at its lower section), and
    column k is complete when the sweep reaches section k."""

    def __init__(self, factor: _NodeFactor, r0: int, r1: int, w: int):
        self.f, self.r0, self.r1, self.shape = factor, r0, r1, (r1 - r0, w)
        self.csum, self.wsum, self.off, self.held = {}, {}, {}, {}

    def add(self, pairs) -> dict:
        """Take in the pairs the sweep reads at this step; their weights per node."""
        out = {}
        for p in pairs:
            c = self.f.confidence(p, self.r0, self.r1)
            c = np.ones(self.shape) if c is None else c
            wt = self.f.weight[p] * c
            for k in p:
                self.csum[k] = self.csum.get(k, 0.0) + c
                self.wsum[k] = self.wsum.get(k, 0.0) + wt
            key = (min(p), max(p))
            self.off[key] = self.off.get(key, 0.0) - wt
            out[p] = wt
        return out

    def column(self, k: int) -> np.ndarray:
        """Column k of the lower Cholesky factor at every node: ``(band + 1, r, w)``, row d
        the entry ``L[k + d, k]``."""
        f, b = self.f, self.f.band
        mean_c = self.csum.pop(k) / f.npairs[k] if f.npairs[k] else np.ones(self.shape)
        diag = (f.prior[k] * np.maximum(mean_c, MIN_NODE_PRIOR) + self.wsum.pop(k, 0.0)
                + (1e6 if f.anchor == k else 0.0))
        for d in range(1, min(b, k) + 1):
            diag = diag - self.held[k - d][d] ** 2
        if not (np.asarray(diag) > 0).all():
            raise ValueError("the joint solve is singular: a section has no pair with a "
                             "weight above 0 and the prior is 0; give prior > 0")
        col = np.zeros((b + 1,) + self.shape)
        col[0] = np.sqrt(diag)
        for e in range(1, min(b, f.z - 1 - k) + 1):
            a = self.off.pop((k, k + e), 0.0)
            for d in range(1, min(b - e, k) + 1):
                a = a - self.held[k - d][e + d] * self.held[k - d][d]
            col[e] = a / col[0]
        self.held[k] = col
        self.held.pop(k - b, None)
        return col


def _sample(pair_fields, pairs, u, to_px, r0: int, r1: int, h: int, *,
            batch: int = 8) -> dict:
    """Each pair's ``v_ij`` on the node rows ``[r0, r1)`` sampled at ``p + u_i(p)``, node
    units (``u[i]``: section i's field on these rows, node units), reading only the rows of
    ``v_ij`` that these positions reach and the edge rows past which the map is constant."""
    out = {}
    ys = np.arange(r0, r1, dtype=np.float32)[:, None]
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        lo = min(float((ys + u[i][1]).min()) for i, _ in chunk)
        hi = max(float((ys + u[i][1]).max()) for i, _ in chunk)
        q0 = int(np.clip(np.floor(lo) - 1, 0, h - 1))
        q1 = int(np.clip(np.ceil(hi) + 2, q0 + 1, h))
        v = np.stack([np.asarray(pair_fields[p][:, q0:q1], np.float32) for p in chunk]) * to_px
        w = v.shape[-1]
        pos = np.empty((len(chunk), 2, r1 - r0, w), np.float32)
        xs = np.arange(w, dtype=np.float32)[None, :]
        for n, (i, _) in enumerate(chunk):
            pos[n, 0] = xs + u[i][0]
            pos[n, 1] = ys - q0 + u[i][1]
        # rows read: from one above the highest position to one below the lowest, or to the
        # map's edge, past which border padding keeps the edge value as on the whole map
        out.update(zip(chunk, _resample_block(v, pos)))
    return out


def part_offsets(k: int, fields, pair_fields, pair_weight, labels: np.ndarray, *,
                 spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """The correction that lets section ``k``, split into parts by a defect, keep its jump.

    A fold or a crack moves the parts of one section apart (a jump of that section alone).
    The small-distortion prior shrinks each section's field towards zero, the jump with it
    (by ``prior / (prior + pair weights)``), and the shrunk share goes to no section. Given
    the solution, each pair touching ``k`` says what ``u_k`` should be (``u_i + v_ik(p +
    u_i)`` or ``u_j - v_kj(p + u_k)``); their weighted mean minus ``u_k`` is what the prior
    took. Its mean over the whole section stays taken (the prior's work on the common
    motion); each part gets back its own deviation from that mean, so the parts keep their
    offsets from one another. Between the parts (the defect's band) the correction is
    filled from both sides (:func:`hybridreg.defects.fill_untrusted`).

    Parameters
    ----------
    k : int
    fields : array, shape (Z, 2, h, w)
        The solution (physical units, node grid).
    pair_fields, pair_weight : mappings ``(i, j) -> map``, ``(i, j) -> weight``
        As :func:`solve_joint`'s input and :class:`JointSolution`'s ``pair_weight``.
    labels : ndarray of int, shape (h, w)
        The parts of section ``k`` in its own (raw) frame, 1..n, 0 on the defect
        (:func:`hybridreg.defects.node_parts`).
    spacing_xy : (float, float)
        The nodes' spacing.

    Returns
    -------
    ndarray, shape (2, h, w), float32
        To add to ``fields[k]`` (physical units).
    """
    from .defects import fill_untrusted

    to_px = np.array([1.0 / spacing_xy[0], 1.0 / spacing_xy[1]], np.float32)[:, None, None]
    u_k = np.asarray(fields[k], np.float32) * to_px
    h, w = u_k.shape[1:]
    acc = np.zeros((2, h, w), np.float64)
    total = 0.0
    for (i, j), wt in pair_weight.items():
        if wt <= 0 or k not in (i, j):
            continue
        # v_ij at p + u_i (u_i = u_k when k is the pair's fixed section), node units
        u_i = u_k if i == k else np.asarray(fields[i], np.float32) * to_px
        v = _sample(pair_fields, [(i, j)], {i: u_i}, to_px, 0, h, h)[(i, j)]
        t = u_i + v if j == k else np.asarray(fields[j], np.float32) * to_px - v
        acc += wt * t
        total += wt
    if total <= 0:
        return np.zeros((2, h, w), np.float32)
    d = acc / total - u_k
    # the parts where the solved field takes each node (nearest node of the raw frame)
    yy, xx = np.mgrid[0:h, 0:w]
    ry = np.clip(np.rint(yy + u_k[1]), 0, h - 1).astype(int)
    rx = np.clip(np.rint(xx + u_k[0]), 0, w - 1).astype(int)
    lab = labels[ry, rx]
    inside = lab > 0
    if not inside.any():
        return np.zeros((2, h, w), np.float32)
    common = d[:, inside].mean(axis=1)
    corr = np.zeros((2, h, w), np.float32)
    for part in np.unique(lab[inside]):
        sel = lab == part
        corr[:, sel] = (d[:, sel].mean(axis=1) - common)[:, None]
    corr = fill_untrusted(corr, inside.astype(np.float32))
    return corr / to_px

