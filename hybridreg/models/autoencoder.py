"""The feature autoencoder of ssEMnet and FAEMReg, and input normalisation.

A convolutional autoencoder trained without labels on EM sections turns a section into a
feature map that is smoother and more registration-friendly than raw intensities (ssEMnet,
Yoo et al. 2017). FAEMReg (Zhou et al. 2019) freezes such an encoder and compares the features
of the warped moving section with those of its fixed neighbours.

Default architecture (FAEMReg's published code): an encoder of seven ``Conv2d + ReLU`` layers
with (out_channels, kernel, stride) ``(128,5,1) (64,3,2) (32,3,2) (16,3,1) (8,3,2) (4,3,1)
(1,3,2)``, so one feature channel at 1/16 of the input resolution, and a mirrored decoder of
``ConvTranspose2d + ReLU`` layers ending in a linear one-channel reconstruction (linear
because normalised intensities are negative as often as positive). About 0.2M parameters.

Sizes that are not a multiple of the total stride
    The input is padded at the bottom and right, by replicating the edge, up to the next
    multiple of :attr:`FeatureAutoencoder.stride` (16 by default). ``encode`` returns the
    features of the padded input, shape ``(B, C, ceil(H / 16), ceil(W / 16))``: feature pixel
    ``(i, j)`` covers input pixels ``[16 i, 16 i + 16) x [16 j, 16 j + 16)``, i.e. it lies on
    the grid of the input downsampled by 16 with the same top-left corner. ``forward`` crops
    the reconstruction back to ``(H, W)``.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["FeatureAutoencoder", "normalize", "FAEMREG_MEAN", "FAEMREG_STD",
           "DEFAULT_AUTOENCODER_LAYERS"]

#: Intensity mean and standard deviation FAEMReg normalised 8-bit EM data with.
FAEMREG_MEAN = 144.6
FAEMREG_STD = 33.4

#: FAEMReg's encoder: (out_channels, kernel, stride) per ``Conv2d + ReLU`` layer.
DEFAULT_AUTOENCODER_LAYERS = ((128, 5, 1), (64, 3, 2), (32, 3, 2), (16, 3, 1), (8, 3, 2),
                              (4, 3, 1), (1, 3, 2))


def normalize(x, *, mean: float = FAEMREG_MEAN, std: float = FAEMREG_STD,
              scale: float = 1.0):
    """Normalise EM intensities for the networks: ``(x * scale - mean) / std``.

    The defaults are FAEMReg's statistics of 8-bit EM data, so ``x`` is expected on the 8-bit
    scale 0..255: ``uint8`` arrays as they are, float arrays holding 0..255 values. For float
    data in [0, 1] pass ``scale=255``; for 16-bit data ``scale=255 / 65535``. A float input
    whose values all lie in [0, 1] with the default ``scale`` is almost always a mistake and
    is logged as a warning.

    Parameters
    ----------
    x : ndarray or Tensor, any shape
        Intensities, integer or float.
    mean, std : float
        Statistics on the 8-bit scale.
    scale : float
        Factor taking ``x`` to the 8-bit scale.

    Returns
    -------
    ndarray or Tensor, float32, same shape (and the same kind as ``x``)
    """
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    if isinstance(x, torch.Tensor):
        is_float = x.is_floating_point()
        xf = x.to(torch.float32)
        if is_float and scale == 1.0 and xf.numel() > 1 and bool((xf.min() >= 0) & (xf.max() <= 1)):
            log.warning("normalize: float input lies in [0, 1]; the statistics are on the "
                        "8-bit scale, pass scale=255 if that is intended")
        return (xf * scale - mean) / std
    arr = np.asarray(x)
    if arr.dtype.kind not in "uifb":
        raise TypeError(f"normalize expects numeric intensities, got dtype {arr.dtype}")
    xf = arr.astype(np.float32)
    if arr.dtype.kind == "f" and scale == 1.0 and xf.size > 1 and xf.min() >= 0 and xf.max() <= 1:
        log.warning("normalize: float input lies in [0, 1]; the statistics are on the "
                    "8-bit scale, pass scale=255 if that is intended")
    return ((xf * np.float32(scale) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _layer_spec(layers) -> list[list[int]]:
    spec = []
    for i, layer in enumerate(layers):
        try:
            out_ch, kernel, stride = (int(v) for v in layer)
        except (TypeError, ValueError):
            raise ValueError(f"layer {i} must be (out_channels, kernel, stride), got {layer!r}") \
                from None
        if out_ch < 1 or kernel < 1 or kernel % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"layer {i} = {layer!r}: out_channels must be >= 1, kernel odd "
                             f"and stride 1 or 2")
        spec.append([out_ch, kernel, stride])
    if not spec:
        raise ValueError("the encoder needs at least one layer")
    return spec


class FeatureAutoencoder(nn.Module):
    """Convolutional autoencoder giving registration features (ssEMnet / FAEMReg).

    Parameters
    ----------
    layers : sequence of (out_channels, kernel, stride)
        Encoder layers, each ``Conv2d(padding=kernel // 2) + ReLU``; kernels odd, strides 1
        or 2. The decoder mirrors them with ``ConvTranspose2d`` layers. Default: FAEMReg's
        :data:`DEFAULT_AUTOENCODER_LAYERS`.
    in_channels : int
        Channels of the input (and of the reconstruction).
    feature_relu : bool
        Whether the last encoder layer (the features) has a ReLU, as in the published
        models. ``False`` gives linear features, which cannot die.

    Notes
    -----
    Input ``(B, in_channels, H, W)``, normalised (see :func:`normalize`); any ``H, W``:
    see the module docstring for the padding.
    """

    def __init__(self, layers: Sequence[Sequence[int]] = DEFAULT_AUTOENCODER_LAYERS, *,
                 in_channels: int = 1, feature_relu: bool = True):
        super().__init__()
        self._layers = _layer_spec(layers)
        self.in_channels = int(in_channels)
        self.feature_relu = bool(feature_relu)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")

        enc = []
        chans = [self.in_channels]
        for out_ch, k, s in self._layers:
            enc.append(nn.Conv2d(chans[-1], out_ch, k, stride=s, padding=k // 2))
            chans.append(out_ch)
        self.encoder = nn.ModuleList(enc)
        dec = []
        for i in reversed(range(len(self._layers))):
            _, k, s = self._layers[i]
            dec.append(nn.ConvTranspose2d(chans[i + 1], chans[i], k, stride=s, padding=k // 2,
                                          output_padding=s - 1))
        self.decoder = nn.ModuleList(dec)

    @property
    def stride(self) -> int:
        """Total downsampling factor of the encoder (16 by default)."""
        return int(math.prod(s for _, _, s in self._layers))

    @property
    def feature_channels(self) -> int:
        return self._layers[-1][0]

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable); ``FeatureAutoencoder(**config)`` rebuilds."""
        return {"layers": [list(layer) for layer in self._layers],
                "in_channels": self.in_channels, "feature_relu": self.feature_relu}

    @classmethod
    def from_config(cls, config: dict) -> "FeatureAutoencoder":
        return cls(**config)

    def feature_shape(self, shape_yx: Sequence[int]) -> tuple[int, int]:
        """Grid shape of the features of an ``(H, W)`` input: ``ceil`` of ``(H, W) / stride``."""
        s = self.stride
        return tuple(-(-int(n) // s) for n in shape_yx)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        h, w = x.shape[-2:]
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x

    def _encode_padded(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.encoder)
        for i, conv in enumerate(self.encoder):
            x = conv(x)
            if i < n - 1 or self.feature_relu:
                x = F.relu(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x``.

        Parameters
        ----------
        x : Tensor, shape (B, in_channels, H, W)

        Returns
        -------
        features : Tensor, shape (B, feature_channels, ceil(H / stride), ceil(W / stride))
        """
        self._check(x)
        return self._encode_padded(self._pad(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction from features, on the padded grid ``features.shape * stride``."""
        x = features
        n = len(self.decoder)
        for i, deconv in enumerate(self.decoder):
            x = deconv(x)
            if i < n - 1:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x``.

        Returns
        -------
        reconstruction : Tensor, shape (B, in_channels, H, W)
        features : Tensor, shape (B, feature_channels, ceil(H / stride), ceil(W / stride))
        """
        self._check(x)
        h, w = x.shape[-2:]
        features = self._encode_padded(self._pad(x))
        recon = self.decode(features)[..., :h, :w]
        return recon, features
