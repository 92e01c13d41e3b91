"""A procedural serial-section EM phantom: sections cut through one 3D volume of cells.

The tissue is an anisotropic 3D Voronoi tessellation. Its seeds live in a *metric* space
``(x, y, z / elongation)`` (in-plane pixels; ``z`` is the physical depth in in-plane pixels),
so cells are ``elongation`` times longer along z than they are wide, like neurites running
through the sections. Each cell runs along its own slightly tilted axis (its seed drifts
``drift_px`` per section in a random direction), a smooth 3D domain warp bends the cell faces,
a finer warp with a short correlation along z makes the boundaries wiggle from section to
section, and a smooth seed density makes regions of small and of large cells. Section ``k`` is
the plane ``z = k * section_thickness_px``. Because every section cuts the same volume,
neighbouring sections are similar but not identical: boundaries shift by a few pixels, cells
start and end, and one label id is one 3D cell.

Each section is rendered from its geometry:

- cell boundaries are dark membranes of ``membrane_px`` thickness, with rounded corners; a
  face that runs obliquely through the section is swept over the section thickness and
  appears wider and paler, as in ssTEM;
- the cytoplasm is smooth noise at three scales over a per-cell brightness and a slow shading
  of the whole volume, with small dark dots; it is independent per section (finer than the
  section thickness);
- mitochondria are 3D ellipsoids inside cells (dark, with a darker rim and cristae stripes),
  seen over a few sections; vesicles are small dark rings, independent per section and
  denser in some cells;
- then additive noise, a slight blur, and one affine map of the whole stack to a target mean
  and standard deviation of grey levels.

The defaults are calibrated on the ISBI 2012 ssTEM volume (4 x 4 x 50 nm): grey-level mean
126 and std 44, about 100-170 cells of a few tens of pixels per 512 x 512 section, membranes
about 70 grey levels darker than the cytoplasm, and adjacent sections that correlate weakly
(NCC of adjacent sections: real 0.21, phantom about 0.3).

Everything is drawn from ``numpy.random.default_rng(seed)``: one seed, one phantom.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

__all__ = ["Phantom", "make_phantom"]

#: Seeds per cell_size_px**3 of metric space: calibrated so that the mean cross-section area
#: of a cell, membranes included, is about cell_size_px**2.
_SEED_DENSITY = 0.32
#: Coarse grid step (pixels) of the exact nearest-seed search; candidates per coarse pixel.
_COARSE = 2
_CANDIDATES = 4
#: Fraction of cells rich in vesicles (boutons).
_VESICLE_RICH = 0.2


@dataclass(frozen=True)
class Phantom:
    """A phantom serial-section stack and its cells.

    Attributes
    ----------
    stack : ndarray, shape (Z, H, W), uint8
        The EM-like sections.
    labels : ndarray, shape (Z, H, W), int32
        Cell instance ids, >= 1 and consistent across sections (one id is one 3D cell);
        0 on membranes.
    """

    stack: np.ndarray
    labels: np.ndarray


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} "
                         f"and finite, got {value!r}")
    return v


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit std (float32)."""
    a = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma,
                                mode="wrap")
    a -= a.mean()
    s = a.std()
    return a / s if s > 0 else a


class _Grid:
    """Smooth random fields on a coarse grid over a box of metric space, sampled trilinearly."""

    def __init__(self, rng, lo, hi, step_xyz, sigmas, amplitudes):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.step = np.asarray(step_xyz, dtype=np.float64)
        n = np.ceil((np.asarray(hi) - self.lo) / self.step).astype(int) + 2
        shape = (int(n[2]), int(n[1]), int(n[0]))                    # (z, y, x)
        self.values = np.stack([amp * _smooth_noise(rng, shape, sig)
                                for sig, amp in zip(sigmas, amplitudes)])

    def sample(self, points_m: np.ndarray, channels=None) -> np.ndarray:
        """Samples at metric points ``(3, ...)`` (x, y, z): ``(len(channels), ...)``."""
        pts = np.asarray(points_m, dtype=np.float64)
        idx = (pts - self.lo.reshape((3,) + (1,) * (pts.ndim - 1))) / self.step.reshape(
            (3,) + (1,) * (pts.ndim - 1))
        coords = np.stack([idx[2], idx[1], idx[0]])
        chans = range(len(self.values)) if channels is None else channels
        return np.stack([ndimage.map_coordinates(self.values[c], coords, order=1,
                                                 mode="nearest") for c in chans])


