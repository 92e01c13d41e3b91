"""Elastix parameter maps: the shipped files, reading, building, checking and writing maps.

Elastix settings stay elastix parameter maps. :func:`parameter_object` accepts a parameter
file, a dict, an ``itk.ParameterObject``, a name of itk's default maps (``"translation"``,
``"rigid"``, ``"affine"``, ``"bspline"``), a name of a file shipped in ``params/``
(``"em_affine"``; see :func:`params_dir`), or a list of these: a chain that elastix runs in
order, each map starting from the result of the previous one (``HowToCombineTransforms
"Compose"``). :func:`refinement_map` writes the multi-channel B-spline maps of the hybrid
method for any number of channels; :func:`adapt_refinement_map` turns a user's map into one.

Transform penalties (:data:`TRANSFORM_PENALTIES`, e.g. ``TransformBendingEnergyPenalty``)
fail after an external initial transform ("Not implemented for AdvancedTransformAdapter"):
the ``refine_bspline_*`` maps carry none.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .loading import load_itk

log = logging.getLogger(__name__)

#: itk's built-in default maps, by name (``ParameterObject.GetDefaultParameterMap``).
ITK_DEFAULT_MAPS = ("translation", "rigid", "affine", "bspline")

#: Metrics that are transform penalties, not image similarities: they do not use an image
#: channel, and they fail after an external initial transform.
TRANSFORM_PENALTIES = frozenset({
    "TransformBendingEnergyPenalty",
    "TransformRigidityPenalty",
    "DistancePreservingRigidityPenalty",
    "DisplacementMagnitudePenalty",
    "CorrespondingPointsEuclideanDistanceMetric",
})

_REFINE_DEFAULT_GRID_PX = 16.0


def params_dir() -> Path:
    """The folder of the parameter files shipped with hybridreg (``params/``).

    ``HYBRIDREG_PARAMS_DIR`` overrides it.
    """
    env = os.environ.get("HYBRIDREG_PARAMS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "params"


def shipped_parameter_files() -> dict[str, Path]:
    """Names (file stem, e.g. ``"em_affine"``) and paths of the shipped parameter files."""
    folder = params_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.txt"))}


def _format_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"parameter values must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"parameter values must be str, bool, int or float, got "
                    f"{type(value).__name__} ({value!r})")


def plain_map(mapping: Mapping) -> dict[str, list[str]]:
    """An elastix map (dict, itk map) as a plain ``{name: [str, ...]}`` dict."""
    out: dict[str, list[str]] = {}
    for key, value in dict(mapping).items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"parameter names must be non-empty strings, got {key!r}")
        values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        try:
            out[key] = [_format_value(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"elastix parameter {key!r}: {exc}") from None
    return out


def _parser_error(text: str) -> str:
    """elastix's parameter-file parser error on one line (its message spans several, after
    a C++ source location)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.endswith(".cxx:" ) and ".cxx:" not in ln]
    text = " ".join(ln.replace("ITK ERROR: ", "").replace("ERROR: ", "") for ln in lines)
    return text.replace("Please correct you parameter file!", "").strip() or "unreadable"


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.lower().endswith(".txt")
            or (os.altsep is not None and os.altsep in text))


def _maps_of_one(itk, item) -> list[dict[str, list[str]]]:
    """The plain maps of one (non-list) item of a chain."""
    if isinstance(item, itk.ParameterObject):
        return [plain_map(item.GetParameterMap(i))
                for i in range(item.GetNumberOfParameterMaps())]
    if isinstance(item, Mapping):
        return [plain_map(item)]
    if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"elastix parameter file '{path}' does not exist")
        po = itk.ParameterObject.New()
        try:
            po.ReadParameterFile(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read elastix parameter file '{path}': "
                             f"{_parser_error(str(exc))}") from None
        return [plain_map(po.GetParameterMap(i)) for i in range(po.GetNumberOfParameterMaps())]
    if isinstance(item, str):
        shipped = shipped_parameter_files()
        if item in shipped:
            return _maps_of_one(itk, shipped[item])
        if item in ITK_DEFAULT_MAPS:
            po = itk.ParameterObject.New()
            return [plain_map(po.GetDefaultParameterMap(item))]
        raise ValueError(
            f"unknown elastix parameter map name {item!r}: expected one of itk's defaults "
            f"{list(ITK_DEFAULT_MAPS)}, a file shipped in '{params_dir()}' "
            f"{sorted(shipped)}, or a path to a parameter file")
    raise TypeError(f"cannot make an elastix parameter map from {type(item).__name__} "
                    f"({item!r}); expected a path, a dict, an itk.ParameterObject or a name")


