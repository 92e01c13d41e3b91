"""Training the feature autoencoder (ssEMnet, FAEMReg) to reconstruct EM sections."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..outputs import jsonable

from .data import StackSampler
from .loop import (TAG_FEATURES, TrainingLog, common_checks, history_summary,
                   prepare_out, resolve_device, resume_state, run_loop)

log = logging.getLogger(__name__)

__all__ = ["train_features"]


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

    from ..models import DEFAULT_AUTOENCODER_LAYERS, FeatureAutoencoder

    steps = common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                          lr_schedule)
    out, sp, resuming = prepare_out(out, resume=resume, overwrite=overwrite)
    dev = resolve_device(device)
    sampler = StackSampler(stacks, crop=crop, augment=True, exclude=exclude, seed=seed)
    spec = [list(map(int, layer)) for layer in (layers or DEFAULT_AUTOENCODER_LAYERS)]
    options = jsonable({"layers": spec, "feature_relu": bool(feature_relu), "crop": crop,
                        "batch": batch, "steps": steps, "lr": lr, "lr_schedule": lr_schedule,
                        "weight_decay": weight_decay, "seed": seed, "exclude": exclude,
                        "data": sampler.names, "checkpoint_every": checkpoint_every,
                        "log_every": log_every, "device": str(dev), "out": os.fspath(out)})

    torch.manual_seed(seed)
    model = FeatureAutoencoder(spec, feature_relu=feature_relu).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start, seconds0, history = 0, 0.0, []
    if resuming:
        start, seconds0, history = resume_state(sp, kind="train_features", options=options,
                                                model=model, optimizer=optimizer, out=out,
                                                steps=steps)

    def step_fn(step):
        rng = np.random.default_rng([seed, TAG_FEATURES, step])
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
                "final_losses": last, "history": history_summary(hist),
                "data": sampler.names, "device": str(dev)}

    log.info("train_features: %s, %d parameters, %s, steps %d..%d on %s", out,
             sum(p.numel() for p in model.parameters()), sampler, start, steps, dev)
    return run_loop(kind="train_features", model=model, optimizer=optimizer, step_fn=step_fn,
                    out=out, sp=sp, start=start, steps=steps, stop_at=stop_at, lr=lr,
                    lr_schedule=lr_schedule, options=options, history=history,
                    seconds0=seconds0, checkpoint_every=checkpoint_every,
                    log_every=log_every, progress=progress, device=dev,
                    save_metadata=metadata)
