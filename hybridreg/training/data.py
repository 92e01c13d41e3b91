"""What training draws: intensities on the networks' scale, crops and registration windows.

:class:`StackSampler` takes random crops of stacks ``(Z, H, W)``: single sections for the
autoencoder, and windows of aligned sections whose next section is deformed by a known
random deformation (:func:`hybridreg.synthetic.random_deformation`) for the registration
network. Every draw takes a ``numpy.random.Generator``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..synthetic import MAGNITUDES, max_displacement_px, random_deformation
from .loop import check_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = ["StackSampler", "eight_bit_scaling"]


# --- intensities ------------------------------------------------------------------------------

def eight_bit_scaling(stack) -> tuple[float, float]:
    """The linear map ``(gain, offset)``, ``x8 = gain * x + offset``, taking a stack to the
    8-bit scale 0..255 the networks are fed (after :func:`hybridreg.models.normalize`):
    :func:`hybridreg.methods.neural.intensity_map` with ``how="auto"`` (``uint8`` as is,
    floats in [0, 1] times 255, others by their 0.1 and 99.9 percentiles). Use the same
    map at inference as in training: the CLI and the API use it by default."""
    from ..methods.neural import intensity_map

    return tuple(intensity_map(stack, "auto"))


def _normalised(region: np.ndarray, gain: float, offset: float) -> np.ndarray:
    from ..models import FAEMREG_MEAN, FAEMREG_STD

    x = region.astype(np.float32) * np.float32(gain) + np.float32(offset)
    return (x - np.float32(FAEMREG_MEAN)) / np.float32(FAEMREG_STD)


# --- the stacks -------------------------------------------------------------------------------

def _as_stacks(stacks) -> tuple[list[np.ndarray], list[str]]:
    """Arrays, hybridreg.io.Stack objects or paths (one or a sequence) to arrays and names."""
    from ..io import Stack, read_stack

    if isinstance(stacks, (np.ndarray, Stack, str, os.PathLike)):
        stacks = [stacks]
    try:
        items = list(stacks)
    except TypeError:
        raise TypeError(f"stacks must be an array (Z, H, W), a hybridreg.io.Stack, a path, or "
                        f"a sequence of them; got {type(stacks).__name__}") from None
    if not items:
        raise ValueError("no stacks given")
    arrays, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            st = read_stack(item)
            arr, name = st.data, os.fspath(item)
        elif isinstance(item, Stack):
            arr, name = item.data, item.path or f"stack[{i}]"
        else:
            arr = np.asarray(item)
            name = f"array[{i}] {tuple(arr.shape)} {arr.dtype}"
        if arr.ndim != 3:
            raise ValueError(f"stack {i} must have shape (Z, H, W), got shape {arr.shape}")
        if arr.dtype.kind not in "uifb":
            raise TypeError(f"stack {i} must hold numeric intensities, got dtype {arr.dtype}")
        if arr.shape[0] < 1:
            raise ValueError(f"stack {i} has no sections")
        arrays.append(arr)
        names.append(name)
    return arrays, names


def _exclusions(exclude, n_stacks: int) -> list[set[int]]:
    out = [set() for _ in range(n_stacks)]
    if exclude is None:
        return out
    if isinstance(exclude, Mapping):
        for key, secs in exclude.items():
            i = int(key)
            if not 0 <= i < n_stacks:
                raise ValueError(f"exclude names stack {i}, but there are {n_stacks} stacks")
            out[i].update(int(s) for s in secs)
        return out
    secs = {int(s) for s in exclude}
    for s in out:
        s.update(secs)
    return out


def _d4(a: np.ndarray, op: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations of the last two axes (op in 0..7)."""
    if op >= 4:
        a = a[..., ::-1]
    return np.rot90(a, op % 4, axes=(-2, -1))


# --- sampling ---------------------------------------------------------------------------------

