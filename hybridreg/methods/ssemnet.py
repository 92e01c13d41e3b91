"""ssEMnet (Yoo et al. 2017): per-pair optimisation of a coarse vector map on learned features.

Registering a pair is an optimisation, not a forward pass. A coarse map of displacement
vectors (control points ``grid_px`` apart, default 128 px) is bilinearly interpolated to every
pixel (``align_corners=True``: the corner control points sit on the corner pixel centres),
the moving section is warped with it through the spatial transformer
(:func:`hybridreg.warp.warp_torch`), and Adam finds the map by backpropagation, minimising
the difference between the features of the warped moving section and those of the fixed
section (and, weighted, of the older references). The features come from a frozen
:class:`~hybridreg.models.FeatureAutoencoder`, by default its intermediate layer at stride 4
(``feature_stride``; None: the full encoder, as published).

Objective per iteration: ``data + smoothness * strain``. ``data`` is the weighted mean over
the references (``reference_weights``, nearest last, default FAEMReg's (0.33, 0.5, 1.0)) of
:func:`~hybridreg.models.ssemnet_masked_loss`, each divided by its reference's feature
variance (0 for equal features, about 2 for unrelated ones); ``strain`` is the mean squared
strain of the interpolated field (:func:`~hybridreg.models.smoothness`, ``"l2"``), so the
weight does not depend on ``grid_px`` or the pyramid level.

- ``mask_empty``: pixels warped in from outside the moving section, and empty space in either
  section (:func:`~hybridreg.methods.base.content_mask`), leave the loss (reduced
  conservatively to the feature grid).
- ``match_intensity``: the moving section and the older references are mapped linearly onto
  the fixed section's mean and standard deviation where they overlap with content, since the
  features follow brightness.
- Loss drop: the largest feature errors are ignored, a fraction ``loss_drop`` at first,
  halving every ``drop_halve_every`` iterations, never below ``loss_drop_floor``; the
  schedule restarts at every stage.
- ``pyramid``: stages run coarse to fine on sections area-downsampled by these factors
  (default (4, 2, 1)); stage ``f`` has control points ``grid_px * f`` px apart and steps of
  ``lr`` of its own pixels, a cosine decay to a tenth within each stage. A stage with fewer
  than 4 feature pixels on a side is skipped.
- ``register(..., initial_field=u0)`` returns ``u0 + map`` (the map starts at zero; the
  smoothness term acts on the map only).
- ``warp_stride`` (default 2): where the moving section is warped. ssEMnet as published
  warps the section at every step and encodes it again (``warp_stride=1``): at 1024^2 the
  autoencoder's first layer (128 channels, 5 x 5, full resolution) runs forward and backward
  20 times, 100 s and 3 GB a pair on 2 cores. With ``warp_stride=2`` the moving section's
  first encoder layers (up to stride 2) run once per pyramid stage and each step warps
  their output (bilinearly, at the feature pixels) before the remaining layers: the layers
  before the warp are local (a 9 px receptive field) and the map is smooth over 128 px, so
  warping before or after them differs little. Measured on 12 pairs with exact truth
  (benchmarks/RESULTS.md, "ssEMnet at 1024^2"): 5.4x faster at 1024^2 (18 s a pair), the
  same endpoint error within the method's pair-to-pair noise.

There is no randomness: on the CPU the same inputs give bit-identical results. Intensities
are handled as in :mod:`hybridreg.methods.learned`. Cost and measured settings:
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np

from ..checks import as_spacing_xy
from ..fields import to_physical, to_pixels, validate_field
from .base import RegistrationResult, check_pair, checked_masks, content_mask
from .neural import (ModelSource, encoder_depth, encoder_features, encoder_layers_at,
                     finite_float, ncc_metric, normalized_sections, resolve_device,
                     set_threads)

log = logging.getLogger(__name__)

__all__ = ["SSEMnetMethod"]

#: FAEMReg's weights of the references r1, r2, r3 (nearest last); the fixed section is r3.
DEFAULT_REFERENCE_WEIGHTS = (0.33, 0.5, 1.0)
#: A stage needs at least this many feature pixels on each side.
MIN_FEATURE_PX = 4


def match_grey_values(images: np.ndarray, content: Sequence[np.ndarray | None], *,
                      target: int, moving_field: np.ndarray | None = None,
                      spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Each section's grey values mapped linearly onto section ``target`` (the fixed one):
    the same mean and standard deviation where both show content.

    The sections are compared where they overlap: the references on the fixed grid as they
    are, the moving section (the last) as ``moving_field`` (physical units, the initial
    field; None: the identity) puts it there, since sections that show different parts of
    the tissue have different statistics. Where the overlap is under 5% of the section, a
    section's own content is used. A blank section (no spread), or a blank target, leaves
    the grey values unchanged.
    """
    from ..warp import warp

    n, h, w = images.shape
    ones = np.ones((h, w), bool)
    tmask = ones if content[target] is None else content[target]
    out = images.copy()
    for i in range(n):
        if i == target:
            continue
        own = ones if content[i] is None else content[i]
        view, overlap = images[i], own & tmask
        if i == n - 1 and moving_field is not None:
            warped, valid = warp(np.stack([images[i], own.astype(np.float32)]), moving_field,
                                 spacing_xy=spacing_xy, order=1)
            view, overlap = warped[0], valid & (warped[1] > 0.999) & tmask
        if overlap.mean() >= 0.05:
            vi, vt = view[overlap], images[target][overlap]
        else:
            vi, vt = images[i][own], images[target][tmask]
        std_i, std_t = float(vi.std()), float(vt.std())
        if std_i > 1e-6 and std_t > 1e-6:
            out[i] = (images[i] - float(vi.mean())) * np.float32(std_t / std_i) \
                + np.float32(vt.mean())
    return out


