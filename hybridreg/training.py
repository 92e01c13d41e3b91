"""Training the feature autoencoder and the registration network, and sampling from stacks.

Everything here needs no human labels. The feature autoencoder learns to reconstruct EM
sections (ssEMnet, FAEMReg); the registration network (:class:`~hybridreg.models.FAEMRegNet`)
learns from windows of *aligned* sections whose next section is deformed by a known random
deformation (:func:`hybridreg.synthetic.random_deformation`), so the exact answer of every
training window is known.

Sampling (:class:`StackSampler`)
    Random crops of one or more stacks ``(Z, H, W)``, normalised for the networks with
    :func:`hybridreg.models.normalize` (FAEMReg's 8-bit mean and std) after
    :func:`eight_bit_scaling` has taken them to the 8-bit scale: ``uint8`` as is, other
    dtypes by a linear map (see there). Every draw takes a ``numpy.random.Generator``.

Training (:func:`train_features`, :func:`train_registration`, :func:`finetune`)
    Adam, one CPU or CUDA device, deterministic per ``seed``: the weights are initialised
    after ``torch.manual_seed(seed)`` and the batch of step ``s`` is drawn from
    ``numpy.random.default_rng([seed, tag, s])``, so a run's result does not depend on
    where it was interrupted. The model is written with :func:`hybridreg.models.save_model`
    to ``out``; next to it, :func:`state_path` (``<out stem>.state.safetensors``) holds what
    resuming needs: the weights, the optimizer's tensors, the step, the options, the loss
    history and the torch RNG state (safetensors tensors plus JSON metadata; never pickle).
    ``resume=True`` continues from it and ends with the same weights as an uninterrupted
    run (on the CPU; CUDA kernels are not bit-deterministic).

Example
    ::

        from hybridreg.training import (evaluate_registration, train_features,
                                        train_registration)
        train_features("train.tif", out="ae.safetensors", steps=2000)
        train_registration("train.tif", out="net.safetensors", features="ae.safetensors",
                           preset="compact", steps=5000, validation="val.tif")
        evaluate_registration("net.safetensors", "val.tif")["epe_px"]

Units
    Fields are pixel displacements ``(B, 2, H, W)``, channel 0 = x, in the pull direction of
    :mod:`hybridreg.fields` (``warped(p) = moving(p + u(p))``). Endpoint errors are pixels.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .synthetic import MAGNITUDES, max_displacement_px, random_deformation

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "StackSampler",
    "eight_bit_scaling",
    "LossWeights",
    "TrainingLog",
    "train_features",
    "train_registration",
    "finetune",
    "evaluate_registration",
    "registration_losses",
    "state_path",
    "LR_SCHEDULES",
]

#: Learning-rate schedules: functions of the step, so resuming needs no scheduler state.
LR_SCHEDULES = ("constant", "step", "cosine")

STATE_KEY = "hybridreg_training_state"
STATE_FORMAT_VERSION = 1

# tags that keep the random streams of the different uses apart
_TAG_FEATURES = 1
_TAG_REGISTRATION = 2
_TAG_EVALUATION = 3


# --- intensities ------------------------------------------------------------------------------

def eight_bit_scaling(stack: np.ndarray) -> tuple[float, float]:
    """The linear map ``x8 = gain * x + offset`` taking a stack to the 8-bit scale 0..255.

    The networks are fed ``normalize(x8)`` with FAEMReg's statistics of 8-bit EM data
    (:func:`hybridreg.models.normalize`); this decides ``x8`` for any dtype:

    - ``uint8`` and ``bool``: unchanged, ``(1, 0)``;
    - float data within [0, 1]: ``(255, 0)``; float data within [0, 255]: unchanged;
    - anything else (``uint16``, other integers, other floats): the stack's 0.1 and 99.9
      percentiles go to 0 and 255. ``uint16`` EM data rarely fills 0..65535 (12-bit
      cameras, narrow histograms), so a fixed ``255 / 65535`` would squash it.

    Use the same map at inference as in training.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W) (or any shape)

    Returns
    -------
    (gain, offset) : (float, float)
    """
    arr = np.asarray(stack)
    if arr.dtype == np.uint8 or arr.dtype == bool:
        return 1.0, 0.0
    if arr.dtype.kind not in "uif":
        raise TypeError(f"stack must hold numeric intensities, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError("stack is empty")
    # a strided subsample is plenty for the range and the percentiles
    step = max(1, int(math.sqrt(arr.size / 4_000_000)))
    sub = arr[..., ::step, ::step] if arr.ndim >= 2 else arr[::step]
    sub = sub.astype(np.float64, copy=False)
    lo_all, hi_all = float(sub.min()), float(sub.max())
    if arr.dtype.kind == "f":
        if lo_all >= 0 and hi_all <= 1:
            return 255.0, 0.0
        if lo_all >= 0 and hi_all <= 255:
            return 1.0, 0.0
    lo, hi = (float(v) for v in np.percentile(sub, [0.1, 99.9]))
    if not hi > lo:
        log.warning("eight_bit_scaling: the stack is flat (%g); mapping it to 128", lo)
        return 1.0, 128.0 - lo
    gain = 255.0 / (hi - lo)
    return gain, -lo * gain


def _normalised(region: np.ndarray, gain: float, offset: float) -> np.ndarray:
    from .models import FAEMREG_MEAN, FAEMREG_STD

    x = region.astype(np.float32) * np.float32(gain) + np.float32(offset)
    return (x - np.float32(FAEMREG_MEAN)) / np.float32(FAEMREG_STD)


# --- sampling ---------------------------------------------------------------------------------

def _as_stacks(stacks) -> tuple[list[np.ndarray], list[str]]:
    """Arrays, hybridreg.io.Stack objects or paths (one or a sequence) to arrays and names."""
    from .io import Stack, read_stack

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
        interpolated (:func:`hybridreg.synthetic.random_deformation`): with 8, the truth is
        within 0.002 px on average (0.07 px at most, at the crop's edges) of the exact one,
        at a small fraction of the cost. 1 for the exact truth.

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
        self.solve_step_px = _check_int("solve_step_px", solve_step_px, 1)
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


# --- configuration and results ----------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms of the registration loss (see :func:`train_registration`).

    Attributes
    ----------
    feature : float
        Feature similarity of the warped moving section and each reference through the
        frozen autoencoder (mean squared difference, masked).
    smooth : float
        Smoothness of the field (FAEMReg: 3, mean absolute forward differences).
    ncc : float
        Local normalised cross-correlation (``1 - NCC`` in 9 px boxes) of intensities of the
        warped moving section and each reference.
    epe : float
        Mean endpoint error (pixels) against the known synthetic field, on valid pixels.
    reference_weights : tuple of float, optional
        Weight of each reference in the feature and NCC terms, oldest first. Default
        FAEMReg's ``(0.33, 0.5, 1.0)`` (nearest last), its last k for k < 3 references,
        and 0.33 for the older ones for k > 3.
    """

    feature: float = 1.0
    smooth: float = 3.0
    ncc: float = 0.0
    epe: float = 1.0
    reference_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("feature", "smooth", "ncc", "epe"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {v!r}")
        if self.reference_weights is not None:
            rw = tuple(float(v) for v in self.reference_weights)
            if not rw or any(not (math.isfinite(v) and v >= 0) for v in rw):
                raise ValueError(f"reference_weights must be non-negative numbers, got "
                                 f"{self.reference_weights!r}")
            object.__setattr__(self, "reference_weights", rw)

    def for_references(self, k: int) -> tuple[float, ...]:
        """The weights of ``k`` references, oldest first."""
        if self.reference_weights is not None:
            if len(self.reference_weights) != k:
                raise ValueError(f"reference_weights has {len(self.reference_weights)} "
                                 f"weights for {k} references")
            return self.reference_weights
        from .models import FAEMREG_FEATURE_WEIGHTS

        base = tuple(FAEMREG_FEATURE_WEIGHTS)
        if k <= len(base):
            return base[len(base) - k:]
        return (base[0],) * (k - len(base)) + base


@dataclass(frozen=True)
class TrainingLog:
    """What a training run did.

    Attributes
    ----------
    steps : int
        Steps completed (in total, over all resumed runs).
    seconds : float
        Training time in seconds, over all resumed runs.
    history : tuple of dict
        One entry per logged step: ``step``, ``lr``, ``seconds`` and the mean losses since
        the previous entry.
    final : dict
        Mean losses over the last logging interval.
    device : str
    out : str
        The model file.
    resumed_from : int
        The step this call started from (0 for a fresh run).
    """

    steps: int
    seconds: float
    history: tuple[dict, ...]
    final: dict
    device: str
    out: str = ""
    resumed_from: int = 0


def state_path(out) -> Path:
    """The resumable training state next to a model file: ``model.safetensors`` ->
    ``model.state.safetensors``."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out.with_suffix(".state.safetensors")
    return out.with_name(out.name + ".state.safetensors")


# --- helpers shared by the training loops ------------------------------------------------------

def _device(device) -> "torch.device":
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available")
    return dev


def _lr_at(step: int, *, lr: float, schedule: str, steps: int) -> float:
    if schedule == "constant":
        return lr
    frac = step / max(steps, 1)
    if schedule == "step":  # FAEMReg: halved every quarter of the run
        return lr * 0.5 ** min(int(4 * frac), 3)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def _check_int(name: str, value, minimum: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if v != value or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def _jsonable(value):
    """Options to JSON: paths to str, tuples to lists, dataclasses to dicts."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    from .io import atomic_output

    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# options that may differ between a run and its resumption
_RESUME_FREE = {"steps", "stop_at", "progress", "checkpoint_every", "log_every", "device",
                "overwrite", "resume", "validation_every", "out"}


@dataclass
class _State:
    step: int
    seconds: float
    options: dict
    history: list
    model_class: str
    model_config: dict
    model_tensors: dict
    optim_tensors: dict
    optim_meta: dict
    torch_rng: Any


def _save_state(path: Path, *, kind: str, model, optimizer, step: int, seconds: float,
                options: dict, history: list) -> None:
    import torch

    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()}
    sd = optimizer.state_dict()
    state_meta = {}
    for idx, st in sd["state"].items():
        entry = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().to("cpu").contiguous().clone()
                entry[key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                entry[key] = {"value": _jsonable(val)}
        state_meta[str(idx)] = entry
    tensors["rng.torch"] = torch.get_rng_state().clone()
    meta = {
        "format_version": STATE_FORMAT_VERSION,
        "kind": kind,
        "step": int(step),
        "seconds": float(seconds),
        "options": options,
        "history": history,
        "model_class": type(model).__name__,
        "model_config": model.config,
        "optimizer": {"class": type(optimizer).__name__, "state": state_meta,
                      "param_groups": _jsonable(sd["param_groups"])},
        "sampling": "batch of step s drawn from numpy.random.default_rng([seed, tag, s])",
    }
    _atomic_save(tensors, path, {STATE_KEY: json.dumps(meta)})


def _load_state(path: Path, *, kind: str) -> _State:
    from safetensors import safe_open

    from .models import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"no training state to resume: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, or OSError
        raise CheckpointError(f"training state {path} is not a readable safetensors file "
                              f"(corrupt or truncated?): {type(exc).__name__}: {exc}; delete "
                              f"it and start again without resume, or restore it") from exc
    if raw is None:
        raise CheckpointError(f"{path} has no '{STATE_KEY}' metadata: not a hybridreg "
                              f"training state")
    try:
        meta = json.loads(raw)
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise CheckpointError(f"training state {path} has format_version "
                                  f"{meta.get('format_version')!r}; this hybridreg reads "
                                  f"{STATE_FORMAT_VERSION}")
        if meta.get("kind") != kind:
            raise CheckpointError(f"training state {path} belongs to {meta.get('kind')!r}, "
                                  f"not {kind!r}")
        model_tensors = {k[len("model."):]: v for k, v in tensors.items()
                         if k.startswith("model.")}
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        for idx, entry in meta["optimizer"]["state"].items():
            for key, spec in entry.items():
                if "tensor" in spec and spec["tensor"] not in optim_tensors:
                    raise CheckpointError(f"training state {path} lacks optimizer tensor "
                                          f"{spec['tensor']!r}")
        if "rng.torch" not in tensors:
            raise CheckpointError(f"training state {path} lacks the torch RNG state")
        return _State(step=int(meta["step"]), seconds=float(meta["seconds"]),
                      options=dict(meta["options"]), history=list(meta["history"]),
                      model_class=str(meta["model_class"]),
                      model_config=dict(meta["model_config"]),
                      model_tensors=model_tensors, optim_tensors=optim_tensors,
                      optim_meta=dict(meta["optimizer"]), torch_rng=tensors["rng.torch"])
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"training state {path} has malformed metadata "
                              f"({type(exc).__name__}: {exc})") from exc