def parameter_maps(params) -> list[dict[str, list[str]]]:
    """The elastix parameter maps described by ``params``, as plain python.

    Parameters
    ----------
    params : str, os.PathLike, dict, itk.ParameterObject, or a list of these
        A parameter file (a path, or a string with a path separator or ending in ``.txt``);
        a dict ``{name: value or list of values}``; an ``itk.ParameterObject`` (all its
        maps); a name of itk's defaults (``"translation"``, ``"rigid"``, ``"affine"``,
        ``"bspline"``); a name of a shipped file (``"em_affine"`` for
        ``params/em_affine.txt``, see :func:`params_dir`); or a list of these, applied in
        order (a chain).

    Returns
    -------
    list of dict
        One ``{name: [str, ...]}`` dict per map, in the order elastix runs them.

    Raises
    ------
    FileNotFoundError
        A parameter file that does not exist (named in the message).
    ValueError
        An unknown name, an unreadable file or an empty chain.
    """
    itk = load_itk()
    items = list(params) if isinstance(params, (list, tuple)) else [params]
    maps: list[dict[str, list[str]]] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            maps.extend(parameter_maps(item))
        else:
            maps.extend(_maps_of_one(itk, item))
    if not maps:
        raise ValueError(f"no elastix parameter maps in {params!r}")
    return maps


def parameter_object(params):
    """An ``itk.ParameterObject`` holding the maps described by ``params``.

    Parameters
    ----------
    params
        As in :func:`parameter_maps`: a path, a dict, an ``itk.ParameterObject``, a name of
        itk's defaults or of a shipped file, or a list of these (a chain, applied in order).

    Returns
    -------
    itk.ParameterObject
        A new object; ``params`` itself is never modified.
    """
    itk = load_itk()
    po = itk.ParameterObject.New()
    for m in parameter_maps(params):
        po.AddParameterMap(m)
    return po