def _downsample(x, shape_yx):
    """Area-average ``(B, C, H, W)`` to ``shape_yx`` (the identity at the same shape)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(shape_yx):
        return x
    return F.interpolate(x, size=tuple(shape_yx), mode="area")


def _upsample_map(c, shape_yx):
    """Bilinear interpolation of a control map ``(B, 2, gh, gw)`` to every pixel."""
    import torch.nn.functional as F

    return F.interpolate(c, size=tuple(shape_yx), mode="bilinear", align_corners=True)


def _nodes(n_px: int, spacing_px: float) -> int:
    """Control points on a side of ``n_px`` pixels, at most ``spacing_px`` apart, >= 2."""
    return max(2, math.ceil((n_px - 1) / spacing_px) + 1)


class SSEMnetMethod:
    """ssEMnet: a coarse vector map optimised through a spatial transformer on learned features.

    Parameters
    ----------
    model : path, FeatureAutoencoder or None
        The feature autoencoder (a checkpoint of :func:`hybridreg.models.save_model`, or the
        module, which is frozen and put in eval mode). None: the shipped ``feature_ae``
        weights (:func:`hybridreg.weights.default_weights`).
    feature_stride : int or None
        Use the encoder's features at this stride (default 4: FAEMReg's encoder up to its 4th
        layer, 16 channels); None: the full encoder. See the module docstring.
    grid_px : float
        Control-point spacing of the finest stage, in pixels (default 128: between real
        neighbours a finer map follows content change; a section's own deformed copy
        is matched better by a finer one).
    pyramid : sequence of int
        Downsampling factor of each stage, coarse to fine (default ``(4, 2, 1)``); ``(1,)``
        is ssEMnet's single resolution.
    iterations : int, sequence of int or None
        Adam iterations per stage: one value for all stages, or one per stage. None (default):
        60 for the coarsest stage, 20 for the finest, 40 for those between (``(60, 40, 20)``
        for the default pyramid: most where they are cheap, the full resolution only
        refines); 100 for a single stage.
    lr : float
        Adam learning rate, in pixels of the stage (default 0.5), decayed by a cosine to a
        tenth within each stage.
    smoothness : float
        Weight of the mean squared strain of the field (default 1.0, see the module docstring).
    reference_weights : sequence of float
        Weights of the aligned sections, nearest (``fixed``) last; their number is how many
        are used (default ``(0.33, 0.5, 1.0)``: ``fixed`` and two older references).
        ``(1.0,)`` registers to ``fixed`` alone.
    loss_drop : float in [0, 1)
        Initial fraction of the largest feature errors ignored (default 0.5; 0 disables loss
        drop, the floor included).
    drop_halve_every : int
        The fraction halves every this many iterations (default 1, as in ssEMnet).
    loss_drop_floor : float in [0, 1)
        The fraction never falls below this (default 0.1; 0 is ssEMnet's schedule).
    mask_empty : bool
        Leave empty space (outside the moving section, empty in either section) out of the
        loss (default True).
    intensity_scale, intensity_offset : float
        The linear map to 0-255 grey values, ``x8 = intensity_scale * x + intensity_offset``
        (default the identity; see :mod:`hybridreg.methods.learned`).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    threads : int, optional
        ``torch.set_num_threads`` (process-wide) before the first registration.
    """

    name = "ssemnet"
    #: ``RegistrationResult.warped`` is ``warp(moving, field, order=warped_order)``
    warped_order = 1
    #: What ``RegistrationResult.metric`` is.
    metric_name = ("ssEMnet's feature loss at the end, in units of the references' feature "
                   "variance (lower is better)")

    def __init__(self, model=None, *, feature_stride: int | None = 4, grid_px: float = 128.0,
                 pyramid: Sequence[int] = (4, 2, 1),
                 iterations: int | Sequence[int] | None = None, lr: float = 0.5,
                 smoothness: float = 1.0,
                 reference_weights: Sequence[float] = DEFAULT_REFERENCE_WEIGHTS,
                 loss_drop: float = 0.5, drop_halve_every: int = 1,
                 loss_drop_floor: float = 0.1, mask_empty: bool = True,
                 match_intensity: bool = True,
                 intensity_scale: float = 1.0, intensity_offset: float = 0.0,
                 device: str = "auto",
                 threads: int | None = None, warp_stride: int = 2):
        self._source = ModelSource(model, default="feature_ae", expected="FeatureAutoencoder",
                                    method=self.name)
        self.pyramid = tuple(int(f) for f in pyramid)
        if not self.pyramid or any(f < 1 for f in self.pyramid):
            raise ValueError(f"pyramid must list factors >= 1, got {pyramid!r}")
        if any(a <= b for a, b in zip(self.pyramid, self.pyramid[1:])):
            raise ValueError(f"pyramid must run coarse to fine (strictly decreasing factors), "
                             f"got {pyramid!r}")
        if iterations is None:
            n = len(self.pyramid)
            its = [100] if n == 1 else [60] + [40] * (n - 2) + [20]
        elif np.isscalar(iterations):
            its = [iterations] * len(self.pyramid)
        else:
            its = list(iterations)
        if len(its) != len(self.pyramid) or any(int(i) != i or i < 1 for i in its):
            raise ValueError(f"iterations must be an int >= 1 or one per pyramid stage "
                             f"({len(self.pyramid)}), got {iterations!r}")
        self.iterations = tuple(int(i) for i in its)
        self.reference_weights = tuple(float(v) for v in reference_weights)
        if not self.reference_weights or any(not v >= 0 for v in self.reference_weights) \
                or sum(self.reference_weights) <= 0:
            raise ValueError(f"reference_weights must be non-negative with a positive sum, got "
                             f"{reference_weights!r}")
        if not grid_px >= 2:
            raise ValueError(f"grid_px must be >= 2 pixels, got {grid_px!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not smoothness >= 0:
            raise ValueError(f"smoothness must be >= 0, got {smoothness!r}")
        if not 0 <= loss_drop < 1:
            raise ValueError(f"loss_drop must be in [0, 1), got {loss_drop!r}")
        if not 0 <= loss_drop_floor < 1:
            raise ValueError(f"loss_drop_floor must be in [0, 1), got {loss_drop_floor!r}")
        if int(drop_halve_every) < 1:
            raise ValueError(f"drop_halve_every must be >= 1, got {drop_halve_every!r}")
        if not (intensity_scale > 0 and np.isfinite(intensity_scale)):
            raise ValueError(f"intensity_scale must be positive, got {intensity_scale!r}")
        if feature_stride is not None and (int(feature_stride) != feature_stride
                                           or feature_stride < 1):
            raise ValueError(f"feature_stride must be None or an int >= 1, got "
                             f"{feature_stride!r}")
        self.feature_stride = None if feature_stride is None else int(feature_stride)
        if int(warp_stride) != warp_stride or warp_stride < 1:
            raise ValueError(f"warp_stride must be an int >= 1, got {warp_stride!r}")
        self.warp_stride = int(warp_stride)
        self.grid_px = float(grid_px)
        self.lr = float(lr)
        self.smoothness = float(smoothness)
        self.loss_drop = float(loss_drop)
        self.loss_drop_floor = float(loss_drop_floor)
        self.drop_halve_every = int(drop_halve_every)
        self.mask_empty = bool(mask_empty)
        self.match_intensity = bool(match_intensity)
        self.intensity_scale = float(intensity_scale)
        self.intensity_offset = finite_float(intensity_offset, "intensity_offset")
        self.device = device
        self.threads = threads
        self._ae = None
        self._device = None
        if self._source.module is not None:  # fail early
            self._check_strides(self._source.module)

    def _check_strides(self, ae) -> None:
        """``feature_stride`` and ``warp_stride`` are strides the encoder reaches."""
        depth, _ = encoder_depth(ae, self.feature_stride)
        encoder_layers_at(ae, self.warp_stride, depth)

    @property
    def model_path(self):
        return self._source.path

    @property
    def config(self) -> dict:
        """JSON-able settings that determine the result (the resume fingerprint of stacks)."""
        return {"method": self.name, "model": self._source.description,
                "weights_sha256": self._source.sha256(), "feature_stride": self.feature_stride,
                "grid_px": self.grid_px, "pyramid": list(self.pyramid),
                "iterations": list(self.iterations), "lr": self.lr,
                "smoothness": self.smoothness,
                "reference_weights": list(self.reference_weights),
                "loss_drop": self.loss_drop, "drop_halve_every": self.drop_halve_every,
                "loss_drop_floor": self.loss_drop_floor,
                "mask_empty": self.mask_empty, "match_intensity": self.match_intensity,
                "intensity_scale": self.intensity_scale,
                "intensity_offset": self.intensity_offset, "warp_stride": self.warp_stride}

    def autoencoder(self):
        """The frozen :class:`~hybridreg.models.FeatureAutoencoder`, loaded on first use."""
        if self._ae is None:
            set_threads(self.threads)
            device = resolve_device(self.device, self._source.module)
            ae = self._source.load(device)
            self._check_strides(ae)
            self._ae, self._device = ae, device
        return self._ae

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._source.path is not None:
            state["_ae"] = None
            state["_device"] = None
        return state

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), initial_field: np.ndarray | None = None,
                 fixed_mask=None, moving_mask=None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (and the older ``references``) by optimisation.

        Parameters
        ----------
        fixed : ndarray, shape (H, W)
            The nearest aligned section, 0-255 grey values.
        moving : ndarray, shape (H, W)
        references : sequence of ndarray (H, W)
            Older aligned sections, oldest first; the newest ``len(reference_weights) - 1``
            are used.
        spacing_xy, origin_xy : (float, float)
            The sections' grid.
        initial_field : ndarray, shape (2, H, W), optional
            Start from this pull field (physical units) instead of the identity.
        fixed_mask, moving_mask : ndarray (H, W), optional
            Defect masks, elastix's convention (nonzero = use): their excluded pixels leave
            the loss as empty space does (whatever ``mask_empty``), the encoder sees them
            filled with the section's mean grey value, and the motion under them is
            replaced by the trusted motion around
            (:func:`hybridreg.defects.trusted_field`).

        Returns
        -------
        RegistrationResult
            ``field`` (2, H, W) float32, physical units; ``metric`` the final data term
            (dimensionless feature loss without loss drop, lower is better); ``info`` with
            ``loss_curve`` (total loss per iteration), ``initial_loss``, ``final_loss``,
            ``iterations`` (run), ``stages`` (per stage: factor, image and control-map
            shapes, iterations, final data and strain terms, seconds), ``control_map_px``
            (2, gh, gw, pixels), ``references_used``, ``feature_stride``, ``ncc`` (of the
            warped and the fixed section, as the learned method's metric) and ``model``.
        """
        import torch

        from ..models import loss_drop_fraction

        from ..defects import neutral_fill, trusted_field

        t0 = time.perf_counter()
        fixed, moving, refs = check_pair(fixed, moving, references)
        spacing_xy = as_spacing_xy(spacing_xy)
        fixed_mask, moving_mask = checked_masks(fixed_mask, moving_mask, fixed.shape)
        h, w = fixed.shape
        ae = self.autoencoder()
        depth, fstride = encoder_depth(ae, self.feature_stride)
        stages = [f for f in self.pyramid
                  if min(-(-h // f), -(-w // f)) >= MIN_FEATURE_PX * fstride]
        if not stages:
            raise ValueError(f"{self.name}: sections of {h}x{w} pixels are too small: with "
                             f"features at stride {fstride} they need at least "
                             f"{MIN_FEATURE_PX * fstride} pixels per side")
        skipped = [f for f in self.pyramid if f not in stages]
        if skipped:
            log.debug("%s: %dx%d sections: pyramid stages %s skipped", self.name, h, w, skipped)

        n_refs = min(len(self.reference_weights), len(refs) + 1)
        used = (list(refs) + [fixed])[-n_refs:]  # oldest first, fixed last
        weights = self.reference_weights[-n_refs:]
        content = [content_mask(s) for s in used + [moving]]
        given = [None] * (n_refs - 1) + [fixed_mask, moving_mask]
        content = [c if g is None else (g if c is None else c & g)
                   for c, g in zip(content, given)]
        images = normalized_sections([neutral_fill(s, g) for s, g in zip(used + [moving], given)],
                                     self.intensity_scale, self.intensity_offset, self.name)
        u0 = None if initial_field is None else validate_field(
            initial_field, name="initial_field", shape_yx=(h, w))
        if self.match_intensity:
            images = match_grey_values(images, content, target=n_refs - 1, moving_field=u0,
                                        spacing_xy=spacing_xy)
        masks = content if self.mask_empty else given

        dev = self._device
        imgs = torch.from_numpy(images).to(dev)[:, None]  # (n_refs + 1, 1, H, W)
        full_masks = torch.stack([
            torch.ones(h, w, dtype=torch.float32) if m is None else torch.from_numpy(m).float()
            for m in masks]).to(dev)[:, None]
        if u0 is not None:
            base_full = torch.from_numpy(to_pixels(u0, spacing_xy)).to(dev)[None]
        else:
            base_full = torch.zeros(1, 2, h, w, device=dev)

        curve: list[float] = []
        warnings: list[str] = []
        stage_info: list[dict] = []
        c = None
        its = dict(zip(self.pyramid, self.iterations))
        for f in stages:
            t_stage = time.perf_counter()
            level = (-(-h // f), -(-w // f))
            # full-resolution pixels -> level pixels (align_corners geometry: corners fixed)
            scale = torch.tensor([(level[1] - 1) / max(w - 1, 1), (level[0] - 1) / max(h - 1, 1)],
                                 device=dev).view(1, 2, 1, 1)
            nodes = (_nodes(h, self.grid_px * f), _nodes(w, self.grid_px * f))
            c = (torch.zeros(1, 2, *nodes, device=dev) if c is None
                 else _upsample_map(c.detach(), nodes))
            c.requires_grad_(True)
            problem = self._stage_problem(ae, imgs, full_masks, base_full, level, scale, depth,
                                          fstride, weights, factor=f, warnings=warnings)
            opt = torch.optim.Adam([c], lr=self.lr * f)
            n_it = its[f]
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_it,
                                                               eta_min=0.1 * self.lr * f)
            for it in range(n_it):
                drop = 0.0 if self.loss_drop == 0 else max(
                    self.loss_drop_floor, loss_drop_fraction(
                        it, initial=self.loss_drop, halve_every=self.drop_halve_every))
                opt.zero_grad(set_to_none=True)
                data, strain = problem(c, drop)
                loss = data + self.smoothness * strain
                loss.backward()
                opt.step()
                sched.step()
                curve.append(float(loss.detach()))
            with torch.no_grad():
                data, strain = problem(c, 0.0)
            stage_info.append({"factor": f, "shape_yx": list(level), "map_shape_yx": list(nodes),
                               "iterations": n_it, "final_data": float(data),
                               "final_strain": float(strain),
                               "seconds": round(time.perf_counter() - t_stage, 3)})

        with torch.no_grad():
            u_px = (base_full + _upsample_map(c.detach(), (h, w)))[0].cpu().numpy()
        field = to_physical(u_px, spacing_xy)
        trust = True
        if fixed_mask is not None or moving_mask is not None:
            field, trust = trusted_field(field, fixed_mask, moving_mask, spacing_xy=spacing_xy,
                                         return_trust=True)
        from ..warp import warp

        warped, valid = warp(moving.astype(np.float32, copy=False), field,
                             spacing_xy=spacing_xy, order=1)
        valid = valid & trust  # where neither mask excludes what the metric compares
        final = stage_info[-1]["final_data"]
        info = {"model": self._source.description, "loss_curve": curve,
                "initial_loss": curve[0] if curve else None, "final_loss": final,
                "iterations": len(curve), "stages": stage_info,
                "references_used": n_refs, "feature_stride": fstride,
                "control_map_px": c.detach()[0].cpu().numpy(),
                "ncc": ncc_metric(fixed.astype(np.float32, copy=False), warped, valid)}
        return RegistrationResult(
            field=field, warped=warped, spacing_xy=spacing_xy,
            origin_xy=tuple(float(o) for o in origin_xy),
            metric=final if np.isfinite(final) else None,
            seconds=time.perf_counter() - t0, warnings=tuple(warnings), info=info)

    def _stage_problem(self, ae, imgs, full_masks, base_full, level, scale, depth, fstride,
                       weights, *, factor, warnings):
        """The objective of one pyramid stage: ``problem(c, drop) -> (data, strain)``."""
        import torch
        import torch.nn.functional as F

        from ..models import downsample_mask, smoothness, ssemnet_masked_loss
        from ..warp import warp_torch

        imgs_l = _downsample(imgs, level)
        masks_l = _downsample(full_masks, level) > 0.999  # conservative: wholly content
        # warp_stride > 1: the moving section's first encoder layers (up to that stride) run
        # once, and each step warps their output instead of the section
        pre_n = encoder_layers_at(ae, self.warp_stride, depth)
        pre = None
        if pre_n:
            with torch.no_grad():
                pre = encoder_features(ae, imgs_l[-1:], pre_n, fstride)
        base_l = _upsample_map(base_full, level) * scale if base_full.abs().max() > 0 \
            else None
        moving_l, moving_mask_l = imgs_l[-1:], masks_l[-1:].float()
        with torch.no_grad():
            # (n_refs, C, fh, fw), one section at a time: the first layers' activations of
            # a 1024^2 section are 0.5 GB each (128 channels at full resolution)
            ref_feats = torch.cat([encoder_features(ae, imgs_l[i:i + 1], depth, fstride)
                                   for i in range(imgs_l.shape[0] - 1)])
            ref_masks = downsample_mask(masks_l[:-1], fstride)  # (n_refs, 1, fh, fw)
            # each reference's feature variance (mean over channels) over its mask: the unit
            # of the data term
            var = []
            for i in range(ref_feats.shape[0]):
                m = ref_masks[i, 0]
                vals = ref_feats[i][:, m] if m.any() else ref_feats[i].flatten(1)
                var.append(float(vals.var(dim=1, unbiased=False).mean()))
        dead = [i for i, v in enumerate(var) if not v > 1e-8]
        if dead:
            warnings.append(
                f"pyramid factor {factor}: the features of {len(dead)} reference section(s) "
                f"are constant (dead features, or a blank section) and give no signal")
        var = [max(v, 1e-6) for v in var]
        total_w = float(sum(weights))

        def problem(c, drop):
            correction = _upsample_map(c, level) * scale
            u = correction if base_l is None else correction + base_l
            wm = None
            if pre is None:
                warped, valid = warp_torch(moving_l, u, align_corners=True,
                                           padding_mode="border")
                feats = encoder_features(ae, warped, depth, fstride)
            else:
                with torch.no_grad():  # where the samples fall inside the section
                    wm, valid = warp_torch(moving_mask_l, u.detach(), align_corners=True)
                s = self.warp_stride
                # the field at the feature pixels (level pixel j * s), in feature pixels
                u_f = u[:, :, ::s, ::s] / s
                ph, pw = pre.shape[-2] - u_f.shape[-2], pre.shape[-1] - u_f.shape[-1]
                if ph or pw:
                    u_f = F.pad(u_f, (0, pw, 0, ph), mode="replicate")
                warped_pre, _ = warp_torch(pre, u_f, align_corners=True,
                                           padding_mode="border")
                feats = encoder_features(ae, warped_pre, depth, fstride, first=pre_n)
            if self.mask_empty:
                if wm is None:
                    with torch.no_grad():
                        wm, _ = warp_torch(moving_mask_l, u.detach(), align_corners=True)
                valid = valid & (wm > 0.999)
            else:
                valid = torch.ones_like(valid)
            data = feats.new_zeros(())
            for i, wi in enumerate(weights):
                if wi == 0:
                    continue
                keep = downsample_mask(valid & masks_l[i:i + 1], fstride)
                li = ssemnet_masked_loss(ref_feats[i:i + 1] - feats, keep, drop)
                data = data + wi * li / var[i]
            # the regulariser acts on the map (the correction), not on an initial field
            return data / total_w, smoothness(correction, penalty="l2")

        return problem
