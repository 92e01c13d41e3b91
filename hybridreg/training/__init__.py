"""Training the feature autoencoder and the registration network, and sampling from stacks.

Everything here needs no human labels. The feature autoencoder learns to reconstruct EM
sections (ssEMnet, FAEMReg); the registration network (:class:`~hybridreg.models.FAEMRegNet`)
learns from windows of *aligned* sections whose next section is deformed by a known random
deformation (:func:`hybridreg.synthetic.random_deformation`), so the exact answer of every
training window is known.

Sampling (:class:`StackSampler`, :mod:`hybridreg.training.data`)
    Random crops of one or more stacks ``(Z, H, W)``, normalised for the networks with
    :func:`hybridreg.models.normalize` (FAEMReg's 8-bit mean and std) after
    :func:`eight_bit_scaling` has taken them to the 8-bit scale: ``uint8`` as is, other
    dtypes by a linear map (see there). Every draw takes a ``numpy.random.Generator``.

Training (:func:`train_features`, :func:`train_registration`, :func:`finetune`)
    Adam, one CPU or CUDA device, deterministic per ``seed``: the weights are initialised
    after ``torch.manual_seed(seed)`` and the batch of step ``s`` is drawn from
    ``numpy.random.default_rng([seed, tag, s])``, so a run's result does not depend on
    where it was interrupted. The model is written with :func:`hybridreg.models.save_model`
    to ``out``; next to it, :func:`state_path` (``<out stem>.state.safetensors``) holds what
    resuming needs: the weights, the optimizer's tensors, the step, the options, the loss
    history and the torch RNG state (safetensors tensors plus JSON metadata; never pickle).
    ``resume=True`` continues from it and ends with the same weights as an uninterrupted
    run (on the CPU; CUDA kernels are not bit-deterministic). The loop and its checkpoints
    are in :mod:`hybridreg.training.loop`.

Example
    ::

        from hybridreg.training import (evaluate_registration, train_features,
                                        train_registration)
        train_features("train.tif", out="ae.safetensors", steps=2000)
        train_registration("train.tif", out="net.safetensors", features="ae.safetensors",
                           preset="compact", steps=5000, validation="val.tif")
        evaluate_registration("net.safetensors", "val.tif")["epe_px"]

Units
    Fields are pixel displacements ``(B, 2, H, W)``, channel 0 = x, in the pull direction of
    :mod:`hybridreg.fields` (``warped(p) = moving(p + u(p))``). Endpoint errors are pixels.
"""
from .data import StackSampler, eight_bit_scaling
from .evaluate import evaluate_registration
from .features import train_features
from .loop import LR_SCHEDULES, TrainingLog, state_path
from .registration import LossWeights, finetune, registration_losses, train_registration

__all__ = [
    "StackSampler",
    "eight_bit_scaling",
    "LossWeights",
    "TrainingLog",
    "train_features",
    "train_registration",
    "finetune",
    "evaluate_registration",
    "registration_losses",
    "state_path",
    "LR_SCHEDULES",
]
