"""The learned method: FAEMReg's window-to-field network, one forward pass per section.

:class:`LearnedMethod` stacks the moving section with the already-aligned sections before it
into FAEMReg's mirrored window ``[r1, ..., rk, m, rk, ..., r1]`` (``rk`` nearest: the
``fixed`` section) and predicts the pull field of ``m`` with a
:class:`~hybridreg.models.FAEMRegNet` in one forward pass.

Window
    The aligned sections available to one registration are ``references`` (older, oldest
    first) followed by ``fixed`` (the nearest), as :func:`hybridreg.stack.align_stack` passes
    them in sequential mode. The newest ``references`` of them (the method option) fill the
    window; with fewer than the network's ``(window - 1) / 2``, the oldest one used is
    repeated, as FAEMReg starts a stack with copies of section 0
    (:func:`hybridreg.models.make_window`). ``references=1`` makes it a pairwise method.

Intensities
    Sections are normalised with :func:`hybridreg.models.normalize` (FAEMReg's statistics of
    8-bit EM data): the network expects **0-255 grey values**. ``uint8`` sections and float
    sections holding 0-255 values (what stack alignment passes on: aligned sections keep the
    original grey range, with 0 in the empty space) give the same result. Other ranges need
    the linear map ``x8 = intensity_scale * x + intensity_offset`` taking them to 0-255
    (``intensity_scale=255`` for floats in [0, 1]). The map is fixed per method, never
    guessed per pair, so every section of a stack is scaled alike. The API
    (``hybridreg.register``, ``hybridreg.align_stack``), ``compare`` and the CLI
    (``--intensity``) set it from the stack by default with
    :func:`hybridreg.methods.intensity_map` (``uint8`` as is, floats in [0, 1] times 255,
    16-bit data by its 0.1 and 99.9 percentiles), the map training uses.

torch is imported when the first section is registered, not when this module is.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checks import as_spacing_xy
from ..fields import to_physical
from .base import RegistrationResult, check_pair, checked_masks
from .neural import (NCC_METRIC_NAME, ModelSource, finite_float, ncc_metric,
                     normalized_sections, resolve_device,
                     set_threads)

log = logging.getLogger(__name__)

__all__ = ["LearnedMethod"]

#: Below this many pixels per side an image is refused, whatever the network.
MIN_SIZE_PX = 16


# --- the method ------------------------------------------------------------------------------

class _FeatureCache:
    """Encoder features of the last few sections a network saw, keyed by their content.

    For networks that encode each section of the window alone
    (:meth:`~hybridreg.models.FAEMRegPyramidNet.encode_sections`). Keys are digests of the
    normalised section, so a hit is the same input, bit for bit, and gives the same output
    (to float rounding: a section encoded alone or in a batch). A sequential stack shows
    every aligned section to up to ``references`` pairs, a joint one every raw section to
    two.
    """

    def __init__(self, size: int = 8):
        import threading

        self.size = int(size)
        self._entries: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # a fresh, empty cache where it is unpickled (a lock does not pickle)
        return {"size": self.size}

    def __setstate__(self, state):
        self.__init__(state["size"])

    def window(self, net, sections: np.ndarray, device) -> list:
        """Per-level features of the window ``sections`` (references oldest first, moving
        last), in :func:`~hybridreg.models.make_window`'s order of the first k + 1 slices."""
        import torch

        from ..models import make_window

        n = len(sections)
        # which section fills each of the window's first k + 1 slices (the oldest reference
        # is repeated when there are fewer than k): make_window applied to the indices
        idx = torch.arange(n, dtype=torch.float32).reshape(1, n, 1, 1)
        order = make_window(idx[:, :-1], idx[:, -1:], window=net.window)[0, 0, :net.refs + 1]
        order = [int(v) for v in order[:, 0, 0]]
        # the network's identity and its parameters' in-place version counters: weights
        # changed by training in between (an in-memory model) never meet stale features
        weights = (id(net), sum(p._version for p in net.parameters()), str(device))
        keys = [(hashlib.blake2b(np.ascontiguousarray(s).tobytes(), digest_size=16).digest(),
                 s.shape, weights) for s in sections]
        with self._lock:
            cached = {i: self._entries.get(keys[i]) for i in set(order)}
        todo = sorted(i for i, f in cached.items() if f is None)
        if todo:
            # one section at a time: a section's features never depend on which others
            # were encoded with it (batches round differently), so they are the same whatever
            # the cache held, in one process or on any Dask worker
            for i in todo:
                one = torch.from_numpy(np.ascontiguousarray(sections[i:i + 1])).to(device)
                cached[i] = list(net.encode_sections(one[:, None]))
            with self._lock:
                for i in todo:
                    self._entries.pop(keys[i], None)
                    self._entries[keys[i]] = cached[i]
                while len(self._entries) > self.size:
                    self._entries.pop(next(iter(self._entries)))
        return [torch.cat([cached[i][lvl] for i in order]) for lvl in range(net.levels)]


