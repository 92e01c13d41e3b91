"""Saving and loading models: safetensors weights plus the architecture as JSON. No pickle.

File format (``format_version`` 1)
    A ``.safetensors`` file holding the model's ``state_dict``. Its string metadata carry

    - ``"hybridreg_config"``: JSON ``{"class": "FAEMRegNet", "config": {...},
      "format_version": 1}``, where ``config`` is the model's constructor arguments (its
      ``config`` property), enough to rebuild the architecture;
    - ``"hybridreg_metadata"``: JSON of the user's metadata (any JSON-serialisable dict),
      present when given.

    Any safetensors reader can open the file; :func:`load_model` rebuilds the model and loads
    the weights strictly, and :func:`read_metadata` reads the metadata without building
    anything.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .autoencoder import FeatureAutoencoder
from .faemreg import FAEMRegNet
from .pyramid import FAEMRegPyramidNet
from .transformer import SpatialTransformer

log = logging.getLogger(__name__)

__all__ = ["save_model", "load_model", "read_metadata", "CheckpointError", "MODEL_CLASSES",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
CONFIG_KEY = "hybridreg_config"
METADATA_KEY = "hybridreg_metadata"

#: The classes a checkpoint may name.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "FeatureAutoencoder": FeatureAutoencoder,
    "FAEMRegNet": FAEMRegNet,
    "FAEMRegPyramidNet": FAEMRegPyramidNet,
    "SpatialTransformer": SpatialTransformer,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the architecture it names."""


def save_model(model: nn.Module, path, *, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights and architecture to a ``.safetensors`` file, atomically.

    Parameters
    ----------
    model : nn.Module
        One of :data:`MODEL_CLASSES`.
    path : str or Path
        Written as given (``.safetensors`` is the expected suffix). The file appears
        complete or not at all: it is written to a temporary file in the same folder and
        moved into place with ``os.replace``.
    metadata : dict, optional
        JSON-serialisable user metadata (training data, iterations, ...), returned by
        :func:`read_metadata`.

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    name = type(model).__name__
    if MODEL_CLASSES.get(name) is not type(model):
        raise TypeError(f"cannot save a {name}: checkpoints hold one of {sorted(MODEL_CLASSES)}")
    header = {"class": name, "config": model.config, "format_version": FORMAT_VERSION}
    meta = {CONFIG_KEY: json.dumps(header)}
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            meta[METADATA_KEY] = json.dumps(metadata)
        except TypeError as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()}

    path = Path(path)
    if path.suffix != ".safetensors":
        log.warning("save_model: %s does not end in .safetensors", path)
    from ..io import atomic_output

    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    log.debug("saved %s (%d tensors) to %s", name, len(tensors), path)
    return path


def _open(path: Path):
    """(tensors, metadata) of a safetensors file, or CheckpointError."""
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, or OSError
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or "
                              f"truncated?): {type(exc).__name__}: {exc}") from exc
    return tensors, meta


def _header(path: Path, meta: dict) -> dict:
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata: not a hybridreg model "
                              f"checkpoint (save it with hybridreg.models.save_model)")
    try:
        header = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: '{CONFIG_KEY}' metadata is not valid JSON: {exc}") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: '{CONFIG_KEY}' must be a JSON object, got "
                              f"{type(header).__name__}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format_version {version!r} "
                              f"(this hybridreg reads {FORMAT_VERSION})")
    if "class" not in header:
        raise CheckpointError(f"{path}: '{CONFIG_KEY}' names no model class (missing 'class')")
    if header["class"] not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model class {header['class']!r}; known: "
                              f"{sorted(MODEL_CLASSES)}")
    if not isinstance(header.get("config"), dict):
        raise CheckpointError(f"{path}: '{CONFIG_KEY}' has no 'config' object for "
                              f"{header['class']}")
    return header


def read_metadata(path) -> dict:
    """The header of a checkpoint, without building the model.

    Returns
    -------
    dict
        ``{"class": str, "config": dict, "format_version": int, "metadata": dict}``
        (``metadata`` empty when none was saved).
    """
    path = Path(path)
    _, meta = _open(path)
    header = dict(_header(path, meta))
    try:
        header["metadata"] = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: '{METADATA_KEY}' is not valid JSON: {exc}") from None
    return header


def load_model(path, *, map_location="cpu") -> nn.Module:
    """Rebuild a model from its checkpoint and load the weights strictly.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`save_model`.
    map_location : str or torch.device
        Device of the returned model.

    Returns
    -------
    nn.Module
        In eval mode.

    Raises
    ------
    CheckpointError
        The file is missing, not a safetensors file (or truncated), has no hybridreg
        header or names an unknown class, or its weights do not fit the architecture of its
        config (the first missing, unexpected or mis-shaped tensor is named).
    """
    path = Path(path)
    tensors, meta = _open(path)
    header = _header(path, meta)
    cls = MODEL_CLASSES[header["class"]]
    try:
        model = cls.from_config(header["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the config does not build a {cls.__name__}: "
                              f"{exc}") from exc
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]!r}" + (
                f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected tensor {unexpected[0]!r}" + (
                f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise CheckpointError(f"{path}: the weights do not fit the {cls.__name__} of its "
                              f"config (another architecture?): {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)} "
                                  f"in the file but {tuple(v.shape)} in the {cls.__name__} "
                                  f"built from its config")
    model.load_state_dict(tensors, strict=True)
    return model.to(torch.device(map_location)).eval()
