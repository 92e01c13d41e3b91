"""What the torch-based methods (learned, ssemnet, hybrid) share.

Model sources (a checkpoint path loaded once, or an in-memory module), the device and thread
settings, a stack's intensity map onto the networks' 0-255 scale (:func:`intensity_map`),
the normalisation of sections for the networks, the autoencoder's features at a
chosen encoder depth, and the NCC by which a method measures its own result. torch is
imported on first use.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import content_mask

log = logging.getLogger(__name__)

__all__ = ["resolve_device", "is_a", "ModelSource", "set_threads", "normalized_sections",
           "IntensityMap", "intensity_map", "INTENSITY_CHOICES", "finite_float", "ncc_metric",
           "encoder_depth", "encoder_features", "encoder_layers_at"]


def resolve_device(device: str, module=None):
    """``"auto"``: the module's own device if given one, else CUDA when available, else CPU."""
    import torch

    if device == "auto":
        if module is not None:
            p = next(module.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_a(model, class_name: str) -> bool:
    """``model`` is an instance of the class named ``class_name`` (or of a subclass)."""
    return any(k.__name__ == class_name for k in type(model).__mro__)


class ModelSource:
    """A checkpoint path (loaded lazily, once) or an in-memory module, of one expected class.

    Parameters
    ----------
    model : None, str, PathLike or nn.Module
        None: the shipped weights ``default`` (:func:`hybridreg.weights.default_weights`,
        which raises at once if they are not installed).
    default : str
        Name of the shipped weights.
    expected : str
        Class name the model must have (``"FAEMRegNet"``, ``"FeatureAutoencoder"``).
    method : str
        For messages.
    """

    def __init__(self, model, *, default: str, expected: str, method: str):
        self.expected = expected
        self.method = method
        self.module = None
        self.path: Path | None = None
        self._sha256: str | None = None
        if model is None:
            from ..weights import default_weights

            self.path = default_weights(default)
        elif isinstance(model, (str, os.PathLike)):
            self.path = Path(model)
            if not self.path.is_file():
                raise FileNotFoundError(f"{method}: model checkpoint not found: {self.path}")
        elif hasattr(model, "state_dict") and hasattr(model, "parameters"):
            if not is_a(model, expected):
                raise TypeError(f"{method} needs a {expected}, got a {type(model).__name__}")
            self.module = model
        else:
            raise TypeError(f"{method}: model must be None, a checkpoint path or a {expected}, "
                            f"got {type(model).__name__}")

    @property
    def description(self) -> str:
        return str(self.path) if self.path is not None else f"<in-memory {self.expected}>"

    def load(self, device):
        """The model, in eval mode, frozen (``requires_grad`` off), on ``device``."""
        if self.module is None:
            from ..models import CheckpointError, load_model

            model = load_model(self.path, map_location="cpu")
            if not is_a(model, self.expected):
                raise CheckpointError(
                    f"{self.path} holds a {type(model).__name__}, but the {self.method} "
                    f"method needs a {self.expected} checkpoint")
            self.module = model
        self.module.eval().requires_grad_(False)
        return self.module.to(device)

    def sha256(self) -> str:
        """Hash of the weights (the file's bytes, or the module's config and tensors)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            if self.path is not None:
                with open(self.path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            else:
                import json

                h.update(json.dumps(getattr(self.module, "config", None), sort_keys=True,
                                    default=str).encode())
                for k, v in sorted(self.module.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def __getstate__(self):  # pickling (process executors): reload from the file there
        state = dict(self.__dict__)
        if self.path is not None:
            state["module"] = None
        return state


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))  # process-wide, as torch has it


#: The named ways of :func:`intensity_map` (``intensity=`` in the API, ``--intensity``);
#: ``(lo, hi)`` (``LO:HI`` on the command line) is the fourth.
INTENSITY_CHOICES = ("auto", "percentiles", "none")

#: Pixels :func:`intensity_map` samples, over at most 16 evenly spaced sections.
INTENSITY_SAMPLE_PX = 4_000_000


class IntensityMap(tuple):
    """``(gain, offset)``: ``x8 = gain * x + offset`` puts a stack on the 0-255 scale the
    networks were trained on; ``note`` says how it was chosen. :meth:`options` gives the
    methods' ``intensity_scale`` and ``intensity_offset``."""

    def __new__(cls, gain: float, offset: float, note: str):
        self = super().__new__(cls, (float(gain), float(offset)))
        self.note = note
        return self

    gain = property(lambda self: self[0])
    offset = property(lambda self: self[1])

    def options(self) -> dict:
        return {"intensity_scale": self.gain, "intensity_offset": self.offset}


def intensity_map(stack, how="auto") -> IntensityMap:
    """How a stack's intensities are put on the networks' 0-255 scale: one linear map for
    the whole stack (never per pair or per section: every section is scaled alike).

    ``how``:

    - ``"auto"`` (the default everywhere): ``uint8`` and ``bool`` as they are; floats within
      [0, 1] times 255; floats within [0, 255] as they are; anything else (``uint16``, other
      integers, other floats) by its percentiles, as ``"percentiles"``. ``uint16`` EM data
      rarely fills 0..65535 (12-bit cameras, narrow histograms): a fixed ``255 / 65535``
      would squash it.
    - ``"percentiles"``: the stack's 0.1 and 99.9 percentiles go to 0 and 255, any dtype.
    - ``"none"``: as they are (the values are taken to be 0-255 grey values already).
    - ``(lo, hi)``: ``lo`` goes to 0 and ``hi`` to 255.

    Percentiles and ranges are taken from a sample of at most :data:`INTENSITY_SAMPLE_PX`
    pixels spread over at most 16 evenly spaced sections (64 blocks of each when its
    sections are read by region): cheap at any size and in any chunking. Train and register
    with the same map.

    Parameters
    ----------
    stack : ndarray (any shape) or a lazy stack (Z, H, W)
    how : str or (float, float)

    Returns
    -------
    IntensityMap
    """
    dtype = np.dtype(stack.dtype)
    if dtype.kind not in "uifb":
        raise TypeError(f"stack must hold numeric intensities, got dtype {dtype}")
    if not isinstance(how, str):
        lo, hi = (float(v) for v in how)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"intensity range must be two finite values LO < HI, got {how!r}")
        gain = 255.0 / (hi - lo)
        return IntensityMap(gain, -lo * gain, f"{lo:g}..{hi:g} to 0..255 (given)")
    if how not in INTENSITY_CHOICES:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_CHOICES)} or a "
                         f"range (lo, hi), got {how!r}")
    if how == "none":
        return IntensityMap(1.0, 0.0, f"{dtype} values taken as 0-255 grey values (none)")
    if how == "auto" and dtype in (np.uint8, np.bool_):
        return IntensityMap(1.0, 0.0, f"{dtype}: as is (0-255)")
    sub = _intensity_sample(stack)
    if how == "auto" and dtype.kind == "f":
        lo_all, hi_all = float(sub.min()), float(sub.max())
        if lo_all >= 0 and hi_all <= 1:
            return IntensityMap(255.0, 0.0, f"{dtype} within 0..1: times 255")
        if lo_all >= 0 and hi_all <= 255:
            return IntensityMap(1.0, 0.0, f"{dtype} within 0..255: as is")
    lo, hi = (float(v) for v in np.percentile(sub, [0.1, 99.9]))
    if not hi > lo:
        log.warning("intensity map: the stack is flat (%g); mapping it to 128", lo)
        return IntensityMap(1.0, 128.0 - lo, f"{dtype}, flat at {lo:g}: to 128")
    gain = 255.0 / (hi - lo)
    return IntensityMap(gain, -lo * gain, f"{dtype}: 0.1 and 99.9 percentiles {lo:g}..{hi:g} "
                                          f"to 0..255")