def _restore(state: _State, path: Path, model, optimizer) -> None:
    import torch

    from .models import CheckpointError

    try:
        model.load_state_dict(state.model_tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"training state {path}: the weights do not fit the model "
                              f"({exc})") from exc
    opt_state = {}
    for idx, entry in state.optim_meta["state"].items():
        opt_state[int(idx)] = {key: (state.optim_tensors[spec["tensor"]] if "tensor" in spec
                                     else spec["value"]) for key, spec in entry.items()}
    groups = state.optim_meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"training state {path}: the optimizer state does not fit "
                              f"({exc})") from exc
    torch.set_rng_state(state.torch_rng)


def _check_resumable(saved: dict, now: dict, path: Path) -> None:
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diffs[:4])
        raise ValueError(f"cannot resume from {path}: options differ from the saved run "
                         f"({shown}); resume with the same options, or start a new run")


def _prepare_out(out, *, resume: bool, overwrite: bool) -> tuple[Path, Path, bool]:
    """(out, state file, whether to resume)."""
    out = Path(out)
    sp = state_path(out)
    if resume:
        if sp.is_file():
            return out, sp, True
        if out.exists():
            raise FileExistsError(f"resume=True but there is no training state {sp} next to "
                                  f"the existing {out}; pass overwrite=True to train anew")
        log.info("resume=True but no state %s: starting a new run", sp)
        return out, sp, False
    if not overwrite:
        for p in (out, sp):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass resume=True to continue that run "
                                      f"or overwrite=True to replace it")
    return out, sp, False


