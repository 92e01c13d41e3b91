"""The hybrid method: the learned field initialises an elastix B-spline refinement.

For each pair:

1. the ``learned`` network (:class:`~hybridreg.methods.learned.LearnedMethod`) predicts
   the pull field in one pass, and it is projected onto what the refinement can correct
   (:func:`project_start`: a low-pass at the B-spline grid's scale): the start ``u0``;
2. elastix refines it with a B-spline (:func:`hybridreg.elastix.register_pair` with
   ``initial_field=u0``) on several similarity channels: the section itself and
   ``feature_channels`` principal components of the frozen autoencoder's features
   (:func:`feature_maps`), each with its own metric and ``Metric<i>Weight`` (default 1.0 for
   the section, ``0.5 / feature_channels`` for each feature channel);
3. the refined field is kept only if it does not lower the NCC of the warped and fixed
   section on the fixed section's content (``tolerance``) and does not fold; otherwise, or
   when elastix fails, the section keeps ``u0`` and a warning flags it.

``initial="resample"`` (default): the moving section and its channels are resampled with
``u0``, elastix refines without an initial transform, and the total field is
``compose(b, u0)``; the exported transformix chain is the B-spline file, then the learned
field's file. ``"external"``: ``u0`` is given to ``SetExternalInitialTransform`` (the chain is
the learned field's file, then the B-spline); same accuracy, slower.

Presets (:data:`PRESETS`): ``"accurate"`` (default) starts from the learned field low-passed
at 32 px and refines on a 32 px grid with a bending-energy penalty (which elastix evaluates
with the resample start); ``"fast"`` starts from the learned field as predicted and refines on
a 64 px grid with 50 iterations. The refinement map is
:func:`hybridreg.elastix.refinement_map` with the preset's options, or a user's B-spline map
adapted with
:func:`hybridreg.elastix.adapt_refinement_map` (``info["parameter_maps"]`` holds what ran).
The result is resampled linearly in numpy (``warped_order``), so that the exported chain
reproduces ``warped``. Measured settings and timings: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from ..checks import as_spacing_xy
from ..fields import folding_fraction
from .base import RegistrationResult, check_pair, checked_masks, content_mask
from .learned import LearnedMethod
from .neural import (NCC_METRIC_NAME, ModelSource, encoder_depth, encoder_features, ncc_metric,
                     normalized_sections)

log = logging.getLogger(__name__)

__all__ = ["HybridMethod", "feature_maps", "project_start", "PRESETS", "DEFAULT_PRESET",
           "DEFAULT_REFINEMENT"]

#: The presets: how the learned field is projected before the refinement starts from it
#: (``start_smoothing_px``: the sigma of a Gaussian low-pass in pixels, 0 = as predicted;
#: see :func:`project_start`) and the refinement (options of
#: :func:`hybridreg.elastix.refinement_map`). How they were chosen: benchmarks/RESULTS.md.
PRESETS = {
    "accurate": {"start_smoothing_px": 32.0,
                 "refinement": {"grid_spacing_px": 32.0, "resolutions": 1, "iterations": 250,
                                "samples": 2048, "bending_weight": 30000.0},
                 "detail": {"grid_spacing_px": 32.0, "resolutions": 1, "iterations": 250,
                            "samples": 2048, "bending_weight": 100.0},
                 "detail_threshold": 0.6},
    "fast": {"start_smoothing_px": 0.0,
             "refinement": {"grid_spacing_px": 64.0, "resolutions": 1, "iterations": 50,
                            "samples": 1024},
             "detail": None, "detail_threshold": 0.6},
}
DEFAULT_PRESET = "accurate"
#: Options of :func:`hybridreg.elastix.refinement_map` for the default refinement.
DEFAULT_REFINEMENT = PRESETS[DEFAULT_PRESET]["refinement"]
#: A refinement may lower the NCC by at most this much before it is rejected.
DEFAULT_TOLERANCE = 0.0
#: A refined field folding on more than this fraction of the content is rejected.
MAX_FOLDING = 1e-3


def feature_maps(ae, fixed: np.ndarray, moving: np.ndarray, *, n_channels: int = 2,
                 feature_stride: int = 4, downsample: int = 1, intensity_scale: float = 1.0,
                 intensity_offset: float = 0.0, device="cpu"
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Autoencoder feature channels of a pair, on the sections' grid.

    Parameters
    ----------
    ae : FeatureAutoencoder
        Frozen.
    fixed, moving : ndarray, shape (H, W)
        0-255 grey values after ``intensity_scale * x + intensity_offset``.
    n_channels : int
        Principal components kept (>= 1).
    feature_stride : int
        Use the encoder's features at this stride (see the module docstring).
    downsample : int
        Average the sections over ``downsample x downsample`` blocks first (features at an
        effective stride ``feature_stride * downsample``, at ``1 / downsample**2`` of the
        cost).

    Returns
    -------
    (list of ndarray, list of ndarray)
        ``n_channels`` float32 maps ``(H, W)`` for the fixed and for the moving section
        (fewer if the features have fewer non-constant directions; none for a blank
        section).
    """
    import torch
    import torch.nn.functional as F

    n_channels = int(n_channels)
    if n_channels < 1:
        raise ValueError(f"n_channels must be >= 1, got {n_channels}")
    h, w = fixed.shape
    depth, stride = encoder_depth(ae, feature_stride)
    if min(float(np.std(fixed)), float(np.std(moving))) * intensity_scale < 1e-3:
        return [], []  # a blank section: its features would only show the zero padding
    x = normalized_sections([fixed, moving], intensity_scale, intensity_offset, "hybrid")
    downsample = int(downsample)
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    with torch.inference_mode():
        xt = torch.from_numpy(x)[:, None].to(device)
        if downsample > 1:
            xt = F.avg_pool2d(xt, downsample, ceil_mode=True)
        f = encoder_features(ae, xt, depth, stride)
        f = f.double().cpu()
    c = f.shape[1]
    flat = f.permute(1, 0, 2, 3).reshape(c, -1)            # (C, 2 * h * w)
    mean = flat.mean(1, keepdim=True)
    _, sv, vh = torch.linalg.svd((flat - mean).T, full_matrices=False)
    keep = int(min(n_channels, (sv > sv[0] * 1e-3).sum())) if sv.numel() and sv[0] > 0 else 0
    if keep == 0:
        return [], []
    proj = vh[:keep] @ (flat - mean)                         # (keep, 2 * h * w)
    maps = proj.reshape(keep, 2, *f.shape[-2:]).permute(1, 0, 2, 3).float()
    up = F.interpolate(maps, scale_factor=stride * downsample, mode="bilinear",
                       align_corners=False)
    up = up[..., :h, :w].numpy()
    return list(up[0]), list(up[1])