def _intensity_sample(stack) -> np.ndarray:
    """At most :data:`INTENSITY_SAMPLE_PX` pixels of ``stack``, float64: a strided subsample
    of an ndarray; of a lazy stack, of at most 16 evenly spaced sections (those read region
    by region: 64 square blocks spread over each)."""
    if isinstance(stack, np.ndarray):
        if stack.size == 0:
            raise ValueError("stack is empty")
        step = max(1, int(math.sqrt(stack.size / INTENSITY_SAMPLE_PX)))
        sub = stack[..., ::step, ::step] if stack.ndim >= 2 else stack[::step]
        return sub.astype(np.float64, copy=False)
    from ..io import section_of

    z = len(stack)
    if z == 0 or 0 in tuple(stack.shape):
        raise ValueError("stack is empty")
    picks = np.unique(np.linspace(0, z - 1, min(z, 16)).round().astype(int))
    per = INTENSITY_SAMPLE_PX // len(picks)
    parts = []
    for k in picks:
        sec = section_of(stack, int(k))
        h, w = sec.shape
        step = max(1, math.ceil(math.sqrt(h * w / per)))
        if isinstance(sec, np.ndarray):
            parts.append(sec[::step, ::step].ravel())
        else:  # a plane read by region: 8 x 8 square blocks spread over it, each a few
            # chunks of a tiled or chunked file (rows would touch every chunk of a row)
            side = max(1, min(h // 8, w // 8, int(math.sqrt(per / 64))))
            for y in np.linspace(0, h - side, 8).round().astype(int):
                for x in np.linspace(0, w - side, 8).round().astype(int):
                    parts.append(np.asarray(sec[y:y + side, x:x + side]).ravel())
    return np.concatenate(parts).astype(np.float64)


def normalized_sections(sections: Sequence[np.ndarray], scale: float, offset: float,
                method: str) -> np.ndarray:
    """``(n, H, W)`` float32 sections normalised for the networks.

    ``normalize(x * scale + offset)``: ``scale`` and ``offset`` take the sections to 0-255
    grey values (FAEMReg's statistics are on that scale).
    """
    from ..models import FAEMREG_STD, normalize

    out = np.stack([normalize(s, scale=scale) for s in sections])
    if offset:
        out += np.float32(offset / FAEMREG_STD)
    # 255 normalises to about 3.3; far beyond means the sections are not on the 8-bit scale
    if float(np.abs(out).max()) > 20.0:
        log.warning("%s: intensities reach %.0f after the 8-bit scaling; the networks expect "
                    "0-255 grey values (set intensity_scale and intensity_offset, e.g. from "
                    "hybridreg.methods.intensity_map(stack), as the CLI and the API do)", method,
                    float(max(np.abs(s).max() for s in sections)) * scale + offset)
    return out


#: What ``RegistrationResult.metric`` is for the methods that measure their result by NCC.
NCC_METRIC_NAME = "NCC of the warped section with the fixed one (higher is better)"


def finite_float(value, name: str) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def ncc_metric(fixed: np.ndarray, warped: np.ndarray, valid: np.ndarray) -> float | None:
    """NCC of ``warped`` and ``fixed`` where the warp is valid and ``fixed`` has content."""
    from ..metrics import ncc

    mask = valid.copy()
    content = content_mask(fixed)
    if content is not None:
        mask &= content
    if mask.sum() < 2:
        return None
    value = ncc(fixed, warped, mask=mask)
    return value if np.isfinite(value) else None


def encoder_depth(ae, feature_stride: int | None, *, within: int | None = None,
                  name: str = "feature_stride") -> tuple[int, int]:
    """``(n_layers, stride)``: how many encoder layers give features at ``feature_stride``
    (among the first ``within`` layers; the deepest at that stride wins)."""
    layers = ae.config["layers"][:within]
    if feature_stride is None:
        return len(layers), int(math.prod(s for _, _, s in layers))
    cum, depth, reached = 1, None, []
    for i, (_, _, s) in enumerate(layers):
        cum *= int(s)
        reached.append(cum)
        if cum == int(feature_stride):
            depth = i + 1  # the deepest layer at that stride wins
    if depth is None:
        raise ValueError(f"{name}={feature_stride} is not a stride this autoencoder's "
                         f"encoder reaches{'' if within is None else f' in {within} layers'}; "
                         f"it reaches {sorted(set(reached))}")
    return depth, int(feature_stride)


def encoder_features(ae, x, n_layers: int, stride: int, *, first: int = 0):
    """The output of the first ``n_layers`` encoder layers (with their ReLUs) of ``x``.

    ``x`` is padded at the bottom and right (edge replicated) to a multiple of ``stride``, as
    :meth:`~hybridreg.models.FeatureAutoencoder.encode` pads to its full stride; with all
    layers this equals ``ae.encode(x)``. With ``first > 0``, ``x`` is the output of the
    first ``first`` layers (already padded) and only layers ``first .. n_layers - 1`` run.
    """
    import torch.nn.functional as F

    if first == 0:
        h, w = x.shape[-2:]
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    last = len(ae.encoder) - 1
    for i in range(first, n_layers):
        x = ae.encoder[i](x)
        if i < last or ae.feature_relu:
            x = F.relu(x)
    return x


def encoder_layers_at(ae, stride: int, n_layers: int) -> int:
    """How many of the first ``n_layers`` encoder layers end at cumulative ``stride`` (the
    deepest such; 0 for stride 1, before any layer): ssEMnet's ``warp_stride``."""
    if stride == 1:
        return 0
    return encoder_depth(ae, stride, within=n_layers, name="warp_stride")[0]
