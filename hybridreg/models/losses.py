"""Registration losses: feature similarity, NCC, smoothness and ssEMnet's loss drop.

All losses are scalars to *minimise*. Images and features are ``(B, C, H, W)`` tensors;
fields are pull displacements in pixels, ``(B, 2, H, W)``, channel 0 = x.

Masks
    ``mask``/``valid`` arguments are ``(B, 1, H, W)`` (bool, or float weights in [0, 1]) and
    mark the pixels that count, e.g. the ``valid`` output of
    :class:`~hybridreg.models.SpatialTransformer` (pixels not warped in from outside the
    moving section). A mask on a finer grid than the tensor it weights, by an integer factor
    ``f`` (an image mask for features at 1/16), is reduced with :func:`downsample_mask`: a
    coarse pixel counts only if every fine pixel under it does.

FAEMReg's objective, with these pieces (see PAPERS.md)::

    FAEMREG_LOSS_SCALE * (feature_similarity(f_refs, f_warped, FAEMREG_FEATURE_WEIGHTS,
                                             kind="frobenius")
                          + FAEMREG_SMOOTHNESS_WEIGHT * smoothness(u_px))
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "feature_similarity",
    "ncc_loss",
    "smoothness",
    "ssemnet_masked_loss",
    "loss_drop_fraction",
    "downsample_mask",
    "FAEMREG_FEATURE_WEIGHTS",
    "FAEMREG_SMOOTHNESS_WEIGHT",
    "FAEMREG_LOSS_SCALE",
]

#: FAEMReg's weights of the references r1, r2, r3 (nearest last).
FAEMREG_FEATURE_WEIGHTS = (0.33, 0.5, 1.0)
#: FAEMReg's weight of the smoothness term relative to the similarity.
FAEMREG_SMOOTHNESS_WEIGHT = 3.0
#: FAEMReg's overall loss factor.
FAEMREG_LOSS_SCALE = 12.7


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Reduce a mask by an integer ``factor``: a coarse pixel is True only if all fine ones are.

    The grid is first padded at the bottom and right (with True) to a multiple of
    ``factor``, matching the padding of :class:`~hybridreg.models.FeatureAutoencoder`, so
    the result has shape ``(B, 1, ceil(H / factor), ceil(W / factor))``.

    Parameters
    ----------
    mask : Tensor, shape (B, 1, H, W), bool or float (> 0.5 is True)
    factor : int

    Returns
    -------
    Tensor of bool, shape (B, 1, ceil(H / factor), ceil(W / factor))
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    m = mask if mask.dtype == torch.bool else mask > 0.5
    if factor == 1:
        return m
    invalid = (~m).to(torch.float32)
    h, w = invalid.shape[-2:]
    invalid = F.pad(invalid, (0, (-w) % factor, 0, (-h) % factor))
    return F.max_pool2d(invalid, factor) < 0.5


def _weights_on(mask: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor | None:
    """A float weight map ``(B, 1, h, w)`` on the grid of ``like`` (or None)."""
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{name} must have shape (B, 1, H, W) with B = {like.shape[0]}, "
                         f"got {tuple(mask.shape)}")
    h, w = like.shape[-2:]
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (h, w):
        # the grids of encoder features are the image's, strided by a power of two (sizes that
        # are not a multiple of it round up): ceil(50 / 16) = 4, but also ceil(50 / 13) = 4,
        # so the factor is the power of two that fits both axes
        factor = next((2 ** e for e in range(1, 11)
                       if -(-mh // 2 ** e) == h and -(-mw // 2 ** e) == w), None)
        if factor is None:
            raise ValueError(f"{name} grid {(mh, mw)} does not match the tensor grid "
                             f"{(h, w)}; pass a mask on the same grid or use "
                             f"downsample_mask(mask, factor)")
        mask = downsample_mask(mask, factor)
    if mask.dtype == torch.bool:
        return mask.to(like.dtype)
    return mask.to(like.dtype).clamp(0, 1)


def feature_similarity(features_fixed_list, features_warped: torch.Tensor,
                       weights: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                       *, kind: str = "mse") -> torch.Tensor:
    """Weighted feature difference between references and the warped moving section.

    ``sum_i weights[i] * D(features_fixed_list[i], features_warped)``, with ``D`` the mean
    squared difference (``kind="mse"``, size independent) or, as FAEMReg, the Frobenius norm
    of the difference per sample, averaged over the batch (``kind="frobenius"``). The weights
    are not normalised.

    Parameters
    ----------
    features_fixed_list : sequence of Tensor (B, C, h, w), or one Tensor
        Features of the references, e.g. ``[f(r1), f(r2), f(r3)]`` (nearest last).
    features_warped : Tensor, shape (B, C, h, w)
        Features of the warped moving section.
    weights : sequence of float, optional
        One per reference; default all 1. FAEMReg: :data:`FAEMREG_FEATURE_WEIGHTS`.
    mask : Tensor, shape (B, 1, h, w) or an integer multiple of it, optional
        Pixels that count (see the module docstring).
    kind : {"mse", "frobenius"}

    Returns
    -------
    Tensor, scalar
    """
    if isinstance(features_fixed_list, torch.Tensor):
        features_fixed_list = [features_fixed_list]
    refs = list(features_fixed_list)
    if not refs:
        raise ValueError("features_fixed_list is empty")
    if weights is None:
        weights = [1.0] * len(refs)
    weights = [float(v) for v in weights]
    if len(weights) != len(refs):
        raise ValueError(f"got {len(weights)} weights for {len(refs)} reference feature maps")
    if kind not in ("mse", "frobenius"):
        raise ValueError(f"kind must be 'mse' or 'frobenius', got {kind!r}")
    if features_warped.ndim != 4:
        raise ValueError(f"features_warped must have shape (B, C, h, w), got "
                         f"{tuple(features_warped.shape)}")
    for i, f in enumerate(refs):
        if f.shape != features_warped.shape:
            raise ValueError(f"features_fixed_list[{i}] has shape {tuple(f.shape)}, "
                             f"features_warped {tuple(features_warped.shape)}")
    wmap = _weights_on(mask, features_warped, "mask")
    total = features_warped.new_zeros(())
    for wi, f in zip(weights, refs):
        sq = (f - features_warped).pow(2)
        if kind == "mse":
            if wmap is None:
                d = sq.mean()
            else:
                d = (sq * wmap).sum() / wmap.expand_as(sq).sum().clamp_min(1e-12)
        else:
            if wmap is not None:
                sq = sq * wmap
            d = torch.sqrt(sq.flatten(1).sum(1) + 1e-12).mean()
        total = total + wi * d
    return total


def _weighted_stats(a, b, wmap, reduce):
    """Weighted means, variances and covariance of a and b under ``reduce``."""
    sw = reduce(wmap)
    safe = sw.clamp_min(1e-12)
    ma = reduce(wmap * a) / safe
    mb = reduce(wmap * b) / safe
    va = (reduce(wmap * a * a) / safe - ma * ma).clamp_min(0)
    vb = (reduce(wmap * b * b) / safe - mb * mb).clamp_min(0)
    cov = reduce(wmap * a * b) / safe - ma * mb
    return sw, va, vb, cov


def ncc_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
             window: int | None = None, *, eps: float = 1e-5) -> torch.Tensor:
    """``1 - NCC(a, b)``: 0 for images equal up to brightness and contrast, up to 2.

    Parameters
    ----------
    a, b : Tensor, shape (B, C, H, W)
    mask : Tensor, shape (B, 1, H, W) (or an integer multiple of it), optional
        Pixels that count, in the statistics and in the average.
    window : int, optional
        ``None``: global NCC per sample and channel. An odd int: local NCC in
        ``window x window`` boxes around every pixel (weighted by the mask, zero outside the
        image), averaged over the (masked) pixels.
    eps : float
        Added to the variances; flat regions give NCC 0.

    Returns
    -------
    Tensor, scalar
        ``1 - mean NCC`` over pixels (local), channels and batch.
    """
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, C, H, W), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    wmap = _weights_on(mask, a, "mask")
    if wmap is None:
        wmap = torch.ones_like(a[:, :1])
    wmap = wmap.expand(a.shape[0], 1, *a.shape[-2:])
    if window is None:
        def reduce(x):
            return x.sum(dim=(-2, -1), keepdim=True)

        sw, va, vb, cov = _weighted_stats(a, b, wmap, reduce)
        ncc = cov / (torch.sqrt(va + eps) * torch.sqrt(vb + eps))
        has = (sw > 0).to(a.dtype).expand_as(ncc)
        return 1.0 - (ncc * has).sum() / has.sum().clamp_min(1.0)
    window = int(window)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window}")

    def reduce(x):
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=True)

    sw, va, vb, cov = _weighted_stats(a, b, wmap, reduce)
    ncc = cov / (torch.sqrt(va + eps) * torch.sqrt(vb + eps))
    weight = (wmap * (sw > 0).to(a.dtype)).expand_as(ncc)
    return 1.0 - (ncc * weight).sum() / weight.sum().clamp_min(1e-12)


def smoothness(u_px: torch.Tensor, *, penalty: str = "l1") -> torch.Tensor:
    """Smoothness of a field: mean size of its forward differences (FAEMReg style).

    ``(mean |d_x u| + mean |d_y u|) / 2`` over both components (``penalty="l1"``), or with
    squares (``"l2"``, the usual diffusion regulariser). Units: pixels per pixel.

    Parameters
    ----------
    u_px : Tensor, shape (B, 2, H, W)
    penalty : {"l1", "l2"}

    Returns
    -------
    Tensor, scalar; 0 for any constant field
    """
    if u_px.ndim != 4 or u_px.shape[1] != 2:
        raise ValueError(f"u_px must have shape (B, 2, H, W), got {tuple(u_px.shape)}")
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    dx = u_px[..., :, 1:] - u_px[..., :, :-1]
    dy = u_px[..., 1:, :] - u_px[..., :-1, :]
    if penalty == "l1":
        return (dx.abs().mean() + dy.abs().mean()) / 2
    return (dx.pow(2).mean() + dy.pow(2).mean()) / 2


def ssemnet_masked_loss(diff: torch.Tensor, valid: torch.Tensor | None,
                        drop_fraction: float = 0.0, *, error: str = "squared") -> torch.Tensor:
    """ssEMnet's robust loss: the mean error over valid pixels after dropping the largest.

    The per-pixel error is the channel mean of ``diff**2`` (``error="squared"``) or
    ``|diff|`` (``"absolute"``). Pixels outside ``valid`` (warped in from outside the
    moving section: ssEMnet's "empty space" mask) are ignored, and of the rest the
    ``floor(drop_fraction * n_valid)`` largest errors are dropped ("loss drop", robustness
    to artefacts; ssEMnet starts at 0.5 and halves the fraction each iteration, see
    :func:`loss_drop_fraction`). Gradients reach only the kept pixels.

    Parameters
    ----------
    diff : Tensor, shape (B, C, h, w)
        Difference, e.g. ``f(fixed) - f(warped)`` of features or images.
    valid : Tensor, shape (B, 1, h, w) (or an integer multiple of it), bool, optional
    drop_fraction : float in [0, 1)
    error : {"squared", "absolute"}

    Returns
    -------
    Tensor, scalar
        Mean over samples (those with at least one valid pixel) of the kept mean error.
    """
    if diff.ndim != 4:
        raise ValueError(f"diff must have shape (B, C, h, w), got {tuple(diff.shape)}")
    drop_fraction = float(drop_fraction)
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    if error == "squared":
        err = diff.pow(2).mean(1)
    elif error == "absolute":
        err = diff.abs().mean(1)
    else:
        raise ValueError(f"error must be 'squared' or 'absolute', got {error!r}")
    if valid is None:
        keep_mask = torch.ones_like(err, dtype=torch.bool)
    else:
        keep_mask = _weights_on(valid, diff, "valid")[:, 0] > 0.5
        keep_mask = keep_mask.expand_as(err)
    losses = []
    for e, m in zip(err, keep_mask):
        vals = e[m]
        n = vals.numel()
        if n == 0:
            continue
        keep = n - math.floor(drop_fraction * n)
        if keep < n:
            vals = torch.topk(vals, keep, largest=False, sorted=False).values
        losses.append(vals.mean())
    if not losses:
        return diff.sum() * 0.0
    return torch.stack(losses).mean()


def loss_drop_fraction(iteration: int, *, initial: float = 0.5,
                       halve_every: int = 1) -> float:
    """ssEMnet's loss-drop schedule: ``initial * 0.5 ** (iteration // halve_every)``."""
    if iteration < 0 or halve_every < 1:
        raise ValueError(f"need iteration >= 0 and halve_every >= 1, got {iteration}, "
                         f"{halve_every}")
    return float(initial) * 0.5 ** (int(iteration) // int(halve_every))
