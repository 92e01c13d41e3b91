"""Shipped model weights: where they live and how to find them.

The weights are ``.safetensors`` checkpoints written by :func:`hybridreg.models.save_model`
and stored next to this module (:data:`WEIGHTS_DIR`):

- ``faemreg_compact.safetensors``: a :class:`~hybridreg.models.FAEMRegNet` of the
  ``"compact"`` preset, the default model of :class:`hybridreg.methods.learned.LearnedMethod`;
- ``feature_ae.safetensors``: a :class:`~hybridreg.models.FeatureAutoencoder`, the default
  features of :class:`hybridreg.methods.ssemnet.SSEMnetMethod`.

Importing this module imports neither torch nor safetensors.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "WEIGHTS", "MissingWeightsError", "default_weights"]

#: The folder holding the shipped ``.safetensors`` files.
WEIGHTS_DIR = Path(__file__).resolve().parent

#: name -> (file name, what it is, how to make it)
WEIGHTS: dict[str, tuple[str, str, str]] = {
    "faemreg_compact": (
        "faemreg_compact.safetensors",
        "the FAEMRegNet ('compact' preset) of the 'learned' method",
        "train a FAEMRegNet.from_preset('compact') with hybridreg.training (it needs a frozen "
        "feature autoencoder, see 'feature_ae') and save it with hybridreg.models.save_model",
    ),
    "feature_ae": (
        "feature_ae.safetensors",
        "the FeatureAutoencoder of the 'ssemnet' method (and of FAEMReg's training loss)",
        "train a hybridreg.models.FeatureAutoencoder on EM sections with hybridreg.training "
        "and save it with hybridreg.models.save_model",
    ),
}


class MissingWeightsError(FileNotFoundError):
    """A shipped weights file is not installed."""


def default_weights(name: str) -> Path:
    """Path of the shipped weights ``name``: ``"faemreg_compact"`` or ``"feature_ae"``.

    Raises
    ------
    ValueError
        For an unknown name.
    MissingWeightsError
        (a ``FileNotFoundError``) when the file is not there, naming the file, what it is and
        how to train it; pass your own checkpoint (``model=PATH``) instead.
    """
    if name not in WEIGHTS:
        raise ValueError(f"unknown weights {name!r}; shipped: {', '.join(sorted(WEIGHTS))}")
    filename, what, how = WEIGHTS[name]
    path = Path(WEIGHTS_DIR) / filename
    if not path.is_file():
        raise MissingWeightsError(
            f"the default weights {name!r} ({what}) are not installed: {path} does not exist. "
            f"To make them, {how}; then put the file there, or pass model=PATH to the method")
    return path
