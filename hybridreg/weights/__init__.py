"""Shipped model weights: where they live and how to find them.

The weights are ``.safetensors`` checkpoints written by :func:`hybridreg.models.save_model`
and stored next to this module (:data:`WEIGHTS_DIR`):

- ``faemreg_compact.safetensors``: the ``"compact"`` preset (a
  :class:`~hybridreg.models.FAEMRegPyramidNet`), the default network of the ``learned`` and
  ``hybrid`` methods;
- ``feature_ae.safetensors``: a :class:`~hybridreg.models.FeatureAutoencoder`, the default
  features of the ``ssemnet`` method and the feature channels of ``hybrid``.

Each has a model card beside it (``<name>.md``: data, recipe, exact command, training time,
figures). Both were made with ``benchmarks/train_default_weights.py``.

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
        "the 'compact' registration network of the 'learned' and 'hybrid' methods",
        "run `python benchmarks/train_default_weights.py registration --out DIR` (or "
        "`hybridreg train` on your own aligned stacks)",
    ),
    "feature_ae": (
        "feature_ae.safetensors",
        "the FeatureAutoencoder of the 'ssemnet' method and of the hybrid's feature channels",
        "run `python benchmarks/train_default_weights.py features --out DIR` (or "
        "`hybridreg train-features` on your own sections)",
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
