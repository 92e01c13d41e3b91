"""The resumable training loop, its checkpoints and the option checks the trainers share.

A run writes its model with :func:`hybridreg.models.save_model` to ``out`` and, next to it,
the state that resuming needs (:func:`state_path`): the weights, the optimizer's tensors,
the step, the options, the loss history and the torch RNG state (safetensors tensors plus
JSON metadata; never pickle). The batch of step ``s`` is drawn from
``numpy.random.default_rng([seed, tag, s])`` (one tag per use, below), so a resumed run
ends with the same weights as an uninterrupted one (on the CPU). Learning-rate schedules
are functions of the step, so resuming needs no scheduler state.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..outputs import jsonable

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = ["TrainingLog", "state_path", "LR_SCHEDULES"]

#: Learning-rate schedules: functions of the step, so resuming needs no scheduler state.
LR_SCHEDULES = ("constant", "step", "cosine")

STATE_KEY = "hybridreg_training_state"
STATE_FORMAT_VERSION = 1

# tags that keep the random streams of the different uses apart
TAG_FEATURES = 1
TAG_REGISTRATION = 2
TAG_EVALUATION = 3


@dataclass(frozen=True)
class TrainingLog:
    """What a training run did.

    Attributes
    ----------
    steps : int
        Steps completed (in total, over all resumed runs).
    seconds : float
        Training time in seconds, over all resumed runs.
    history : tuple of dict
        One entry per logged step: ``step``, ``lr``, ``seconds`` and the mean losses since
        the previous entry.
    final : dict
        Mean losses over the last logging interval.
    device : str
    out : str
        The model file.
    resumed_from : int
        The step this call started from (0 for a fresh run).
    """

    steps: int
    seconds: float
    history: tuple[dict, ...]
    final: dict
    device: str
    out: str = ""
    resumed_from: int = 0


def state_path(out) -> Path:
    """The resumable training state next to a model file: ``model.safetensors`` ->
    ``model.state.safetensors``."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out.with_suffix(".state.safetensors")
    return out.with_name(out.name + ".state.safetensors")


# --- options ---------------------------------------------------------------------------------

