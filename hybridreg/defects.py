"""Section defects: masks, what a transform may trust near them, and their detection.

Folds, cracks, knife chatter, debris and stains spoil parts of a section, and some sections
are lost outright. hybridreg takes defect masks in elastix's convention (nonzero = tissue to
use, zero = a defect to exclude), one per section, and uses them in three places:

- **Registration.** elastix and the hybrid's refinement get them as elastix masks; the
  learned methods see the masked pixels filled with the section's mean grey value and give
  no trust to their own motion under a mask (:func:`fill_untrusted`).
- **The coarse maps of pairs.** A node of a pair's map is trusted only where neither section
  has a defect within the node's support (the ``2 S`` pixels around it that bilinear
  interpolation reads from it; the moving section's mask is looked up where the node's
  motion points): :func:`pair_trust`. Untrusted nodes take their values from the trusted
  nodes around them (:func:`fill_untrusted`, push-pull), so a defect contributes nothing to
  the joint solve and its neighbourhood follows its own good neighbours (down-weighting
  the filled nodes in the solve as well raised the error: benchmarks/RESULTS.md, "Per-node
  weights in the joint solve"). The solve is per
  node (it never smooths within a section), so where a mask splits a section the two sides
  keep their own motion: a crack's opening or a fold's collapse stays a jump.
- **Damaged sections.** A section whose mask keeps less than
  :data:`hybridreg.methods.base.MOSTLY_EXCLUDED` of it is skipped: its neighbours register
  across it, its transform is interpolated along z, and it is flagged
  (:func:`hybridreg.stack.align_stack`).

:func:`detect_defects` finds defects in a section without a mask: regions that are flat (no
texture: three pixels in a row of one grey value) and extreme (darker than the tissue's darkest or
brighter than its brightest percentile), which EM tissue never is but blank and saturated
regions, empty cracks, dense folds and debris are.
"""
from __future__ import annotations

import logging

import numpy as np

from .io.base import SectionSequence, section_of, strips

log = logging.getLogger(__name__)

__all__ = ["fill_untrusted", "node_trust", "pair_trust", "trusted_map", "trusted_field",
           "neutral_fill", "node_parts", "detect_defects", "DetectedMasks", "stack_masks",
           "mask_fraction",
           "DETECT_DEFAULTS"]


def fill_untrusted(values: np.ndarray, trust: np.ndarray) -> np.ndarray:
    """``values`` where ``trust`` is 1, filled from the trusted values around elsewhere.

    Push-pull interpolation: trust-weighted 2 x 2 means down a pyramid until every cell holds
    some trusted value, then, back up, each level's untrusted part taken from the bilinearly
    upsampled coarser level (``trust * values + (1 - trust) * coarser``). Cost linear in the
    pixels; a hole of any size is filled smoothly from its rim.

    Parameters
    ----------
    values : ndarray, shape (C, H, W)
    trust : ndarray, shape (H, W)
        In [0, 1]; 0 = ignore the value there.

    Returns
    -------
    ndarray, shape (C, H, W), float32
        ``values`` unchanged where ``trust == 1``; all zeros when nothing is trusted.
    """
    v = np.asarray(values, np.float32)
    c = np.clip(np.asarray(trust, np.float32), 0.0, 1.0)
    if v.ndim != 3 or c.shape != v.shape[1:]:
        raise ValueError(f"values (C, H, W) and trust (H, W) must match, got {v.shape} and "
                         f"{c.shape}")
    if c.min() >= 1.0:
        return v
    if c.max() <= 0.0:
        return np.zeros_like(v)
    return _pull(v, c)