class StackSampler:
    """Random crops of stacks for training: single sections, and registration windows.

    Parameters
    ----------
    stacks : ndarray (Z, H, W), hybridreg.io.Stack, path, or a sequence of them
        ``uint8``, ``uint16`` or float intensities; paths are read with
        :func:`hybridreg.io.read_stack`. Registration windows need aligned stacks.
    crop : int
        Side of the square crops, pixels; at most the smallest section side.
    deformation : dict, optional
        Magnitudes of the synthetic deformation of the moving section, the options of
        :func:`hybridreg.synthetic.random_deformation` (defaults there: rotation 2 deg,
        shift 12 px, scale 0.02, elastic 6 px, elastic spacing 64 px), drawn on the crop.
    reference_jitter_px : float
        Each reference of a window gets its own small smooth random displacement (a shift
        plus a B-spline elastic part on the same control spacing), at most this many
        pixels per axis: in sequential alignment the references are themselves imperfectly
        aligned. 0 turns it off.
    augment : bool
        Random flips and 90-degree rotations (the same for all sections of a window).
    exclude : iterable of int, or mapping {stack index: iterable of int}, optional
        Sections never drawn (e.g. held out for validation): ints apply to every stack.
        A window is drawn only if none of its sections is excluded.
    seed : int
        Seed of the generator used when a draw gets no ``rng``.
    solve_step_px : int
        The deformation and its recovery are computed on a grid this many pixels apart and
        interpolated (:func:`hybridreg.synthetic.random_deformation`); 1 for the exact truth.

    Notes
    -----
    Intensities: ``normalize(gain * x + offset)`` with :func:`eight_bit_scaling` per stack
    (``uint8`` is used as is) and FAEMReg's mean 144.6 and std 33.4.

    To keep black borders out of the moving section, a window reads a region larger than
    the crop by the largest displacement the deformation can make
    (:func:`hybridreg.synthetic.max_displacement_px`) on each side, placed inside the
    section when the section is large enough; otherwise the region is padded by
    replicating the edge and ``valid`` excludes what came from outside.
    """

    def __init__(self, stacks, *, crop: int, deformation: Mapping[str, float] | None = None,
                 reference_jitter_px: float = 1.5, augment: bool = True,
                 exclude=None, seed: int = 0, solve_step_px: int = 8):
        self.stacks, self.names = _as_stacks(stacks)
        try:
            crop = int(crop)
        except (TypeError, ValueError):
            raise TypeError(f"crop must be an int, got {crop!r}") from None
        if crop < 8:
            raise ValueError(f"crop must be at least 8 px, got {crop}")
        for i, s in enumerate(self.stacks):
            if min(s.shape[1:]) < crop:
                raise ValueError(f"crop {crop} px is larger than the sections of stack {i} "
                                 f"({self.names[i]}: {s.shape[1]} x {s.shape[2]} px)")
        self.crop = crop
        self.deformation = {**MAGNITUDES, **dict(deformation or {})}
        # validates the magnitudes too
        self.margin = int(math.ceil(max_displacement_px((crop, crop), **self.deformation))) + 2
        self.reference_jitter_px = float(reference_jitter_px)
        if not (self.reference_jitter_px >= 0 and math.isfinite(self.reference_jitter_px)):
            raise ValueError(f"reference_jitter_px must be >= 0, got {reference_jitter_px!r}")
        self.augment = bool(augment)
        self.solve_step_px = check_int("solve_step_px", solve_step_px, 1)
        self.excluded = _exclusions(exclude, len(self.stacks))
        self.scaling = [eight_bit_scaling(s) for s in self.stacks]
        self._rng = np.random.default_rng(seed)
        self._sections = [(i, k) for i, s in enumerate(self.stacks) for k in range(s.shape[0])
                          if k not in self.excluded[i]]
        if not self._sections:
            raise ValueError("every section is excluded: nothing to sample")
        yy, xx = np.meshgrid(np.arange(crop, dtype=np.float64),
                             np.arange(crop, dtype=np.float64), indexing="ij")
        self._grid_xy = np.stack([xx, yy])

    def __repr__(self) -> str:
        return (f"StackSampler({len(self.stacks)} stacks, {len(self._sections)} sections, "
                f"crop={self.crop}, margin={self.margin})")

    # --- helpers -------------------------------------------------------------------------

    def _rng_or_own(self, rng):
        if rng is None:
            return self._rng
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng

    def windows_available(self, references: int) -> list[tuple[int, int]]:
        """``(stack, moving section)`` of every window of ``references`` + 1 sections."""
        out = []
        for i, s in enumerate(self.stacks):
            ex = self.excluded[i]
            for k in range(references, s.shape[0]):
                if not any(j in ex for j in range(k - references, k + 1)):
                    out.append((i, k))
        return out

    def _corner(self, rng, size: int, extent: int) -> int:
        """Top-left of a crop: with its margin inside the section when that fits."""
        m = self.margin
        if extent >= size + 2 * m:
            return int(rng.integers(m, extent - size - m + 1))
        return int(rng.integers(0, extent - size + 1))

    def _region(self, i: int, ks: Sequence[int], y0: int, x0: int, m: int):
        """Sections ``ks`` of stack ``i`` over the crop at (y0, x0) plus ``m`` on each side.

        Returns the normalised region (len(ks), S, S) float32, edge-replicated outside the
        section, and the inside mask (S, S) bool.
        """
        st = self.stacks[i]
        _, h, w = st.shape
        s = self.crop + 2 * m
        ya, xa = y0 - m, x0 - m
        yb, xb = ya + s, xa + s
        cy0, cx0, cy1, cx1 = max(ya, 0), max(xa, 0), min(yb, h), min(xb, w)
        raw = np.asarray(st[list(ks), cy0:cy1, cx0:cx1])
        region = _normalised(raw, *self.scaling[i])
        pad = ((0, 0), (cy0 - ya, yb - cy1), (cx0 - xa, xb - cx1))
        inside = np.zeros((s, s), dtype=bool)
        inside[pad[1][0]:s - pad[1][1], pad[2][0]:s - pad[2][1]] = True
        if any(p != (0, 0) for p in pad[1:]):
            region = np.pad(region, pad, mode="edge")
        return region, inside

    def _jitter(self, rng) -> np.ndarray:
        """A small smooth displacement (2, crop, crop), at most the jitter per axis."""
        c = self.crop
        half = self.reference_jitter_px / 2
        shift = rng.uniform(-1.0, 1.0, 2) * half
        sp = self.deformation["elastic_spacing_px"]
        n = max(2, int(round((c - 1) / sp)) + 1)
        # non-prefiltered cubic B-spline of the coefficients: bounded by their largest value
        coef = np.pad(rng.uniform(-1.0, 1.0, (2, n, n)) * half, ((0, 0), (1, 1), (1, 1)),
                      mode="edge")
        scale = (n - 1) / max(c - 1, 1)
        coords = np.stack([self._grid_xy[1] * scale + 1, self._grid_xy[0] * scale + 1])
        e = np.stack([ndimage.map_coordinates(coef[j], coords, order=3, mode="nearest",
                                              prefilter=False) for j in range(2)])
        return e + shift.reshape(2, 1, 1)

    @staticmethod
    def _sample(img: np.ndarray, pts_xy: np.ndarray, order: int = 1, mode="nearest",
                cval: float = 0.0) -> np.ndarray:
        return ndimage.map_coordinates(img, np.stack([pts_xy[1], pts_xy[0]]), order=order,
                                       mode=mode, cval=cval, prefilter=False)

    # --- draws ---------------------------------------------------------------------------

    def sections(self, batch: int, *, rng: np.random.Generator | None = None) -> "torch.Tensor":
        """Random crops of random sections, for the autoencoder.

        Parameters
        ----------
        batch : int
        rng : numpy.random.Generator, optional
            Default: the sampler's own (seeded) generator.

        Returns
        -------
        Tensor, shape (batch, 1, crop, crop), float32, normalised
        """
        import torch

        rng = self._rng_or_own(rng)
        c = self.crop
        out = np.empty((int(batch), 1, c, c), dtype=np.float32)
        for b in range(int(batch)):
            i, k = self._sections[int(rng.integers(len(self._sections)))]
            _, h, w = self.stacks[i].shape
            y0 = int(rng.integers(0, h - c + 1))
            x0 = int(rng.integers(0, w - c + 1))
            img = _normalised(np.asarray(self.stacks[i][k, y0:y0 + c, x0:x0 + c]),
                              *self.scaling[i])
            if self.augment:
                img = _d4(img, int(rng.integers(8)))
            out[b, 0] = img
        return torch.from_numpy(out)

    def windows(self, batch: int, *, references: int = 3,
                rng: np.random.Generator | None = None,
                debug: bool = False) -> dict[str, "torch.Tensor"]:
        """Registration windows with a known answer.

        Each window is ``references`` consecutive aligned sections of one stack (oldest
        first) and the next section, deformed by its own
        :func:`~hybridreg.synthetic.random_deformation` drawn on the crop (with the
        sampler's ``deformation`` magnitudes); the references get their own small jitter
        (``reference_jitter_px``).

        Parameters
        ----------
        batch : int
        references : int
            Number k of references (>= 1).
        rng : numpy.random.Generator, optional
        debug : bool
            Also return ``original``, the undeformed moving crop.

        Returns
        -------
        dict of Tensor
            ``references`` (B, k, crop, crop) float32, normalised, oldest first;
            ``moving`` (B, 1, crop, crop) float32, normalised, deformed;
            ``truth`` (B, 2, crop, crop) float32, pixels, channel 0 = x: the exact recovery
            field, ``warp(moving, truth)`` is the undeformed section (pull direction);
            ``valid`` (B, 1, crop, crop) bool: where ``p + truth(p)`` lies inside the crop
            and was read from inside the section, so the recovery is defined there;
            ``original`` (B, 1, crop, crop) float32 with ``debug=True``.
        """
        import torch

        rng = self._rng_or_own(rng)
        k = int(references)
        if k < 1:
            raise ValueError(f"references must be >= 1, got {references}")
        avail = self.windows_available(k)
        if not avail:
            raise ValueError(f"no window of {k} references + 1 moving section: the stacks "
                             f"(lengths {[s.shape[0] for s in self.stacks]}) need at least "
                             f"{k + 1} consecutive sections that are not excluded")
        c, m, b_n = self.crop, self.margin, int(batch)
        refs = np.empty((b_n, k, c, c), dtype=np.float32)
        moving = np.empty((b_n, 1, c, c), dtype=np.float32)
        truth = np.empty((b_n, 2, c, c), dtype=np.float32)
        valid = np.empty((b_n, 1, c, c), dtype=bool)
        original = np.empty((b_n, 1, c, c), dtype=np.float32) if debug else None
        lim = c - 1 + 1e-4
        for b in range(b_n):
            i, km = avail[int(rng.integers(len(avail)))]
            _, h, w = self.stacks[i].shape
            y0, x0 = self._corner(rng, c, h), self._corner(rng, c, w)
            region, inside = self._region(i, range(km - k, km + 1), y0, x0, m)
            if self.augment:
                op = int(rng.integers(8))
                region, inside = _d4(region, op), _d4(inside, op)
            inside_f = inside.astype(np.float32)
            dfm = random_deformation((c, c), rng=rng, solve_step_px=self.solve_step_px,
                                     **self.deformation)
            fwd, rec = dfm.forward, dfm.recovery  # spacing 1: pixels
            # the moving section: deformed(q) = original(q + d(q)), read from the region
            pts = self._grid_xy + m + fwd
            moving[b, 0] = self._sample(region[k], pts)
            read_inside = self._sample(inside_f, pts, mode="constant") > 0.999
            for j in range(k):
                if self.reference_jitter_px > 0:
                    refs[b, j] = self._sample(region[j], self._grid_xy + m + self._jitter(rng))
                else:
                    refs[b, j] = region[j, m:m + c, m:m + c]
            truth[b] = rec
            q = self._grid_xy + rec
            in_crop = ((q[0] >= -1e-4) & (q[0] <= lim) & (q[1] >= -1e-4) & (q[1] <= lim))
            came_inside = self._sample(read_inside.astype(np.float32), q,
                                       mode="constant") > 0.999
            valid[b, 0] = in_crop & came_inside
            if debug:
                original[b, 0] = region[k, m:m + c, m:m + c]
        out = {"references": torch.from_numpy(refs), "moving": torch.from_numpy(moving),
               "truth": torch.from_numpy(truth), "valid": torch.from_numpy(valid)}
        if debug:
            out["original"] = torch.from_numpy(original)
        return out
