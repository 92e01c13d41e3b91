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
    The normal matrix is Z x Z and the same for every pixel, so each Gauss-Newton step is
    one small solve applied to all pixels. ``v_ij`` is re-sampled at ``p + u_i(p)`` between
    steps. Pairs are weighted robustly (Cauchy weights on each pair's mean residual), so one
    failed or ambiguous pair does not pull its sections away.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .fields import validate_field

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
    rows, w = v.shape[-2:]
    p, _, r, c = pos.shape
    grid = np.empty((p, r, c, 2), np.float32)
    grid[..., 0] = 2.0 * pos[:, 0] / (w - 1) - 1.0
    grid[..., 1] = 2.0 * pos[:, 1] / (rows - 1) - 1.0
    with torch.inference_mode():
        out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(v, np.float32)),
                            torch.from_numpy(grid), mode="bilinear", padding_mode="border",
                            align_corners=True)
    return out.numpy()


#: Bytes one block of the joint solve may take (the rows of nodes solved at once, for every
#: section and pair): the solve's memory at any section size and number of sections.
SOLVE_BLOCK_BYTES = 256 << 20


def block_rows(z: int, n_pairs: int, w: int, *, max_bytes: int) -> int:
    """Rows of nodes per block of :func:`solve_joint` under ``max_bytes``: per row, the
    right-hand side (float64) and solution of every section, and each pair's map rows read
    (with as many again around the block), its targets and sample positions."""
    per_row = 2 * w * (z * (8 + 4) + n_pairs * 4 * 5)
    return max(1, int(max_bytes) // per_row)


def solve_joint(pair_fields: Mapping[tuple[int, int], np.ndarray], z: int, *,
                prior: float = 0.3, spacing_xy=(1.0, 1.0), mask=None,
                robust_scale_px: float | None = None, iterations: int = 4,
                anchor: int | None = None,
                pair_weights: Mapping[tuple[int, int], float] | None = None,
                stride: int = 1, out=None, max_bytes: int | None = None,
                progress: bool = False) -> JointSolution:
    """Find every section's field from pairwise fields (see the module docstring).

    The solve runs over blocks of rows of nodes (at most ``max_bytes`` each): a block needs
    its own rows of every section and, of every pair's map, the rows its sections' current
    fields point into. Pair maps and the result may live on disk (zarr arrays): memory is
    one block at any section size and number of sections, and the result is the same as
    one block for all.

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
        Where to put the fields (e.g. a zarr array on disk); default a new ndarray.
    max_bytes : int, optional
        Memory of one block; default :data:`SOLVE_BLOCK_BYTES`.
    progress : bool
        A progress bar over the iterations' blocks (stderr).

    Returns
    -------
    JointSolution
    """
    if z < 1:
        raise ValueError(f"z must be >= 1, got {z}")
    check_prior(prior, anchor)
    check_anchor(z, anchor)
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
    rows = min(h, block_rows(z, len(pairs), w, max_bytes=max_bytes or SOLVE_BLOCK_BYTES))
    blocks = [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    to_px = np.array([1.0 / spacing_xy[0], 1.0 / spacing_xy[1]], np.float32)[:, None, None]
    from tqdm.auto import tqdm

    bar = tqdm(total=max(1, iterations) * len(blocks), desc="joint solve", unit="block",
               disable=not progress or len(blocks) < 2)
    for it in range(max(1, iterations)):
        a = prior * np.eye(z)
        if anchor is not None:
            a[anchor, anchor] += 1e6
        for (i, j) in pairs:
            wt = weight[(i, j)]
            a[i, i] += wt
            a[j, j] += wt
            a[i, j] -= wt
            a[j, i] -= wt
        # the same small matrix for every node: one inverse and a matrix product (BLAS 3),
        # 16x faster than np.linalg.solve with 2*H*W right-hand sides (measured, 30 x 512^2)
        inv = np.linalg.inv(a)
        sums = {p: 0.0 for p in pairs}
        count = 0
        for r0, r1 in blocks:
            # targets: v_ij sampled where section i's current field sends the block's nodes
            target = _targets(pair_fields, pairs, out, to_px, r0, r1, h, first=it == 0)
            rhs = np.zeros((z, 2 * (r1 - r0) * w))  # float64: a small prior makes `a`
            for (i, j), t in target.items():         # ill-conditioned
                t = weight[(i, j)] * t.reshape(-1).astype(np.float64)
                rhs[j] += t
                rhs[i] -= t
            u = (inv @ rhs).astype(np.float32).reshape(z, 2, r1 - r0, w) / to_px
            del rhs
            out[:, :, r0:r1] = u
            # residuals at this solution (section pixels), for the robust weights
            mb = m[r0:r1]
            count += int(mb.sum())
            for (i, j), t in target.items():
                r = (u[j] - u[i]) * to_px - t
                sums[(i, j)] += float(np.sqrt((r ** 2).sum(axis=0))[mb].sum())
            bar.update(1)
        resid = {p: sums[p] / max(1, count) * stride for p in pairs}
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


def _targets(pair_fields, pairs, u, to_px, r0: int, r1: int, h: int, *, first: bool,
             batch: int = 8) -> dict:
    """Each pair's target on the node rows ``[r0, r1)`` in node units: ``v_ij`` itself in the
    first step, then ``v_ij`` sampled at ``p + u_i(p)`` (reading only the rows of ``v_ij``
    that these positions reach, and the edge rows past which the map is constant)."""
    if first:
        return {p: np.asarray(pair_fields[p][:, r0:r1], np.float32) * to_px for p in pairs}
    out = {}
    ui_all = {}
    for i in {i for i, _ in pairs}:
        ui_all[i] = np.asarray(u[i, :, r0:r1], np.float32) * to_px  # node units
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        ys = np.arange(r0, r1, dtype=np.float32)[:, None]
        lo = min(float((ys + ui_all[i][1]).min()) for i, _ in chunk)
        hi = max(float((ys + ui_all[i][1]).max()) for i, _ in chunk)
        q0 = int(np.clip(np.floor(lo) - 1, 0, h - 1))
        q1 = int(np.clip(np.ceil(hi) + 2, q0 + 1, h))
        v = np.stack([np.asarray(pair_fields[p][:, q0:q1], np.float32) for p in chunk]) * to_px
        w = v.shape[-1]
        pos = np.empty((len(chunk), 2, r1 - r0, w), np.float32)
        xs = np.arange(w, dtype=np.float32)[None, :]
        for n, (i, _) in enumerate(chunk):
            pos[n, 0] = xs + ui_all[i][0]
            pos[n, 1] = ys - q0 + ui_all[i][1]
        # rows read: from one above the highest position to one below the lowest, or to the
        # map's edge, past which border padding keeps the edge value as on the whole map
        out.update(zip(chunk, _resample_block(v, pos)))
    return out