def _pull(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    if (c > 0).all() or c.size <= 1:
        return v
    h, w = c.shape
    ph, pw = h + h % 2, w + w % 2
    cv = np.zeros((v.shape[0], ph, pw), np.float32)
    cc = np.zeros((ph, pw), np.float32)
    cv[:, :h, :w] = v * c
    cc[:h, :w] = c
    cs = cc.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    vs = cv.reshape(v.shape[0], ph // 2, 2, pw // 2, 2).sum(axis=(2, 4))
    coarse = _pull(vs / np.maximum(cs, 1e-12), np.minimum(cs, 1.0))
    up = _upsample2(coarse)[:, :h, :w]
    return c * v + (1.0 - c) * up


def _upsample2(v: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling of ``(C, h, w)`` cells (cell centres: half-pixel rule)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        out = F.interpolate(torch.from_numpy(np.ascontiguousarray(v))[None], scale_factor=2,
                            mode="bilinear", align_corners=False)
    return out[0].numpy()


def mask_fraction(mask) -> float:
    """Fraction of a section a mask keeps (nonzero), read in strips of rows."""
    kept = sum(int(np.count_nonzero(strip)) for strip in strips(mask, 1 << 24))
    return kept / float(mask.shape[0] * mask.shape[1])


#: Nodes beyond a defect's own that a pair's map does not trust: methods spread a defect's
#: jump further than one node (a B-spline's support, a network's receptive field). One
#: more node lowered the error away from the defects on ISBI 2012's test stack from 1.26 to
#: 1.16 (learned), 1.16 to 1.09 (hybrid) and 1.15 to 1.08 (elastix) times the clean stack's;
#: two nodes undid it for learned (benchmarks/RESULTS.md, "Defects and masks").
TRUST_MARGIN_NODES = 1


def node_trust(mask, grid, *, margin_nodes: int = TRUST_MARGIN_NODES) -> np.ndarray:
    """Which nodes of ``grid`` see no defect: 1 where the mask keeps every pixel of the node's
    support (the pixels within ``stride`` of it, which bilinear interpolation reads from
    it) and, for a defect inside the section (not in its outermost ``stride`` pixels:
    empty space along the edge), of its ``margin_nodes`` nearest nodes' supports, else 0.

    Parameters
    ----------
    mask : array-like, shape (H, W)
        elastix's convention (nonzero = use); read in strips of rows (any size).
    grid : hybridreg.fields.MapGrid

    Returns
    -------
    ndarray, shape grid.node_shape, float32
    """
    h, w = grid.shape_yx
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the grid {(h, w)}")
    s = grid.stride
    hn, wn = grid.node_shape
    # block (b, c) = pixels [bS, (b+1)S) x [cS, (c+1)S): does it hold a defect?
    bad = np.zeros((hn, wn), bool)
    rows = max(1, (1 << 24) // max(1, w * s)) * s
    for r0 in range(0, h, rows):
        strip = np.asarray(mask[r0:r0 + rows]) == 0
        if not strip.any():
            continue
        nb = -(-strip.shape[0] // s)
        pad = np.zeros((nb * s, wn * s), bool)
        pad[:strip.shape[0], :w] = strip
        bad[r0 // s:r0 // s + nb] |= pad.reshape(nb, s, wn, s).any(axis=(1, 3))

    def nodes_reading(blocks):  # node n reads blocks n - 1 and n along each axis
        rows_ = blocks.copy()
        rows_[1:] |= blocks[:-1]
        out = rows_.copy()
        out[:, 1:] |= rows_[:, :-1]
        return out

    both = nodes_reading(bad)
    if margin_nodes > 0:
        # the margin is for a jump inside the section, which spreads: empty space along
        # its edge (a deformed or cropped section's, in its outermost blocks) has none
        from scipy import ndimage

        inner = bad.copy()
        inner[[0, (h - 1) // s]] = False
        inner[:, [0, (w - 1) // s]] = False
        if inner.any():
            both |= ndimage.binary_dilation(nodes_reading(inner), iterations=int(margin_nodes))
    return (~both).astype(np.float32)


def pair_trust(fixed_trust: np.ndarray, moving_trust: np.ndarray, m: np.ndarray,
               grid) -> np.ndarray:
    """Trust of a pair's map ``m`` (2, h, w) on ``grid``: the fixed section's node trust,
    times the moving section's looked up where each node's motion points (0 if any of the
    four moving nodes around that point is untrusted)."""
    from scipy import ndimage

    if moving_trust.min() >= 1.0:
        return fixed_trust
    hn, wn = grid.node_shape
    sx, sy = grid.node_spacing_xy
    yy, xx = np.mgrid[0:hn, 0:wn].astype(np.float32)
    pos = np.stack([yy + m[1] / sy, xx + m[0] / sx])
    at = ndimage.map_coordinates(moving_trust, pos, order=1, mode="nearest")
    return fixed_trust * (at >= 1.0 - 1e-6)


#: :func:`detect_defects`'s defaults.
DETECT_DEFAULTS = {"percentile": 1.0, "min_area_px": 16, "dilate_px": 1}


#: Sections over this many pixels are searched for defects in strips of rows (the same
#: result away from strip edges; memory a strip's, at any section size).
DETECT_STRIP_PX = 1 << 23
#: Rows shared by neighbouring strips (a defect's flat core is measured, grown and its
#: area counted within them).
DETECT_OVERLAP_PX = 64


def detect_defects(section, *, percentile: float = DETECT_DEFAULTS["percentile"],
                   min_area_px: int = DETECT_DEFAULTS["min_area_px"],
                   dilate_px: int = DETECT_DEFAULTS["dilate_px"]) -> np.ndarray:
    """A section's defect mask, elastix's convention (255 = tissue to use, 0 = defect).

    A defect pixel is flat (it has the grey value of both its neighbours along a row or
    along a column: no texture, where EM tissue always has some) and extreme (at or below
    the ``percentile``-th percentile of the textured pixels' grey values, or at or above
    the ``100 - percentile``-th): blank or saturated regions, an empty crack, a dense fold,
    debris. Regions of fewer than ``min_area_px`` such pixels are dropped (clipped pixels
    in dark membranes), the rest grown by ``dilate_px`` (the defect's blurred rim). A
    section with no textured pixel (blank) is all defect.

    Parameters
    ----------
    section : ndarray or array-like, shape (H, W)
        Read in strips of rows when larger than :data:`DETECT_STRIP_PX` pixels (the
        percentiles then come from every few textured pixels).

    Returns
    -------
    ndarray of uint8, shape (H, W)
    """
    if len(section.shape) != 2:
        raise ValueError(f"section must be 2D (H, W), got shape {tuple(section.shape)}")
    if not 0.0 < percentile < 50.0:
        raise ValueError(f"percentile must be in (0, 50), got {percentile!r}")
    h, w = (int(n) for n in section.shape)
    rows = max(4 * DETECT_OVERLAP_PX, DETECT_STRIP_PX // max(1, w))
    strips = [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    # the tissue's own range: its textured pixels (not blank borders, not the defects)
    keep_every = max(1, (h * w) // DETECT_STRIP_PX)
    samples = []
    for r0, r1 in strips:
        x = np.asarray(section[r0:r1]).astype(np.float32)
        samples.append(x[~_flat(x)][::keep_every])
    tissue = np.concatenate(samples)
    if tissue.size == 0:
        return np.zeros((h, w), np.uint8)
    lo, hi = np.percentile(tissue, [percentile, 100.0 - percentile])
    out = np.empty((h, w), np.uint8)
    m = DETECT_OVERLAP_PX
    for r0, r1 in strips:
        a0, a1 = max(0, r0 - m), min(h, r1 + m)
        x = np.asarray(section[a0:a1]).astype(np.float32)
        out[r0:r1] = _defects_in(x, lo, hi, min_area_px, dilate_px)[r0 - a0:r1 - a0]
    return out


def _flat(x: np.ndarray) -> np.ndarray:
    """Pixels with the grey value of both neighbours along a row or along a column (a thin
    band at any angle is >= 3 px wide along one of them)."""
    from scipy import ndimage

    flat = np.zeros(x.shape, bool)
    for size in ((3, 1), (1, 3)):
        flat |= (ndimage.maximum_filter(x, size) - ndimage.minimum_filter(x, size)) <= 0
    return flat


def _defects_in(x: np.ndarray, lo: float, hi: float, min_area_px: int,
                dilate_px: int) -> np.ndarray:
    """:func:`detect_defects` of one strip, given the tissue's percentiles."""
    from scipy import ndimage

    core = _flat(x) & ((x <= lo) | (x >= hi))
    if core.any():
        labels, n = ndimage.label(core, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        core = (sizes >= min_area_px)[labels] & (labels > 0)
    if core.any():  # the flat core is one pixel inside the region: grow it back, and by the rim
        core = ndimage.binary_dilation(core, iterations=1 + int(dilate_px))
    return np.where(core, 0, 255).astype(np.uint8)


def neutral_fill(section: np.ndarray, mask) -> np.ndarray:
    """``section`` (float32) with the pixels ``mask`` excludes set to the mean of those it
    keeps: a network or a similarity sees no edge where a defect was."""
    x = np.asarray(section, np.float32)
    if mask is None:
        return x
    keep = np.asarray(mask) != 0
    if keep.all() or not keep.any():
        return x
    out = x.copy()
    out[~keep] = float(x[keep].mean())
    return out


#: :func:`trusted_field` decides trust and fills on cells of this many pixels a side (the
#: motion of a network or an optimised map is smooth at that scale): 1/16 of the work.
TRUST_CELL_PX = 4


def trusted_field(field: np.ndarray, fixed_mask, moving_mask, *, spacing_xy=(1.0, 1.0),
                  margin_px: int = 4, return_trust: bool = False):
    """A dense pull field with no trust in its motion under a defect: where the fixed mask
    excludes the pixel, or the moving mask excludes where the pixel's motion points (within
    ``margin_px``), the field is filled from the trusted motion around
    (:func:`fill_untrusted`). ``field`` (2, H, W), physical units; masks elastix's
    convention, either may be None.

    Trust is decided on cells of :data:`TRUST_CELL_PX` pixels (a cell is trusted when all
    its pixels are) and the fill made there, from the cells' centre values; the pixels of
    untrusted cells take the fill, bilinearly upsampled, the others keep their motion.
    With ``return_trust``, also the trust on the pixels (bool (H, W)).
    """
    from scipy import ndimage

    u = np.asarray(field, np.float32)
    h, w = u.shape[1:]
    c = TRUST_CELL_PX
    hc, wc = -(-h // c), -(-w // c)

    def cells(mask):  # kept where every pixel of the cell is kept
        pad = np.ones((hc * c, wc * c), bool)
        pad[:h, :w] = np.asarray(mask) != 0
        return pad.reshape(hc, c, wc, c).all(axis=(1, 3))

    trust = np.ones((hc, wc), bool)
    if fixed_mask is not None:
        trust &= cells(fixed_mask)
    small = u[:, c // 2::c, c // 2::c]
    small = np.pad(small, ((0, 0), (0, hc - small.shape[1]), (0, wc - small.shape[2])),
                   mode="edge")
    if moving_mask is not None:
        kept = cells(moving_mask)
        if not kept.all():
            yy, xx = np.mgrid[0:hc, 0:wc].astype(np.float32)
            pos = np.stack([yy + small[1] / (spacing_xy[1] * c),
                            xx + small[0] / (spacing_xy[0] * c)])
            trust &= ndimage.map_coordinates(kept.astype(np.float32), pos, order=1,
                                             mode="constant", cval=1.0) >= 1.0 - 1e-3
    if trust.all():
        return (u, np.ones((h, w), bool)) if return_trust else u
    if margin_px > 0:
        trust = ndimage.binary_erosion(trust, iterations=-(-int(margin_px) // c),
                                       border_value=1)
    filled = _upsample_cells(fill_untrusted(small, trust.astype(np.float32)), c, (h, w))
    trust_px = np.repeat(np.repeat(trust, c, axis=0), c, axis=1)[:h, :w]
    out = np.where(trust_px, u, filled)
    return (out, trust_px) if return_trust else out


def _upsample_cells(v: np.ndarray, c: int, shape) -> np.ndarray:
    """``(C, hc, wc)`` cell values bilinearly at the pixels of ``shape`` (cell centres at
    pixel ``c * i + c // 2``), the edge value beyond."""
    import torch
    import torch.nn.functional as F

    h, w = shape
    hc, wc = v.shape[1:]
    with torch.inference_mode():
        out = F.interpolate(torch.from_numpy(np.ascontiguousarray(v))[None],
                            size=(hc * c, wc * c), mode="bilinear", align_corners=False)
    return out[0, :, :h, :w].numpy()


def trusted_map(m: np.ndarray, fixed_mask, moving_mask, grid) -> np.ndarray:
    """A pair's coarse map ``m`` (2, h, w) on ``grid`` with its untrusted nodes
    (:func:`pair_trust`) filled from the trusted ones."""
    ones = np.ones(grid.node_shape, np.float32)
    margin = TRUST_MARGIN_NODES
    ft = ones if fixed_mask is None else node_trust(fixed_mask, grid, margin_nodes=margin)
    mt = ones if moving_mask is None else node_trust(moving_mask, grid, margin_nodes=margin)
    return fill_untrusted(m, pair_trust(ft, mt, m, grid))


class DetectedMasks(SectionSequence):
    """The masks :func:`detect_defects` finds in ``stack``, computed a section at a time when
    indexed (``--masks auto``): array-like ``(Z, H, W)`` uint8, the last few kept."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, stack, *, keep: int = 4, **options):
        self.stack = stack
        self.shape = tuple(int(n) for n in stack.shape)
        self.options = options
        self._keep = int(keep)
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return dict(self.__dict__, _cache={})

    def section(self, k: int) -> np.ndarray:
        k = int(k)
        if k not in self._cache:
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = detect_defects(section_of(self.stack, k), **self.options)
        return self._cache[k]

    def __repr__(self) -> str:
        return f"DetectedMasks({self.shape})"


def stack_masks(masks, stack):
    """``masks`` as given (None, or a mask stack), or for ``"auto"`` the
    :class:`DetectedMasks` of ``stack``; any other string is refused."""
    if not isinstance(masks, str):
        return masks
    if masks != "auto":
        raise ValueError(f"masks must be a mask stack or 'auto', got {masks!r}")
    return DetectedMasks(stack)


#: A part of a section split by a defect counts when it holds at least this fraction of
#: the section's nodes (smaller islands between defects are left to the fill).
MIN_PART = 0.05


def node_parts(mask, grid) -> tuple[np.ndarray, int]:
    """The parts a defect splits a section into, on ``grid``'s nodes: ``(labels, n)``,
    labels 1..n on the trusted nodes (:func:`node_trust`) of each connected part holding at
    least :data:`MIN_PART` of the nodes, 0 elsewhere. ``n == 1`` for a section with no
    defect or a spot of debris, 2 for a fold or a crack across it."""
    from scipy import ndimage

    trust = node_trust(mask, grid) > 0
    labels, n = ndimage.label(trust)
    if n == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel())
    big = [i for i in range(1, n + 1) if sizes[i] >= MIN_PART * trust.size]
    relabel = np.zeros(n + 1, labels.dtype)
    relabel[big] = np.arange(1, len(big) + 1)
    return relabel[labels], len(big)