def refinement_map(n_channels: int, *, grid_spacing_px: float = _REFINE_DEFAULT_GRID_PX,
                   weights: Sequence[float] | None = None, resolutions: int = 2,
                   iterations: int = 250, samples: int = 4096,
                   bending_weight: float = 0.0) -> dict[str, list[str]]:
    """The B-spline refinement map of the hybrid method for ``n_channels`` image channels.

    Channel 0 is the EM section; channels 1.. are extra similarity channels (feature maps)
    given to :func:`~hybridreg.elastix.register_pair` as ``fixed_channels`` /
    ``moving_channels``. The map uses ``MultiMetricMultiResolutionRegistration`` with one
    ``AdvancedNormalizedCorrelation`` metric, one pyramid pair, one interpolator and one
    sampler per channel, and ``Metric<i>Weight`` entries. With ``bending_weight`` it also
    carries a ``TransformBendingEnergyPenalty`` (its own sampler, 1024 samples, as in
    ``em_bspline``): usable when the refinement starts by resampling
    (``register_pair(..., initial_mode="resample")``), not after an external initial
    transform, where elastix cannot evaluate penalties. With the default arguments it equals
    ``params/refine_bspline_<n>ch.txt``.

    Parameters
    ----------
    n_channels : int
        Number of image channels (>= 1).
    grid_spacing_px : float
        Final B-spline control-point spacing in pixels (``FinalGridSpacingInVoxels``).
    weights : sequence of float, optional
        One weight per channel (``Metric<i>Weight``); default 1.0 each.
    resolutions : int
        Number of pyramid levels; level ``k`` of ``resolutions`` smooths with shrink factor
        ``2**(resolutions - 1 - k)`` and a grid ``2**(resolutions - 1 - k)`` times coarser.
    iterations : int
        ``MaximumNumberOfIterations`` per level.
    samples : int
        ``NumberOfSpatialSamples`` per channel and iteration.
    bending_weight : float
        ``Metric<n>Weight`` of a bending-energy penalty after the image metrics (0: none).

    Returns
    -------
    dict
        ``{name: [str, ...]}``, usable wherever :func:`parameter_object` takes a dict.
    """
    n = int(n_channels)
    if n < 1 or n != n_channels:
        raise ValueError(f"n_channels must be a positive integer, got {n_channels!r}")
    if weights is None:
        weights = [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per channel ({n}), got {len(weights)}")
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    spacing = float(grid_spacing_px)
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"grid_spacing_px must be positive, got {grid_spacing_px!r}")
    levels = int(resolutions)
    if levels < 1:
        raise ValueError(f"resolutions must be >= 1, got {resolutions!r}")
    shrink = [2 ** (levels - 1 - k) for k in range(levels)]
    m: dict[str, list[str]] = {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "FixedImageDimension": ["2"],
        "MovingImageDimension": ["2"],
        "UseDirectionCosines": ["true"],
        "Registration": ["MultiMetricMultiResolutionRegistration"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"] * n,
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"] * n,
        "Interpolator": ["LinearInterpolator"] * n,
        "Metric": ["AdvancedNormalizedCorrelation"] * n,
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "Transform": ["BSplineTransform"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "Resampler": ["DefaultResampler"],
        "FinalGridSpacingInVoxels": [repr(spacing)] * 2,
        "GridSpacingSchedule": [repr(float(s)) for s in shrink for _ in range(2)],
        "BSplineTransformSplineOrder": ["3"],
        "UseCyclicTransform": ["false"],
        "HowToCombineTransforms": ["Compose"],
        "AutomaticTransformInitialization": ["false"],
        "NumberOfResolutions": [str(levels)],
        "ImagePyramidSchedule": [str(s) for s in shrink for _ in range(2)],
        "AutomaticParameterEstimation": ["true"],
        "MaximumNumberOfIterations": [str(int(iterations))],
        "ImageSampler": ["RandomCoordinate"] * n,
        "NumberOfSpatialSamples": [str(int(samples))],
        "NewSamplesEveryIteration": ["true"],
        "CheckNumberOfSamples": ["true"],
        "MaximumNumberOfSamplingAttempts": ["8"],
        "FinalBSplineInterpolationOrder": ["3"],
        "DefaultPixelValue": ["0"],
        "WriteResultImage": ["true"],
        "ResultImagePixelType": ["float"],
        "ResultImageFormat": ["mha"],
        "CompressResultImage": ["false"],
        "WriteTransformParametersEachIteration": ["false"],
        "WriteTransformParametersEachResolution": ["false"],
    }
    for i, w in enumerate(weights):
        m[f"Metric{i}Weight"] = [repr(w)]
    bending = float(bending_weight)
    if not (math.isfinite(bending) and bending >= 0):
        raise ValueError(f"bending_weight must be finite and >= 0, got {bending_weight!r}")
    if bending > 0:
        # elastix wants one interpolator and sampler per metric, the penalty's included, and
        # with several images one pyramid (and image pair) per metric: register_pair gives
        # the penalty the section again, which it does not look at
        m["Metric"] = m["Metric"] + ["TransformBendingEnergyPenalty"]
        m["Interpolator"] = m["Interpolator"] + ["LinearInterpolator"]
        m["ImageSampler"] = m["ImageSampler"] + ["RandomCoordinate"]
        if n > 1:
            for key in ("FixedImagePyramid", "MovingImagePyramid"):
                m[key] = m[key] + [m[key][0]]
        m[f"ImageSampler{n}NumberOfSpatialSamples"] = ["1024"]
        m[f"Metric{n}Weight"] = [repr(bending)]
    return m


#: Entries that elastix expects once per image channel in a multi-metric registration.
_PER_CHANNEL = ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler")


def adapt_refinement_map(params, n_channels: int, *, weights: Sequence[float] | None = None,
                         keep_penalties: bool = False) -> tuple[dict[str, list[str]], list[str]]:
    """Adapt a user's (B-spline) map to refine from an initial field with extra channels.

    What changes, and why:

    - transform penalties (``TransformBendingEnergyPenalty`` and the others of
      ``TRANSFORM_PENALTIES``) are removed, with a warning, unless ``keep_penalties``:
      elastix cannot evaluate them after an external initial transform ("Not implemented
      for AdvancedTransformAdapter"); the B-spline grid spacing is the regulariser then.
      With the resample start (``keep_penalties=True``) they are kept, after the image
      metrics, with their weights and samplers;
    - ``Registration`` becomes ``MultiMetricMultiResolutionRegistration`` (for more than
      one channel), and the map's first image metric, pyramids, interpolator and sampler are
      repeated once per channel, unless the map already lists one per channel;
    - ``Metric<i>Weight`` is set from ``weights`` (default: the map's own, else 1.0);
    - ``AutomaticTransformInitialization`` is turned off (the initial field places the
      moving section; a centre-of-mass initialisation on top of it would move it again).

    Everything else (grid spacing, optimiser, iterations, samples, ...) stays the user's.

    Parameters
    ----------
    params
        One map, as :func:`parameter_maps` accepts it (a file, dict, name or
        ParameterObject with one map).
    n_channels : int
        The section plus the extra channels.
    weights : sequence of float, optional
        One per channel.
    keep_penalties : bool
        Keep the map's transform penalties (for ``initial_mode="resample"``).

    Returns
    -------
    (dict, list of str)
        The adapted map and the warnings (returned for the caller to show; logged at INFO
        only, so that they are not shown twice).
    """
    maps = parameter_maps(params)
    if len(maps) != 1:
        raise ValueError(f"a refinement needs one parameter map, got a chain of {len(maps)}; "
                         f"pass the B-spline map alone")
    n = int(n_channels)
    if n < 1 or n != n_channels:
        raise ValueError(f"n_channels must be a positive integer, got {n_channels!r}")
    m = {k: list(v) for k, v in maps[0].items()}
    notes: list[str] = []
    metrics = list(m.get("Metric", []))
    penalties = [x for x in metrics if x in TRANSFORM_PENALTIES]
    image = [x for x in metrics if x not in TRANSFORM_PENALTIES]
    if penalties and not keep_penalties:
        notes.append(f"removed transform penalties {penalties} from the refinement map: "
                     f"elastix cannot evaluate them after an external initial transform; the "
                     f"B-spline grid spacing regularises the refinement instead")
    transform = m.get("Transform", ["(none)"])[0]
    if transform != "BSplineTransform":
        notes.append(f"the refinement map's Transform is {transform!r}, not "
                     f"'BSplineTransform'; it is run as given")
    if not image:
        image = ["AdvancedNormalizedCorrelation"]
        notes.append("the refinement map had no image metric; using "
                     "AdvancedNormalizedCorrelation")
    old_weights = [m.get(f"Metric{i}Weight", [None])[0] for i in range(len(metrics))]
    kept_weights = [w for x, w in zip(metrics, old_weights) if x not in TRANSFORM_PENALTIES]
    samplers = list(m.get("ImageSampler", []))
    # per-metric sample counts (ImageSampler<i>NumberOfSpatialSamples) follow their metric
    counts = [m.pop(f"ImageSampler{i}NumberOfSpatialSamples", None) for i in range(len(metrics))]
    image_counts = [c for x, c in zip(metrics, counts) if x not in TRANSFORM_PENALTIES]
    # each kept penalty with its weight, sampler and sample count
    kept_penalties = [(x, w, samplers[i] if i < len(samplers) else None, counts[i])
                      for i, (x, w) in enumerate(zip(metrics, old_weights))
                      if x in TRANSFORM_PENALTIES] if keep_penalties else []
    for key in [k for k in m if k.startswith("Metric") and k.endswith(("Weight", "Use"))]:
        del m[key]
    if len(image) != n:
        image = [image[0]] * n
        kept_weights = [kept_weights[0] if kept_weights else None] * n
        image_counts = [image_counts[0] if image_counts else None] * n
    m["Metric"] = image
    for key in _PER_CHANNEL:
        if key in m and len(m[key]) != n:
            m[key] = [m[key][0]] * n
    if n > 1 or penalties:
        m["Registration"] = ["MultiMetricMultiResolutionRegistration"]
    m["AutomaticTransformInitialization"] = ["false"]
    if weights is None:
        weights = [float(w) if w is not None else 1.0 for w in kept_weights]
    weights = [float(w) for w in weights]
    if len(weights) != n or any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be {n} finite numbers >= 0, got {weights}")
    for i, w in enumerate(weights):
        m[f"Metric{i}Weight"] = [repr(w)]
    for i, count in enumerate(image_counts):
        if count is not None:
            m[f"ImageSampler{i}NumberOfSpatialSamples"] = list(count)
    for j, (metric, w, sampler, count) in enumerate(kept_penalties):
        i = n + j
        m["Metric"].append(metric)
        m[f"Metric{i}Weight"] = [w if w is not None else "1.0"]
        # one interpolator, sampler and pyramid per metric once they are listed per channel
        for key, own in (("Interpolator", None), ("ImageSampler", sampler),
                         ("FixedImagePyramid", None), ("MovingImagePyramid", None)):
            if len(m.get(key, [])) > 1:
                m[key] = m[key][:i] + [own or m[key][0]]
        if count is not None:
            m[f"ImageSampler{i}NumberOfSpatialSamples"] = list(count)
    for note in notes:
        log.info("adapt_refinement_map: %s", note)  # returned: the caller shows them
    return m, notes


def image_metrics(m: Mapping[str, Sequence[str]]) -> list[str]:
    """The image (similarity) metrics of a map: its metrics that are no transform penalty."""
    return [x for x in m.get("Metric", []) if x not in TRANSFORM_PENALTIES]


def check_channels(maps: Sequence[Mapping[str, Sequence[str]]], n_channels: int) -> None:
    """Every map must have one image metric and pyramid pair per channel, and one
    interpolator per metric (a transform penalty counts).

    Maps with a single pyramid entry and a single-channel registration are left alone (a
    map may put several metrics on one image pair).
    """
    for index, m in enumerate(maps):
        n_pyramids = len(m.get("FixedImagePyramid", []))
        if n_channels == 1 and n_pyramids <= 1:
            continue
        metrics = image_metrics(m)
        problems = []
        if len(metrics) != n_channels:
            problems.append(f"{len(metrics)} image metric(s) {metrics}")
        for key in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator"):
            count = len(m.get(key, []))
            # one per metric, a transform penalty's included (elastix's rule)
            if count not in (0, len(m.get("Metric", []))):
                problems.append(f"{count} {key} entries")
        if n_channels > 1 and m.get("Registration", [""])[0] != \
                "MultiMetricMultiResolutionRegistration":
            problems.append(f"Registration {m.get('Registration', ['(none)'])[0]!r} instead of "
                            f"'MultiMetricMultiResolutionRegistration'")
        if problems:
            raise ValueError(
                f"elastix map {index} of the chain does not fit {n_channels} image channel(s) "
                f"(the section plus {n_channels - 1} extra channel(s)): it has "
                f"{'; '.join(problems)}. A map for N channels needs N image metrics, N "
                f"FixedImagePyramid/MovingImagePyramid entries, one Interpolator per metric "
                f"and Metric<i>Weight entries; see hybridreg.elastix.refinement_map(N).")


def check_no_penalty_with_initial(maps) -> None:
    """No map may carry a transform penalty when elastix gets an external initial transform."""
    for index, m in enumerate(maps):
        penalties = [x for x in m.get("Metric", []) if x in TRANSFORM_PENALTIES]
        if penalties:
            raise ValueError(
                f"elastix map {index} of the chain has transform penalties {penalties}, which "
                f"fail after an external initial transform (initial_field) in elastix "
                f"('Not implemented for AdvancedTransformAdapter'); use a refinement map "
                f"without penalties (refine_bspline_*.txt or refinement_map()).")


def write_parameter_file(mapping, path, *, overwrite: bool = False) -> Path:
    """Write one parameter map as an elastix parameter file (``(Key "value" ...)`` lines).

    Parameters
    ----------
    mapping : dict
        ``{name: [str, ...]}`` (e.g. an entry of ``ElastixResult.parameter_maps``).
    path : str or os.PathLike
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
    """
    from ..io import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(format_parameter_file(plain_map(mapping)))
    return path


def format_parameter_file(m: Mapping[str, Sequence[str]]) -> str:
    """An elastix parameter file: numbers bare, other values quoted."""
    number = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
    lines = []
    for key in sorted(m):
        values = [str(v) for v in m[key]]
        if not values:
            continue
        text = " ".join(v if number.match(v) else '"' + v.replace('"', "") + '"'
                        for v in values)
        lines.append(f"({key} {text})")
    return "\n".join(lines) + "\n"


def scale_penalties_to_spacing(maps, spacing_xy) -> list[dict]:
    """Maps whose ``TransformBendingEnergyPenalty`` weight is multiplied by ``sx * sy``.

    elastix computes the bending energy in physical units: a displacement's second
    derivatives, and so the energy, scale as 1 / spacing^2 (a spacing of 0.001, um for nm,
    makes it 10^6 times larger). Penalty weights in hybridreg's parameter files are for pixel
    units (a spacing of 1, as elastix's own examples assume); rescaled here, the balance of
    similarity and smoothness, and so the result in pixels, is the same in any unit of the
    spacing (tests/elastix: nm against um).
    """
    factor = float(spacing_xy[0]) * float(spacing_xy[1])
    out = []
    for m in maps:
        m = {k: list(v) for k, v in m.items()}
        for i, metric in enumerate(m.get("Metric", [])):
            if metric == "TransformBendingEnergyPenalty" and factor != 1.0:
                key = f"Metric{i}Weight"
                m[key] = [repr(float(m.get(key, ["1.0"])[0]) * factor)]
        out.append(m)
    return out