def project_start(u: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """The learned field projected onto what a B-spline refinement can correct.

    A B-spline refinement cannot remove error at scales finer than its grid, so a start
    that carries such error caps its precision. A Gaussian low-pass of ``sigma_px`` pixels
    (edges extended) keeps the field's smooth part. ``sigma_px=0`` returns ``u`` as is.

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Pull field (any units: the low-pass is per component).
    sigma_px : float
        Standard deviation in pixels (>= 0).
    """
    from scipy import ndimage

    sigma = float(sigma_px)
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma_px must be finite and >= 0, got {sigma_px!r}")
    if sigma == 0:
        return u
    return ndimage.gaussian_filter(np.asarray(u, np.float32), (0, sigma, sigma),
                                   mode="nearest", truncate=3.0).astype(np.float32)


class HybridMethod:
    """Learned field, then an elastix B-spline refinement on section and feature channels.

    Parameters
    ----------
    model : path, FAEMRegNet or None
        The network of the ``learned`` step (default: the shipped ``faemreg_compact``).
    features : path, FeatureAutoencoder, None or False
        The autoencoder of the feature channels (default: the shipped ``feature_ae``);
        False: the section channel only.
    preset : {"accurate", "fast"}
        The start projection and refinement (:data:`PRESETS`). ``"accurate"`` (default):
        the learned field low-passed at the grid's scale, then a 32 px B-spline with a
        bending-energy penalty; ``"fast"``: the learned field as it is, then a 64 px grid,
        50 iterations.
    params : path, dict or name, optional
        A B-spline parameter map of the user's, adapted with
        :func:`hybridreg.elastix.adapt_refinement_map`; it replaces the preset's
        refinement. Default: :func:`hybridreg.elastix.refinement_map` with the preset's.
    refinement : dict, optional
        Options of :func:`hybridreg.elastix.refinement_map` that override the preset's.
    detail : dict or False, optional
        Options that override the preset's detail stage (a second, flexible refinement
        kept only where it explains the pair far better: see :meth:`register`); False: no
        detail stage. With ``params`` there is none unless given here.
    detail_threshold : float, optional
        The detail stage is kept when its residual dissimilarity (``1 - NCC``) is at most
        this fraction of the first stage's (preset ``accurate``: 0.6).
    start_smoothing_px : float, optional
        Overrides the preset's projection of the learned field (:func:`project_start`).
    feature_channels : int
        Principal components of the features given to elastix (default 2).
    channel_weights : sequence of float, optional
        ``Metric<i>Weight`` of the section and each feature channel (see the module
        docstring for the default).
    feature_stride : int
        Encoder stride of the features (default 4).
    feature_downsample : int
        Sections are block-averaged by this factor before the encoder (default 4: features
        at an effective stride of 16 px, at 1/16 of the cost of full resolution).
    references : int
        Window of the learned step (see :class:`LearnedMethod`).
    tolerance : float
        The refined NCC may fall at most this much below the learned one.
    initial : {"resample", "external"}
        How the refinement starts from the learned field (see the module docstring).
    intensity_scale, intensity_offset, device
        As in :class:`LearnedMethod`.
    threads : int, optional
        elastix threads and ``torch.set_num_threads``.
    """

    name = "hybrid"
    #: ``RegistrationResult.warped`` is ``warp(moving, field, order=warped_order)``
    warped_order = 1
    #: What ``RegistrationResult.metric`` is.
    metric_name = NCC_METRIC_NAME

    def __init__(self, model=None, features=None, *, preset: str = DEFAULT_PRESET,
                 params=None, refinement: dict | None = None, detail=None,
                 detail_threshold: float | None = None,
                 start_smoothing_px: float | None = None, feature_channels: int = 2,
                 channel_weights: Sequence[float] | None = None, feature_stride: int = 4,
                 feature_downsample: int = 4,
                 references: int = 3, tolerance: float = DEFAULT_TOLERANCE,
                 initial: str = "resample", intensity_scale: float = 1.0,
                 intensity_offset: float = 0.0,
                 device: str = "auto", threads: int | None = None):
        from ..elastix import adapt_refinement_map

        self.learned = LearnedMethod(model, references=references,
                                     intensity_scale=intensity_scale,
                                     intensity_offset=intensity_offset, device=device,
                                     threads=threads)
        if features is False:
            self._features = None
            feature_channels = 0
        else:
            self._features = ModelSource(features, default="feature_ae",
                                         expected="FeatureAutoencoder", method=self.name)
        self.feature_channels = int(feature_channels)
        if self.feature_channels < 0:
            raise ValueError(f"feature_channels must be >= 0, got {feature_channels}")
        self.feature_stride = int(feature_stride)
        self.feature_downsample = int(feature_downsample)
        n = 1 + self.feature_channels
        if channel_weights is None:
            channel_weights = [1.0] + [0.5 / max(self.feature_channels, 1)] * \
                self.feature_channels
        channel_weights = [float(v) for v in channel_weights]
        if len(channel_weights) != n:
            raise ValueError(f"channel_weights must have {n} entries (the section and "
                             f"{self.feature_channels} feature channel(s)), got "
                             f"{len(channel_weights)}")
        self.channel_weights = channel_weights
        if initial not in ("resample", "external"):
            raise ValueError(f"initial must be 'resample' or 'external', got {initial!r}")
        self.initial = initial
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        self.preset = preset
        self.start_smoothing_px = float(PRESETS[preset]["start_smoothing_px"]
                                        if start_smoothing_px is None else start_smoothing_px)
        if not (np.isfinite(self.start_smoothing_px) and self.start_smoothing_px >= 0):
            raise ValueError(f"start_smoothing_px must be finite and >= 0, got "
                             f"{start_smoothing_px!r}")
        self.params = params
        self.adapt_warnings: list[str] = []
        if params is None:
            self.parameter_map = self._preset_map(
                n, {**PRESETS[preset]["refinement"], **(refinement or {})})
        else:
            if refinement:
                raise ValueError("refinement options are for the preset's map; with params, "
                                 "set them in the parameter map")
            self.parameter_map, self.adapt_warnings = adapt_refinement_map(
                params, n, weights=channel_weights, keep_penalties=initial == "resample")
            # one rendering rule: the result, and the exported chain, resample with the
            # method's order (linear), whatever order the user's file asks of elastix
            self.parameter_map["FinalBSplineInterpolationOrder"] = [str(self.warped_order)]
            self.parameter_map["WriteResultImage"] = ["false"]
        detail_options = PRESETS[preset]["detail"] if params is None else None
        if detail is False:
            detail_options = None
        elif detail:
            detail_options = {**(detail_options or PRESETS["accurate"]["detail"]), **detail}
        self.detail_map = None if detail_options is None else self._preset_map(n, detail_options)
        self.detail_threshold = float(PRESETS[preset]["detail_threshold"]
                                      if detail_threshold is None else detail_threshold)
        if not 0 < self.detail_threshold <= 1:
            raise ValueError(f"detail_threshold must be in (0, 1], got {detail_threshold!r}")
        self.tolerance = float(tolerance)
        self.threads = threads
        self._ae = None

    def _preset_map(self, n: int, options: dict) -> dict:
        """A refinement map of ``refinement_map`` options, resampled by the method itself."""
        from ..elastix import refinement_map

        options = dict(options)
        if self.initial == "external" and options.get("bending_weight"):
            # elastix cannot evaluate penalties after an external initial transform
            options["bending_weight"] = 0.0
            note = ("initial='external': the refinement runs without its bending-energy "
                    "penalty, which elastix cannot evaluate after an external initial "
                    "transform")
            if note not in self.adapt_warnings:
                self.adapt_warnings.append(note)
        m = refinement_map(n, weights=self.channel_weights, **options)
        # elastix's own final resampling would cost a third of the refinement's time on
        # 512 x 512: the result is resampled in numpy instead, linearly, the method's
        # warped_order, so that the exported transformix chain reproduces `warped`
        m["WriteResultImage"] = ["false"]
        m["FinalBSplineInterpolationOrder"] = [str(self.warped_order)]
        return m

    @property
    def config(self) -> dict:
        """JSON-able settings that determine the result (the resume fingerprint of stacks)."""
        return {"method": self.name, "learned": self.learned.config,
                "features": (None if self._features is None else
                             {"model": self._features.description,
                              "weights_sha256": self._features.sha256()}),
                "feature_channels": self.feature_channels,
                "feature_stride": self.feature_stride,
                "feature_downsample": self.feature_downsample,
                "channel_weights": self.channel_weights,
                "parameter_map": self.parameter_map, "tolerance": self.tolerance,
                "initial": self.initial, "preset": self.preset,
                "start_smoothing_px": self.start_smoothing_px, "detail_map": self.detail_map,
                "detail_threshold": self.detail_threshold}

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._features is not None and self._features.path is not None:
            state["_ae"] = None
        return state

    def autoencoder(self):
        """The frozen feature autoencoder (None without feature channels)."""
        if self._features is None or self.feature_channels == 0:
            return None
        if self._ae is None:
            self._ae = self._features.load(self.learned.torch_device)  # threads set too
        return self._ae

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0), fixed_mask=None, moving_mask=None
                 ) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``: learned field, its projection, the refinement.

        ``fixed_mask`` and ``moving_mask`` (elastix's convention: nonzero = use) are the
        refinement's elastix masks (the fixed one combined with the empty-space mask), and
        the learned start's (:meth:`LearnedMethod.predict_field`: filled inputs, no trust
        in its motion under a defect).

        The refinement runs in up to two stages. The first (``refinement``) starts from the
        projected learned field; it is kept if it does not fold and does not lower the NCC
        (``tolerance``). The detail stage (``detail``, a more flexible map) starts from the
        first stage's result and is kept only if it removes most of the remaining
        dissimilarity: ``1 - NCC`` at most ``detail_threshold`` of the first stage's (as on
        a section's own deformed copy). Between neighbouring sections whose content
        changes, a flexible map lowers the dissimilarity a little by following the content,
        and the smoother first stage is kept.

        Returns
        -------
        RegistrationResult
            ``field``: the refined (or, after a fallback, the start) pull field in physical
            units; ``info``: ``learned_field`` (the network's), ``start_field`` (its
            projection, where the refinement starts), ``elastix`` (the kept
            :class:`~hybridreg.elastix.ElastixResult`), ``parameter_maps`` (what elastix
            ran), ``fallback`` (the reason, or None), ``ncc_learned`` (of the start),
            ``ncc_refined``, ``detail`` (``None`` without a detail stage, else ``kept``,
            ``ncc``, ``ratio`` of the dissimilarities, or ``failed``),
            ``seconds_learned``, ``seconds_features``, ``seconds_refinement``.
        """
        from ..warp import warp

        t0 = time.perf_counter()
        fixed, moving, refs = check_pair(fixed, moving, references)
        fixed = fixed.astype(np.float32, copy=False)
        moving = moving.astype(np.float32, copy=False)
        spacing_xy = as_spacing_xy(spacing_xy)
        origin_xy = tuple(float(o) for o in origin_xy)
        fixed_mask, moving_mask = checked_masks(fixed_mask, moving_mask, fixed.shape)
        learned_field, _ = self.learned.predict_field(fixed, moving, references=refs,
                                                      spacing_xy=spacing_xy,
                                                      fixed_mask=fixed_mask,
                                                      moving_mask=moving_mask)
        start = project_start(learned_field, sigma_px=self.start_smoothing_px)
        # the one warp of the moving section by the start: the start's NCC, the fallback's
        # result and the resample start of the refinement
        start_warped, start_valid = warp(moving, start, spacing_xy=spacing_xy, order=1)
        start_ncc = ncc_metric(fixed, start_warped, start_valid)
        t1 = time.perf_counter()
        fixed_ch, moving_ch = [], []
        warnings = list(self.adapt_warnings)
        ae = self.autoencoder()
        if ae is not None:
            from ..defects import neutral_fill

            # a defect's edges are no feature: the encoder sees it filled
            fixed_ch, moving_ch = feature_maps(
                ae, neutral_fill(fixed, fixed_mask), neutral_fill(moving, moving_mask),
                n_channels=self.feature_channels,
                feature_stride=self.feature_stride, downsample=self.feature_downsample,
                intensity_scale=self.learned.intensity_scale,
                intensity_offset=self.learned.intensity_offset,
                device=self.learned.torch_device)
        maps = [self.parameter_map] + ([self.detail_map] if self.detail_map else [])
        if len(fixed_ch) != self.feature_channels:
            from ..elastix import adapt_refinement_map

            warnings.append(f"only {len(fixed_ch)} of {self.feature_channels} feature "
                            f"channels carry signal (blank or constant section?)")
            maps = [adapt_refinement_map(m, 1 + len(fixed_ch),
                                         weights=self.channel_weights[:1 + len(fixed_ch)],
                                         keep_penalties=self.initial == "resample")[0]
                    for m in maps]
        t2 = time.perf_counter()
        mask = content_mask(fixed)
        if fixed_mask is not None:  # (checked at the top)
            mask = fixed_mask if mask is None else mask & fixed_mask
        info = {"learned_field": learned_field, "start_field": start,
                "parameter_maps": [maps[0]], "fallback": None,
                "ncc_learned": start_ncc, "ncc_refined": None, "detail": None,
                "seconds_learned": t1 - t0, "seconds_features": t2 - t1}
        if fixed_mask is not None or moving_mask is not None:
            from .elastix import user_mask_map

            maps = [user_mask_map(m) for m in maps]  # see ElastixMethod.register
        pair = dict(fixed=fixed, moving=moving, spacing_xy=spacing_xy, origin_xy=origin_xy,
                    channels=(fixed_ch, moving_ch), mask=mask, moving_mask=moving_mask)
        refined, warped, ncc_refined, fallback = self._refine(
            maps[0], start, start_warped, start_ncc, **pair)
        if fallback is None and len(maps) > 1:
            detail, d_warped, d_ncc, d_fallback = self._refine(
                maps[1], refined.field, warped, ncc_refined, **pair)
            if d_fallback is None:
                ratio = (1.0 - d_ncc) / max(1.0 - ncc_refined, 1e-12)
                kept = ratio <= self.detail_threshold
                info["detail"] = {"kept": kept, "ncc": d_ncc, "ratio": ratio}
                if kept:
                    refined, warped, ncc_refined = detail, d_warped, d_ncc
            else:
                info["detail"] = {"kept": False, "failed": d_fallback}
        info["seconds_refinement"] = time.perf_counter() - t2
        if refined is not None:
            info["parameter_maps"] = refined.parameter_maps
            info["ncc_refined"] = ncc_refined
        if fallback is not None:
            info["fallback"] = fallback
            warnings.append(f"kept the learned field: {fallback}")
            log.info("hybrid: %s", warnings[-1])
            return RegistrationResult(
                field=start, warped=start_warped, spacing_xy=spacing_xy,
                origin_xy=origin_xy, metric=start_ncc,
                seconds=time.perf_counter() - t0, warnings=tuple(warnings), info=info)
        info["elastix"] = refined
        return RegistrationResult(
            field=refined.field, warped=warped, spacing_xy=spacing_xy, origin_xy=origin_xy,
            metric=ncc_refined, seconds=time.perf_counter() - t0,
            warnings=tuple(warnings), info=info)

    def _refine(self, params, start, start_warped, start_ncc, *, fixed, moving, spacing_xy,
                origin_xy, channels, mask, moving_mask=None):
        """One refinement from ``start``: ``(result, warped, ncc, fallback reason)``.

        ``fallback`` is None when the result is kept: elastix ran, the field is finite,
        does not fold and does not lower the NCC of ``start`` by more than the tolerance.
        """
        from ..elastix import register_pair
        from ..elastix.run import ElastixConfigError
        from ..warp import valid_mask, warp

        try:
            refined = register_pair(
                fixed, moving, params=[params], spacing_xy=spacing_xy, origin_xy=origin_xy,
                fixed_channels=channels[0], moving_channels=channels[1],
                initial_field=start, threads=self.threads, initial_mode=self.initial,
                moving_resampled=start_warped if self.initial == "resample" else None,
                **({"fixed_mask": mask} if mask is not None else {}),
                **({"moving_mask": moving_mask} if moving_mask is not None else {}))
        except ElastixConfigError:  # the parameter file's fault: the same for every pair
            raise
        except Exception as exc:  # noqa: BLE001 - any failure falls back, flagged
            return None, None, None, (f"the refinement failed ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''})")
        if refined.parameter_maps[-1].get("FinalBSplineInterpolationOrder", ["3"])[0] \
                == str(self.warped_order):
            warped = refined.warped  # resampled by register_pair in numpy, this order
            valid = valid_mask(refined.field, spacing_xy=spacing_xy)
        else:
            warped, valid = warp(moving, refined.field, spacing_xy=spacing_xy,
                                 order=self.warped_order)
        ncc = ncc_metric(fixed, warped, valid)
        folds = folding_fraction(refined.field, spacing_xy=spacing_xy, mask=mask)
        fallback = None
        if not np.all(np.isfinite(refined.field)):
            fallback = "the refined field is not finite"
        elif folds > MAX_FOLDING:
            fallback = f"the refined field folds on {folds:.2%} of the section"
        elif ncc is None:
            fallback = "the refined result has no measurable overlap"
        elif start_ncc is not None and ncc < start_ncc - self.tolerance:
            fallback = f"the refinement lowered the NCC from {start_ncc:.4f} to {ncc:.4f}"
        return refined, warped, ncc, fallback
