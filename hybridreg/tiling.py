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

from .fields import compose, resample, validate_field
from .methods.base import RegistrationResult, check_pair
from .warp import warp

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


def _has_content(section: np.ndarray, min_content: float) -> bool:
    """Not blank (one value everywhere) and at least ``min_content`` of it non-zero."""
    if not np.ptp(section) > 0:
        return False
    return float(np.count_nonzero(section)) / section.size >= min_content


def _downsample(section: np.ndarray, f: int) -> np.ndarray:
    """Block means of ``f x f`` pixels (the section padded at its far edges by repetition)."""
    if f == 1:
        return section.astype(np.float32, copy=False)
    h, w = section.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    padded = np.pad(section.astype(np.float32, copy=False), ((0, hp - h), (0, wp - w)),
                    mode="edge")
    return padded.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3)).astype(np.float32)


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

    def _coarse(self, fixed, moving, refs, spacing, origin):
        """The coarse field on the full grid, or None (with a warning) when it failed."""
        h, w = fixed.shape
        f = max(1, math.ceil(max(h, w) / self.coarse_px))
        sx, sy = spacing
        c_spacing = (sx * f, sy * f)
        c_origin = (origin[0] + (f - 1) / 2 * sx, origin[1] + (f - 1) / 2 * sy)
        small = [_downsample(a, f) for a in (fixed, moving, *refs)]
        info = {"factor": f, "shape_yx": small[0].shape}
        try:
            res = self.method.register(small[0], small[1], references=small[2:],
                                       spacing_xy=c_spacing, origin_xy=c_origin)
            u_c = validate_field(res.field, name="coarse field", shape_yx=small[0].shape)
        except Exception as exc:
            msg = f"coarse pass (1/{f}) failed: {type(exc).__name__}: {exc}"
            log.warning("%s", msg)
            return None, dict(info, status="failed", warnings=msg), [msg]
        full = resample(u_c, spacing_xy=c_spacing, origin_xy=c_origin, to_shape_yx=(h, w),
                        to_spacing_xy=spacing, to_origin_xy=origin)
        info.update(status="ok", metric=res.metric, warnings="; ".join(res.warnings))
        return full, info, [f"coarse: {x}" for x in res.warnings]

    def _tiles(self, fixed, moving, refs, spacing, origin):
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
                if not (_has_content(f_t, self.min_content)
                        and _has_content(m_t, self.min_content)):
                    row["status"] = "blank"
                    warnings.append(f"tile {a},{b} (y {y0}:{y1}, x {x0}:{x1}) blank or mostly "
                                    f"empty: filled in")
                    rows.append(row)
                    continue
                t_origin = (origin[0] + x0 * spacing[0], origin[1] + y0 * spacing[1])
                try:
                    res = self.method.register(f_t, m_t, references=[r[crop] for r in refs],
                                               spacing_xy=spacing, origin_xy=t_origin)
                    row["field"] = validate_field(res.field, name=f"field of tile {a},{b}",
                                                  shape_yx=f_t.shape)
                    row.update(status="ok", metric=res.metric,
                               warnings="; ".join(res.warnings))
                except Exception as exc:
                    row["status"] = "failed"
                    row["warnings"] = f"{type(exc).__name__}: {exc}"
                    warnings.append(f"tile {a},{b} (y {y0}:{y1}, x {x0}:{x1}) failed "
                                    f"({type(exc).__name__}): filled in")
                    log.warning("tile %d,%d failed: %s: %s", a, b, type(exc).__name__, exc)
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
        means = {k: r["field"].mean(axis=(1, 2)) for k, r in grid.items()
                 if r["field"] is not None}
        while len(means) < len(grid):
            new = {}
            for (a, b) in grid:
                if (a, b) in means:
                    continue
                near = [means[(a + da, b + db)] for da in (-1, 0, 1) for db in (-1, 0, 1)
                        if (a + da, b + db) in means]
                if near:
                    new[(a, b)] = np.mean(near, axis=0)
            means.update(new)
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

    # --- the interface -----------------------------------------------------------------------

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` coarse-then-fine over tiles.

        Parameters
        ----------
        fixed, moving : ndarray, shape (H, W)
        references : sequence of ndarray (H, W)
            Passed on (reduced for the coarse pass, cropped for the tiles).
        spacing_xy, origin_xy : (float, float)
            The sections' grid.

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
        if h <= self.tile_px and w <= self.tile_px:  # one tile: the section, whole
            res = self.method.register(fixed, moving, references=refs, spacing_xy=spacing,
                                       origin_xy=origin)
            return RegistrationResult(
                field=res.field, warped=res.warped, spacing_xy=spacing, origin_xy=origin,
                metric=res.metric, seconds=time.perf_counter() - t0, warnings=res.warnings,
                info=dict(res.info, tiles=[], grid=(1, 1), coarse=None))
        warnings: list[str] = []
        u_c, coarse_info = None, None
        pre = moving
        if self.coarse:
            u_c, coarse_info, msgs = self._coarse(fixed, moving, refs, spacing, origin)
            warnings += msgs
            if u_c is not None:
                pre = warp(moving, u_c, spacing_xy=spacing)[0]
        rows, ys, xs, msgs = self._tiles(fixed, pre, refs, spacing, origin)
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