def _upsample2(c: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling by 2 of samples at even pixels ``(..., hc, wc)`` to ``(..., h, w)``."""
    hc, wc = c.shape[-2:]
    out = np.empty(c.shape[:-2] + (2 * hc - 1, 2 * wc - 1), dtype=c.dtype)
    out[..., ::2, ::2] = c
    out[..., 1::2, ::2] = 0.5 * (c[..., :-1, :] + c[..., 1:, :])
    out[..., :, 1::2] = 0.5 * (out[..., :, :-2:2] + out[..., :, 2::2])
    return out[..., :h, :w]


class _Tissue:
    """The 3D cell volume: seeds, per-cell properties and smooth fields in metric space."""

    def __init__(self, rng, *, sections, shape_yx, cell_size_px, elongation,
                 section_thickness_px, size_variation, wiggle_px, drift_px):
        h, w = shape_yx
        self.h, self.w = h, w
        self.dz = section_thickness_px / elongation     # metric z per section
        warp_amp = 0.25 * cell_size_px
        # each cell runs along its own tilted axis: in-plane px per metric z
        tilt_max = 2.5 * drift_px / self.dz
        # margins around the sections: the seeds a section sees, wherever they drift from
        m = 1.5 * cell_size_px + 3 * warp_amp + 3 * wiggle_px
        m_xy = m + tilt_max * m
        lo = np.array([-m_xy, -m_xy, -m])
        hi = np.array([w - 1 + m_xy, h - 1 + m_xy, (sections - 1) * self.dz + m])
        self.lo, self.hi = lo, hi
        c = cell_size_px
        # large scale: warp x, y, z (cells bend and wander along z), shading, seed density
        self.coarse = _Grid(rng, lo, hi, (c / 2, c / 2, c / 2), (1.5, 1.5, 1.5, 4.0, 3.0),
                            (warp_amp, warp_amp, warp_amp, 1.0, 1.0))
        # small scale, short along z: boundaries wiggle from section to section
        self.fine = _Grid(rng, lo, hi, (c / 3, c / 3, self.dz), ((1.0, 1.2, 1.2),) * 2,
                          (wiggle_px, wiggle_px))

        # seeds: an inhomogeneous Poisson process (thinning by the smooth density)
        volume = float(np.prod(hi - lo))
        mean_density = _SEED_DENSITY / cell_size_px ** 3
        g_max = 3.0 * size_variation
        n_cand = rng.poisson(volume * mean_density * math.exp(g_max))
        cand = rng.uniform(lo, hi, size=(n_cand, 3))
        g = self.coarse.sample(cand.T, channels=[4])[0] * size_variation
        keep = rng.uniform(size=n_cand) < np.exp(np.minimum(g, g_max) - g_max)
        seeds = cand[keep]
        if len(seeds) < _CANDIDATES + 1:   # tiny volumes: make sure the search has candidates
            seeds = np.concatenate([seeds, rng.uniform(lo, hi, size=(_CANDIDATES + 1, 3))])
        n_cells = len(seeds)
        tilt = rng.normal(0.0, drift_px / (self.dz * math.sqrt(2.0)), (2, n_cells))
        norm = np.maximum(np.hypot(tilt[0], tilt[1]), 1e-12)
        tilt *= np.minimum(1.0, tilt_max / norm)
        self.seeds = seeds
        self.tilt = tilt.astype(np.float32)                # (2, n): x, y
        # per-cell properties
        self.brightness = rng.normal(0.0, 1.0, n_cells).astype(np.float32)
        self.face_darkness = rng.uniform(0.0, 1.0, n_cells).astype(np.float32)
        self.vesicle_rich = rng.uniform(size=n_cells) < _VESICLE_RICH

    def section_geometry(self, k: int):
        """Nearest cell and distances to the cell faces, per pixel of section ``k``.

        Returns
        -------
        cell : (H, W) int, index of the nearest seed
        face_dist : (C, H, W) in-plane distance (px) to the face with each candidate
            neighbour (inf for the cell itself)
        sweep : (C, H, W) in-plane width (px) the face sweeps through the section thickness
        other : (C, H, W) the candidate neighbours
        shade : (H, W) the slow shading field
        """
        h, w, f = self.h, self.w, _COARSE
        zc = k * self.dz
        # the seeds where their cells cross this section
        moved = self.seeds.copy()
        moved[:, :2] += (self.tilt * (zc - self.seeds[:, 2])).T
        tree = cKDTree(moved)
        seeds_xyz = moved.T.astype(np.float32)
        hc, wc = -(-(h - 1) // f) + 1, -(-(w - 1) // f) + 1
        yc, xc = np.meshgrid(np.arange(hc) * float(f), np.arange(wc) * float(f), indexing="ij")
        pc = np.stack([xc, yc, np.full_like(xc, zc)])
        fc = self.coarse.sample(pc, channels=[0, 1, 2, 3])            # (4, hc, wc)
        fc[:2] += self.fine.sample(pc)
        # candidate seeds from the coarse grid
        qc = (pc + fc[:3]).reshape(3, -1).T
        _, cand = tree.query(qc, k=_CANDIDATES)
        cand = cand.T.reshape(_CANDIDATES, hc, wc)
        cand = np.repeat(np.repeat(cand, f, axis=1), f, axis=2)[:, :h, :w]  # (C, h, w)
        # warp and shading at full resolution: bilinear upsampling of the coarse samples
        full = _upsample2(fc.astype(np.float32), h, w)
        y, x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                           indexing="ij")
        qx, qy, qz = x + full[0], y + full[1], np.float32(zc) + full[2]
        # exact nearest among the candidates at full resolution
        sx, sy, sz = (s[cand] for s in seeds_xyz)                        # (C, h, w) each
        dx, dy, dz = sx - qx, sy - qy, sz - qz
        d2 = dx * dx + dy * dy + dz * dz
        near = np.argmin(d2, axis=0)[None]
        cell = np.take_along_axis(cand, near, axis=0)[0]
        d2_1 = np.take_along_axis(d2, near, axis=0)
        # distance to the bisector plane of the nearest seed with each other candidate
        ex = sx - np.take_along_axis(sx, near, axis=0)
        ey = sy - np.take_along_axis(sy, near, axis=0)
        ez = sz - np.take_along_axis(sz, near, axis=0)
        exy = np.sqrt(ex * ex + ey * ey)
        norm = np.sqrt(exy * exy + ez * ez)
        # d/dz of F = |q - s_j(z)|^2 - |q - s_1(z)|^2, halved: how fast the face's trace moves
        tx, ty = self.tilt[0][cand], self.tilt[1][cand]
        g = dx * tx + dy * ty
        dfdz = g - np.take_along_axis(g, near, axis=0) - ez
        with np.errstate(divide="ignore", invalid="ignore"):
            # in-plane distance = (d2_j - d2_1) / |grad_xy F| = (d2_j - d2_1) / (2 |e_xy|)
            inv = 1.0 / np.maximum(exy, 1e-3 * norm)
            face_dist = (d2 - d2_1) * (0.5 * inv)
            # the trace moves dz * |dF/dz| / |grad_xy F| px through the section thickness
            sweep = np.float32(self.dz) * np.abs(dfdz) * inv
        self_ = norm == 0
        face_dist[self_] = np.inf
        sweep[self_] = 0.0
        return cell, face_dist, sweep, cand, full[3]


def _splat(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """Add ``values`` at integer ``rows, cols`` (same shapes) into ``img``, clipping at edges."""
    h, w = img.shape
    ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = (rows[ok] * w + cols[ok]).astype(np.intp)
    img += np.bincount(flat, weights=values[ok], minlength=h * w).reshape(h, w).astype(
        img.dtype)


def _patches(cy: np.ndarray, cx: np.ndarray, radius: int):
    """Integer pixel indices and sub-pixel offsets of square patches around centres."""
    offs = np.arange(-radius, radius + 1)
    rows = np.floor(cy).astype(int)[:, None, None] + offs[None, :, None]
    cols = np.floor(cx).astype(int)[:, None, None] + offs[None, None, :]
    dy = rows - cy[:, None, None]
    dx = cols - cx[:, None, None]
    rows, cols = np.broadcast_arrays(rows, cols)
    return rows, cols, dy, dx


def make_phantom(*, sections: int = 16, shape_yx: Sequence[int] = (256, 256), seed: int = 0,
                 cell_size_px: float = 48.0, elongation: float = 4.0,
                 section_thickness_px: float = 12.5, size_variation: float = 1.0,
                 wiggle_px: float = 3.0, drift_px: float = 5.0, membrane_px: float = 4.0,
                 membrane_contrast: float = 85.0, mito_density: float = 0.4,
                 vesicle_density: float = 10.0, dot_density: float = 80.0,
                 texture_std: float = 30.0, noise_std: float = 12.0, blur_px: float = 0.6,
                 intensity_mean: float = 126.0, intensity_std: float = 44.0) -> Phantom:
    """Make a phantom serial-section EM stack with its cell labels.

    Parameters
    ----------
    sections : int
        Number of sections Z (>= 1).
    shape_yx : (int, int)
        Section shape (H, W), each >= 16 px.
    seed : int
        Seed of ``numpy.random.default_rng``; the phantom is a deterministic function of it.
    cell_size_px : float
        Typical in-plane cell diameter in pixels (square root of the mean cross-section
        area). Real ssTEM at 4 nm/px: a few tens of pixels.
    elongation : float
        Cell length along z over cell width (>= 1 for neurite-like cells).
    section_thickness_px : float
        Section thickness in in-plane pixels (50 nm sections at 4 nm/px: 12.5). Larger
        values make adjacent sections less alike.
    size_variation : float
        Standard deviation of the log seed density: 0 gives cells of one typical size,
        larger values regions of small and of large cells.
    wiggle_px : float
        Amplitude (px) of the fine warp that makes boundaries wiggle from section to
        section (correlated over about one section along z).
    drift_px : float
        Root-mean-square in-plane drift of a cell per section (px): each cell's axis is
        tilted in its own random direction, so boundaries move between sections.
    membrane_px : float
        Membrane thickness in pixels (full width at half depth of the dark core).
    membrane_contrast : float
        Typical grey-level darkening at the centre of a membrane (before the final affine
        map); each face varies between 0.75 and 1.25 times this.
    mito_density : float
        Mitochondria per section per 10,000 px², before those that would touch a membrane
        are dropped (0 for none).
    vesicle_density : float
        Vesicles per section per 10,000 px² (0 for none).
    dot_density : float
        Small dark dots per section per 10,000 px² (0 for none).
    texture_std : float
        Grey-level standard deviation of the cytoplasm texture.
    noise_std : float
        Grey-level standard deviation of the additive noise (before the blur).
    blur_px : float
        Gaussian blur sigma in pixels (0 for none).
    intensity_mean, intensity_std : float
        Target mean and standard deviation of the stack's grey levels, before clipping to
        uint8.

    Returns
    -------
    Phantom
        ``stack`` (Z, H, W) uint8 and ``labels`` (Z, H, W) int32.

    Raises
    ------
    ValueError
        For a non-positive number of sections, sections smaller than 16 px, or negative or
        non-finite options.
    """
    if isinstance(sections, bool) or not isinstance(sections, (int, np.integer)):
        raise TypeError(f"sections must be an integer, got {sections!r}")
    if sections < 1:
        raise ValueError(f"sections must be >= 1, got {sections}")
    try:
        h, w = (int(s) for s in shape_yx)
    except (TypeError, ValueError):
        raise TypeError(f"shape_yx must be a pair (H, W) of integers, got {shape_yx!r}") from None
    if h < 16 or w < 16:
        raise ValueError(f"shape_yx must be at least (16, 16) px, got {tuple(shape_yx)}")
    cell_size_px = _check_positive("cell_size_px", cell_size_px)
    if cell_size_px < 4:
        raise ValueError(f"cell_size_px must be >= 4 px, got {cell_size_px}")
    elongation = _check_positive("elongation", elongation)
    section_thickness_px = _check_positive("section_thickness_px", section_thickness_px)
    size_variation = _check_positive("size_variation", size_variation, allow_zero=True)
    wiggle_px = _check_positive("wiggle_px", wiggle_px, allow_zero=True)
    drift_px = _check_positive("drift_px", drift_px, allow_zero=True)
    membrane_px = _check_positive("membrane_px", membrane_px)
    membrane_contrast = _check_positive("membrane_contrast", membrane_contrast,
                                        allow_zero=True)
    mito_density = _check_positive("mito_density", mito_density, allow_zero=True)
    vesicle_density = _check_positive("vesicle_density", vesicle_density, allow_zero=True)
    dot_density = _check_positive("dot_density", dot_density, allow_zero=True)
    texture_std = _check_positive("texture_std", texture_std, allow_zero=True)
    noise_std = _check_positive("noise_std", noise_std, allow_zero=True)
    blur_px = _check_positive("blur_px", blur_px, allow_zero=True)
    intensity_std = _check_positive("intensity_std", intensity_std, allow_zero=True)
    try:
        intensity_mean = float(intensity_mean)
    except (TypeError, ValueError):
        raise TypeError(f"intensity_mean must be a number, got {intensity_mean!r}") from None
    if not math.isfinite(intensity_mean):
        raise ValueError(f"intensity_mean must be finite, got {intensity_mean!r}")

    rng = np.random.default_rng(seed)
    tissue = _Tissue(rng, sections=sections, shape_yx=(h, w), cell_size_px=cell_size_px,
                     elongation=elongation, section_thickness_px=section_thickness_px,
                     size_variation=size_variation, wiggle_px=wiggle_px, drift_px=drift_px)
    mitos = _mitochondria(rng, tissue, sections=sections, density=mito_density)

    stack = np.empty((sections, h, w), dtype=np.float32)
    cells = np.empty((sections, h, w), dtype=np.int64)
    sigma_m = membrane_px / 2.355               # membrane core FWHM = membrane_px
    tau = 0.04 * cell_size_px                   # rounding of the cell corners
    for k in range(sections):
        cell, face_dist, sweep, other, shade = tissue.section_geometry(k)
        # the nearest face, and a soft minimum over the faces that rounds the corners
        j = np.argmin(face_dist, axis=0)[None]
        near_face = np.take_along_axis(face_dist, j, axis=0)[0]
        sweep = np.take_along_axis(sweep, j, axis=0)[0]
        other = np.take_along_axis(other, j, axis=0)[0]
        soft = near_face - tau * np.log(np.sum(np.exp(-(face_dist - near_face) / tau), axis=0))
        soft = np.maximum(soft, 0.0)
        # membranes: a Gaussian profile across the face, swept over the section thickness
        sigma_eff = np.sqrt(sigma_m ** 2 + sweep ** 2 / 12.0)
        depth = membrane_contrast * (0.75 + 0.25 * (tissue.face_darkness[cell]
                                                     + tissue.face_darkness[other]))
        dark = depth * (sigma_m / sigma_eff) * np.exp(-0.5 * (soft / sigma_eff) ** 2)
        on_membrane = (soft < 0.5 * membrane_px + 0.5) & (sigma_eff < 2 * sigma_m)

        img = (150.0 + 6.0 * shade + 6.0 * tissue.brightness[cell]).astype(np.float32)
        if texture_std > 0:
            tex = (0.3 * _smooth_noise(rng, (h, w), 0.8)
                   + 0.6 * _smooth_noise(rng, (h, w), 2.0)
                   + 0.35 * _smooth_noise(rng, (h, w), 4.5))
            img += np.float32(texture_std) * tex
        img -= dark.astype(np.float32)
        if vesicle_density > 0:
            _draw_vesicles(rng, img, cell, near_face, tissue, density=vesicle_density)
        if dot_density > 0:
            _draw_dots(rng, img, density=dot_density)
        if mitos is not None:
            _draw_mitochondria(img, mitos, k, cell, near_face)
        if noise_std > 0:
            img += np.float32(noise_std) * rng.standard_normal((h, w), dtype=np.float32)
        if blur_px > 0:
            img = ndimage.gaussian_filter(img, blur_px)
        stack[k] = img
        cells[k] = np.where(on_membrane, -1, cell)

    # grey levels: one affine map for the whole stack
    mean, std = float(stack.mean()), float(stack.std())
    scale = intensity_std / std if std > 0 else 0.0
    stack = (stack - mean) * scale + intensity_mean
    stack = np.clip(np.rint(stack), 0, 255).astype(np.uint8)

    # labels: consecutive ids >= 1 in the order of the seeds, 0 on membranes
    present = np.zeros(len(tissue.seeds) + 1, dtype=bool)
    present[cells.ravel() + 1] = True
    present[0] = False
    lut = np.cumsum(present).astype(np.int32)
    lut[0] = 0
    labels = lut[cells + 1]
    log.debug("phantom: %d sections %dx%d, %d seeds, %d labels", sections, h, w,
              len(tissue.seeds), int(labels.max()))
    return Phantom(stack=stack, labels=labels)


def _draw_vesicles(rng, img, cell, near_face, tissue, *, density: float) -> None:
    """Small dark rings (radius 2.5-5.5 px), away from membranes, denser in some cells.

    ``density`` is the mean number per 10,000 px²; vesicle-rich cells get four times the
    density of the others.
    """
    h, w = img.shape
    accept_rich, accept_other = 1.0, 0.25
    mean_accept = (accept_rich * _VESICLE_RICH + accept_other * (1 - _VESICLE_RICH))
    count = rng.poisson(density * h * w / 1e4 / mean_accept)
    if count == 0:
        return
    cy = rng.uniform(0, h - 1, count)
    cx = rng.uniform(0, w - 1, count)
    radius = rng.uniform(2.5, 5.5, count)
    iy, ix = np.rint(cy).astype(int), np.rint(cx).astype(int)
    rich = tissue.vesicle_rich[cell[iy, ix]]
    keep = ((near_face[iy, ix] > radius + 1.5)
            & (rng.uniform(size=count) < np.where(rich, accept_rich, accept_other)))
    if not np.any(keep):
        return
    cy, cx, radius = cy[keep], cx[keep], radius[keep]
    rows, cols, dy, dx = _patches(cy, cx, 8)
    r = np.sqrt(dy ** 2 + dx ** 2)
    rad = radius[:, None, None]
    depth = rng.uniform(30.0, 60.0, len(cy))[:, None, None]
    ring = np.exp(-0.5 * ((r - rad) / 0.8) ** 2) - 0.2 * (r < rad - 1.0)
    _splat(img, rows, cols, -(depth * ring))


def _draw_dots(rng, img, *, density: float) -> None:
    """Small dark Gaussian spots (sigma 0.8-1.6 px): ribosomes, microtubules, granules."""
    h, w = img.shape
    count = rng.poisson(density * h * w / 1e4)
    if count == 0:
        return
    cy = rng.uniform(0, h - 1, count)
    cx = rng.uniform(0, w - 1, count)
    sigma = rng.uniform(0.8, 1.6, count)[:, None, None]
    depth = rng.uniform(15.0, 40.0, count)[:, None, None]
    rows, cols, dy, dx = _patches(cy, cx, 4)
    _splat(img, rows, cols, -(depth * np.exp(-0.5 * (dy ** 2 + dx ** 2) / sigma ** 2)))


def _mitochondria(rng, tissue: _Tissue, *, sections: int, density: float):
    """3D ellipsoids: centre (x, y, section), in-plane semi-axes, z half-length, angle."""
    if density == 0:
        return None
    per_section = density * tissue.h * tissue.w / 1e4
    span = sections + 8
    n = rng.poisson(per_section * span / 5.5)        # each is seen in ~5.5 sections
    return {
        "x": rng.uniform(0, tissue.w - 1, n),
        "y": rng.uniform(0, tissue.h - 1, n),
        "z": rng.uniform(-4, sections + 4, n),
        "a": rng.uniform(14.0, 28.0, n),              # semi-major, px
        "b": rng.uniform(9.0, 15.0, n),               # semi-minor, px
        "c": rng.uniform(1.5, 4.0, n),                # half-length, sections
        "theta": rng.uniform(0, np.pi, n),
        "drift": rng.normal(0, 1.0, (2, n)),          # px per section
        "period": rng.uniform(3.0, 4.5, n),           # cristae period, px
    }


def _draw_mitochondria(img, mitos, k: int, cell, near_face) -> None:
    """The sections through the mitochondria at section ``k``, clipped to their cell."""
    dzs = (k - mitos["z"]) / mitos["c"]
    sel = np.abs(dzs) < 1.0
    if not np.any(sel):
        return
    h, w = img.shape
    f = np.sqrt(1.0 - dzs[sel] ** 2)
    a = np.maximum(mitos["a"][sel] * f, 2.0)
    b = np.maximum(mitos["b"][sel] * np.sqrt(f), 2.0)
    cx = mitos["x"][sel] + mitos["drift"][0, sel] * (k - mitos["z"][sel])
    cy = mitos["y"][sel] + mitos["drift"][1, sel] * (k - mitos["z"][sel])
    inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    ix = np.clip(np.rint(cx), 0, w - 1).astype(int)
    iy = np.clip(np.rint(cy), 0, h - 1).astype(int)
    # a mitochondrion sits inside one cell, away from its membrane
    ok = inside & (near_face[iy, ix] > 0.6 * b)
    if not np.any(ok):
        return
    a, b, cx, cy, ix, iy = a[ok], b[ok], cx[ok], cy[ok], ix[ok], iy[ok]
    log.debug("section %d: %d mitochondria", k, len(a))
    theta = mitos["theta"][sel][ok]
    period = mitos["period"][sel][ok]
    owner = cell[iy, ix]
    rows, cols, dy, dx = _patches(cy, cx, 30)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = c * dx + s * dy          # along the major axis
    v = -s * dx + c * dy         # along the minor axis
    A, B = a[:, None, None], b[:, None, None]
    r = np.sqrt((u / A) ** 2 + (v / B) ** 2)
    edge = (1.0 - r) * B                                   # px inside the outline
    body = 1.0 / (1.0 + np.exp(-edge / 0.6))
    rim = np.exp(-0.5 * (edge / 0.9) ** 2)
    cristae = 0.5 + 0.5 * np.cos(2 * np.pi * u / period[:, None, None])
    dark = 40.0 * body + 25.0 * body * cristae + 45.0 * rim
    rr = np.clip(rows, 0, h - 1)
    cc = np.clip(cols, 0, w - 1)
    same = cell[rr, cc] == owner[:, None, None]
    _splat(img, rows, cols, -(dark * same))
