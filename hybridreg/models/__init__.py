"""Neural networks of hybridreg: torch ``nn.Module``\\ s, losses and checkpoints.

Importing this package imports torch; ``import hybridreg`` does not import it. Inside
``hybridreg.models`` fields are pixel displacements ``(B, 2, H, W)``, channel 0 = x, in the
pull direction of :mod:`hybridreg.fields` (``warped(p) = moving(p + u(p))``).

- :class:`FeatureAutoencoder`: the ssEMnet/FAEMReg feature autoencoder; :func:`normalize`.
- :class:`FAEMRegNet`: the 3D-convolution window-to-field network; :func:`make_window`.
- :class:`FAEMRegPyramidNet`: the same input and output with a correlation pyramid (the
  ``compact`` preset, trainable on a CPU); :func:`correlation`.
- :class:`SpatialTransformer`: differentiable warp returning ``(warped, valid)``.
- losses: :func:`feature_similarity`, :func:`ncc_loss`, :func:`smoothness`,
  :func:`ssemnet_masked_loss`, :func:`loss_drop_fraction`, :func:`downsample_mask`.
- checkpoints: :func:`save_model`, :func:`load_model`, :func:`read_metadata`,
  :class:`CheckpointError`.
"""
from .autoencoder import (DEFAULT_AUTOENCODER_LAYERS, FAEMREG_MEAN, FAEMREG_STD,
                          FeatureAutoencoder, normalize)
from .checkpoint import CheckpointError, load_model, read_metadata, save_model
from .faemreg import PRESETS, FAEMRegNet, make_window
from .pyramid import FAEMRegPyramidNet, correlation
from .losses import (FAEMREG_FEATURE_WEIGHTS, FAEMREG_LOSS_SCALE, FAEMREG_SMOOTHNESS_WEIGHT,
                     downsample_mask, feature_similarity, loss_drop_fraction, ncc_loss,
                     smoothness, ssemnet_masked_loss)
from .transformer import SpatialTransformer

__all__ = [
    "FeatureAutoencoder", "normalize", "FAEMREG_MEAN", "FAEMREG_STD",
    "DEFAULT_AUTOENCODER_LAYERS",
    "FAEMRegNet", "make_window", "PRESETS", "FAEMRegPyramidNet", "correlation",
    "SpatialTransformer",
    "feature_similarity", "ncc_loss", "smoothness", "ssemnet_masked_loss",
    "loss_drop_fraction", "downsample_mask", "FAEMREG_FEATURE_WEIGHTS",
    "FAEMREG_SMOOTHNESS_WEIGHT", "FAEMREG_LOSS_SCALE",
    "save_model", "load_model", "read_metadata", "CheckpointError",
]
