"""FAEMReg's registration network: 3D convolutions over a window of sections, one dense field.

FAEMReg (Zhou et al., MICCAI 2019) stacks three aligned reference sections ``r1, r2, r3``
(``r3`` nearest) and the moving section ``m`` into the mirrored depth-7 volume
``[r1, r2, r3, m, r3, r2, r1]`` and predicts, in one forward pass, the pull field that aligns
``m`` to the references.

Architecture (:class:`FAEMRegNet`)
    Encoder: convolutions with SAME padding and leaky ReLU (slope 0.1), striding in-plane
    only (stride ``(1, 2, 2)``), so the depth of the window is kept. The first ``n_3d`` layers
    are 3D; after them the depth is folded into the channels, ``(B, C, D, H, W) -> (B, C*D,
    H, W)``, and the remaining layers are 2D (the published net is 3D throughout). A *level*
    ``l`` is the grid downsampled by ``2**l``; its skip feature is the output of the last
    encoder layer at that resolution (level 0: the input itself when no layer runs at full
    resolution).

    Decoder, FlowNet style, from the coarsest level ``L`` down to ``output_level``: at each
    level a flow head predicts two channels. In a 3D decoder the head is a ``Conv3d`` with
    kernel 3, padding in-plane only and stride ``(depth, 1, 1)``, which collapses the depth to
    one 2D flow (as published: with no depth padding it reads the first three depth slices,
    which after the 3D encoder carry the whole window); in a 2D decoder it is a ``Conv2d``
    with kernel 3. The features are upsampled
    by a transposed convolution (stride 2 in-plane, kernel 3, leaky ReLU) and concatenated
    with the skip feature of the finer level and the bilinearly upsampled coarser flow (tiled
    along the depth in a 3D decoder). Once the decoder is 2D (the coarsest level is 2D), 3D
    skip features enter it folded as ``C*D`` channels.

    The head outputs of every level are in units of ``flow_scale`` full-resolution pixels
    (FlowNet's convention): the field is ``flow_scale * head`` (FAEMReg: 20). With
    ``output_level > 0`` the finest predicted flow is upsampled bilinearly to full
    resolution. The flow heads start near zero, so an untrained net predicts about the
    identity (a field of hundredths of a pixel).

Sizes
    The input is padded at the bottom and right (edge replicated) to a multiple of
    ``2**L`` and the field is cropped back, so any ``H, W`` works.

Output
    ``(B, 2, H, W)`` pull displacement in pixels, channel 0 = x: ``warped(p) = moving(p +
    u(p))`` aligns the moving section (the window's centre) to the references.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FAEMRegNet", "make_window", "PRESETS"]

#: Architectures by name; see :meth:`FAEMRegNet.from_preset`.
PRESETS: dict[str, dict] = {
    # The published network: all 3D, 6 levels, full-resolution output, about 24M parameters.
    "paper": {
        "window": 7,
        "encoder": [[32, [3, 7, 7], 2], [64, [3, 5, 5], 2], [128, [3, 5, 5], 2],
                    [128, 3, 1], [256, 3, 2], [256, 3, 1], [256, 3, 2], [256, 3, 1],
                    [512, 3, 2], [512, 3, 1]],
        "n_3d": 10,
        "decoder": [256, 128, 64, 32, 16, 8],
        "output_level": 0,
        "flow_scale": 20.0,
        "negative_slope": 0.1,
        "in_channels": 1,
    },
    # The CPU preset: a correlation pyramid (FAEMRegPyramidNet, see hybridreg.models.pyramid):
    # shared 2D features at 1/2 .. 1/32, the references fused by a 3D convolution across the
    # window, cost volumes of radius 3 read by a soft argmax plus a learned correction,
    # residual flows from 1/32 to 1/8 (fine enough for fields as
    # smooth as a 64-px B-spline grid), about 0.6M parameters.
    "compact": {
        "architecture": "FAEMRegPyramidNet",
        "window": 7,
        "channels": [8, 16, 32, 48, 64],
        "decoder": [64, 48, 32],
        "radius": 3,
        "soft_argmax": True,
        "output_level": 3,
        "flow_scale": 20.0,
        "negative_slope": 0.1,
        "in_channels": 1,
    },
    # The first CPU preset, a narrow FAEMRegNet, kept for comparison: it learned little in
    # 3,000 CPU steps (see hybridreg.models.pyramid). About 0.4M parameters: one 3D layer
    # (8 channels, kernel (3, 5, 5)) sees neighbouring sections at half resolution, then the
    # depth is folded into the channels (56) so every 2D layer sees the whole window; 6
    # levels like the paper (1/64 at the coarsest, for a large capture range); the field is
    # predicted at 1/4 resolution and upsampled bilinearly (registration fields are smooth).
    # A second 3D layer cost 3x the time on a 2-core CPU for no extra mixing that the fold
    # does not already give.
    "compact-flownet": {
        "window": 7,
        "encoder": [[8, [3, 5, 5], 2], [16, 3, 2], [32, 3, 2], [32, 3, 1], [48, 3, 2],
                    [48, 3, 1], [64, 3, 2], [64, 3, 1], [96, 3, 2], [96, 3, 1]],
        "n_3d": 1,
        "decoder": [64, 48, 32, 16],
        "output_level": 2,
        "flow_scale": 20.0,
        "negative_slope": 0.1,
        "in_channels": 1,
    },
    # For tests: the pyramid at 1/2 .. 1/8, a few thousand parameters.
    "tiny-pyramid": {
        "architecture": "FAEMRegPyramidNet",
        "window": 7,
        "channels": [4, 6, 8],
        "decoder": [8],
        "radius": 2,
        "output_level": 1,
        "flow_scale": 20.0,
        "negative_slope": 0.1,
        "in_channels": 1,
    },
    # For tests: 3D then 2D layers, full-resolution output, about 11k parameters.
    "tiny": {
        "window": 7,
        "encoder": [[4, 3, 2], [8, 3, 2], [8, 3, 2]],
        "n_3d": 2,
        "decoder": [8, 4, 4],
        "output_level": 0,
        "flow_scale": 20.0,
        "negative_slope": 0.1,
        "in_channels": 1,
    },
}


def make_window(references: torch.Tensor, moving: torch.Tensor, *,
                window: int | None = None) -> torch.Tensor:
    """Stack references and the moving section into FAEMReg's mirrored window.

    ``k`` references ``[r1, ..., rk]`` (oldest first, ``rk`` nearest to ``m``) give
    ``[r1, ..., rk, m, rk, ..., r1]``, depth ``2k + 1``.

    Parameters
    ----------
    references : Tensor, shape (B, k, H, W)
        Aligned reference sections, oldest first, ``k >= 1``.
    moving : Tensor, shape (B, 1, H, W)
    window : int, optional
        The depth the network expects (odd). With fewer references than
        ``(window - 1) / 2``, the oldest is repeated (FAEMReg starts a stack with copies of
        section 0); with more, only the nearest are used.

    Returns
    -------
    Tensor, shape (B, 1, 2k + 1, H, W) (or (B, 1, window, H, W))
    """
    if references.ndim != 4 or references.shape[1] < 1:
        raise ValueError(f"references must have shape (B, k, H, W) with k >= 1, got "
                         f"{tuple(references.shape)}")
    if moving.ndim != 4 or moving.shape[1] != 1:
        raise ValueError(f"moving must have shape (B, 1, H, W), got {tuple(moving.shape)}")
    if references.shape[0] != moving.shape[0] or references.shape[-2:] != moving.shape[-2:]:
        raise ValueError(f"references {tuple(references.shape)} and moving "
                         f"{tuple(moving.shape)} must agree in batch size and grid")
    if window is not None:
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        k = (window - 1) // 2
        have = references.shape[1]
        if have < k:
            oldest = references[:, :1].expand(-1, k - have, -1, -1)
            references = torch.cat([oldest, references], dim=1)
        elif have > k:
            references = references[:, have - k:]
    moving = moving.to(references.dtype)
    stacked = torch.cat([references, moving, references.flip(1)], dim=1)
    return stacked.unsqueeze(1)


def _norm_kernel(kernel, dims: int, index: int) -> list[int]:
    if isinstance(kernel, int):
        ks = [kernel] * dims
    else:
        ks = [int(k) for k in kernel]
        if dims == 2 and len(ks) == 3:
            ks = ks[1:]  # a 3D kernel on a 2D layer: its in-plane part
    if len(ks) != dims or any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"encoder layer {index}: kernel {kernel!r} must be an odd int or "
                         f"{dims} odd ints")
    return ks


def _leaky_init(module: nn.Module, slope: float) -> None:
    transposed = isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu",
                            mode="fan_out" if transposed else "fan_in")
    nn.init.zeros_(module.bias)


class FAEMRegNet(nn.Module):
    """FAEMReg's window-to-field network (see the module docstring for the architecture).

    Parameters
    ----------
    window : int
        Depth of the input window (odd, >= 3): ``2k + 1`` for ``k`` references.
    encoder : sequence of (out_channels, kernel, stride)
        Encoder layers; ``kernel`` an odd int or a tuple ``(kd, kh, kw)`` (3D layers) /
        ``(kh, kw)`` (2D layers; a 3D tuple's in-plane part is used); in-plane ``stride`` 1
        or 2. Every stride-2 layer starts a level.
    n_3d : int, optional
        How many leading encoder layers are 3D (default: all).
    decoder : sequence of int
        Output channels of the transposed convolutions, coarse to fine, one per level from
        ``L - 1`` down to ``output_level``.
    output_level : int
        Finest level with a flow head; 0 = full resolution.
    flow_scale : float
        Multiplies the head outputs to give pixels (FAEMReg: 20).
    negative_slope : float
        Leaky ReLU slope.
    in_channels : int
        Channels per section (1 for EM intensities).

    Notes
    -----
    Input ``(B, in_channels, window, H, W)`` (see :func:`make_window`), normalised with
    :func:`hybridreg.models.normalize`; output ``(B, 2, H, W)`` pixels, channel 0 = x.
    """

    #: Architecture name -> class (``PRESETS``' ``"architecture"``); subclasses such as
    #: :class:`~hybridreg.models.pyramid.FAEMRegPyramidNet` register themselves.
    architectures: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        FAEMRegNet.architectures[cls.__name__] = cls

    def __init__(self, *, window: int = 7, encoder: Sequence = PRESETS["paper"]["encoder"],
                 n_3d: int | None = None, decoder: Sequence[int] = PRESETS["paper"]["decoder"],
                 output_level: int = 0, flow_scale: float = 20.0,
                 negative_slope: float = 0.1, in_channels: int = 1):
        super().__init__()
        window = int(window)
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        n_layers = len(encoder)
        if n_layers == 0:
            raise ValueError("the encoder needs at least one layer")
        n_3d = n_layers if n_3d is None else int(n_3d)
        if not 0 <= n_3d <= n_layers:
            raise ValueError(f"n_3d must be between 0 and {n_layers}, got {n_3d}")
        self.window = window
        self.n_3d = n_3d
        self.output_level = int(output_level)
        self.flow_scale = float(flow_scale)
        self.negative_slope = float(negative_slope)
        self.in_channels = int(in_channels)
        self._encoder_spec = []

        # --- encoder ---
        d = window
        layers = []
        ch = self.in_channels
        is3d = True  # the input is a 3D window
        level = 0
        # per level: (channels, is3d) of its skip feature
        skip_info = {0: (self.in_channels, n_3d > 0)}
        if n_3d == 0:  # all 2D: fold the window into the channels at once
            ch *= d
            is3d = False
            skip_info[0] = (ch, False)
        for i, layer in enumerate(encoder):
            try:
                out_ch, kernel, stride = layer
                out_ch, stride = int(out_ch), int(stride)
            except (TypeError, ValueError):
                raise ValueError(f"encoder layer {i} must be (out_channels, kernel, stride), "
                                 f"got {layer!r}") from None
            if out_ch < 1 or stride not in (1, 2):
                raise ValueError(f"encoder layer {i} = {layer!r}: out_channels must be >= 1 "
                                 f"and stride 1 or 2")
            layer_3d = i < n_3d
            if is3d and not layer_3d:
                ch *= d  # fold the depth into the channels
            is3d = layer_3d
            ks = _norm_kernel(kernel, 3 if layer_3d else 2, i)
            if layer_3d:
                conv = nn.Conv3d(ch, out_ch, ks, stride=(1, stride, stride),
                                 padding=[k // 2 for k in ks])
            else:
                conv = nn.Conv2d(ch, out_ch, ks, stride=stride, padding=[k // 2 for k in ks])
            layers.append(conv)
            self._encoder_spec.append([out_ch, kernel if isinstance(kernel, int)
                                       else [int(k) for k in kernel], stride])
            ch = out_ch
            level += stride == 2
            skip_info[level] = (ch, layer_3d)
        self.encoder = nn.ModuleList(layers)
        self.levels = level
        if not 0 <= self.output_level <= self.levels:
            raise ValueError(f"output_level must be between 0 and the number of levels "
                             f"({self.levels}), got {output_level}")

        # --- decoder ---
        decoder = [int(c) for c in decoder]
        n_dec = self.levels - self.output_level
        if len(decoder) != n_dec:
            raise ValueError(f"decoder must list {n_dec} widths (levels {self.levels - 1} "
                             f"down to {self.output_level}), got {len(decoder)}: {decoder}")
        self._decoder_spec = decoder
        self.decoder_3d = skip_info[self.levels][1]

        def skip_channels(lvl: int) -> int:
            c, s3d = skip_info[lvl]
            return c * d if (s3d and not self.decoder_3d) else c

        feat = skip_channels(self.levels)
        heads = [self._flow_head(feat)]
        deconvs = []
        for j, lvl in enumerate(range(self.levels - 1, self.output_level - 1, -1)):
            if self.decoder_3d:
                deconvs.append(nn.ConvTranspose3d(feat, decoder[j], 3, stride=(1, 2, 2),
                                                  padding=1, output_padding=(0, 1, 1)))
            else:
                deconvs.append(nn.ConvTranspose2d(feat, decoder[j], 3, stride=2, padding=1,
                                                  output_padding=1))
            feat = skip_channels(lvl) + decoder[j] + 2
            heads.append(self._flow_head(feat))
        self.deconvs = nn.ModuleList(deconvs)
        self.flow_heads = nn.ModuleList(heads)  # index 0: coarsest level

        for m in list(self.encoder) + list(self.deconvs):
            _leaky_init(m, self.negative_slope)
        for head in self.flow_heads:
            fan_in = head.weight[0].numel()
            # about 0.01 px per unit of feature scale: an untrained net is near the identity
            nn.init.normal_(head.weight, std=0.01 / (self.flow_scale * math.sqrt(fan_in)))
            nn.init.zeros_(head.bias)

    def _flow_head(self, channels: int) -> nn.Module:
        if self.decoder_3d:
            kd = min(3, self.window)
            return nn.Conv3d(channels, 2, (kd, 3, 3), stride=(self.window, 1, 1),
                             padding=(0, 1, 1))
        return nn.Conv2d(channels, 2, 3, padding=1)

    # --- construction ---------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable); ``FAEMRegNet(**config)`` rebuilds."""
        return {"window": self.window, "encoder": copy.deepcopy(self._encoder_spec),
                "n_3d": self.n_3d, "decoder": list(self._decoder_spec),
                "output_level": self.output_level, "flow_scale": self.flow_scale,
                "negative_slope": self.negative_slope, "in_channels": self.in_channels}

    @classmethod
    def from_config(cls, config: dict) -> "FAEMRegNet":
        return cls(**config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FAEMRegNet":
        """Build a preset architecture: ``"paper"``, ``"compact"``, ``"compact-flownet"``,
        ``"tiny"`` or ``"tiny-pyramid"``.

        ``"compact"`` and ``"tiny-pyramid"`` build a
        :class:`~hybridreg.models.pyramid.FAEMRegPyramidNet` (a subclass).

        ``overrides`` replace preset arguments, e.g. ``flow_scale=10``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        config = copy.deepcopy(PRESETS[name])
        arch = config.pop("architecture", "FAEMRegNet")
        klass = FAEMRegNet if arch == "FAEMRegNet" else FAEMRegNet.architectures[arch]
        return klass(**{**config, **overrides})

    make_window = staticmethod(make_window)

    @property
    def stride(self) -> int:
        """Input sizes are padded to a multiple of this (``2**levels``)."""
        return 2 ** self.levels

    # --- forward --------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or x.shape[2] != self.window:
            raise ValueError(f"expected a window of shape (B, {self.in_channels}, "
                             f"{self.window}, H, W) (see make_window), got {tuple(x.shape)}")

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2) if x.ndim == 5 else x

    def _head(self, head: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        flow = head(feat)
        return flow.squeeze(2) if flow.ndim == 5 else flow

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """The checked window, padded as :meth:`_pad_to_stride` does."""
        self._check(x)
        return self._pad_to_stride(x)

    def _pad_to_stride(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (4D sections or a 5D window) padded at the bottom and right (edge
        replicated) to a multiple of :attr:`stride`."""
        s = self.stride
        h, w = x.shape[-2:]
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:  # replicate pads the last ndim - 2 dimensions: none more in depth
            x = F.pad(x, (0, pw, 0, ph) + (0, 0) * (x.ndim - 4), mode="replicate")
        return x

    def _pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        x = self._padded(x)
        skips = {0: x if self.n_3d > 0 else self._fold(x)}
        level = 0
        feat = skips[0]
        for i, conv in enumerate(self.encoder):
            if i == self.n_3d:
                feat = self._fold(feat)
            feat = self._act(conv(feat))
            level += conv.stride[-1] == 2
            skips[level] = feat
        if not self.decoder_3d:
            skips = {k: self._fold(v) for k, v in skips.items()}

        feat = skips[self.levels]
        flows = [self._head(self.flow_heads[0], feat)]
        for j, lvl in enumerate(range(self.levels - 1, self.output_level - 1, -1)):
            up = self._act(self.deconvs[j](feat))
            flow_up = F.interpolate(flows[-1], scale_factor=2, mode="bilinear",
                                    align_corners=False)
            if self.decoder_3d:
                flow_up = flow_up.unsqueeze(2).expand(-1, -1, self.window, -1, -1)
            feat = torch.cat([skips[lvl], up, flow_up], dim=1)
            flows.append(self._head(self.flow_heads[j + 1], feat))
        out = []
        for j, flow in enumerate(flows):
            lvl = self.levels - j
            f = 2 ** lvl
            out.append(flow[..., : -(-h // f), : -(-w // f)] * self.flow_scale)
        return out

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The flows of all levels, coarse to fine.

        Returns
        -------
        list of Tensor, shapes (B, 2, ceil(H / 2**l), ceil(W / 2**l)) for l = levels ..
        output_level. Values are full-resolution pixels (not rescaled per level).
        """
        return self._pyramid(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the pull field of the window's centre section.

        Parameters
        ----------
        x : Tensor, shape (B, in_channels, window, H, W)

        Returns
        -------
        u_px : Tensor, shape (B, 2, H, W)
            Pixels, channel 0 = x; ``warped(p) = moving(p + u(p))``.
        """
        h, w = x.shape[-2:]
        return self._upsampled(self._pyramid(x)[-1], h, w)

    def _upsampled(self, flow: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The output level's flow brought to the full (unpadded) ``h x w`` grid."""
        if self.output_level > 0:
            f = 2 ** self.output_level
            size = (flow.shape[-2] * f, flow.shape[-1] * f)
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
            flow = flow[..., :h, :w]
        return flow
