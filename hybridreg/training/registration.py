"""Training the FAEMReg-style registration network on synthetic deformations of real stacks.

The loss (:func:`registration_losses`, weighted by :class:`LossWeights`), the trainer
(:func:`train_registration`) and its short-schedule variant for a user's stack
(:func:`finetune`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..outputs import jsonable

from .data import StackSampler
from .evaluate import evaluate_registration
from .loop import (TAG_REGISTRATION, TrainingLog, check_int, common_checks, history_summary,
                   prepare_out, resolve_device, resume_state, run_loop)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = ["LossWeights", "registration_losses", "train_registration", "finetune"]


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
        from ..models import FAEMREG_FEATURE_WEIGHTS

        base = tuple(FAEMREG_FEATURE_WEIGHTS)
        if k <= len(base):
            return base[len(base) - k:]
        return (base[0],) * (k - len(base)) + base


# --- the loss ---------------------------------------------------------------------------------

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

    from ..models import (downsample_mask, feature_similarity, make_window, ncc_loss,
                          smoothness)
    from ..warp import warp_torch

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
    from ..models import FeatureAutoencoder, load_model

    ae = load_model(path, map_location=dev)
    if not isinstance(ae, FeatureAutoencoder):
        raise ValueError(f"features={os.fspath(path)!r} holds a {type(ae).__name__}, not a "
                         f"FeatureAutoencoder")
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae


# --- the trainers -----------------------------------------------------------------------------

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

    Adjacent EM sections differ in content, so matching the neighbours' features alone
    teaches the network to follow that content drift. The synthetic deformation of the
    moving section is known exactly, so the EPE term teaches the network to recover the
    section's own distortion and to ignore content change; since the stacks were aligned,
    the undeformed section *is* aligned to its references. No human labels are needed:
    only an aligned stack (for a user's own raw stack, a first alignment by any method is
    enough, the errors left in it act like the reference jitter).

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
        Adam's learning rate (FAEMReg: 1e-4).
    lr_schedule : {"step", "constant", "cosine"}
        ``"step"`` halves the rate at every quarter of ``steps`` (FAEMReg's schedule).
    seed : int
        Initial weights from ``torch.manual_seed(seed)``; step ``s`` draws its windows from
        ``numpy.random.default_rng([seed, 2, s])``.
    weights : LossWeights
    deformation : dict, optional
        Magnitudes of the synthetic deformation (see :class:`StackSampler`).
    reference_jitter_px : float
        Jitter of the references (see :class:`StackSampler`).
    init : str or Path, optional
        A network checkpoint to start from (finetuning); its architecture is used.
    weight_decay, device, checkpoint_every, log_every, resume, overwrite, stop_at, exclude
        As in :func:`train_features`; so is ``progress``.
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

    from ..models import FAEMRegNet, load_model, read_metadata

    steps = common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                          lr_schedule)
    k = check_int("references", references, 1)
    if not isinstance(weights, LossWeights):
        raise TypeError(f"weights must be a LossWeights, got {type(weights).__name__}")
    weights.for_references(k)
    validation_every = check_int("validation_every", validation_every or checkpoint_every, 1)
    out, sp, resuming = prepare_out(out, resume=resume, overwrite=overwrite)
    dev = resolve_device(device)
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

    options = jsonable({
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
        start, seconds0, history = resume_state(sp, kind="train_registration",
                                                options=options, model=net,
                                                optimizer=optimizer, out=out, steps=steps)

    def step_fn(step):
        rng = np.random.default_rng([seed, TAG_REGISTRATION, step])
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
                "final_losses": last, "history": history_summary(hist), "data": sampler.names,
                "features": options["features"], "references": k, "device": str(dev)}

    log.info("train_registration: %s, %d parameters, %s, steps %d..%d on %s", out,
             sum(p.numel() for p in net.parameters()), sampler, start, steps, dev)
    return run_loop(kind="train_registration", model=net, optimizer=optimizer,
                    step_fn=step_fn, out=out, sp=sp, start=start, steps=steps,
                    stop_at=stop_at, lr=lr, lr_schedule=lr_schedule, options=options,
                    history=history, seconds0=seconds0, checkpoint_every=checkpoint_every,
                    log_every=log_every, progress=progress, device=dev,
                    save_metadata=metadata, validate=validate,
                    validation_every=validation_every)


def finetune(stacks, *, init, out, steps: int = 300, lr: float = 5e-5,
             lr_schedule: str = "cosine", features=None, crop: int = 256, batch: int = 4,
             log_every: int = 25, checkpoint_every: int = 100, **kw) -> TrainingLog:
    """Adapt a trained registration network to a user's stack with a short schedule.

    :func:`train_registration` from ``init`` (its architecture and weights), by default
    300 steps at half FAEMReg's learning rate decaying to 0 (cosine), driven by the
    self-supervised endpoint-error term and the smoothness term. The feature term is off
    by default (it is costly through a large autoencoder); pass ``features="init"`` or a
    path to use it. The stack should be aligned (a first alignment by any method will do;
    see :func:`train_registration`).

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
    from ..models import read_metadata

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