class _Meter:
    """Running means of named losses since the last log entry."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, losses: Mapping[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else {}

    def reset(self) -> None:
        self.sums, self.n = {}, 0


def _progress(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step")


def _loop(*, kind: str, model, optimizer, step_fn, out: Path, sp: Path, start: int,
          steps: int, stop_at: int | None, lr: float, lr_schedule: str, options: dict,
          history: list, seconds0: float, checkpoint_every: int, log_every: int,
          progress: bool, device, save_metadata, validate=None, validation_every=None):
    """The shared loop: steps ``start .. end``, logging, checkpoints, the final save."""
    end = steps if stop_at is None else min(steps, stop_at)
    end = max(end, start)
    meter = _Meter()
    last = {}
    bar = _progress(progress, steps, start, kind)
    t0 = time.perf_counter()

    def seconds_now():
        return seconds0 + time.perf_counter() - t0

    def save(step):
        # the state first: it is what resuming reads, and holds the weights too
        _save_state(sp, kind=kind, model=model, optimizer=optimizer, step=step,
                    seconds=seconds_now(), options=options, history=history)
        _save_model_file(model, out, save_metadata(step, seconds_now(), last, history))

    step = start
    try:
        for step in range(start, end):
            cur_lr = _lr_at(step, lr=lr, schedule=lr_schedule, steps=steps)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            losses = step_fn(step)
            meter.add(losses)
            done = step + 1
            validating = validate is not None and (done % validation_every == 0
                                                   or done == end)
            if done % log_every == 0 or done == end or validating:
                entry = {"step": done, "lr": cur_lr, "seconds": round(seconds_now(), 3),
                         **{k: round(v, 6) for k, v in meter.means().items()}}
                if validating:
                    entry.update(validate())
                history.append(entry)
                last = {k: v for k, v in entry.items() if k not in ("step", "seconds")}
                meter.reset()
                log.info("%s step %d/%d: %s", kind, done, steps,
                         ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step"))
            if bar is not None:
                bar.update(1)
                if "total" in losses:
                    bar.set_postfix(loss=f"{losses['total']:.4g}")
            if done % checkpoint_every == 0 and done != end:
                save(done)
                log.debug("%s: checkpoint at step %d", kind, done)
    finally:
        if bar is not None:
            bar.close()
    if end > start or not out.exists():
        save(end)
    return end, seconds_now(), last


def _save_model_file(model, out: Path, metadata: dict) -> None:
    from .models import save_model

    save_model(model, out, metadata=metadata)


def _final_log(kind, *, end, seconds, history, last, device, out, start) -> "TrainingLog":
    final = dict(last) if last else (
        {k: v for k, v in history[-1].items() if k not in ("step", "seconds")}
        if history else {})
    return TrainingLog(steps=end, seconds=seconds, history=tuple(history), final=final,
                       device=str(device), out=str(out), resumed_from=start)


def _common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                   lr_schedule):
    steps = _check_int("steps", steps, 1)
    _check_int("batch", batch, 1)
    _check_int("crop", crop, 8)
    _check_int("checkpoint_every", checkpoint_every, 1)
    _check_int("log_every", log_every, 1)
    if stop_at is not None:
        _check_int("stop_at", stop_at, 1)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    return steps


# --- the feature autoencoder -------------------------------------------------------------------

def train_features(stacks, *, out, layers=None, feature_relu: bool = True, crop: int = 128,
                   batch: int = 8, steps: int = 2000, lr: float = 1e-3,
                   lr_schedule: str = "constant", weight_decay: float = 0.0, seed: int = 0,
                   device="auto", checkpoint_every: int = 200, log_every: int = 50,
                   resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
                   exclude=None, progress: bool = False) -> TrainingLog:
    """Train the feature autoencoder (ssEMnet, FAEMReg) to reconstruct EM sections.

    Random crops of random sections, randomly flipped and rotated by multiples of 90
    degrees (:meth:`StackSampler.sections`), normalised; the loss is the mean squared error
    of the reconstruction (normalised units). No labels are needed.

    Parameters
    ----------
    stacks : ndarray (Z, H, W), hybridreg.io.Stack, path, or a sequence of them
        Training sections (need not be aligned).
    out : str or Path
        The model file (``.safetensors``), written with :func:`hybridreg.models.save_model`
        at every checkpoint and at the end; its metadata hold the recipe, the options, the
        steps, the seconds, the final losses and the data names.
    layers : sequence of (out_channels, kernel, stride), optional
        The encoder; default FAEMReg's :data:`hybridreg.models.DEFAULT_AUTOENCODER_LAYERS`.
    feature_relu : bool
        ReLU on the features (the published models); see
        :class:`~hybridreg.models.FeatureAutoencoder`.
    crop, batch, steps : int
        Crop side (px), batch size and number of optimiser steps (in total).
    lr : float
        Adam's learning rate.
    lr_schedule : {"constant", "step", "cosine"}
        ``"step"`` halves the rate at every quarter of ``steps`` (FAEMReg's schedule).
    weight_decay : float
        Adam's (L2) weight decay.
    seed : int
        Initial weights from ``torch.manual_seed(seed)``; step ``s`` draws its batch from
        ``numpy.random.default_rng([seed, 1, s])``.
    device : {"auto", "cpu", "cuda"} or torch.device
    checkpoint_every, log_every : int
        Steps between checkpoints (model and state file) and between log entries.
    resume : bool
        Continue from :func:`state_path` (``out``) with the same options (``steps`` may
        grow). With no state file and no ``out``, a new run starts.
    overwrite : bool
        Replace an existing ``out`` (and its state) with a new run.
    stop_at : int, optional
        Stop (and save) after this step although the schedule runs to ``steps``: for
        time-sliced jobs, continued with ``resume=True``.
    exclude : optional
        Sections never drawn, as in :class:`StackSampler`.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TrainingLog

    Raises
    ------
    FileExistsError
        ``out`` (or its state) exists and neither ``resume`` nor ``overwrite`` is set.
    hybridreg.models.CheckpointError
        The state file is unreadable, corrupt or from another kind of run.
    """
    import torch

    from .models import DEFAULT_AUTOENCODER_LAYERS, FeatureAutoencoder

    steps = _common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                           lr_schedule)
    out, sp, resuming = _prepare_out(out, resume=resume, overwrite=overwrite)
    dev = _device(device)
    sampler = StackSampler(stacks, crop=crop, augment=True, exclude=exclude, seed=seed)
    spec = [list(map(int, layer)) for layer in (layers or DEFAULT_AUTOENCODER_LAYERS)]
    options = _jsonable({"layers": spec, "feature_relu": bool(feature_relu), "crop": crop,
                         "batch": batch, "steps": steps, "lr": lr, "lr_schedule": lr_schedule,
                         "weight_decay": weight_decay, "seed": seed, "exclude": exclude,
                         "data": sampler.names, "checkpoint_every": checkpoint_every,
                         "log_every": log_every, "device": str(dev), "out": os.fspath(out)})

    torch.manual_seed(seed)
    model = FeatureAutoencoder(spec, feature_relu=feature_relu).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start, seconds0, history = 0, 0.0, []
    if resuming:
        state = _load_state(sp, kind="train_features")
        _check_resumable(state.options, options, sp)
        _restore(state, sp, model, optimizer)
        start, seconds0, history = state.step, state.seconds, state.history
        log.info("train_features: resuming %s at step %d of %d", out, start, steps)

    def step_fn(step):
        rng = np.random.default_rng([seed, _TAG_FEATURES, step])
        x = sampler.sections(batch, rng=rng).to(dev)
        optimizer.zero_grad(set_to_none=True)
        recon, _ = model(x)
        loss = torch.nn.functional.mse_loss(recon, x)
        loss.backward()
        optimizer.step()
        return {"total": float(loss.detach()), "mse": float(loss.detach())}

    def metadata(step, seconds, last, hist):
        return {"recipe": "hybridreg.training.train_features", "options": options,
                "steps": step, "complete": step >= steps, "seconds": round(seconds, 3),
                "final_losses": last, "history": _summary(hist), "data": sampler.names,
                "device": str(dev)}

    log.info("train_features: %s, %d parameters, %s, steps %d..%d on %s", out,
             sum(p.numel() for p in model.parameters()), sampler, start, steps, dev)
    end, seconds, last = _loop(kind="train_features", model=model, optimizer=optimizer,
                               step_fn=step_fn, out=out, sp=sp, start=start, steps=steps,
                               stop_at=stop_at, lr=lr, lr_schedule=lr_schedule,
                               options=options, history=history, seconds0=seconds0,
                               checkpoint_every=checkpoint_every, log_every=log_every,
                               progress=progress, device=dev, save_metadata=metadata)
    return _final_log("train_features", end=end, seconds=seconds, history=history, last=last,
                      device=dev, out=out, start=start)


def _summary(history: list, n: int = 20) -> list:
    """At most ``n`` evenly spaced history entries (and the last), for model metadata."""
    if len(history) <= n:
        return list(history)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(history) - 1, n)})
    return [history[i] for i in idx]


# --- the registration network -----------------------------------------------------------------

def registration_losses(net, window: Mapping[str, "torch.Tensor"], *, weights: LossWeights,
                        features=None, ncc_window: int = 9) -> dict[str, "torch.Tensor"]:
    """The loss of :func:`train_registration` on one batch of windows.

    Parameters
    ----------
    net : FAEMRegNet
    window : dict of Tensor
        As returned by :meth:`StackSampler.windows` (on the net's device).
    weights : LossWeights
    features : FeatureAutoencoder, optional
        Frozen; without it the feature term is 0.
    ncc_window : int
        Box side of the local NCC term, pixels.

    Returns
    -------
    dict of scalar Tensor
        ``total`` (to minimise) and its terms before the :class:`LossWeights`:
        ``feature`` and ``ncc`` (each summed over the references with their
        ``reference_weights``), ``smooth``, ``epe_px``; and ``identity_epe_px``, the EPE
        of a zero field, for scale (no gradient).
    """
    import torch

    from .models import (downsample_mask, feature_similarity, make_window, ncc_loss,
                         smoothness)
    from .warp import warp_torch

    refs, moving = window["references"], window["moving"]
    truth, valid = window["truth"], window["valid"]
    k = refs.shape[1]
    rw = weights.for_references(k)
    u = net(make_window(refs, moving, window=net.window))
    zero = u.new_zeros(())
    validf = valid.to(u.dtype)
    n_valid = validf.sum().clamp_min(1.0)
    err = torch.sqrt(((u - truth) ** 2).sum(1, keepdim=True) + 1e-8)
    epe = (err * validf).sum() / n_valid
    with torch.no_grad():
        identity = (torch.sqrt((truth ** 2).sum(1, keepdim=True)) * validf).sum() / n_valid
    smooth = smoothness(u)
    feat = zero
    ncc = zero
    if (features is not None and weights.feature > 0) or weights.ncc > 0:
        warped, inside = warp_torch(moving, u, align_corners=True, padding_mode="border")
        mask = valid & inside
        if features is not None and weights.feature > 0:
            b, _, h, w = refs.shape
            f_refs = features.encode(refs.reshape(b * k, 1, h, w))
            f_refs = f_refs.reshape(b, k, *f_refs.shape[1:]).detach()
            f_w = features.encode(warped)
            # explicit factor: crops need not be a multiple of the encoder's stride
            fmask = downsample_mask(mask, features.stride)
            feat = feature_similarity([f_refs[:, j] for j in range(k)], f_w, rw, fmask,
                                      kind="mse")
        if weights.ncc > 0:
            ncc = sum(wj * ncc_loss(warped, refs[:, j:j + 1], mask, window=ncc_window)
                      for j, wj in enumerate(rw))
    total = (weights.feature * feat + weights.smooth * smooth + weights.ncc * ncc
             + weights.epe * epe)
    return {"total": total, "feature": feat, "smooth": smooth, "ncc": ncc, "epe_px": epe,
            "identity_epe_px": identity}


def _load_features(path, dev):
    from .models import FeatureAutoencoder, load_model

    ae = load_model(path, map_location=dev)
    if not isinstance(ae, FeatureAutoencoder):
        raise ValueError(f"features={os.fspath(path)!r} holds a {type(ae).__name__}, not a "
                         f"FeatureAutoencoder")
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae


def train_registration(stacks, *, out, features=None, preset: str | None = None,
                       model_overrides: Mapping | None = None, references: int = 3,
                       crop: int = 256, batch: int = 4, steps: int = 5000, lr: float = 1e-4,
                       lr_schedule: str = "step", weight_decay: float = 0.0, seed: int = 0,
                       device="auto", weights: LossWeights = LossWeights(),
                       deformation: Mapping[str, float] | None = None,
                       reference_jitter_px: float = 1.5, init=None,
                       checkpoint_every: int = 200, log_every: int = 50, resume: bool = False,
                       overwrite: bool = False, stop_at: int | None = None, exclude=None,
                       validation=None, validation_every: int | None = None,
                       progress: bool = False) -> TrainingLog:
    """Train the FAEMReg-style registration network on synthetic deformations of real stacks.

    Each step draws ``batch`` windows (:meth:`StackSampler.windows`): ``references``
    consecutive aligned sections and the next one, deformed by a known random deformation.
    The network (:class:`~hybridreg.models.FAEMRegNet`, window ``2 * references + 1``
    through :func:`~hybridreg.models.make_window`) predicts the pull field that undoes it.

    The loss (:func:`registration_losses`), weighted by ``weights``:

    - ``feature``: FAEMReg's unsupervised objective, the difference between the features
      (frozen autoencoder ``features``) of the warped moving section and of each
      reference, weighted ``(0.33, 0.5, 1.0)`` nearest last, masked to valid pixels. The
      mean squared difference is used instead of FAEMReg's Frobenius norm so that the
      term does not grow with the crop size;
    - ``smooth``: FAEMReg's smoothness (mean absolute forward differences of the field),
      weight 3;
    - ``ncc`` (default off): local NCC of intensities against each reference;
    - ``epe``: the mean endpoint error (pixels) against the known synthetic field on valid
      pixels, weight 1.

    Why the self-supervised EPE term: adjacent EM sections differ in content (structures
    move, start and end between sections), so matching the neighbours' features alone
    teaches the network to follow that content drift. Measured: elastix pairwise
    registration of already-aligned ISBI 2012 neighbours finds about 3 px of spurious
    motion, up to 25 px. The synthetic deformation of the moving section is known exactly,
    so the EPE term teaches the network to recover the section's own distortion and to
    ignore content change; since the stacks were aligned, the undeformed section *is*
    aligned to its references. No human labels are needed: only an aligned stack (for a
    user's own raw stack, a first alignment by any method is enough, the errors left in it
    act like the reference jitter).

    Parameters
    ----------
    stacks : ndarray (Z, H, W), hybridreg.io.Stack, path, or a sequence of them
        Aligned training stacks.
    out : str or Path
        The network file (``.safetensors``, :func:`hybridreg.models.save_model`); its
        metadata: recipe, all options, steps, seconds, final losses, data names.
    features : str or Path, optional
        A trained :class:`~hybridreg.models.FeatureAutoencoder` (frozen). Without it the
        feature term is dropped.
    preset : {"compact", "paper", "tiny"}, optional
        The architecture (:data:`hybridreg.models.PRESETS`); default ``"compact"``, or the
        architecture of ``init``.
    model_overrides : dict, optional
        Arguments replacing the preset's (``window`` is set from ``references``).
    references : int
        References per window (FAEMReg: 3).
    crop, batch, steps : int
        Crop side (px), windows per step, optimiser steps (in total).
    lr : float
        Adam's learning rate (FAEMReg: 1e-4; small models train well with up to 1e-3).
    lr_schedule : {"step", "constant", "cosine"}
        ``"step"`` halves the rate at every quarter of ``steps`` (FAEMReg halved it every
        49,250 of 197,000 iterations).
    weight_decay : float
        Adam's (L2) weight decay (FAEMReg: 4e-4 on a loss scaled by 12.7).
    seed : int
        Initial weights from ``torch.manual_seed(seed)``; step ``s`` draws its windows from
        ``numpy.random.default_rng([seed, 2, s])``.
    device : {"auto", "cpu", "cuda"} or torch.device
    weights : LossWeights
    deformation : dict, optional
        Magnitudes of the synthetic deformation (see :class:`StackSampler`).
    reference_jitter_px : float
        Jitter of the references (see :class:`StackSampler`).
    init : str or Path, optional
        A network checkpoint to start from (finetuning); its architecture is used.
    checkpoint_every, log_every, resume, overwrite, stop_at, exclude, progress
        As in :func:`train_features`.
    validation : stacks, optional
        Held-out aligned stacks: the EPE on 8 fixed windows of them
        (:func:`evaluate_registration`) is logged as ``val_epe_px`` and
        ``val_identity_epe_px`` every ``validation_every`` steps (default
        ``checkpoint_every``) and at the end.

    Returns
    -------
    TrainingLog
        History entries hold ``total``, ``feature``, ``smooth``, ``ncc``, ``epe_px`` and
        ``identity_epe_px`` (means since the previous entry), and ``lr``.
    """
    import torch

    from .models import FAEMRegNet, load_model, read_metadata

    steps = _common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                           lr_schedule)
    k = _check_int("references", references, 1)
    if not isinstance(weights, LossWeights):
        raise TypeError(f"weights must be a LossWeights, got {type(weights).__name__}")
    weights.for_references(k)
    validation_every = _check_int("validation_every", validation_every or checkpoint_every, 1)
    out, sp, resuming = _prepare_out(out, resume=resume, overwrite=overwrite)
    dev = _device(device)
    sampler = StackSampler(stacks, crop=crop, deformation=deformation,
                           reference_jitter_px=reference_jitter_px, exclude=exclude, seed=seed)
    if not sampler.windows_available(k):
        raise ValueError(f"no window of {k} references + 1 moving section in the stacks "
                         f"(lengths {[a.shape[0] for a in sampler.stacks]}, minus exclusions)")

    torch.manual_seed(seed)
    if init is not None:
        if preset is not None or model_overrides:
            raise ValueError("init gives the architecture; do not pass preset or "
                             "model_overrides with it")
        net = load_model(init)
        if not isinstance(net, FAEMRegNet):
            raise ValueError(f"init={os.fspath(init)!r} holds a {type(net).__name__}, not a "
                             f"FAEMRegNet")
        if net.window != 2 * k + 1:
            log.warning("init's window is %d, not 2 * references + 1 = %d: make_window "
                        "adapts the references", net.window, 2 * k + 1)
        init_info = {"path": os.fspath(init),
                     "recipe": read_metadata(init).get("metadata", {}).get("recipe")}
    else:
        overrides = dict(model_overrides or {})
        overrides.setdefault("window", 2 * k + 1)
        net = FAEMRegNet.from_preset(preset or "compact", **overrides)
        init_info = None
    ae = _load_features(features, dev) if features is not None else None
    if ae is None and weights.feature > 0:
        log.info("train_registration: no features autoencoder, the feature term is off")

    options = _jsonable({
        "features": os.path.abspath(os.fspath(features)) if features is not None else None,
        "preset": preset, "model_overrides": dict(model_overrides or {}),
        "model_config": net.config, "references": k, "crop": crop, "batch": batch,
        "steps": steps, "lr": lr, "lr_schedule": lr_schedule, "weight_decay": weight_decay,
        "seed": seed, "weights": weights, "deformation": sampler.deformation,
        "reference_jitter_px": sampler.reference_jitter_px, "init": init_info,
        "exclude": exclude, "data": sampler.names, "checkpoint_every": checkpoint_every,
        "log_every": log_every, "validation_every": validation_every,
        "device": str(dev), "out": os.fspath(out),
    })
    net.to(dev).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    start, seconds0, history = 0, 0.0, []
    if resuming:
        state = _load_state(sp, kind="train_registration")
        _check_resumable(state.options, options, sp)
        _restore(state, sp, net, optimizer)
        start, seconds0, history = state.step, state.seconds, state.history
        log.info("train_registration: resuming %s at step %d of %d", out, start, steps)

    def step_fn(step):
        rng = np.random.default_rng([seed, _TAG_REGISTRATION, step])
        win = {key: t.to(dev) for key, t in sampler.windows(batch, references=k,
                                                            rng=rng).items()}
        optimizer.zero_grad(set_to_none=True)
        losses = registration_losses(net, win, weights=weights, features=ae)
        losses["total"].backward()
        optimizer.step()
        return {key: float(v.detach()) for key, v in losses.items()}

    validate = None
    if validation is not None:
        val_stacks = validation
        if not StackSampler(val_stacks, crop=crop).windows_available(k):
            raise ValueError(f"the validation stacks have no window of {k} references + 1 "
                             f"moving section")

        def validate():
            net.eval()
            try:
                res = evaluate_registration(net, val_stacks, n=8, crop=crop, references=k,
                                            seed=seed, device=dev, deformation=deformation,
                                            reference_jitter_px=reference_jitter_px)
            finally:
                net.train()
            return {"val_epe_px": round(res["epe_px"], 4),
                    "val_identity_epe_px": round(res["identity_epe_px"], 4)}

    def metadata(step, seconds, last, hist):
        return {"recipe": "hybridreg.training.train_registration", "options": options,
                "steps": step, "complete": step >= steps, "seconds": round(seconds, 3),
                "final_losses": last, "history": _summary(hist), "data": sampler.names,
                "features": options["features"], "references": k, "device": str(dev)}

    log.info("train_registration: %s, %d parameters, %s, steps %d..%d on %s", out,
             sum(p.numel() for p in net.parameters()), sampler, start, steps, dev)
    end, seconds, last = _loop(kind="train_registration", model=net, optimizer=optimizer,
                               step_fn=step_fn, out=out, sp=sp, start=start, steps=steps,
                               stop_at=stop_at, lr=lr, lr_schedule=lr_schedule,
                               options=options, history=history, seconds0=seconds0,
                               checkpoint_every=checkpoint_every, log_every=log_every,
                               progress=progress, device=dev, save_metadata=metadata,
                               validate=validate, validation_every=validation_every)
    return _final_log("train_registration", end=end, seconds=seconds, history=history,
                      last=last, device=dev, out=out, start=start)


def finetune(stacks, *, init, out, steps: int = 300, lr: float = 5e-5,
             lr_schedule: str = "cosine", features=None, crop: int = 256, batch: int = 4,
             log_every: int = 25, checkpoint_every: int = 100, **kw) -> TrainingLog:
    """Adapt a trained registration network to a user's stack with a short schedule.

    :func:`train_registration` from ``init`` (its architecture and weights), by default
    300 steps at half FAEMReg's learning rate decaying to 0 (cosine), driven by the
    self-supervised endpoint-error term and the smoothness term. On one CPU thread the
    compact preset at crop 256, batch 4 takes about 0.75 s per step (0.6 s of it drawing
    the synthetic deformations), so about 4 minutes. The feature term is off by default:
    through FAEMReg's autoencoder (128 channels at full resolution) it costs about 5 s
    more per step; pass ``features="init"`` or a path to use it. The stack should be
    aligned (a first alignment by any method will do; see :func:`train_registration`).

    Parameters
    ----------
    stacks
        As in :func:`train_registration`.
    init : str or Path
        The trained network.
    out : str or Path
        The finetuned network.
    features : str, Path, None or "init"
        The frozen autoencoder of the feature term (default none); ``"init"`` takes the one
        ``init`` was trained with when that file still exists.
    steps, lr, lr_schedule, crop, batch, log_every, checkpoint_every
        As in :func:`train_registration`, with shorter defaults.
    **kw
        Any other option of :func:`train_registration` (``weights``, ``references``,
        ``seed``, ``device``, ``resume``, ...).
    """
    from .models import read_metadata

    if isinstance(features, str) and features == "init":
        meta = read_metadata(init).get("metadata", {})
        cand = meta.get("features") or meta.get("options", {}).get("features")
        features = cand if cand and Path(cand).is_file() else None
        if cand and features is None:
            log.warning("finetune: %s was trained with features %s, which is not there; "
                        "finetuning without the feature term", init, cand)
    return train_registration(stacks, init=init, out=out, steps=steps, lr=lr,
                              lr_schedule=lr_schedule, features=features, crop=crop,
                              batch=batch, log_every=log_every,
                              checkpoint_every=checkpoint_every, **kw)


# --- evaluation --------------------------------------------------------------------------------

def evaluate_registration(model, stacks, *, n: int = 16, crop: int = 256,
                          references: int | None = None, seed: int = 2024, batch: int = 4,
                          device="auto", deformation: Mapping[str, float] | None = None,
                          reference_jitter_px: float = 1.5) -> dict:
    """Endpoint error of a registration network on fresh synthetic windows of aligned stacks.

    Windows are drawn as in training (:meth:`StackSampler.windows`) from
    ``numpy.random.default_rng([seed, 3, i])``, a stream that no training step uses, so
    the same ``seed`` gives the same windows for every model (comparable numbers).

    Parameters
    ----------
    model : FAEMRegNet, or str / Path of its checkpoint
    stacks
        Aligned stacks, as in :class:`StackSampler` (held-out ones, to measure
        generalisation).
    n : int
        Number of windows.
    crop : int
    references : int, optional
        Default: ``(model.window - 1) // 2``.
    seed : int
    batch : int
        Windows per forward pass.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where a checkpoint is loaded; a network given as a module is used where it is.
    deformation, reference_jitter_px
        As in :class:`StackSampler`.

    Returns
    -------
    dict
        ``epe_px``: mean over windows of the network's mean endpoint error (pixels) on
        valid pixels; ``identity_epe_px``: the same for a zero field (no registration);
        ``epe_px_per_window``, ``identity_epe_px_per_window``: lists; ``n``; ``crop``.
    """
    import torch

    from .models import FAEMRegNet, load_model, make_window

    if isinstance(model, (str, os.PathLike)):
        dev = _device(device)
        net = load_model(model, map_location=dev)
    else:
        net = model
    if not isinstance(net, FAEMRegNet):
        raise TypeError(f"model must be a FAEMRegNet or its checkpoint, got "
                        f"{type(net).__name__}")
    dev = next(net.parameters()).device
    n = _check_int("n", n, 1)
    batch = _check_int("batch", batch, 1)
    k = (net.window - 1) // 2 if references is None else _check_int("references",
                                                                     references, 1)
    sampler = StackSampler(stacks, crop=crop, deformation=deformation,
                           reference_jitter_px=reference_jitter_px, seed=seed)
    was_training = net.training
    net.eval()
    epe, ident = [], []
    try:
        with torch.no_grad():
            for i, b0 in enumerate(range(0, n, batch)):
                rng = np.random.default_rng([seed, _TAG_EVALUATION, i])
                win = sampler.windows(min(batch, n - b0), references=k, rng=rng)
                win = {key: t.to(dev) for key, t in win.items()}
                u = net(make_window(win["references"], win["moving"], window=net.window))
                v = win["valid"].to(u.dtype)
                cnt = v.sum(dim=(1, 2, 3)).clamp_min(1.0)
                e = (torch.linalg.vector_norm(u - win["truth"], dim=1, keepdim=True) * v)
                e0 = torch.linalg.vector_norm(win["truth"], dim=1, keepdim=True) * v
                epe += (e.sum(dim=(1, 2, 3)) / cnt).tolist()
                ident += (e0.sum(dim=(1, 2, 3)) / cnt).tolist()
    finally:
        net.train(was_training)
    return {"epe_px": float(np.mean(epe)), "identity_epe_px": float(np.mean(ident)),
            "epe_px_per_window": epe, "identity_epe_px_per_window": ident, "n": n,
            "crop": crop}
