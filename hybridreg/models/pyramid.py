"""A FAEMReg-style window network with a correlation pyramid: the ``compact`` preset.

Why a cost volume
    FAEMReg's network (:class:`~hybridreg.models.FAEMRegNet`) has to *learn* to compare
    sections; an explicit *cost volume* of feature correlations over a small search window
    at every level of a pyramid, with the moving features warped by the coarser estimate
    first (PWC-Net, Sun et al. 2018), builds the comparison in, so the network only learns
    features and how to read the costs, and trains in thousands of CPU steps.

What is kept from FAEMReg
    The input (the mirrored window ``[r1, .., rk, m, rk, .., r1]`` of
    :func:`~hybridreg.models.make_window`), leaky ReLU 0.1, a field scale, and 3D
    convolutions across the window: at every level the features of the ``k`` references are
    fused by a ``Conv3d`` whose depth kernel spans the ``k`` references (no depth padding,
    so the depth collapses to one fused reference), as FAEMReg's flow heads collapse the
    window with a depth stride. It starts as the identity on the nearest reference, so that
    the cost volumes compare features of one encoder from the first step.

Architecture (:class:`FAEMRegPyramidNet`)
    Features: one small 2D encoder shared by all sections (siamese), two ``3x3``
    convolutions per level, the first with stride 2: level ``l`` (``1 .. L``) is the grid
    downsampled by ``2**l``, with ``channels[l - 1]`` channels.

    Coarse to fine, at each level from ``L`` down to ``output_level``: the moving
    features are warped by the coarser flow (upsampled, bilinear), a cost volume of the
    correlations between the fused reference features and the warped moving features is
    formed over displacements ``[-r, r]^2`` (``(2r + 1)**2`` channels, mean over feature
    channels), and a small CNN reads ``[costs, fused reference features, coarser flow]``
    and predicts a *residual* flow, added to the coarser flow (with ``soft_argmax``, the
    costs' soft argmax is added first and the CNN corrects it). The finest flow (level
    ``output_level``, default 1/4) is upsampled bilinearly to full resolution
    (registration fields are smooth).

    The capture range is about ``r * 2**L`` pixels (3 * 32 = 96 px with the defaults).

Output
    ``(B, 2, H, W)`` pull displacement in pixels, channel 0 = x: ``warped(p) = moving(p +
    u(p))`` aligns the moving section (the window's centre) to the references.
    :meth:`FAEMRegPyramidNet.forward_pyramid` also returns the coarser flows (for a
    multi-scale loss), all in full-resolution pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .faemreg import FAEMRegNet

__all__ = ["FAEMRegPyramidNet", "correlation"]


def correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Local correlation: ``out[:, k] = mean_c a(p) * b(p + d_k)`` for ``d_k`` in ``[-r, r]^2``.

    Parameters
    ----------
    a, b : Tensor, shape (B, C, H, W)
    radius : int
        Search radius ``r``, pixels of this grid; ``b`` is zero-padded.

    Returns
    -------
    Tensor, shape (B, (2r + 1)**2, H, W)
        Displacements in row-major order: ``k = (dy + r) * (2r + 1) + (dx + r)``.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"a and b must both have shape (B, C, H, W), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    r = int(radius)
    h, w = a.shape[-2:]
    bp = F.pad(b, (r, r, r, r))
    out = [(a * bp[..., dy:dy + h, dx:dx + w]).mean(1, keepdim=True)
           for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
    return torch.cat(out, dim=1)


def _warp(x: torch.Tensor, u_px: torch.Tensor) -> torch.Tensor:
    """Bilinear pull warp of ``x`` (B, C, h, w) by ``u_px`` (B, 2, h, w), border clamped."""
    from ..warp import warp_torch

    return warp_torch(x, u_px, align_corners=True, padding_mode="border")[0]


class FAEMRegPyramidNet(FAEMRegNet):
    """FAEMReg-style window network with a PWC-style correlation pyramid (module docstring).

    A :class:`~hybridreg.models.FAEMRegNet` by type (same input, output and use), with its
    own architecture; it does not call ``FAEMRegNet.__init__``.

    Parameters
    ----------
    window : int
        Depth of the input window (odd, >= 3): ``2k + 1`` for ``k`` references.
    channels : sequence of int
        Feature channels of levels ``1 .. L`` (level ``l`` at ``1 / 2**l``).
    decoder : sequence of int
        Widths of the ``3x3`` convolutions of each level's flow estimator.
    radius : int
        Correlation search radius, pixels of each level.
    soft_argmax : bool
        Read each cost volume with a soft argmax too: the displacement expected under a
        softmax of the cosine similarities (a learned temperature per level) is added to
        the flow before the estimator's correction, and given to the estimator as input.
        Block matching is then built in and the estimator only corrects it.
    output_level : int
        Finest level with a flow estimate (1 .. L); its flow is upsampled to full resolution.
    flow_scale : float
        The estimators' outputs times this are pixels (FlowNet's convention: small outputs).
    negative_slope : float
        Leaky ReLU slope (FAEMReg: 0.1).
    in_channels : int
        Channels per section (1 for EM intensities).
    """

    def __init__(self, *, window: int = 7, channels: Sequence[int] = (16, 24, 32, 48, 64),
                 decoder: Sequence[int] = (64, 48, 32), radius: int = 3,
                 soft_argmax: bool = False,
                 output_level: int = 2, flow_scale: float = 20.0,
                 negative_slope: float = 0.1, in_channels: int = 1):
        nn.Module.__init__(self)
        window = int(window)
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        channels = [int(c) for c in channels]
        decoder = [int(c) for c in decoder]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got "
                             f"{channels}")
        if not decoder or any(c < 1 for c in decoder):
            raise ValueError(f"decoder must be a non-empty list of positive ints, got "
                             f"{decoder}")
        if int(radius) < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        self.window = window
        self.refs = (window - 1) // 2
        self.levels = len(channels)
        self.output_level = int(output_level)
        if not 1 <= self.output_level <= self.levels:
            raise ValueError(f"output_level must be between 1 and {self.levels} (the number "
                             f"of levels), got {output_level}")
        self.radius = int(radius)
        self.soft_argmax = bool(soft_argmax)
        self.flow_scale = float(flow_scale)
        self.negative_slope = float(negative_slope)
        self.in_channels = int(in_channels)
        self._channels = channels
        self._decoder = decoder
        # the FAEMRegNet attributes other code may read
        self.n_3d = 0
        self.decoder_3d = False

        enc = []
        ch = self.in_channels
        for c in channels:
            enc.append(nn.ModuleList([nn.Conv2d(ch, c, 3, stride=2, padding=1),
                                      nn.Conv2d(c, c, 3, padding=1)]))
            ch = c
        self.features = nn.ModuleList(enc)
        # 3D convolution across the references: depth kernel k, no depth padding
        self.fuse = nn.ModuleList([nn.Conv3d(c, c, (self.refs, 3, 3), padding=(0, 1, 1))
                                   for c in channels])
        n_cost = (2 * self.radius + 1) ** 2
        est = []
        heads = []
        for lvl in range(self.levels, self.output_level - 1, -1):
            c_in = n_cost + channels[lvl - 1] + 2 + (2 if self.soft_argmax else 0)
            layers = []
            for width in decoder:
                layers.append(nn.Conv2d(c_in, width, 3, padding=1))
                c_in = width
            est.append(nn.ModuleList(layers))
            heads.append(nn.Conv2d(c_in, 2, 3, padding=1))
        self.estimators = nn.ModuleList(est)   # index 0: coarsest level
        r = self.radius
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0),
                                indexing="ij")
        # (k, 2) offsets (x, y) of the correlation channels, row-major as in correlation()
        self.register_buffer("_offsets", torch.stack([dx.flatten(), dy.flatten()], 1),
                             persistent=False)
        self.log_temperature = nn.Parameter(torch.full((len(est),), math.log(0.05)),
                                            requires_grad=self.soft_argmax)
        self.flow_heads = nn.ModuleList(heads)

        convs = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        for m in convs:
            nn.init.kaiming_normal_(m.weight, a=self.negative_slope,
                                    nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)
        # the fusion starts as the nearest reference's features (centre tap of the last depth
        # slice): the costs compare features of one encoder, so they are meaningful from the
        # first step; a random fusion would correlate two unrelated feature spaces
        for fuse in self.fuse:
            nn.init.zeros_(fuse.weight)
            with torch.no_grad():
                idx = torch.arange(fuse.out_channels)
                fuse.weight[idx, idx, self.refs - 1, 1, 1] = 1.0
        for head in self.flow_heads:
            fan_in = head.weight[0].numel()
            # about 0.01 px: an untrained net is near the identity
            nn.init.normal_(head.weight, std=0.01 / (self.flow_scale * math.sqrt(fan_in)))
            nn.init.zeros_(head.bias)

    # --- construction ---------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable)."""
        return {"window": self.window, "channels": list(self._channels),
                "decoder": list(self._decoder), "radius": self.radius,
                "soft_argmax": self.soft_argmax,
                "output_level": self.output_level, "flow_scale": self.flow_scale,
                "negative_slope": self.negative_slope, "in_channels": self.in_channels}

    @property
    def stride(self) -> int:
        """Input sizes are padded to a multiple of this (``2**levels``)."""
        return 2 ** self.levels

    # --- forward --------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv_a, conv_b in self.features:
            x = self._act(conv_b(self._act(conv_a(x))))
            feats.append(x)
        return feats

    def encode_sections(self, sections: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features of single sections, one tensor per level.

        Every section of the window is encoded alone (the references meet only in the
        fusion), so features can be computed once per section and reused in every window
        that holds it (:meth:`forward_features`), as a sequential stack alignment does.

        Parameters
        ----------
        sections : Tensor, shape (N, in_channels, H, W)

        Returns
        -------
        list of Tensor, shapes (N, C_l, ceil(H / 2**l), ceil(W / 2**l)), l = 1 .. levels
        (of the grid padded to a multiple of :attr:`stride`).
        """
        if sections.ndim != 4 or sections.shape[1] != self.in_channels:
            raise ValueError(f"sections must have shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(sections.shape)}")
        return self._encode(self._pad_to_stride(sections))

    def forward_features(self, feats: list[torch.Tensor], shape_yx) -> torch.Tensor:
        """:meth:`forward` from :meth:`encode_sections` features.

        Parameters
        ----------
        feats : list of Tensor
            Per level, shape (B * (k + 1), C_l, h_l, w_l): for each batch item the window's
            references ``r1 .. rk`` (oldest first, as :func:`make_window` orders them) and
            then the moving section.
        shape_yx : (int, int)
            The sections' grid before padding.
        """
        h, w = (int(v) for v in shape_yx)
        return self._upsampled(self._decode(feats, h, w)[-1], h, w)

    def _pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        x = self._padded(x)
        b = x.shape[0]
        k = self.refs
        hp, wp = x.shape[-2:]
        # the window's distinct sections: references r1..rk (slices 0..k-1) and m (slice k)
        sections = x[:, :, :k + 1].transpose(1, 2).reshape(b * (k + 1), self.in_channels,
                                                           hp, wp)
        return self._decode(self._encode(sections), h, w)

    def _decode(self, feats: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
        k = self.refs
        if len(feats) != self.levels or feats[0].shape[0] % (k + 1):
            raise ValueError(f"expected {self.levels} feature levels of B * {k + 1} sections, "
                             f"got {len(feats)} levels of {feats[0].shape[0]}")
        b = feats[0].shape[0] // (k + 1)
        flow = None  # full-resolution pixels
        flows = []
        for j, lvl in enumerate(range(self.levels, self.output_level - 1, -1)):
            f = feats[lvl - 1]
            c, fh, fw = f.shape[1:]
            f = f.reshape(b, k + 1, c, fh, fw)
            refs = f[:, :k].transpose(1, 2)                    # (B, C, k, h, w)
            fused = self._act(self.fuse[lvl - 1](refs)).squeeze(2)
            mov = f[:, k]
            factor = 2 ** lvl
            if flow is None:
                up = mov.new_zeros(b, 2, fh, fw)
                warped = mov
            else:
                up = F.interpolate(flow, size=(fh, fw), mode="bilinear",
                                   align_corners=False)
                warped = _warp(mov, up / factor)
            if self.soft_argmax:
                # block matching built in: the expected displacement under a softmax of
                # the cosine similarities (temperature per level, learned)
                raw = correlation(F.normalize(fused, dim=1), F.normalize(warped, dim=1),
                                  self.radius)
                prob = torch.softmax(raw / self.log_temperature[j].exp(), dim=1)
                match = torch.einsum("bkhw,kc->bchw", prob, self._offsets.to(prob.dtype))
                cost = raw
                y = torch.cat([cost, fused, up / factor, match], dim=1)
                up = up + match * factor
            else:
                cost = self._act(correlation(fused, warped, self.radius))
                y = torch.cat([cost, fused, up / factor], dim=1)
            for conv in self.estimators[j]:
                y = self._act(conv(y))
            flow = up + self.flow_heads[j](y) * self.flow_scale
            flows.append(flow)
        out = []
        for j, fl in enumerate(flows):
            f = 2 ** (self.levels - j)
            out.append(fl[..., : -(-h // f), : -(-w // f)])
        return out
