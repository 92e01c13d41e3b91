"""The spatial transformer: a differentiable warp as an ``nn.Module``.

A thin wrapper of :func:`hybridreg.warp.warp_torch`, which holds the coordinate contract
(pull direction, ``warped(p) = moving(p + u(p))``, pixel displacements, channel 0 = x).
"""
from __future__ import annotations

import torch
from torch import nn

from ..warp import warp_torch

__all__ = ["SpatialTransformer"]

_MODES = ("bilinear", "nearest", "bicubic")
_PADDING_MODES = ("zeros", "border", "reflection")


class SpatialTransformer(nn.Module):
    """Warp images with pull fields in pixels; returns ``(warped, valid)``.

    Parameters
    ----------
    align_corners : bool
        Passed to ``grid_sample``. ``True`` (default) samples at pixel centres, as ITK does.
    mode : {"bilinear", "nearest", "bicubic"}
        Interpolation.
    padding_mode : {"border", "zeros", "reflection"}
        Values sampled outside the moving image. ``"border"`` (default) clamps at the edge,
        as FAEMReg does; either way ``valid`` marks the pixels that sampled inside.

    Notes
    -----
    ``forward(moving (B, C, H, W), u_px (B, 2, H, W))`` returns ``warped (B, C, H, W)`` with
    ``warped(p) = moving(p + u_px(p))``, and ``valid``, bool ``(B, 1, H, W)``, True where
    ``p + u_px(p)`` lies inside the moving image. Gradients flow to both ``moving`` and
    ``u_px``; ``valid`` carries none.
    """

    def __init__(self, *, align_corners: bool = True, mode: str = "bilinear",
                 padding_mode: str = "border"):
        super().__init__()
        if not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got "
                             f"{padding_mode!r}")
        self.align_corners = align_corners
        self.mode = mode
        self.padding_mode = padding_mode

    @property
    def config(self) -> dict:
        return {"align_corners": self.align_corners, "mode": self.mode,
                "padding_mode": self.padding_mode}

    @classmethod
    def from_config(cls, config: dict) -> "SpatialTransformer":
        return cls(**config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def forward(self, moving: torch.Tensor, u_px: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``moving`` with ``u_px``: ``warped(p) = moving(p + u_px(p))``.

        Parameters
        ----------
        moving : Tensor, shape (B, C, H, W)
        u_px : Tensor, shape (B, 2, H, W)
            Pull field in pixels, channel 0 = x.

        Returns
        -------
        warped : Tensor, shape (B, C, H, W)
        valid : Tensor of bool, shape (B, 1, H, W)
        """
        return warp_torch(moving, u_px, align_corners=self.align_corners, mode=self.mode,
                          padding_mode=self.padding_mode)