class LearnedMethod:
    """FAEMReg-style registration: a 3D-convolution network predicts the field in one pass.

    Parameters
    ----------
    model : path, FAEMRegNet or None
        A checkpoint written by :func:`hybridreg.models.save_model` holding a
        :class:`~hybridreg.models.FAEMRegNet`, or the network itself (used as given, frozen
        and put in eval mode). None: the shipped ``faemreg_compact`` weights
        (:func:`hybridreg.weights.default_weights`; a clear error if not installed). A path is
        loaded once, when the first section is registered.
    references : int
        At most this many aligned sections (``fixed`` and the newest of ``references``) fill
        the window; at most the network's ``(window - 1) / 2`` (3 for FAEMReg's window of 7).
    intensity_scale, intensity_offset : float
        The linear map to 0-255 grey values, ``x8 = intensity_scale * x + intensity_offset``
        (default the identity; see the module docstring).
    device : str
        ``"auto"`` (CUDA when available, else the CPU; a given module stays on its device),
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    threads : int, optional
        ``torch.set_num_threads`` (process-wide) before the first registration.

    Notes
    -----
    ``register`` returns the field in physical units (the network's pixels times
    ``spacing_xy``), the moving section warped with it (:func:`hybridreg.warp.warp`, linear),
    and as ``metric`` the NCC of the warped and the fixed section (higher is better) over
    pixels that were warped from inside the moving section and are content of the fixed one
    (:func:`hybridreg.methods.base.content_mask`).
    """

    name = "learned"
    #: ``RegistrationResult.warped`` is ``warp(moving, field, order=warped_order)``
    warped_order = 1
    #: What ``RegistrationResult.metric`` is.
    metric_name = NCC_METRIC_NAME

    def __init__(self, model=None, *, references: int = 3, intensity_scale: float = 1.0,
                 intensity_offset: float = 0.0, device: str = "auto",
                 threads: int | None = None):
        self._source = ModelSource(model, default="faemreg_compact", expected="FAEMRegNet",
                                    method=self.name)
        if int(references) != references or references < 1:
            raise ValueError(f"references must be an int >= 1, got {references!r}")
        if not (intensity_scale > 0 and np.isfinite(intensity_scale)):
            raise ValueError(f"intensity_scale must be positive, got {intensity_scale!r}")
        self.references = int(references)
        self.intensity_scale = float(intensity_scale)
        self.intensity_offset = finite_float(intensity_offset, "intensity_offset")
        self.device = device
        self.threads = threads
        self._net = None
        self._device = None
        self._features = _FeatureCache()
        if self._source.module is not None:
            self._check_window(self._source.module)

    @property
    def model_path(self) -> Path | None:
        """The checkpoint file (None for an in-memory network)."""
        return self._source.path

    @property
    def config(self) -> dict:
        """JSON-able settings that determine the result (the resume fingerprint of stacks).

        The weights enter by their SHA-256; ``device`` and ``threads`` do not.
        """
        return {"method": self.name, "model": self._source.description,
                "weights_sha256": self._source.sha256(), "references": self.references,
                "intensity_scale": self.intensity_scale,
                "intensity_offset": self.intensity_offset}

    def _check_window(self, net) -> None:
        k = (net.window - 1) // 2
        if self.references > k:
            raise ValueError(f"references={self.references} is more than the network's window "
                             f"of {net.window} holds ({k} references)")

    def network(self):
        """The :class:`~hybridreg.models.FAEMRegNet`, loaded on first use."""
        if self._net is None:
            set_threads(self.threads)
            device = resolve_device(self.device, self._source.module)
            net = self._source.load(device)
            self._check_window(net)
            self._net, self._device = net, device
        return self._net

    @property
    def torch_device(self):
        """The torch device the network runs on (it is loaded if it was not)."""
        self.network()
        return self._device

    def min_size_px(self, net=None) -> int:
        """Smallest section side accepted: half a cell of the network's coarsest level, >= 16."""
        net = self.network() if net is None else net
        return max(MIN_SIZE_PX, net.stride // 2)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = _FeatureCache()
        if self._source.path is not None:
            state["_net"] = None
            state["_device"] = None
        return state

    def predict_field(self, fixed: np.ndarray, moving: np.ndarray, *,
                      references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                      fixed_mask=None, moving_mask=None) -> tuple[np.ndarray, dict]:
        """The network's pull field of ``moving`` onto ``fixed``, without warping.

        ``fixed_mask``, ``moving_mask`` (elastix's convention: nonzero = use): the network
        sees the excluded pixels filled with the section's mean grey value, and its motion
        there (under the fixed mask, or pointing into the moving one's defects) is replaced
        by the trusted motion around (:func:`hybridreg.defects.trusted_field`).

        Returns
        -------
        (ndarray, dict)
            The field ``(2, H, W)`` float32 in physical units, and ``info`` (``model``,
            ``config``, ``references_used``, ``window``; with masks ``defect_free``, where
            the field was trusted, bool (H, W)).
        """
        import torch

        from ..models import make_window

        from ..defects import neutral_fill, trusted_field

        fixed, moving, refs = check_pair(fixed, moving, references)
        spacing_xy = as_spacing_xy(spacing_xy)
        fixed_mask, moving_mask = checked_masks(fixed_mask, moving_mask, fixed.shape)
        fixed, moving = neutral_fill(fixed, fixed_mask), neutral_fill(moving, moving_mask)
        net = self.network()
        h, w = fixed.shape
        minimum = self.min_size_px(net)
        if min(h, w) < minimum:
            raise ValueError(f"{self.name}: sections of {h}x{w} pixels are too small for this "
                             f"network (stride {net.stride}); need at least {minimum}x{minimum}")
        used = (list(refs) + [fixed])[-self.references:]  # oldest first, fixed last
        window_np = normalized_sections(used + [moving], self.intensity_scale,
                                        self.intensity_offset, self.name)
        with torch.inference_mode():
            if hasattr(net, "encode_sections"):
                # each section encoded once while it stays in the window (a sequential
                # stack shows every aligned section to up to `references` pairs)
                feats = self._features.window(net, window_np, self._device)
                u_px = net.forward_features(feats, (h, w))[0].float().cpu().numpy()
            else:
                sections = torch.from_numpy(window_np).to(self._device)
                x = make_window(sections[None, :-1], sections[None, -1:], window=net.window)
                u_px = net(x)[0].float().cpu().numpy()
        info = {"model": self._source.description, "config": net.config,
                "references_used": len(used), "window": net.window}
        u = to_physical(u_px, spacing_xy)
        if fixed_mask is not None or moving_mask is not None:
            u, info["defect_free"] = trusted_field(u, fixed_mask, moving_mask,
                                                   spacing_xy=spacing_xy, return_trust=True)
        return u, info

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None
                 ) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (and the older ``references``).

        Parameters
        ----------
        fixed : ndarray, shape (H, W)
            The nearest aligned section, 0-255 grey values (see the module docstring).
        moving : ndarray, shape (H, W)
        references : sequence of ndarray (H, W)
            Older aligned sections, oldest first.
        spacing_xy, origin_xy : (float, float)
            The sections' grid.
        fixed_mask, moving_mask : ndarray (H, W), optional
            Defect masks, elastix's convention (see :meth:`predict_field`); the metric is
            measured where both keep the section.

        Returns
        -------
        RegistrationResult
            ``field`` (2, H, W) float32 in physical units, pull direction; ``info`` holds
            ``model``, ``config`` (the network's), ``references_used`` and ``window``.
        """
        from ..warp import warp

        t0 = time.perf_counter()
        fixed, moving, refs = check_pair(fixed, moving, references)
        spacing_xy = as_spacing_xy(spacing_xy)
        fixed_mask, moving_mask = checked_masks(fixed_mask, moving_mask, fixed.shape)
        field, info = self.predict_field(fixed, moving, references=refs, spacing_xy=spacing_xy,
                                         fixed_mask=fixed_mask, moving_mask=moving_mask)
        warped, valid = warp(moving.astype(np.float32, copy=False), field,
                             spacing_xy=spacing_xy, order=1)
        if "defect_free" in info:  # where neither mask excludes what the metric compares
            valid = valid & info.pop("defect_free")
        metric = ncc_metric(fixed.astype(np.float32, copy=False), warped, valid)
        return RegistrationResult(
            field=field, warped=warped, spacing_xy=spacing_xy,
            origin_xy=tuple(float(o) for o in origin_xy), metric=metric,
            seconds=time.perf_counter() - t0, info=info)
