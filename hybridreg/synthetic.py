"""Random deformations with exact inverses: ground truth for training and for benchmarks.

A deformation is an analytic point map ``d`` in pixels, defined at *every* continuous point
``q = (x, y)`` of the plane, not only on pixel centres:

    d(q) = c + s R(theta) (q - c) + t - q   +   e(q)

an affine part (rotation ``theta`` about the image centre ``c``, isotropic scale ``s``,
shift ``t``) plus a smooth elastic part ``e``: a cubic B-spline whose coefficients sit on a
coarse control grid (as in elastix's B-spline transform). Because the B-spline weights are
non-negative and sum to one, ``|e_x|, |e_y| <= elastic_px`` everywhere.

Following the contract of :mod:`hybridreg.fields` (pull direction):

``forward``
    ``d`` sampled on the grid. The deformed image is ``deformed(q) = original(q + d(q))``,
    i.e. ``warp(original, forward)``.
``recovery``
    The field ``u`` with ``warp(deformed, u) == original``: for each fixed pixel ``p``,
    ``y = p + u(p)`` solves ``y + d(y) = p``. It is found per pixel by Newton's method on the
    analytic ``d`` (to 1e-5 px), not by inverting the sampled ``forward``, so it is exact up
    to the solver tolerance.

Magnitudes are in pixels; both fields are stored in physical units (``spacing_xy``), as
every field of hybridreg is. With anisotropic spacing the rotation is a rotation of the pixel
grid, not of physical space.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .checks import as_spacing_xy
from .fields import to_physical
from .io import cast_to_dtype
from .warp import warp

log = logging.getLogger(__name__)

__all__ = ["Deformation", "DeformedStack", "random_deformation", "deform_stack",
           "max_displacement_px", "MAGNITUDES", "DEFECTS", "Defect", "random_defect"]

#: The kinds of section defects :func:`deform_stack` can add (``defects=``).
DEFECTS = ("folds", "cracks", "debris")

#: The magnitude options of :func:`random_deformation` (and of :func:`deform_stack`),
#: with their defaults.
MAGNITUDES = {
    "max_rotation_deg": 2.0,
    "max_shift_px": 12.0,
    "max_scale": 0.02,
    "elastic_px": 6.0,
    "elastic_spacing_px": 64.0,
}

_TOL_PX = 1e-5
_MAX_NEWTON = 50


@dataclass(frozen=True, eq=False)
class Deformation:
    """One random deformation: its analytic point map and the fields sampled from it.

    Attributes
    ----------
    forward : ndarray, shape (2, H, W), float32
        ``d`` on the grid, physical units: ``deformed = warp(original, forward)``.
    recovery : ndarray, shape (2, H, W), float32
        Physical units: ``warp(deformed, recovery) == original`` (the exact inverse).
    spacing_xy : (float, float)
        Grid spacing of both fields.
    rotation_deg : float
        Rotation about the image centre ``((W - 1) / 2, (H - 1) / 2)``, degrees,
        counter-clockwise in (x, y) with y pointing down the rows.
    scale : float
        Isotropic scale of the affine part.
    shift_px : (float, float)
        Shift (x, y) of the affine part, pixels.
    control_px : ndarray, shape (2, Gy, Gx), float64
        B-spline coefficients (x, y) of the elastic part, pixels.
    control_origin_px : (float, float)
        Pixel position (x, y) of control node ``[0, 0]``.
    control_spacing_px : (float, float)
        Control node spacing (x, y), pixels.
    """

    forward: np.ndarray
    recovery: np.ndarray
    spacing_xy: tuple[float, float]
    rotation_deg: float
    scale: float
    shift_px: tuple[float, float]
    control_px: np.ndarray
    control_origin_px: tuple[float, float]
    control_spacing_px: tuple[float, float]

    @property
    def shape_yx(self) -> tuple[int, int]:
        return tuple(self.forward.shape[1:])

    def displacement_px(self, points_px: np.ndarray) -> np.ndarray:
        """Evaluate the analytic displacement ``d`` at continuous pixel points.

        Parameters
        ----------
        points_px : array_like, shape (2, ...)
            Points (x, y) in pixels, anywhere in the plane.

        Returns
        -------
        d : ndarray, shape (2, ...), float64, pixels
        """
        q = np.asarray(points_px, dtype=np.float64)
        if q.ndim < 1 or q.shape[0] != 2:
            raise ValueError(f"points_px must have shape (2, ...) with rows (x, y), "
                             f"got {q.shape}")
        return _displacement(q, self._affine(), self.control_px, self.control_origin_px,
                             self.control_spacing_px)

    def _affine(self):
        h, w = self.shape_yx
        return _affine_params(self.rotation_deg, self.scale, self.shift_px, (h, w))


@dataclass(frozen=True, eq=False)
class DeformedStack:
    """A stack deformed section by section, with the ground-truth fields.

    Attributes
    ----------
    stack : ndarray, shape (Z, H, W)
        The deformed sections, the input's dtype; section 0 is the input's section 0.
        Pixels sampled from outside the original are 0.
    labels : ndarray, shape (Z, H, W), or None
        The labels deformed with nearest-neighbour interpolation (0 outside).
    fields : ndarray, shape (Z, 2, H, W), float32
        Recovery fields, physical units: ``warp(stack[k], fields[k]) == original[k]``.
        ``fields[0]`` is zero. This is the ground truth a registration should find.
    forward_fields : ndarray, shape (Z, 2, H, W), float32
        ``stack[k] == warp(original[k], forward_fields[k])``.
    valid : ndarray of bool, shape (Z, H, W)
        True where the deformed pixel was sampled from inside the original section.
    spacing_xy : (float, float)
    masks : ndarray of uint8, shape (Z, H, W), or None
        With ``defects``: elastix's convention, 255 where the deformed section shows tissue
        to use, 0 on a defect (a fold's collapsed band, a crack's gap, debris).
    defects : list of list of Defect
        The defects of each section (empty without ``defects``).
    """

    stack: np.ndarray
    labels: np.ndarray | None
    fields: np.ndarray
    forward_fields: np.ndarray
    valid: np.ndarray
    spacing_xy: tuple[float, float]
    masks: np.ndarray | None = None
    defects: list | None = None


# --- the analytic map -------------------------------------------------------------------------

def _affine_params(rotation_deg, scale, shift_px, shape_yx):
    """(M, c, t) with the affine part of d(q) = M (q - c) + c + t - q."""
    h, w = shape_yx
    th = math.radians(rotation_deg)
    m = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    t = np.asarray(shift_px, dtype=np.float64)
    return m, c, t


def _displacement(q, affine, control, origin, spacing) -> np.ndarray:
    """d(q) in pixels for points q (2, ...) (x, y)."""
    m, c, t = affine
    shape = q.shape
    flat = q.reshape(2, -1)
    rel = flat - c[:, None]
    d = m @ rel + (c + t)[:, None] - flat
    if np.any(control):
        gx = (flat[0] - origin[0]) / spacing[0]
        gy = (flat[1] - origin[1]) / spacing[1]
        coords = np.stack([gy, gx])
        for i in range(2):
            d[i] += ndimage.map_coordinates(control[i], coords, order=3, mode="nearest",
                                            prefilter=False)
    return d.reshape(shape)


def _coarse_axis(n: int, step: int) -> np.ndarray:
    """Points 0 .. n - 1 about ``step`` apart, both ends included."""
    m = max(2, int(math.ceil((n - 1) / step)) + 1)
    return np.linspace(0.0, n - 1.0, m)


def _upsample_smooth(coarse: np.ndarray, shape_yx) -> np.ndarray:
    """Cubic-spline interpolation of (2, gy, gx) values on :func:`_coarse_axis` grids."""
    h, w = shape_yx
    gy, gx = coarse.shape[1:]
    cy = np.arange(h, dtype=np.float64) * (gy - 1) / max(h - 1, 1)
    cx = np.arange(w, dtype=np.float64) * (gx - 1) / max(w - 1, 1)
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    return np.stack([ndimage.map_coordinates(coarse[i], [yy, xx], order=3, mode="nearest")
                     for i in range(2)])


def _solve_inverse(shape_yx, affine, control, origin, spacing, *, tol_px=_TOL_PX,
                   step_px: int = 1):
    """For every pixel p, y with y + d(y) = p (Newton's method); returns y - p (2, H, W).

    With ``step_px > 1`` it is solved on a grid about ``step_px`` apart and interpolated
    (cubic spline), for speed where exactness is not needed (training samples).
    """
    h, w = shape_yx
    if step_px > 1:
        ys, xs = _coarse_axis(h, step_px), _coarse_axis(w, step_px)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
    else:
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64),
                             np.arange(w, dtype=np.float64), indexing="ij")
    p = np.stack([xx, yy])

    def d(q):
        return _displacement(q, affine, control, origin, spacing)

    y = p - d(p)
    eps = 1e-3
    res = np.inf
    for _ in range(_MAX_NEWTON):
        r = y + d(y) - p
        res = float(np.abs(r).max())
        if res < tol_px:
            break
        # Jacobian of q -> q + d(q) by central differences of the analytic d
        ex = np.array([eps, 0.0]).reshape(2, 1, 1)
        ey = np.array([0.0, eps]).reshape(2, 1, 1)
        dx = (d(y + ex) - d(y - ex)) / (2 * eps)   # column d/dx
        dy = (d(y + ey) - d(y - ey)) / (2 * eps)   # column d/dy
        a, b = 1.0 + dx[0], dy[0]
        cc, dd = dx[1], 1.0 + dy[1]
        det = a * dd - b * cc
        if np.any(det <= 0):
            raise ValueError("the deformation folds (its Jacobian determinant is <= 0 "
                             "somewhere), so it has no inverse; lower elastic_px or raise "
                             "elastic_spacing_px")
        y = y - np.stack([(dd * r[0] - b * r[1]) / det, (a * r[1] - cc * r[0]) / det])
    else:
        raise RuntimeError(f"inverting the deformation did not converge (largest residual "
                           f"{res:.3g} px after {_MAX_NEWTON} Newton steps)")
    if step_px > 1:
        return _upsample_smooth(y - p, (h, w))
    return y - p


# --- public API -------------------------------------------------------------------------------

def _check_magnitudes(magnitudes: dict) -> dict:
    unknown = set(magnitudes) - set(MAGNITUDES)
    if unknown:
        raise TypeError(f"unknown magnitude option(s) {sorted(unknown)}; expected some of "
                        f"{sorted(MAGNITUDES)}")
    out = dict(MAGNITUDES)
    for name, value in magnitudes.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be non-negative and finite, got {value!r}")
        out[name] = v
    if out["elastic_spacing_px"] <= 0:
        raise ValueError(f"elastic_spacing_px must be positive, got "
                         f"{out['elastic_spacing_px']!r}")
    if out["max_scale"] >= 1:
        raise ValueError(f"max_scale must be < 1 (a scale of 1 +- max_scale), got "
                         f"{out['max_scale']!r}")
    if out["max_rotation_deg"] > 45:
        raise ValueError(f"max_rotation_deg must be <= 45, got {out['max_rotation_deg']!r}")
    return out


def _check_shape(shape_yx) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape_yx)
    except (TypeError, ValueError):
        raise TypeError(f"shape_yx must be a pair (H, W) of integers, got {shape_yx!r}") from None
    if h < 2 or w < 2:
        raise ValueError(f"shape_yx must be at least (2, 2), got {tuple(shape_yx)}")
    return h, w


def max_displacement_px(shape_yx: Sequence[int], **magnitudes) -> float:
    """Upper bound on ``|d(q)|`` (pixels, Euclidean) over the image for these magnitudes."""
    h, w = _check_shape(shape_yx)
    mg = _check_magnitudes(magnitudes)
    s = 1.0 + mg["max_scale"]
    th = math.radians(mg["max_rotation_deg"])
    lin = math.sqrt(s * s - 2 * s * math.cos(th) + 1)   # largest |sR - I| over the ranges
    lin = max(lin, mg["max_scale"])
    r = 0.5 * math.hypot(w - 1, h - 1)
    return math.sqrt(2) * (mg["max_shift_px"] + mg["elastic_px"]) + lin * r


def random_deformation(shape_yx: Sequence[int], *, rng: np.random.Generator | None = None,
                       seed: int | None = None, spacing_xy=(1.0, 1.0),
                       solve_step_px: int = 1, **magnitudes) -> Deformation:
    """Draw a random affine + elastic deformation and its exact inverse.

    Parameters
    ----------
    shape_yx : (int, int)
        Grid shape (H, W).
    rng : numpy.random.Generator, optional
        The random source (advanced by the call); or give ``seed``. Exactly one is needed.
    seed : int, optional
        Seed for ``numpy.random.default_rng``.
    spacing_xy : (float, float)
        Grid spacing; the returned fields are in these physical units.
    max_rotation_deg : float, default 2.0
        Rotation about the image centre, uniform in +-max_rotation_deg (<= 45).
    max_shift_px : float, default 12.0
        Shift uniform in +-max_shift_px per axis, pixels.
    max_scale : float, default 0.02
        Isotropic scale uniform in 1 +- max_scale.
    elastic_px : float, default 6.0
        B-spline coefficients uniform in +-elastic_px per axis (bounds the elastic part).
    elastic_spacing_px : float, default 64.0
        Approximate control node spacing, pixels (the nodes span the image evenly).
    solve_step_px : int
        1 (default): ``forward`` and ``recovery`` are evaluated at every pixel, the recovery
        solved to 1e-5 px. Larger: both are evaluated on a grid about this many pixels
        apart and interpolated with a cubic spline, many times faster; with the default
        magnitudes and a step of 8 px the recovery is off the exact one by about 0.002 px
        on average and at most about 0.07 px (at the image edges; tested). For training samples, not for benchmarks.

    Returns
    -------
    Deformation
        With ``forward`` and ``recovery`` fields ``(2, H, W)`` float32 in physical units.

    Raises
    ------
    ValueError
        For negative or non-finite magnitudes, a grid smaller than 2 x 2, or a deformation
        that folds (no inverse).
    """
    h, w = _check_shape(shape_yx)
    mg = _check_magnitudes(magnitudes)
    spacing = as_spacing_xy(spacing_xy)
    if (rng is None) == (seed is None):
        raise TypeError("random_deformation needs exactly one of rng= (a numpy Generator) "
                        "or seed= (an int)")
    if rng is None:
        rng = np.random.default_rng(seed)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    rotation = float(rng.uniform(-1.0, 1.0) * mg["max_rotation_deg"])
    scale = float(1.0 + rng.uniform(-1.0, 1.0) * mg["max_scale"])
    shift = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 2) * mg["max_shift_px"])

    # control grid: nodes spanning the image evenly at about elastic_spacing_px, padded so
    # that every point the inverse may visit lies inside the grid
    sp = mg["elastic_spacing_px"]
    nx = max(2, int(round((w - 1) / sp)) + 1)
    ny = max(2, int(round((h - 1) / sp)) + 1)
    gsx = max((w - 1) / (nx - 1), 1e-6)
    gsy = max((h - 1) / (ny - 1), 1e-6)
    reach = max_displacement_px((h, w), **magnitudes)
    px = 2 + int(math.ceil(reach / gsx))
    py = 2 + int(math.ceil(reach / gsy))
    control = rng.uniform(-1.0, 1.0, (2, ny + 2 * py, nx + 2 * px)) * mg["elastic_px"]
    origin = (-px * gsx, -py * gsy)
    spacing_px = (gsx, gsy)

    affine = _affine_params(rotation, scale, shift, (h, w))
    step = int(solve_step_px)
    if step < 1:
        raise ValueError(f"solve_step_px must be >= 1, got {solve_step_px!r}")
    if step > 1:
        yy, xx = np.meshgrid(_coarse_axis(h, step), _coarse_axis(w, step), indexing="ij")
        forward_px = _upsample_smooth(
            _displacement(np.stack([xx, yy]), affine, control, origin, spacing_px), (h, w))
    else:
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64),
                             np.arange(w, dtype=np.float64), indexing="ij")
        forward_px = _displacement(np.stack([xx, yy]), affine, control, origin, spacing_px)
    recovery_px = _solve_inverse((h, w), affine, control, origin, spacing_px, step_px=step)
    return Deformation(
        forward=to_physical(forward_px, spacing),
        recovery=to_physical(recovery_px, spacing),
        spacing_xy=spacing,
        rotation_deg=rotation,
        scale=scale,
        shift_px=shift,
        control_px=control,
        control_origin_px=origin,
        control_spacing_px=spacing_px,
    )


@dataclass(frozen=True)
class Defect:
    """One defect of a deformed section, in its (final) pixel grid.

    ``kind`` is ``"fold"``, ``"crack"`` or ``"debris"``. Folds and cracks lie along the line
    through ``centre`` (x, y) with unit normal ``normal`` (x, y); ``width`` (px) is the band
    of tissue a fold collapses onto the line, or the gap a crack opens (the two sides move
    apart by half of it each). Debris is a dark ellipse at ``centre`` with semi-axes
    ``axes`` (px).
    """

    kind: str
    centre: tuple
    normal: tuple = (0.0, 1.0)
    width: float = 0.0
    axes: tuple = (0.0, 0.0)

    def side(self, x, y):
        """Signed distance (px) of points from the line (folds, cracks)."""
        return (x - self.centre[0]) * self.normal[0] + (y - self.centre[1]) * self.normal[1]

    def pull(self, x, y):
        """``D`` with ``final(q) = before(q + D(q))`` at final points ``q``: the tissue on
        each side of a crack moved apart by ``width / 2``, of a fold towards the line by as
        much; zero for debris and in a crack's gap (empty) and a fold's line."""
        if self.kind == "debris":
            return np.zeros_like(x), np.zeros_like(y)
        s = self.side(x, y)
        sign = np.sign(s)
        half = self.width / 2.0
        if self.kind == "crack":
            shift = np.where(np.abs(s) > half, -sign * half, 0.0)
        else:  # fold: the band |s| < width / 2 of the tissue before is folded under
            shift = sign * half
        return shift * self.normal[0], shift * self.normal[1]

    def push(self, x, y):
        """``E`` with ``before(x) = final(x + E(x))`` at points ``x`` before the defect:
        the inverse of :meth:`pull` (a fold's collapsed band goes onto its line)."""
        if self.kind == "debris":
            return np.zeros_like(x), np.zeros_like(y)
        s = self.side(x, y)
        half = self.width / 2.0
        if self.kind == "crack":
            shift = np.sign(s) * half
        else:
            shift = np.where(np.abs(s) > half, -np.sign(s) * half, -s)
        return shift * self.normal[0], shift * self.normal[1]

    def masked(self, x, y):
        """True on the final points the defect spoils (the crack's gap, the fold's line
        with a pixel either side, the debris)."""
        if self.kind == "debris":
            ax, ay = self.axes
            return ((x - self.centre[0]) / ax) ** 2 + ((y - self.centre[1]) / ay) ** 2 <= 1.0
        s = self.side(x, y)
        return np.abs(s) <= (self.width / 2.0 if self.kind == "crack" else 1.5)


def random_defect(kind: str, shape_yx, rng: np.random.Generator) -> Defect:
    """A defect of ``kind`` (``"folds"``, ``"cracks"``, ``"debris"``) placed at random: a
    line through the central half at any angle; a fold 6-20 px wide, a crack opening
    4-12 px, one ellipse of debris 6-24 px across."""
    h, w = shape_yx
    centre = (float(rng.uniform(0.25, 0.75) * (w - 1)), float(rng.uniform(0.25, 0.75) * (h - 1)))
    if kind == "debris":
        return Defect("debris", centre, axes=(float(rng.uniform(3, 12)),
                                             float(rng.uniform(3, 12))))
    angle = float(rng.uniform(0, np.pi))
    normal = (math.cos(angle), math.sin(angle))
    width = float(rng.uniform(6, 20) if kind == "folds" else rng.uniform(4, 12))
    return Defect("fold" if kind == "folds" else "crack", centre, normal, width)


def deform_stack(stack: np.ndarray, *, seed: int, labels: np.ndarray | None = None,
                 spacing_xy=(1.0, 1.0), order: int = 3, defects: Sequence[str] = (),
                 defect_fraction: float = 0.5, **magnitudes) -> DeformedStack:
    """Deform every section but the first with its own random deformation.

    Section 0 is returned unchanged (its fields are zero); section ``k >= 1`` gets an
    independent :func:`random_deformation`, all drawn from one
    ``numpy.random.default_rng(seed)``, so the result is a deterministic function of
    ``seed``.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W)
        Z >= 1 sections of at least 2 x 2 pixels.
    seed : int
    labels : ndarray of int, shape (Z, H, W), optional
        Deformed with nearest-neighbour interpolation.
    spacing_xy : (float, float)
        Grid spacing; the fields are in these physical units.
    order : int
        Interpolation order for the image (1 bilinear, 3 cubic). Integer images are rounded
        and clipped to their dtype's range.
    defects : sequence of str
        Kinds of section defects to add (:data:`DEFECTS`): each section but the first gets
        each kind with probability ``defect_fraction``, placed by :func:`random_defect`,
        after its smooth deformation. The truth stays exact: the forward field is the
        defect's piecewise translation composed with the smooth map, the recovery field the
        smooth recovery composed with the defect's inverse (a crack's two sides apart, a
        fold's band collapsed onto its line). The defects come from their own random
        stream: the same ``seed`` without ``defects`` gives the same case without them.
    defect_fraction : float
        Probability per section and kind, in [0, 1].
    **magnitudes
        The options of :func:`random_deformation` (``max_rotation_deg``, ``max_shift_px``,
        ``max_scale``, ``elastic_px``, ``elastic_spacing_px``), pixels.

    Returns
    -------
    DeformedStack
    """
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (Z, H, W), got shape {arr.shape}")
    z, h, w = arr.shape
    if z < 1:
        raise ValueError("stack must have at least one section (Z >= 1), got Z = 0")
    if h < 2 or w < 2:
        raise ValueError(f"sections must be at least 2 x 2 pixels, got {h} x {w}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == bool):
        raise ValueError(f"stack must be numeric, got dtype {arr.dtype}")
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be a spline order 0-5, got {order!r}")
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != arr.shape:
            raise ValueError(f"labels has shape {lab.shape}, expected the stack's {arr.shape}")
        if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    _check_magnitudes(magnitudes)
    spacing = as_spacing_xy(spacing_xy)
    defects = [defects] if isinstance(defects, str) else list(defects)
    unknown = sorted(set(defects) - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown defect kind(s) {unknown}; choose from {', '.join(DEFECTS)}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction!r}")
    defect_rng = np.random.default_rng([int(seed), 17])  # its own stream: see `defects`
    masks = np.full((z, h, w), 255, np.uint8) if defects else None
    placed: list = [[] for _ in range(z)]

    rng = np.random.default_rng(seed)
    out = np.empty_like(arr)
    out_labels = None if lab is None else np.empty_like(lab)
    fields = np.zeros((z, 2, h, w), dtype=np.float32)
    forward = np.zeros((z, 2, h, w), dtype=np.float32)
    valid = np.ones((z, h, w), dtype=bool)
    out[0] = arr[0]
    if lab is not None:
        out_labels[0] = lab[0]
    for k in range(1, z):
        dfm = random_deformation((h, w), rng=rng, spacing_xy=spacing, **magnitudes)
        fields[k] = dfm.recovery
        forward[k] = dfm.forward
        kinds = [kind for kind in defects if defect_rng.uniform() < defect_fraction]
        placed[k] = [random_defect(kind, (h, w), defect_rng) for kind in kinds]
        spoiled = None
        if placed[k]:
            forward[k], fields[k], spoiled = _with_defects(dfm, placed[k], (h, w), spacing)
            masks[k][np.any(spoiled, axis=0)] = 0
        warped, valid[k] = warp(arr[k].astype(np.float32), forward[k], spacing_xy=spacing,
                                order=order, cval=0.0)
        if spoiled is not None:
            warped = _paint_defects(warped, placed[k], spoiled, arr[k])
        out[k] = cast_to_dtype(warped, arr.dtype)
        if lab is not None:
            out_labels[k] = warp(lab[k], forward[k], spacing_xy=spacing, order=0, cval=0)[0]
            if spoiled is not None:
                out_labels[k][masks[k] == 0] = 0
        log.debug("section %d: rotation %.3f deg, scale %.4f, shift (%.2f, %.2f) px", k,
                  dfm.rotation_deg, dfm.scale, *dfm.shift_px)
    return DeformedStack(stack=out, labels=out_labels, fields=fields, forward_fields=forward,
                         valid=valid, spacing_xy=spacing, masks=masks, defects=placed)


def _with_defects(dfm, placed, shape_yx, spacing):
    """``(forward, recovery, spoiled)`` of a smooth deformation followed by the ``placed``
    defects, in order, exact (the smooth map evaluated analytically): a final point is
    pulled through the defects, last first, then through the smooth map; an original point
    goes through the smooth recovery, then pushed through the defects, first first.
    ``spoiled``: one mask per defect, in the final grid."""
    from .fields import to_pixels

    h, w = shape_yx
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    px, py = x, y
    spoiled = []
    for d in reversed(placed):
        spoiled.append(d.masked(px, py))  # where this defect shows, seen through later ones
        dx, dy = d.pull(px, py)
        px, py = px + dx, py + dy
    spoiled.reverse()
    src = np.stack([px, py])
    fwd = src + dfm.displacement_px(src) - np.stack([x, y])
    rec = to_pixels(dfm.recovery, spacing).astype(np.float64)
    rx, ry = x + rec[0], y + rec[1]
    for d in placed:
        ex, ey = d.push(rx, ry)
        rx, ry = rx + ex, ry + ey
    recovery = np.stack([rx - x, ry - y])
    return (to_physical(fwd, spacing).astype(np.float32),
            to_physical(recovery, spacing).astype(np.float32), spoiled)


def _paint_defects(warped: np.ndarray, placed, spoiled, original: np.ndarray) -> np.ndarray:
    """What a defect looks like: a crack's gap empty (0), a fold a dark line (two layers of
    tissue), debris a dark blob."""
    dark = float(np.percentile(original, 2))
    out = warped.copy()
    for d, where in zip(placed, spoiled):
        out[where] = 0.0 if d.kind == "crack" else dark * 0.5
    return out
