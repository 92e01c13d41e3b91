"""Sections too large to register whole: coarse-then-fine over overlapping tiles.

:class:`TiledMethod` wraps any registration method (:mod:`hybridreg.methods`) and keeps its
interface, so a stack alignment, the command line (``--tile PX``) and the comparison code
use it unchanged. For one fixed/moving pair of shape ``(H, W)``:

1. **Coarse.** Both sections are reduced by an integer factor ``f`` (block means, so that
   the larger side is at most ``coarse_px``) and registered whole by the wrapped method on
   the coarse grid (spacing ``f`` times larger; origin at the centre of the first block).
   The coarse field is resampled to the full grid (:func:`hybridreg.fields.resample`),
   giving ``U_c``, and the moving section is warped with it. This catches the large,
   section-wide motion (shift, rotation) that a single tile cannot see whole.
2. **Fine.** The full grid is cut into tiles of ``tile_px`` with at least ``overlap_px`` of
   overlap (tiles spread evenly, all of one size; the last one ends at the edge). Each tile
   of the fixed section is registered, independently, to the same tile of the coarsely
   warped moving section, on its own grid (the tile's physical origin), giving a residual
   field ``r_t`` in physical units.
3. **Blend.** The residuals are averaged with weights that are 1 inside a tile and fall
   to 0 across each overlap with a raised-cosine ramp (``0.5 - 0.5 cos(pi t)``), so that
   neighbouring tiles' weights sum to one there: ``R = sum_t w_t r_t / sum_t w_t``. The
   blended field is continuous, with no seam at the tile borders, whatever each tile found.
4. **Compose.** ``u = compose(R, U_c)``, i.e. ``u(p) = R(p) + U_c(p + R(p))``, so that
   ``warp(moving, u) = warp(warp(moving, U_c), R)``: a pull field on the fixed grid in the
   contract's direction and physical units (:mod:`hybridreg.fields`).

Tiles that cannot be registered are flagged in the result's ``warnings`` and ``info`` and
replaced, before blending, by a fallback: a tile whose fixed or moving part is blank (one
value everywhere) or mostly empty (less than ``min_content`` of its pixels non-zero: a
fold, a crack, the edge of the tissue), and a tile whose registration raised. With the
coarse pass the fallback is a zero residual (the tile keeps the coarse field); without it,
the mean field of the neighbouring tiles that did register (spreading further when a whole
region failed). When no tile and no coarse pass succeeded, :meth:`TiledMethod.register`
raises (a stack alignment then flags the pair and carries on).

A section that fits in one tile is registered whole, without tiles or coarse pass.

Every tile is one call of the wrapped method: elastix's cost and memory stay those of a
``tile_px`` image, and the calls are independent (a stack alignment on Dask already runs
pairs in parallel; the tiles of one pair run one after the other in that worker).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np

from .fields import DEFAULT_STRIDE, compose, interp_matrix, resample, validate_field
from .methods.base import RegistrationResult, check_pair
from .warp import _region_of, warp

log = logging.getLogger(__name__)

__all__ = ["TiledMethod", "tile_starts", "tile_weights"]


def tile_starts(length: int, tile_px: int, overlap_px: int) -> list[int]:
    """Start indices of tiles of ``tile_px`` covering ``range(length)`` with overlap.

    Tiles are spread evenly: the first starts at 0, the last ends at ``length``, and
    neighbours overlap by at least ``overlap_px`` pixels. A length that fits in one tile
    gives ``[0]`` (that tile is then ``length`` long).
    """
    if length <= tile_px:
        return [0]
    n = math.ceil((length - tile_px) / (tile_px - overlap_px)) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile_px, n)]


def _ramp_1d(size: int, before: int, after: int) -> np.ndarray:
    """Weights along one axis of a tile: raised-cosine ramps over the overlaps ``before``
    (with the previous tile) and ``after`` (with the next), 1 in between."""
    w = np.ones(size, np.float64)
    for n, side in ((before, "up"), (after, "down")):
        n = min(int(n), size)
        if n <= 0:
            continue
        t = (np.arange(n) + 0.5) / n
        ramp = 0.5 - 0.5 * np.cos(np.pi * t)
        if side == "up":
            w[:n] = np.minimum(w[:n], ramp)
        else:
            w[size - n:] = np.minimum(w[size - n:], ramp[::-1])
    return w


def tile_weights(starts: Sequence[int], size: int, length: int) -> list[np.ndarray]:
    """Blending weights along one axis for tiles of ``size`` at ``starts`` in ``length``.

    Each is 1 where no other tile overlaps and ramps (raised cosine) to near 0 across the
    overlap with the previous and the next tile; at the section's edges there is no ramp.
    Two neighbours' ramps over the same overlap sum to one.
    """
    out = []
    for n, s in enumerate(starts):
        end = min(s + size, length)
        before = (starts[n - 1] + size - s) if n > 0 else 0
        after = (end - starts[n + 1]) if n + 1 < len(starts) else 0
        out.append(_ramp_1d(end - s, max(0, before), max(0, after)))
    return out


def _coarse_ncc(fixed, moving, u, spacing) -> float | None:
    """NCC of a reduced pair, ``moving`` warped by ``u`` (None: as it is), on the pixels
    warped from inside the section (None when too few, or a constant image)."""
    from .metrics import ncc

    if u is None:
        warped, valid = moving, np.ones(moving.shape, bool)
    else:
        warped, valid = warp(moving, u, spacing_xy=spacing)
    if valid.sum() < 16:
        return None
    value = ncc(fixed, warped, mask=valid)
    return float(value) if np.isfinite(value) else None


def _bilinear(img: np.ndarray, tx: np.ndarray, ty: np.ndarray, *, border: bool
              ) -> np.ndarray:
    """``img`` (C, h, w) sampled bilinearly at index positions ``tx`` (column), ``ty`` (row)
    of shape (H, W) (torch's ``grid_sample``, ``align_corners=True``): outside, the edge
    value (``border``) or 0. Returns (C, H, W) float32."""
    import torch
    import torch.nn.functional as F

    c, h, w = img.shape
    grid = np.empty(tx.shape + (2,), np.float32)
    grid[..., 0] = 2.0 * tx / max(w - 1, 1) - 1.0
    grid[..., 1] = 2.0 * ty / max(h - 1, 1) - 1.0
    with torch.inference_mode():
        out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(img, np.float32))[None],
                            torch.from_numpy(grid)[None], mode="bilinear",
                            padding_mode="border" if border else "zeros", align_corners=True)
    return out[0].numpy()


class _Nonzero:
    """A mask seen as 1 where it keeps the section and 0 on a defect (elastix's convention:
    any nonzero value keeps), read region by region."""

    def __init__(self, mask):
        self.mask = mask
        self.shape = tuple(mask.shape)
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, key):
        return (np.asarray(self.mask[key]) != 0).astype(np.uint8)


def _mask_down(mask, f: int) -> np.ndarray:
    """Where every pixel of an ``f x f`` block is kept (:func:`downsample`'s blocks)."""
    return downsample(_Nonzero(mask), f) >= 1.0 - 1e-6


def _tile_masks(fixed_mask, moving_mask, crop, moving_at=None) -> dict:
    """The masks of one tile: the fixed one cropped, the moving one cropped or, with
    ``moving_at`` (tx, ty: the coarse field's sample positions), warped as the tile's moving
    section is (kept where wholly kept). ``{}`` without masks."""
    out = {}
    if fixed_mask is not None:
        out["fixed_mask"] = np.asarray(fixed_mask[crop]) != 0
    if moving_mask is not None:
        if moving_at is None:
            out["moving_mask"] = np.asarray(moving_mask[crop]) != 0
        else:
            tx, ty = moving_at
            out["moving_mask"] = _warp_region(_Nonzero(moving_mask), tx.copy(),
                                              ty.copy()) >= 1.0 - 1e-6
    return out


def _too_masked(masks: dict, min_content: float) -> bool:
    """A tile whose masks keep less than ``min_content`` of it: left to the fill."""
    return any(m.mean() < min_content for m in masks.values())


def _warp_region(moving: np.ndarray, tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """The section ``moving`` (any dtype, any size, read region by region) sampled at index
    positions (tx, ty) of one tile, 0 outside: only the region the positions need is read
    (:func:`hybridreg.warp._region_of`; ``tx``, ``ty`` are shifted into it in place) and
    copied to float."""
    region = _region_of(moving, ty, tx, order=1)
    if region is None or region.shape[0] < 2 or region.shape[1] < 2:  # all outside
        return np.zeros(tx.shape, np.float32)
    # zeros outside the section, not only outside the region: positions beyond the region's
    # edge that are inside the section cannot occur (the region bounds them)
    return _bilinear(region.astype(np.float32)[None], tx, ty, border=False)[0]


def _normalised(weights: list[np.ndarray], starts: Sequence[int], length: int
                ) -> list[np.ndarray]:
    """Tile weights along one axis divided by their sum at every pixel (so that the
    separable 2-D weights of all tiles sum to one everywhere)."""
    total = np.zeros(length, np.float64)
    for s, wt in zip(starts, weights):
        total[s:s + len(wt)] += wt
    return [wt / total[s:s + len(wt)] for s, wt in zip(starts, weights)]


def _fill_means(means: dict, tiles: list) -> dict:
    """Mean fields of tiles without one: their registered neighbours', ring by ring."""
    means = dict(means)
    while len(means) < len(tiles):
        new = {}
        for (a, b) in tiles:
            if (a, b) in means:
                continue
            near = [means[(a + da, b + db)] for da in (-1, 0, 1) for db in (-1, 0, 1)
                    if (a + da, b + db) in means]
            if near:
                new[(a, b)] = np.mean(near, axis=0)
        means.update(new)
    return means


def _tile_failed(row: dict, exc: Exception) -> str:
    """Mark a tile's row failed (it is filled in) and log it; returns the pair's warning."""
    a, b = row["tile"]
    row["status"] = "failed"
    row["warnings"] = f"{type(exc).__name__}: {exc}"
    log.warning("tile %d,%d failed: %s: %s", a, b, type(exc).__name__, exc)
    return (f"tile {a},{b} (y {row['y0']}:{row['y1']}, x {row['x0']}:{row['x1']}) failed "
            f"({type(exc).__name__}): filled in")


def _has_content(section: np.ndarray, min_content: float) -> bool:
    """Not blank (one value everywhere) and at least ``min_content`` of it non-zero."""
    if not np.ptp(section) > 0:
        return False
    return float(np.count_nonzero(section)) / section.size >= min_content


def _check_sections(fixed, moving, references=()):
    """:func:`hybridreg.methods.base.check_pair` for ndarrays; sections read region by
    region (:class:`hybridreg.io.SectionPlane`, checked as they are read) by shape only."""
    if all(isinstance(a, np.ndarray) for a in (fixed, moving, *references)):
        return check_pair(fixed, moving, references)
    for name, a in [("fixed", fixed), ("moving", moving)] + [
            (f"reference {i}", r) for i, r in enumerate(references)]:
        if len(a.shape) != 2:
            raise ValueError(f"{name} must be a 2D section (H, W), got shape {a.shape}")
        if tuple(a.shape) != tuple(fixed.shape):
            raise ValueError(f"{name} has shape {tuple(a.shape)}, fixed {tuple(fixed.shape)}: "
                             f"sections of one stack share a grid")
    return fixed, moving, list(references)


def downsample(section: np.ndarray, f: int, *, chunk_px: int = 1 << 22) -> np.ndarray:
    """Block means of ``f x f`` pixels (the section padded at its far edges by repetition).

    Computed in strips of rows (about ``chunk_px`` pixels): a large integer section is never
    copied whole to float.

    Returns
    -------
    ndarray, shape (ceil(H / f), ceil(W / f)), float32
    """
    from .io.base import is_array_like

    if not is_array_like(section):
        section = np.asarray(section)  # a SectionPlane is read strip by strip below
    if f == 1:
        return np.asarray(section[:, :]).astype(np.float32, copy=False)
    h, w = section.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    out = np.empty((hp // f, wp // f), np.float32)
    rows = max(1, int(chunk_px) // max(1, wp * f)) * f
    for r0 in range(0, hp, rows):
        r1 = min(hp, r0 + rows)
        strip = np.asarray(section[r0:min(r1, h), :]).astype(np.float32)
        strip = np.pad(strip, ((0, r1 - r0 - strip.shape[0]), (0, wp - w)), mode="edge")
        out[r0 // f:r1 // f] = strip.reshape((r1 - r0) // f, f, wp // f, f).mean(axis=(1, 3))
    return out



class TiledMethod:
    """Register large sections coarse-then-fine over overlapping, blended tiles.

    The design (coarse pass, tiles, raised-cosine blending, fallbacks) is described in the
    module docstring. Same interface as the wrapped method: ``register(fixed, moving,
    references=..., spacing_xy=..., origin_xy=...) -> RegistrationResult``.

    Parameters
    ----------
    method : Method
        The registration method for the coarse pass and every tile (e.g.
        ``get_method("elastix", params=["em_affine"])``).
    tile_px : int
        Tile side in pixels (>= 16).
    overlap_px : int, optional
        Least overlap of neighbouring tiles in pixels, ``0 < overlap_px <= tile_px // 2``;
        default ``tile_px // 4``. The blending ramps span the overlaps: the wider, the
        smoother the transition between tiles' fields.
    coarse : bool
        Run the coarse whole-section pass first (default True).
    coarse_px : int, optional
        The coarse pass reduces the section until its larger side is at most this many
        pixels; default ``tile_px``.
    min_content : float
        Tiles with less than this fraction of non-zero pixels (in the fixed or the moving
        section), or blank ones, are not registered but filled in (default 0.25).

    Attributes
    ----------
    name : str
        ``"<method>+tiles"``.
    """

    @property
    def metric_name(self) -> str | None:
        """What ``RegistrationResult.metric`` is: the wrapped method's, averaged over tiles."""
        name = getattr(self.method, "metric_name", None)
        return None if name is None else f"{name}, mean over tiles"

    def __init__(self, method, *, tile_px: int = 1024, overlap_px: int | None = None,
                 coarse: bool = True, coarse_px: int | None = None, min_content: float = 0.25):
        if not hasattr(method, "register"):
            raise TypeError(f"method must be a registration method with register(), got "
                            f"{type(method).__name__}")
        tile_px = int(tile_px)
        if tile_px < 16:
            raise ValueError(f"tile_px must be at least 16 pixels, got {tile_px}")
        overlap_px = tile_px // 4 if overlap_px is None else int(overlap_px)
        if not 0 < overlap_px <= tile_px // 2:
            raise ValueError(f"overlap_px must be in 1..{tile_px // 2} (half of tile_px "
                             f"{tile_px}), got {overlap_px}")
        coarse_px = tile_px if coarse_px is None else int(coarse_px)
        if coarse_px < 16:
            raise ValueError(f"coarse_px must be at least 16 pixels, got {coarse_px}")
        if not 0.0 <= float(min_content) < 1.0:
            raise ValueError(f"min_content must be in [0, 1), got {min_content}")
        self.method = method
        self.tile_px, self.overlap_px = tile_px, overlap_px
        self.coarse, self.coarse_px = bool(coarse), coarse_px
        self.min_content = float(min_content)
        self.name = f"{getattr(method, 'name', type(method).__name__)}+tiles"

    @property
    def config(self) -> dict:
        """Everything that decides the result (the stack's resume fingerprint uses it)."""
        return {"method": "tiled", "inner": getattr(self.method, "config", self.method.name),
                "tile_px": self.tile_px, "overlap_px": self.overlap_px,
                "coarse": self.coarse, "coarse_px": self.coarse_px,
                "min_content": self.min_content}

    def __repr__(self) -> str:
        return (f"TiledMethod({self.method.name}, tile_px={self.tile_px}, "
                f"overlap_px={self.overlap_px}, coarse={self.coarse})")

    # --- the pieces --------------------------------------------------------------------------

    def _coarse(self, fixed, moving, refs, spacing, origin, masks=(None, None)):
        """The coarse field on the full grid, or None (with a warning) when it failed."""
        u_c, c_spacing, c_origin, info, warnings = self._coarse_small(
            fixed, moving, refs, spacing, origin, check=False, masks=masks)
        if u_c is None:
            return None, info, warnings
        full = resample(u_c, spacing_xy=c_spacing, origin_xy=c_origin,
                        to_shape_yx=fixed.shape, to_spacing_xy=spacing, to_origin_xy=origin)
        return full, info, warnings

    def _tiles(self, fixed, moving, refs, spacing, origin, masks=(None, None)):
        """Register every tile; returns the tile rows (with their fields) and warnings."""
        h, w = fixed.shape
        t = self.tile_px
        ys, xs = tile_starts(h, t, self.overlap_px), tile_starts(w, t, self.overlap_px)
        rows, warnings = [], []
        for a, y0 in enumerate(ys):
            for b, x0 in enumerate(xs):
                y1, x1 = min(y0 + t, h), min(x0 + t, w)
                crop = (slice(y0, y1), slice(x0, x1))
                row = {"tile": (a, b), "y0": y0, "y1": y1, "x0": x0, "x1": x1,
                       "field": None, "metric": None, "warnings": ""}
                f_t, m_t = fixed[crop], moving[crop]
                t_masks = _tile_masks(*masks, crop)
                if not (_has_content(f_t, self.min_content)
                        and _has_content(m_t, self.min_content)) or _too_masked(
                            t_masks, self.min_content):
                    row["status"] = "blank"
                    warnings.append(f"tile {a},{b} (y {y0}:{y1}, x {x0}:{x1}) blank or mostly "
                                    f"empty: filled in")
                    rows.append(row)
                    continue
                t_origin = (origin[0] + x0 * spacing[0], origin[1] + y0 * spacing[1])
                try:
                    res = self.method.register(f_t, m_t, references=[r[crop] for r in refs],
                                               spacing_xy=spacing, origin_xy=t_origin,
                                               **t_masks)
                    row["field"] = validate_field(res.field, name=f"field of tile {a},{b}",
                                                  shape_yx=f_t.shape)
                    row.update(status="ok", metric=res.metric,
                               warnings="; ".join(res.warnings))
                except Exception as exc:
                    warnings.append(_tile_failed(row, exc))
                rows.append(row)
        return rows, ys, xs, warnings

    @staticmethod
    def _fill(rows, ys, xs, have_coarse: bool) -> None:
        """Give skipped tiles a fallback field (in place): zero on top of a coarse field,
        else the mean of their registered neighbours, spreading ring by ring."""
        grid = {r["tile"]: r for r in rows}
        missing = [r for r in rows if r["field"] is None]
        if not missing:
            return
        if have_coarse:
            for r in missing:
                r["field"] = np.zeros((2, r["y1"] - r["y0"], r["x1"] - r["x0"]), np.float32)
            return
        if len(missing) == len(rows):
            raise RuntimeError("no tile could be registered (all blank, mostly empty or "
                               "failed) and there is no coarse pass to fall back on")
        means = _fill_means({k: r["field"].mean(axis=(1, 2)) for k, r in grid.items()
                             if r["field"] is not None}, list(grid))
        for r in missing:
            shape = (r["y1"] - r["y0"], r["x1"] - r["x0"])
            r["field"] = np.broadcast_to(means[r["tile"]].astype(np.float32)[:, None, None],
                                         (2,) + shape).copy()

    def _blend(self, rows, ys, xs, shape_yx) -> np.ndarray:
        h, w = shape_yx
        t = self.tile_px
        wy, wx = tile_weights(ys, t, h), tile_weights(xs, t, w)
        acc = np.zeros((2, h, w), np.float64)
        total = np.zeros((h, w), np.float64)
        for r in rows:
            a, b = r["tile"]
            weight = np.outer(wy[a], wx[b])
            crop = (slice(r["y0"], r["y1"]), slice(r["x0"], r["x1"]))
            acc[(slice(None),) + crop] += weight * r["field"]
            total[crop] += weight
        return (acc / total).astype(np.float32)

    # --- coarse maps, tile by tile (sections of any size) ------------------------------------

    def _coarse_small(self, fixed, moving, refs, spacing, origin, *, check: bool = True,
                      masks=(None, None)):
        """The coarse pass on its own grid: ``(u_c, c_spacing, c_origin, info, warnings)``,
        ``u_c`` None when it failed (or, with ``check``, matched worse than none)."""
        h, w = fixed.shape
        f = max(1, math.ceil(max(h, w) / self.coarse_px))
        sx, sy = spacing
        c_spacing = (sx * f, sy * f)
        c_origin = (origin[0] + (f - 1) / 2 * sx, origin[1] + (f - 1) / 2 * sy)
        small = [downsample(a, f) for a in (fixed, moving, *refs)]
        info = {"factor": f, "shape_yx": small[0].shape}
        kw = {name: _mask_down(m, f) for name, m in zip(("fixed_mask", "moving_mask"), masks)
              if m is not None}
        kw = {name: m for name, m in kw.items() if m.mean() >= self.min_content}
        try:
            res = self.method.register(small[0], small[1], references=small[2:],
                                       spacing_xy=c_spacing, origin_xy=c_origin, **kw)
            u_c = validate_field(res.field, name="coarse field", shape_yx=small[0].shape)
        except Exception as exc:
            msg = f"coarse pass (1/{f}) failed: {type(exc).__name__}: {exc}"
            log.warning("%s", msg)
            return None, c_spacing, c_origin, dict(info, status="failed", warnings=msg), [msg]
        info.update(status="ok", metric=res.metric, warnings="; ".join(res.warnings))
        warnings = [f"coarse: {x}" for x in res.warnings]
        if not check:
            return u_c, c_spacing, c_origin, info, warnings
        # a method outside its range at this scale (a network trained at full resolution,
        # on sections reduced 16 times) can return a field that matches worse than none:
        # pre-warping every tile with it would throw the tiles out of their own range
        before, after = _coarse_ncc(small[0], small[1], None, c_spacing), _coarse_ncc(
            small[0], small[1], u_c, c_spacing)
        info.update(ncc_before=before, ncc_after=after)
        if before is not None and (after is None or after < before):
            msg = (f"coarse pass (1/{f}) not used: it matched worse than no registration "
                   f"(NCC {before:.3f} -> {after if after is None else round(after, 3)})")
            log.info("%s", msg)
            return None, c_spacing, c_origin, dict(info, status="rejected", warnings=msg), []
        return u_c, c_spacing, c_origin, info, warnings

    def register_map(self, fixed: np.ndarray, moving: np.ndarray, grid, *,
                     references: Sequence[np.ndarray] = (), fixed_mask=None,
                     moving_mask=None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` and give the transform as a coarse map.

        The same registration as :meth:`register` (coarse pass, tiles, blending), but the
        result is a map on ``grid`` (:class:`hybridreg.fields.MapGrid`) built tile by tile:
        each tile's field (its residual composed with the coarse field) is projected on the
        nodes with its blending weight, and the nodes are solved once at the end. No dense
        field, float copy or warped copy of the whole section is made: memory is the two
        sections in their own dtype and one tile's work, at any section size.

        ``fixed_mask``, ``moving_mask`` (elastix's convention, read region by region): each
        tile's method gets its part of them (the moving one warped with the tile), the
        coarse pass their reduced copies; a tile they leave mostly empty is filled in.

        Returns
        -------
        RegistrationResult
            ``field``: the map ``(2, h, w)`` (physical units; ``spacing_xy`` the nodes'),
            ``warped`` None; ``metric``, ``warnings`` and ``info`` as :meth:`register`.
        """


        t0 = time.perf_counter()
        fixed, moving, refs = _check_sections(fixed, moving, references)
        h, w = fixed.shape
        if grid.shape_yx != (h, w):
            raise ValueError(f"the map grid {grid} is not the sections' {h}x{w}")
        spacing, origin = grid.spacing_xy, grid.origin_xy
        f32 = np.float32
        whole = (slice(0, h), slice(0, w))
        if h <= self.tile_px and w <= self.tile_px:  # one tile: the section, whole
            res = self.method.register(np.asarray(fixed).astype(f32, copy=False),
                                       np.asarray(moving).astype(f32, copy=False),
                                       references=[np.asarray(r).astype(f32, copy=False)
                                                   for r in refs],
                                       spacing_xy=spacing, origin_xy=origin,
                                       **_tile_masks(fixed_mask, moving_mask, whole))
            m = grid.project(validate_field(res.field, name="field", shape_yx=(h, w)))
            return RegistrationResult(
                field=m, warped=None, spacing_xy=grid.node_spacing_xy, origin_xy=origin,
                metric=res.metric, seconds=time.perf_counter() - t0, warnings=res.warnings,
                info=dict(res.info, tiles=[], grid=(1, 1), coarse=None))
        warnings: list[str] = []
        u_c, coarse_info = None, None
        if self.coarse:
            u_c, c_spacing, c_origin, coarse_info, msgs = self._coarse_small(
                fixed, moving, refs, spacing, origin, masks=(fixed_mask, moving_mask))
            warnings += msgs

        def coarse_on(y0, y1, x0, x1):
            """u_c on the pixels [y0:y1, x0:x1], separably (as coarse_at on that grid)."""
            ty = (origin[1] + np.arange(y0, y1) * spacing[1] - c_origin[1]) / c_spacing[1]
            tx = (origin[0] + np.arange(x0, x1) * spacing[0] - c_origin[0]) / c_spacing[0]
            ay, ax = interp_matrix(ty, u_c.shape[1]), interp_matrix(tx, u_c.shape[2])
            return np.stack([ay @ (ax @ np.asarray(c, np.float64).T).T
                             for c in u_c]).astype(np.float32)

        t = self.tile_px
        ys, xs = tile_starts(h, t, self.overlap_px), tile_starts(w, t, self.overlap_px)
        wy, wx = _normalised(tile_weights(ys, t, h), ys, h), _normalised(
            tile_weights(xs, t, w), xs, w)
        rhs = np.zeros((2,) + grid.node_shape, np.float64)
        rows, means, missing = [], {}, []
        for a, y0 in enumerate(ys):
            for b, x0 in enumerate(xs):
                y1, x1 = min(y0 + t, h), min(x0 + t, w)
                crop = (slice(y0, y1), slice(x0, x1))
                row = {"tile": (a, b), "y0": y0, "y1": y1, "x0": x0, "x1": x1,
                       "metric": None, "warnings": ""}
                rows.append(row)
                sx, sy = spacing
                # the tile's pixel indices in the section (broadcast: no coordinate arrays)
                jx = np.arange(x0, x1, dtype=f32)[None, :]
                iy = np.arange(y0, y1, dtype=f32)[:, None]
                f_t = np.asarray(fixed[crop]).astype(f32)
                at = None
                if u_c is not None:  # the moving tile warped by the coarse field
                    uc_t = coarse_on(y0, y1, x0, x1)
                    at = (jx + uc_t[0] / f32(sx), iy + uc_t[1] / f32(sy))
                    m_t = _warp_region(moving, at[0].copy(), at[1].copy())
                else:
                    m_t = np.asarray(moving[crop]).astype(f32)
                t_masks = _tile_masks(fixed_mask, moving_mask, crop, at)
                if not (_has_content(f_t, self.min_content)
                        and _has_content(m_t, self.min_content)) or _too_masked(
                            t_masks, self.min_content):
                    row["status"] = "blank"
                    warnings.append(f"tile {a},{b} (y {y0}:{y1}, x {x0}:{x1}) blank or mostly "
                                    f"empty: filled in")
                    missing.append((row, None if u_c is None else uc_t))
                    continue
                try:
                    t_refs = [np.asarray(r[crop]).astype(f32) for r in refs]
                    if hasattr(self.method, "predict_field"):
                        # the field alone: the tile's warp and metric would be thrown away
                        r_t, _ = self.method.predict_field(f_t, m_t, references=t_refs,
                                                           spacing_xy=spacing, **t_masks)
                        res = None
                    else:
                        res = self.method.register(
                            f_t, m_t, references=t_refs, spacing_xy=spacing,
                            origin_xy=(origin[0] + x0 * sx, origin[1] + y0 * sy), **t_masks)
                        r_t = res.field
                    r_t = validate_field(r_t, name=f"field of tile {a},{b}",
                                         shape_yx=f_t.shape)
                    row.update(status="ok", metric=None if res is None else res.metric,
                               warnings="" if res is None else "; ".join(res.warnings))
                except Exception as exc:
                    warnings.append(_tile_failed(row, exc))
                    missing.append((row, None if u_c is None else uc_t))
                    continue
                means[(a, b)] = r_t.mean(axis=(1, 2))
                # u = compose(r, u_c) on the tile: r(p) + u_c(p + r(p))
                if u_c is None:
                    u_t = r_t
                else:  # u_c at the physical points p + r(p)
                    u_t = r_t + _bilinear(
                        u_c, (origin[0] - c_origin[0] + jx * sx + r_t[0]) / c_spacing[0],
                        (origin[1] - c_origin[1] + iy * sy + r_t[1]) / c_spacing[1],
                        border=True)
                rhs += grid.rhs(u_t, y0, x0, weight=(wy[a], wx[b]))
        if missing:
            if u_c is None and not means:
                raise RuntimeError("no tile could be registered (all blank, mostly empty or "
                                   "failed) and there is no coarse pass to fall back on")
            fill = _fill_means(means, [r["tile"] for r in rows]) if u_c is None else {}
            for row, uc_t in missing:
                a, b = row["tile"]
                shape = (row["y1"] - row["y0"], row["x1"] - row["x0"])
                u_t = (uc_t if u_c is not None else np.broadcast_to(
                    fill[(a, b)].astype(f32)[:, None, None], (2,) + shape))
                rhs += grid.rhs(u_t, row["y0"], row["x0"], weight=(wy[a], wx[b]))
        m = grid.solve(rhs)
        metrics = [r["metric"] for r in rows if r["status"] == "ok" and r["metric"] is not None]
        return RegistrationResult(
            field=m, warped=None, spacing_xy=grid.node_spacing_xy, origin_xy=origin,
            metric=float(np.mean(metrics)) if metrics else None,
            seconds=time.perf_counter() - t0, warnings=tuple(warnings),
            info={"tiles": rows, "grid": (len(ys), len(xs)), "coarse": coarse_info})

    # --- the interface -----------------------------------------------------------------------

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None
                 ) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` coarse-then-fine over tiles.

        Parameters
        ----------
        fixed, moving : ndarray, shape (H, W)
        references : sequence of ndarray (H, W)
            Passed on (reduced for the coarse pass, cropped for the tiles).
        spacing_xy, origin_xy : (float, float)
            The sections' grid.
        fixed_mask, moving_mask : ndarray (H, W), optional
            Defect masks, elastix's convention: each tile's method gets its part (the
            moving one warped with the coarse field, as the tile), the coarse pass their
            reduced copies; a tile they leave mostly empty is filled in.

        Returns
        -------
        RegistrationResult
            ``field`` (2, H, W): pull field on the fixed grid, physical units. ``metric``:
            the mean of the tiles' metrics (None when they have none). ``warnings``: the
            tiles filled in and the coarse pass's trouble. ``info``: ``"tiles"`` (one row per
            tile: position, ``status`` ok/blank/failed, metric, warnings), ``"coarse"``.

        Raises
        ------
        RuntimeError
            When no tile could be registered and there is no coarse field to fall back on.
        """
        t0 = time.perf_counter()
        fixed, moving, refs = check_pair(fixed, moving, references)
        fixed = fixed.astype(np.float32, copy=False)
        moving = moving.astype(np.float32, copy=False)
        spacing = tuple(float(s) for s in spacing_xy)
        origin = tuple(float(o) for o in origin_xy)
        h, w = fixed.shape
        masks = (fixed_mask, moving_mask)
        if h <= self.tile_px and w <= self.tile_px:  # one tile: the section, whole
            res = self.method.register(fixed, moving, references=refs, spacing_xy=spacing,
                                       origin_xy=origin,
                                       **_tile_masks(*masks, (slice(0, h), slice(0, w))))
            return RegistrationResult(
                field=res.field, warped=res.warped, spacing_xy=spacing, origin_xy=origin,
                metric=res.metric, seconds=time.perf_counter() - t0, warnings=res.warnings,
                info=dict(res.info, tiles=[], grid=(1, 1), coarse=None))
        warnings: list[str] = []
        u_c, coarse_info = None, None
        pre = moving
        if self.coarse:
            u_c, coarse_info, msgs = self._coarse(fixed, moving, refs, spacing, origin,
                                                  masks=masks)
            warnings += msgs
            if u_c is not None:
                pre = warp(moving, u_c, spacing_xy=spacing)[0]
                if moving_mask is not None:  # warped with the section, kept where wholly
                    masks = (fixed_mask, warp((np.asarray(moving_mask) != 0).astype(
                        np.float32), u_c, spacing_xy=spacing)[0] >= 1.0 - 1e-6)
        rows, ys, xs, msgs = self._tiles(fixed, pre, refs, spacing, origin, masks=masks)
        warnings += msgs
        self._fill(rows, ys, xs, have_coarse=u_c is not None)
        residual = self._blend(rows, ys, xs, (h, w))
        u = residual if u_c is None else compose(residual, u_c, spacing_xy=spacing)
        metrics = [r["metric"] for r in rows if r["status"] == "ok" and r["metric"] is not None]
        n_ok = sum(r["status"] == "ok" for r in rows)
        log.debug("%s: %d of %d tiles registered (%d x %d), coarse %s", self.name, n_ok,
                  len(rows), len(ys), len(xs),
                  None if coarse_info is None else coarse_info["status"])
        tiles = [{k: v for k, v in r.items() if k != "field"} for r in rows]
        return RegistrationResult(
            field=u, warped=warp(moving, u, spacing_xy=spacing)[0], spacing_xy=spacing,
            origin_xy=origin, metric=float(np.mean(metrics)) if metrics else None,
            seconds=time.perf_counter() - t0, warnings=tuple(warnings),
            info={"tiles": tiles, "grid": (len(ys), len(xs)), "coarse": coarse_info})


# --- the memory plan -------------------------------------------------------------------------

#: Peak bytes per pixel of one registration (a whole section or one tile, its inputs
#: included) above the process's baseline, and the baseline (imports, weights, itk's elastix
#: wrapping), measured by benchmarks/memory_per_px.py (RESULTS.md, "Memory per registered
#: pixel"); rounded up. learned measured 196-248 B/px alone, but a 16384^2 stack alignment
#: peaked 0.5 GB over the plan made with 260: it plans with 330.
BYTES_PER_PX = {"learned": 330, "elastix": 120, "hybrid": 450, "ssemnet": 3400}
BASELINE_BYTES = {"learned": 0.35e9, "elastix": 1.1e9, "hybrid": 1.2e9, "ssemnet": 0.5e9}
#: overlap of the tiles :func:`plan_tile` chooses (px), and their coarse pass's size
AUTO_OVERLAP_PX = 256
AUTO_COARSE_PX = 1024


def memory_plan(shape_yx, *, itemsize: int, method: str, tile_px: int | None,
                sections_held: int = 3, regions: bool = False, sections: int | None = None,
                neighbours: int = 1) -> dict:
    """What aligning a stack of ``shape_yx`` sections needs at its peak, in bytes.

    The parts: ``baseline`` (the method loaded), ``sections`` (the raw sections a pair
    alignment holds in their own dtype; with ``regions``, a lazy stack whose sections over
    :data:`hybridreg.io.WHOLE_SECTION_BYTES` are read region by region, only their reduced
    copies), ``registration`` (one whole section, or one tile, and the pair's NCC on at
    most :data:`hybridreg.stack.NCC_MAX_PX` pixels), ``render`` (one output section and a
    chunk, or one band of chunks), ``solve`` (the maps of the run's ``sections`` and their
    pairs with ``neighbours``, held in memory up to :data:`hybridreg.stack.MAPS_IN_MEMORY_BYTES`,
    and a block of the joint solve, at most :data:`hybridreg.joint.SOLVE_BLOCK_BYTES`; those
    bounds when ``sections`` is None), and ``total`` (the largest phase: registering, solving
    or rendering).
    """
    from . import io
    from .joint import SOLVE_BLOCK_BYTES
    from .stack import MAPS_IN_MEMORY_BYTES, NCC_MAX_PX

    h, w = (int(s) for s in shape_yx)
    name = method.split("+")[0]
    per_px = BYTES_PER_PX.get(name, max(BYTES_PER_PX.values()))
    base = BASELINE_BYTES.get(name, max(BASELINE_BYTES.values()))
    unit = h * w if not tile_px or (h <= tile_px and w <= tile_px) else tile_px ** 2
    planes = regions and h * w * max(itemsize, 4) > io.WHOLE_SECTION_BYTES
    if planes:  # the coarse pass's and the NCC's reduced copies, float32
        sections = sections_held * 4 * (AUTO_COARSE_PX ** 2 + NCC_MAX_PX)
        render = 0.3e9  # one band of output chunks and its region of the raw section
    else:
        sections = sections_held * h * w * itemsize
        render = 2 * h * w * itemsize + 0.2e9
    # and the pair's map, built from the tiles: its right-hand side and solve (float64)
    nodes = (h // DEFAULT_STRIDE + 2) * (w // DEFAULT_STRIDE + 2)
    registration = per_px * unit + 40 * min(h * w, NCC_MAX_PX) + 3 * 2 * nodes * 8
    if sections is None:
        solve = MAPS_IN_MEMORY_BYTES + SOLVE_BLOCK_BYTES
    else:  # the maps, the sweeps' sections and pairs (joint.block_rows), their scratch
        z, n = int(sections), int(neighbours)
        maps = (z + z * n) * 2 * nodes * 4
        block = 2 * nodes * ((n + 1) * 28 + n * 20)
        scratch = z * 2 * nodes * 8  # in memory when within a block's budget
        solve = (min(maps, MAPS_IN_MEMORY_BYTES) + min(block, SOLVE_BLOCK_BYTES)
                 + (scratch if scratch <= SOLVE_BLOCK_BYTES else 0))
    return {"baseline": base, "sections": sections, "registration": registration,
            "render": render, "solve": solve,
            "total": base + max(sections + registration, render, solve)}


def tile_for(length: int, n: int, overlap_px: int = AUTO_OVERLAP_PX) -> int:
    """The tile that cuts ``length`` into ``n`` tiles overlapping by ``overlap_px``
    (rounded up to 16 px): the least pixel work for ``n`` tiles."""
    return -(-(length + (n - 1) * overlap_px) // (16 * n)) * 16


def plan_tile(shape_yx, *, itemsize: int, method: str, limit_bytes: float,
              tile_px: int | None = None, sections_held: int = 3,
              regions: bool = False, sections: int | None = None,
              neighbours: int = 1) -> int | None:
    """The tile for a stack of ``shape_yx`` sections under ``limit_bytes``.

    With ``tile_px`` None: None (whole sections) when they fit, else the largest tile that
    fits among those cutting the longer side into 2, 3, ... tiles overlapping by
    :data:`AUTO_OVERLAP_PX` (so that little is registered twice). A given ``tile_px`` is
    checked. Raises ValueError, before any work, when nothing fits, naming the tile that
    would (or what else to change).
    """
    def total(t):
        return memory_plan(shape_yx, itemsize=itemsize, method=method, tile_px=t,
                           sections_held=sections_held, regions=regions,
                           sections=sections, neighbours=neighbours)["total"]

    gb = 1e9
    longest = max(int(s) for s in shape_yx)
    candidates = [tile_for(longest, n) for n in range(2, 4096)
                  if tile_for(longest, n) >= max(256, 2 * AUTO_OVERLAP_PX)]
    fits = [t for t in candidates if total(t) <= limit_bytes]
    if tile_px is None:
        if total(None) <= limit_bytes:
            return None
        if fits:
            return fits[0]
    elif total(tile_px) <= limit_bytes:
        return tile_px
    need = total(tile_px)
    what = f"tiles of {tile_px} px" if tile_px else "whole sections"
    smallest = candidates[-1] if candidates else 256
    held = ("" if regions else f" (the sections themselves take "
            f"{sections_held * shape_yx[0] * shape_yx[1] * itemsize / gb:.1f} GB: read the "
            f"stack lazily, from a file, to work on regions of them)")
    hint = (f"use --tile {fits[0]} (about {total(fits[0]) / gb:.1f} GB)" if fits else
            f"even tiles of {smallest} px need {total(smallest) / gb:.1f} GB{held}")
    raise ValueError(f"{method} on {shape_yx[0]}x{shape_yx[1]} sections with {what} needs "
                     f"about {need / gb:.1f} GB, over the memory limit of "
                     f"{limit_bytes / gb:.1f} GB: {hint}, or raise --memory-limit")