def resolve_device(device) -> "torch.device":
    """``"auto"`` (or None): CUDA when available, else the CPU; otherwise that device."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available")
    return dev


def _lr_at(step: int, *, lr: float, schedule: str, steps: int) -> float:
    if schedule == "constant":
        return lr
    frac = step / max(steps, 1)
    if schedule == "step":  # FAEMReg: halved every quarter of the run
        return lr * 0.5 ** min(int(4 * frac), 3)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; TypeError or ValueError naming ``name``."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if v != value or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def common_checks(steps, batch, crop, lr, checkpoint_every, log_every, stop_at,
                  lr_schedule):
    """Check the options every trainer takes; returns ``steps`` as an int."""
    steps = check_int("steps", steps, 1)
    check_int("batch", batch, 1)
    check_int("crop", crop, 8)
    check_int("checkpoint_every", checkpoint_every, 1)
    check_int("log_every", log_every, 1)
    if stop_at is not None:
        check_int("stop_at", stop_at, 1)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    return steps


# --- the state file ------------------------------------------------------------------------------

def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    from ..io import atomic_output

    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# options that may differ between a run and its resumption
_RESUME_FREE = {"steps", "stop_at", "progress", "checkpoint_every", "log_every", "device",
                "overwrite", "resume", "validation_every", "out"}


@dataclass
class _State:
    step: int
    seconds: float
    options: dict
    history: list
    model_class: str
    model_config: dict
    model_tensors: dict
    optim_tensors: dict
    optim_meta: dict
    torch_rng: Any


def _save_state(path: Path, *, kind: str, model, optimizer, step: int, seconds: float,
                options: dict, history: list) -> None:
    import torch

    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()}
    sd = optimizer.state_dict()
    state_meta = {}
    for idx, st in sd["state"].items():
        entry = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().to("cpu").contiguous().clone()
                entry[key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                entry[key] = {"value": jsonable(val)}
        state_meta[str(idx)] = entry
    tensors["rng.torch"] = torch.get_rng_state().clone()
    meta = {
        "format_version": STATE_FORMAT_VERSION,
        "kind": kind,
        "step": int(step),
        "seconds": float(seconds),
        "options": options,
        "history": history,
        "model_class": type(model).__name__,
        "model_config": model.config,
        "optimizer": {"class": type(optimizer).__name__, "state": state_meta,
                      "param_groups": jsonable(sd["param_groups"])},
        "sampling": "batch of step s drawn from numpy.random.default_rng([seed, tag, s])",
    }
    _atomic_save(tensors, path, {STATE_KEY: json.dumps(meta)})


def _load_state(path: Path, *, kind: str) -> _State:
    from safetensors import safe_open

    from ..models import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"no training state to resume: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, or OSError
        raise CheckpointError(f"training state {path} is not a readable safetensors file "
                              f"(corrupt or truncated?): {type(exc).__name__}: {exc}; delete "
                              f"it and start again without resume, or restore it") from exc
    if raw is None:
        raise CheckpointError(f"{path} has no '{STATE_KEY}' metadata: not a hybridreg "
                              f"training state")
    try:
        meta = json.loads(raw)
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise CheckpointError(f"training state {path} has format_version "
                                  f"{meta.get('format_version')!r}; this hybridreg reads "
                                  f"{STATE_FORMAT_VERSION}")
        if meta.get("kind") != kind:
            raise CheckpointError(f"training state {path} belongs to {meta.get('kind')!r}, "
                                  f"not {kind!r}")
        model_tensors = {k[len("model."):]: v for k, v in tensors.items()
                         if k.startswith("model.")}
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        for idx, entry in meta["optimizer"]["state"].items():
            for key, spec in entry.items():
                if "tensor" in spec and spec["tensor"] not in optim_tensors:
                    raise CheckpointError(f"training state {path} lacks optimizer tensor "
                                          f"{spec['tensor']!r}")
        if "rng.torch" not in tensors:
            raise CheckpointError(f"training state {path} lacks the torch RNG state")
        return _State(step=int(meta["step"]), seconds=float(meta["seconds"]),
                      options=dict(meta["options"]), history=list(meta["history"]),
                      model_class=str(meta["model_class"]),
                      model_config=dict(meta["model_config"]),
                      model_tensors=model_tensors, optim_tensors=optim_tensors,
                      optim_meta=dict(meta["optimizer"]), torch_rng=tensors["rng.torch"])
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"training state {path} has malformed metadata "
                              f"({type(exc).__name__}: {exc})") from exc


def _restore(state: _State, path: Path, model, optimizer) -> None:
    import torch

    from ..models import CheckpointError

    try:
        model.load_state_dict(state.model_tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"training state {path}: the weights do not fit the model "
                              f"({exc})") from exc
    opt_state = {}
    for idx, entry in state.optim_meta["state"].items():
        opt_state[int(idx)] = {key: (state.optim_tensors[spec["tensor"]] if "tensor" in spec
                                     else spec["value"]) for key, spec in entry.items()}
    groups = state.optim_meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"training state {path}: the optimizer state does not fit "
                              f"({exc})") from exc
    torch.set_rng_state(state.torch_rng)


def _check_resumable(saved: dict, now: dict, path: Path) -> None:
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diffs[:4])
        raise ValueError(f"cannot resume from {path}: options differ from the saved run "
                         f"({shown}); resume with the same options, or start a new run")


def resume_state(sp: Path, *, kind: str, options: dict, model, optimizer, out: Path,
                 steps: int) -> tuple[int, float, list]:
    """Restore ``model``, ``optimizer`` and the torch RNG from the state file ``sp``.

    Raises ValueError when ``options`` differ from the saved run's (beyond those that may
    change on resuming) and :class:`hybridreg.models.CheckpointError` for a bad state file.

    Returns
    -------
    (start step, seconds so far, history)
    """
    state = _load_state(sp, kind=kind)
    _check_resumable(state.options, options, sp)
    _restore(state, sp, model, optimizer)
    log.info("%s: resuming %s at step %d of %d", kind, out, state.step, steps)
    return state.step, state.seconds, state.history


def prepare_out(out, *, resume: bool, overwrite: bool) -> tuple[Path, Path, bool]:
    """(out, state file, whether to resume)."""
    out = Path(out)
    sp = state_path(out)
    if resume:
        if sp.is_file():
            return out, sp, True
        if out.exists():
            raise FileExistsError(f"resume=True but there is no training state {sp} next to "
                                  f"the existing {out}; pass overwrite=True to train anew")
        log.info("resume=True but no state %s: starting a new run", sp)
        return out, sp, False
    if not overwrite:
        for p in (out, sp):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass resume=True to continue that run "
                                      f"or overwrite=True to replace it")
    return out, sp, False


# --- the loop ----------------------------------------------------------------------------------

class _Meter:
    """Running means of named losses since the last log entry."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, losses: Mapping[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else {}

    def reset(self) -> None:
        self.sums, self.n = {}, 0


