"""The endpoint error of a registration network on synthetic windows of held-out stacks."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from .data import StackSampler
from .loop import TAG_EVALUATION, check_int, resolve_device

__all__ = ["evaluate_registration"]


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

    from ..models import FAEMRegNet, load_model, make_window

    if isinstance(model, (str, os.PathLike)):
        dev = resolve_device(device)
        net = load_model(model, map_location=dev)
    else:
        net = model
    if not isinstance(net, FAEMRegNet):
        raise TypeError(f"model must be a FAEMRegNet or its checkpoint, got "
                        f"{type(net).__name__}")
    dev = next(net.parameters()).device
    n = check_int("n", n, 1)
    batch = check_int("batch", batch, 1)
    k = (net.window - 1) // 2 if references is None else check_int("references",
                                                                    references, 1)
    sampler = StackSampler(stacks, crop=crop, deformation=deformation,
                           reference_jitter_px=reference_jitter_px, seed=seed)
    was_training = net.training
    net.eval()
    epe, ident = [], []
    try:
        with torch.no_grad():
            for i, b0 in enumerate(range(0, n, batch)):
                rng = np.random.default_rng([seed, TAG_EVALUATION, i])
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