def _progress(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step")


def run_loop(*, kind: str, model, optimizer, step_fn, out: Path, sp: Path, start: int,
             steps: int, stop_at: int | None, lr: float, lr_schedule: str, options: dict,
             history: list, seconds0: float, checkpoint_every: int, log_every: int,
             progress: bool, device, save_metadata, validate=None,
             validation_every=None) -> TrainingLog:
    """The shared loop: steps ``start .. end``, logging, checkpoints, the final save.

    Parameters
    ----------
    kind : str
        The trainer's name (``"train_features"``, ...), stored in the state file.
    step_fn : callable
        ``step_fn(step) -> dict of float``: one optimiser step, its losses (``total``
        among them for the progress bar).
    out, sp : Path
        The model file and its state file (:func:`state_path`).
    start, steps, stop_at : int
        Steps ``start .. min(steps, stop_at)`` run; the schedule runs to ``steps``.
    options : dict
        The run's options (JSON), saved in the state.
    history : list
        Log entries so far; appended to in place.
    seconds0 : float
        Training seconds of the earlier runs.
    save_metadata : callable
        ``save_metadata(step, seconds, last losses, history) -> dict``: the model file's
        metadata.
    validate : callable, optional
        ``validate() -> dict``, merged into the log entry every ``validation_every`` steps
        and at the end.
    """
    end = steps if stop_at is None else min(steps, stop_at)
    end = max(end, start)
    meter = _Meter()
    last = {}
    bar = _progress(progress, steps, start, kind)
    t0 = time.perf_counter()

    def seconds_now():
        return seconds0 + time.perf_counter() - t0

    def save(step):
        # the state first: it is what resuming reads, and holds the weights too
        _save_state(sp, kind=kind, model=model, optimizer=optimizer, step=step,
                    seconds=seconds_now(), options=options, history=history)
        _save_model_file(model, out, save_metadata(step, seconds_now(), last, history))

    step = start
    try:
        for step in range(start, end):
            cur_lr = _lr_at(step, lr=lr, schedule=lr_schedule, steps=steps)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            losses = step_fn(step)
            meter.add(losses)
            done = step + 1
            validating = validate is not None and (done % validation_every == 0
                                                   or done == end)
            if done % log_every == 0 or done == end or validating:
                entry = {"step": done, "lr": cur_lr, "seconds": round(seconds_now(), 3),
                         **{k: round(v, 6) for k, v in meter.means().items()}}
                if validating:
                    entry.update(validate())
                history.append(entry)
                last = {k: v for k, v in entry.items() if k not in ("step", "seconds")}
                meter.reset()
                log.info("%s step %d/%d: %s", kind, done, steps,
                         ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step"))
            if bar is not None:
                bar.update(1)
                if "total" in losses:
                    bar.set_postfix(loss=f"{losses['total']:.4g}")
            if done % checkpoint_every == 0 and done != end:
                save(done)
                log.debug("%s: checkpoint at step %d", kind, done)
    finally:
        if bar is not None:
            bar.close()
    if end > start or not out.exists():
        save(end)
    return _final_log(kind, end=end, seconds=seconds_now(), history=history, last=last,
                      device=device, out=out, start=start)


def _save_model_file(model, out: Path, metadata: dict) -> None:
    from ..models import save_model

    save_model(model, out, metadata=metadata)


def _final_log(kind, *, end, seconds, history, last, device, out, start) -> "TrainingLog":
    final = dict(last) if last else (
        {k: v for k, v in history[-1].items() if k not in ("step", "seconds")}
        if history else {})
    return TrainingLog(steps=end, seconds=seconds, history=tuple(history), final=final,
                       device=str(device), out=str(out), resumed_from=start)


def history_summary(history: list, n: int = 20) -> list:
    """At most ``n`` evenly spaced history entries (and the last), for model metadata."""
    if len(history) <= n:
        return list(history)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(history) - 1, n)})
    return [history[i] for i in idx]
