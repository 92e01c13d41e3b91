"""The itk-elastix boundary: parameter maps, pair registration, transform export.

Everything hybridreg does with elastix goes through this module. It holds fields to the
contract of :mod:`hybridreg.fields` (pull fields ``(2, H, W)``, channel 0 = u_x, physical
units with ``spacing_xy`` / ``origin_xy``).

Loading
    Importing this module imports neither itk nor elastix. The first call that needs them
    runs :func:`load_itk` once per process: it selects ITK's ``Pool`` threader (the default
    TBB threader is slow and crashes when a thread count is set) *before* any filter runs,
    and touches the elastix wrapping, which costs over ten seconds.

Parameter maps
    Elastix settings stay elastix parameter maps. :func:`parameter_object` accepts a
    parameter file, a dict, an ``itk.ParameterObject``, a name of itk's default maps
    (``"translation"``, ``"rigid"``, ``"affine"``, ``"bspline"``), a name of a file shipped in
    ``params/`` (``"em_affine"``; see :func:`params_dir`), or a list of these: a chain that
    elastix runs in order, each map starting from the result of the previous one
    (``HowToCombineTransforms "Compose"``). :func:`refinement_map` writes the multi-channel
    B-spline maps of the hybrid method for any number of channels.

Initial fields
    :func:`register_pair` applies ``initial_field`` with ``SetExternalInitialTransform`` (a
    ``DisplacementFieldTransform``). ``SetInitialTransform`` with such a transform is silently
    ignored by itk-elastix, and transform penalties (``TransformBendingEnergyPenalty``) fail
    after an external initial transform: use the ``refine_bspline_*`` maps. Elastix applies
    the initial transform first: the total map is ``p -> q = p + initial(p) -> q + b(q)``,
    i.e. ``fields.compose(initial, b)``. With itk-elastix 0.25 the transform parameter
    object then holds two maps, an ``ExternalTransform`` (which refers to the in-memory
    transform by its address) and the B-spline, and transformix on that object gives the
    *total* field; :func:`register_pair` returns the total field either way. The parameter
    files elastix writes in that case reference an ITK ``.tfm`` file that elastix 5.0's
    ``transformix`` cannot read: :func:`export_transformix_chain` writes a faithful chain
    for it instead. With ``initial_mode="resample"`` elastix never sees the initial field:
    the moving section is resampled with it first, elastix finds ``b`` on that, and the
    total is ``fields.compose(b, initial)`` (the B-spline acts first); evaluating an
    external transform is what makes elastix slow with one (about 0.12 s per 512 x 512
    call). A lone B-spline map's field is evaluated in numpy (:func:`bspline_map_field`);
    every other result's field comes from transformix.

Transformix 5.0.1 (the Debian program) resolves relative paths in
``InitialTransformParametersFileName`` and ``DeformationFieldFileName`` against its current
working directory, not against the parameter file's folder. :func:`export_transformix_chain`
therefore writes absolute paths unless asked for bare file names.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import fields as _fields

log = logging.getLogger(__name__)

__all__ = [
    "adapt_refinement_map",
    "write_parameter_file",
    "ElastixError",
    "ElastixResult",
    "load_itk",
    "params_dir",
    "shipped_parameter_files",
    "parameter_object",
    "parameter_maps",
    "refinement_map",
    "parse_final_metric",
    "register_pair",
    "bspline_map_field",
    "export_transformix_chain",
    "write_itk_transform",
]

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

_ITK = None
_LOAD_LOCK = threading.Lock()


class ElastixError(RuntimeError):
    """elastix or transformix failed; the message carries the tail of elastix's log."""


# --- loading ---------------------------------------------------------------------------------

def load_itk():
    """Import itk with the Pool threader and load the elastix wrapping, once per process.

    Safe to call often and from several threads: only the first call does the work
    (about 12 s). If itk was already imported with another default threader, the Pool
    threader is selected anyway, before any elastix filter is created here.

    Returns
    -------
    module
        The ``itk`` module, with ``itk.ElastixRegistrationMethod`` loaded.
    """
    global _ITK
    if _ITK is not None:
        return _ITK
    with _LOAD_LOCK:
        if _ITK is None:
            t0 = time.perf_counter()
            os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
            import itk

            base = itk.MultiThreaderBase
            pool = itk.MultiThreaderBaseEnums.Threader_Pool
            if base.GetGlobalDefaultThreader() != pool:
                log.info("selecting ITK's Pool threader (was %s)",
                         base.ThreaderTypeToString(base.GetGlobalDefaultThreader()))
                base.SetGlobalDefaultThreader(pool)
            # Touch the lazily loaded elastix wrapping once.
            itk.ElastixRegistrationMethod  # noqa: B018
            itk.TransformixFilter  # noqa: B018
            itk.ParameterObject  # noqa: B018
            _ITK = itk
            log.info("loaded itk %s with elastix in %.1f s", itk.Version.GetITKVersion(),
                     time.perf_counter() - t0)
    return _ITK


# --- parameter maps --------------------------------------------------------------------------

def params_dir() -> Path:
    """The folder of the parameter files shipped with hybridreg (``params/``).

    ``HYBRIDREG_PARAMS_DIR`` overrides it.
    """
    env = os.environ.get("HYBRIDREG_PARAMS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "params"


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


def _plain_map(mapping: Mapping) -> dict[str, list[str]]:
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


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.lower().endswith(".txt")
            or (os.altsep is not None and os.altsep in text))


def _maps_of_one(itk, item) -> list[dict[str, list[str]]]:
    """The plain maps of one (non-list) item of a chain."""
    if isinstance(item, itk.ParameterObject):
        return [_plain_map(item.GetParameterMap(i))
                for i in range(item.GetNumberOfParameterMaps())]
    if isinstance(item, Mapping):
        return [_plain_map(item)]
    if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"elastix parameter file '{path}' does not exist")
        po = itk.ParameterObject.New()
        try:
            po.ReadParameterFile(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read elastix parameter file '{path}': {exc}") from None
        return [_plain_map(po.GetParameterMap(i)) for i in range(po.GetNumberOfParameterMaps())]
    if isinstance(item, str):
        shipped = shipped_parameter_files()
        if item in shipped:
            return _maps_of_one(itk, shipped[item])
        if item in ITK_DEFAULT_MAPS:
            po = itk.ParameterObject.New()
            return [_plain_map(po.GetDefaultParameterMap(item))]
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
                   iterations: int = 250, samples: int = 4096) -> dict[str, list[str]]:
    """The B-spline refinement map of the hybrid method for ``n_channels`` image channels.

    Channel 0 is the EM section; channels 1.. are extra similarity channels (feature maps)
    given to :func:`register_pair` as ``fixed_channels`` / ``moving_channels``. The map uses
    ``MultiMetricMultiResolutionRegistration`` with one ``AdvancedNormalizedCorrelation``
    metric, one pyramid pair, one interpolator and one sampler per channel, and
    ``Metric<i>Weight`` entries. It has *no* transform penalty (those fail after an external
    initial transform); the grid spacing is the regulariser. With the default arguments it
    equals ``params/refine_bspline_<n>ch.txt``.

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
    return m


#: Entries that elastix expects once per image channel in a multi-metric registration.
_PER_CHANNEL = ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler")


def adapt_refinement_map(params, n_channels: int, *, weights: Sequence[float] | None = None
                         ) -> tuple[dict[str, list[str]], list[str]]:
    """Adapt a user's (B-spline) map to refine from an initial field with extra channels.

    What changes, and why:

    - transform penalties (``TransformBendingEnergyPenalty`` and the others of
      ``TRANSFORM_PENALTIES``) are removed, with a warning: elastix cannot evaluate them
      after an external initial transform ("Not implemented for AdvancedTransformAdapter");
      the B-spline grid spacing is the regulariser then;
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

    Returns
    -------
    (dict, list of str)
        The adapted map and the warnings (also logged).
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
    if penalties:
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
    for key in [k for k in m if k.startswith("Metric") and k.endswith(("Weight", "Use"))]:
        del m[key]
    if len(image) != n:
        image = [image[0]] * n
        kept_weights = [kept_weights[0] if kept_weights else None] * n
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
    for note in notes:
        log.warning("adapt_refinement_map: %s", note)
    return m, notes


def _image_metrics(m: Mapping[str, Sequence[str]]) -> list[str]:
    return [x for x in m.get("Metric", []) if x not in TRANSFORM_PENALTIES]


def _check_channels(maps: Sequence[Mapping[str, Sequence[str]]], n_channels: int) -> None:
    """Every map must have one image metric, pyramid pair and interpolator per channel.

    Maps with a single pyramid entry and a single-channel registration are left alone (a
    map may put several metrics on one image pair).
    """
    for index, m in enumerate(maps):
        n_pyramids = len(m.get("FixedImagePyramid", []))
        if n_channels == 1 and n_pyramids <= 1:
            continue
        metrics = _image_metrics(m)
        problems = []
        if len(metrics) != n_channels:
            problems.append(f"{len(metrics)} image metric(s) {metrics}")
        for key in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator"):
            count = len(m.get(key, []))
            if count not in (0, n_channels):
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
                f"FixedImagePyramid/MovingImagePyramid/Interpolator entries and "
                f"Metric<i>Weight entries; see hybridreg.elastix.refinement_map(N).")


def _check_no_penalty_with_initial(maps) -> None:
    for index, m in enumerate(maps):
        penalties = [x for x in m.get("Metric", []) if x in TRANSFORM_PENALTIES]
        if penalties:
            raise ValueError(
                f"elastix map {index} of the chain has transform penalties {penalties}, which "
                f"fail after an external initial transform (initial_field) in elastix "
                f"('Not implemented for AdvancedTransformAdapter'); use a refinement map "
                f"without penalties (refine_bspline_*.txt or refinement_map()).")


# --- images ----------------------------------------------------------------------------------

def _pair(value, name) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a pair (x, y) of numbers, got {value!r}") from None
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{name} must be a pair (x, y) of finite numbers, got {value!r}")
    return pair


def _is_itk_image(itk, obj) -> bool:
    return hasattr(obj, "GetImageDimension") and hasattr(obj, "GetSpacing") and \
        not isinstance(obj, np.ndarray)


def _to_array(itk, image, name: str) -> np.ndarray:
    if _is_itk_image(itk, image):
        if image.GetImageDimension() != 2:
            raise ValueError(f"{name} must be a 2D image, got dimension "
                             f"{image.GetImageDimension()}")
        if not np.allclose(np.asarray(image.GetDirection()), np.eye(2)):
            raise ValueError(f"{name} has a non-identity direction; hybridreg supports "
                             f"axis-aligned grids only")
        arr = itk.array_from_image(image)
    else:
        arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D section of shape (H, W), got shape {arr.shape}")
    if arr.shape[0] < 4 or arr.shape[1] < 4:
        raise ValueError(f"{name} must be at least 4x4 pixels, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _itk_image(itk, arr: np.ndarray, spacing_xy, origin_xy):
    img = itk.image_from_array(np.ascontiguousarray(arr))
    img.SetSpacing([float(s) for s in spacing_xy])
    img.SetOrigin([float(o) for o in origin_xy])
    direction = itk.Matrix[itk.D, 2, 2]()
    direction.SetIdentity()
    img.SetDirection(direction)
    return img


# --- log -------------------------------------------------------------------------------------

_FINAL_METRIC = re.compile(r"^\s*Final metric value\s*=\s*(\S+)")


def parse_final_metric(text: str) -> float | None:
    """The final metric value of the last registration in an elastix log.

    Reads the last ``Final metric value = ...`` line (elastix writes one per map of a
    chain, after that map's iteration tables). Where the last iteration table comes after it
    (a log cut short), reads the ``2:Metric`` column of that table's last row instead (the
    tables are tab-separated, headed ``1:ItNr  2:Metric ...``).

    Returns
    -------
    float or None
        ``None`` when the log holds neither.
    """
    lines = text.splitlines()
    final_at = [i for i, line in enumerate(lines) if _FINAL_METRIC.match(line)]
    header_at = [i for i, line in enumerate(lines) if line.startswith("1:ItNr")]
    if final_at and (not header_at or final_at[-1] > header_at[-1]):
        try:
            return float(_FINAL_METRIC.match(lines[final_at[-1]]).group(1))
        except ValueError:
            pass
    if not header_at:
        return None
    start = header_at[-1]
    columns = lines[start].split("\t")
    try:
        col = columns.index("2:Metric")
    except ValueError:
        return None
    value = None
    for line in lines[start + 1:]:
        parts = line.split("\t")
        if len(parts) < len(columns) or not parts[0].strip().isdigit():
            break
        try:
            value = float(parts[col])
        except ValueError:
            break
    return value


def _log_tail(path: Path, *, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no elastix log was written)"
    all_lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in all_lines if "ERROR" in ln or "Error" in ln]
    tail = all_lines[-lines:]
    picked = [ln for ln in errors if ln not in tail][-10:] + tail
    return "\n".join(picked)


# --- registration ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ElastixResult:
    """The result of :func:`register_pair`.

    Attributes
    ----------
    field : ndarray, shape (2, H, W), float32
        The total pull field (initial field included) in physical units on the fixed grid:
        ``warp(moving, field)`` reproduces ``warped``.
    warped : ndarray, shape (H, W), float32
        Elastix's own result image (the moving section resampled with elastix's final
        interpolator, ``FinalBSplineInterpolationOrder``). When the last map says
        ``(WriteResultImage "false")`` elastix skips that resampling (about 0.15 s on 512 x
        512) and ``warped`` is :func:`hybridreg.warp.warp` of the moving section with
        ``field`` at that order (at most 3; spline interpolation, like elastix's).
    transform : itk.DisplacementFieldTransform
        ``fields.to_itk_transform(field)``: reproduces the result in ITK.
    parameter_maps : list of dict
        The maps that were run, ``{name: [str, ...]}``.
    transform_parameter_maps : list of dict
        Elastix's transform parameter maps, in order. Their file links
        (``InitialTransformParameterFileName``) are reset to ``"NoInitialTransform"``: in an
        ``itk.ParameterObject`` (:func:`parameter_object`) itk-elastix chains maps by
        position, and ``itk.transformix_filter`` with all of them reproduces ``warped``. After
        an initial field the first is an ``ExternalTransform`` map that stands for the
        initial field (its in-memory ``TransformAddress`` is removed: it would dangle);
        with ``initial_mode="resample"`` the maps are only what elastix found on the
        resampled section, and the initial field acts *after* them (see ``initial_mode``).
        See :func:`export_transformix_chain` for files that reproduce the result on disk.
    final_metric : float or None
        The final metric value of the last map, from elastix's log.
    seconds : float
        Wall time of the registration and of computing the field.
    initial_field : ndarray, shape (2, H, W), float32, or None
        The initial field that was given (physical units).
    spacing_xy, origin_xy : (float, float)
        The fixed grid.
    initial_mode : str
        ``"external"``: elastix's maps act after the initial field (``field`` is
        ``compose(initial_field, found)``); ``"resample"``: before it
        (``compose(found, initial_field)``). See :func:`register_pair`.
    """

    field: np.ndarray
    warped: np.ndarray
    transform: Any
    parameter_maps: list
    transform_parameter_maps: list
    final_metric: float | None
    seconds: float
    initial_field: np.ndarray | None = None
    spacing_xy: tuple = (1.0, 1.0)
    origin_xy: tuple = (0.0, 0.0)
    initial_mode: str = "external"

    @property
    def shape_yx(self) -> tuple[int, int]:
        return tuple(self.field.shape[1:])


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline kernel."""
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6,
                    np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def bspline_map_field(tmap: Mapping[str, Sequence[str]], shape_yx, *, spacing_xy=(1.0, 1.0),
                      origin_xy=(0.0, 0.0)) -> np.ndarray | None:
    """The pull field of one elastix ``BSplineTransform`` parameter map on a grid, in numpy.

    What transformix computes for a map without initial transform, at a fraction of its cost
    (0.003 s against 0.05 s on 512 x 512): the cubic B-spline is separable, so each
    component is ``By @ C @ Bx.T`` with the kernel's weights of the pixels against the
    control points (tested against transformix). Returns None for anything else (another
    transform or spline order, a chained or cyclic map, a rotated grid), which the caller
    leaves to transformix.
    """
    def get(key, default=None):
        v = tmap.get(key)
        return default if v is None else list(v)

    if get("Transform", [""])[0] != "BSplineTransform" \
            or get("BSplineTransformSplineOrder", ["3"])[0] != "3" \
            or get("UseCyclicTransform", ["false"])[0].lower() != "false" \
            or get("InitialTransformParameterFileName", ["NoInitialTransform"])[0] \
            != "NoInitialTransform" \
            or get("InitialTransformParametersFileName", ["NoInitialTransform"])[0] \
            != "NoInitialTransform":
        return None
    try:
        size = [int(v) for v in get("GridSize")]
        index = [int(float(v)) for v in get("GridIndex", ["0", "0"])]
        gsp = [float(v) for v in get("GridSpacing")]
        gor = [float(v) for v in get("GridOrigin")]
        gdir = [float(v) for v in get("GridDirection", ["1", "0", "0", "1"])]
        coef = np.asarray([float(v) for v in get("TransformParameters")], np.float64)
    except (TypeError, ValueError):
        return None
    if len(size) != 2 or index != [0, 0] or gdir != [1.0, 0.0, 0.0, 1.0] \
            or coef.size != 2 * size[0] * size[1]:
        return None
    h, w = shape_yx
    basis = []
    for n, sp, org, g_org, g_sp, g_n in ((w, spacing_xy[0], origin_xy[0], gor[0], gsp[0],
                                          size[0]),
                                         (h, spacing_xy[1], origin_xy[1], gor[1], gsp[1],
                                          size[1])):
        t = (org + sp * np.arange(n) - g_org) / g_sp
        basis.append(_cubic_bspline(t[:, None] - np.arange(g_n)[None, :]))
    bx, by = basis
    c = coef.reshape(2, size[1], size[0])  # x then y components, x fastest
    return np.stack([by @ c[k] @ bx.T for k in range(2)]).astype(np.float32)


def _transformix_field(itk, image_type, moving_img, tpo, out_dir: Path, shape, spacing_xy,
                       origin_xy) -> np.ndarray:
    """The total pull field of elastix's transform parameters, computed by transformix."""
    # An ExternalTransform map refers to the initial transform by address: the caller keeps
    # it alive. (itk.transformix_deformation_field would write deformationField.* into the
    # current directory: give transformix the output folder instead.)
    transformix = itk.TransformixFilter[image_type].New(moving_img)
    transformix.SetTransformParameterObject(tpo)
    transformix.SetComputeDeformationField(True)
    transformix.SetOutputDirectory(str(out_dir))
    transformix.SetLogToConsole(False)
    transformix.SetLogToFile(True)
    transformix.SetLogFileName("transformix.log")
    try:
        transformix.UpdateLargestPossibleRegion()
    except RuntimeError as exc:
        raise ElastixError(
            f"transformix could not compute the deformation field: {exc}\n"
            f"--- tail of the transformix log ---\n"
            f"{_log_tail(out_dir / 'transformix.log')}") from exc
    df = transformix.GetOutputDeformationField()
    field, df_spacing, df_origin = _fields.from_itk(df)
    if field.shape[1:] != shape or not np.allclose(df_spacing, spacing_xy) \
            or not np.allclose(df_origin, origin_xy):
        raise ElastixError(f"transformix gave a field on grid {field.shape[1:]}, spacing "
                           f"{df_spacing}, origin {df_origin}; expected {shape}, "
                           f"{spacing_xy}, {origin_xy}")
    return field


def register_pair(fixed, moving, *, params, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0),
                  fixed_channels: Sequence = (), moving_channels: Sequence = (),
                  initial_field: np.ndarray | None = None, fixed_mask: np.ndarray | None = None,
                  moving_mask: np.ndarray | None = None, threads: int | None = None, log_dir=None,
                  initial_mode: str = "external") -> ElastixResult:
    """Register a moving section to a fixed section with elastix.

    Parameters
    ----------
    fixed, moving : ndarray, shape (H, W), or itk.Image
        The sections, on one grid. With an ``itk.Image`` for ``fixed``, its spacing and
        origin are used (and must agree with ``spacing_xy`` / ``origin_xy`` if those are given
        too).
    params
        Elastix parameter maps, as in :func:`parameter_object` (a path, dict, name, object,
        or a list of these for a chain).
    spacing_xy, origin_xy : (float, float)
        The grid, in physical units.
    fixed_channels, moving_channels : sequence of ndarray, shape (H, W)
        Extra similarity channels (e.g. feature maps), added with ``AddFixedImage`` /
        ``AddMovingImage``. Every map must then have one image metric, pyramid pair and
        interpolator per channel (section included), as :func:`refinement_map` writes.
    initial_field : ndarray, shape (2, H, W), optional
        A pull field in physical units to start from (see ``initial_mode``). The maps must
        not carry transform penalties.
    fixed_mask : ndarray of bool, shape (H, W), optional
        Where the similarity is measured (every channel).
    moving_mask : ndarray of bool, shape (H, W), optional
        Where the moving section has content. Beware: elastix then requires the samples of
        the fixed mask to map strictly inside it, and stops with "Too many samples map
        outside moving image buffer" when too few do; a fixed mask alone is more robust.
    threads : int, optional
        ``number_of_threads`` of the elastix filter; default: ITK's default.
    log_dir : str or os.PathLike, optional
        Keep elastix's output folder here (``elastix.log``, ``transformix.log``, the
        transform parameter files, result images, the deformation field); by default a
        temporary folder is used and removed. Nothing is written anywhere else.
    initial_mode : {"external", "resample"}
        How ``initial_field`` is applied. ``"external"`` (default): elastix's
        ``SetExternalInitialTransform`` with an ITK ``DisplacementFieldTransform``.
        ``"resample"``: the moving section, its channels and ``moving_mask`` are resampled
        with the initial field first (linear interpolation; nearest for the mask), elastix
        registers the fixed section to them without an initial transform, and the total
        field is ``fields.compose(found, initial_field)``, which is how elastix combines an
        initial transform (``HowToCombineTransforms "Compose"``). Fixed pixels that the
        initial field sends outside the moving section are left out of the similarity, as
        elastix leaves out samples that map outside. The result has the same form either
        way (total ``field``, ``initial_field``, the maps found), exports to the same
        transformix chain, and differs only by the second interpolation; on 512 x 512
        sections it saves about 0.12 s per call (elastix's cost of an external transform).

    Returns
    -------
    ElastixResult
        With the *total* field (initial field included) on the fixed grid.

    Raises
    ------
    ValueError
        Shapes that disagree, a channel count that the maps do not fit, or transform
        penalties together with ``initial_field``.
    ElastixError
        When elastix fails; the message carries the tail of its log.
    """
    itk = load_itk()
    t0 = time.perf_counter()

    if _is_itk_image(itk, fixed):
        img_spacing = tuple(float(s) for s in fixed.GetSpacing())
        img_origin = tuple(float(o) for o in fixed.GetOrigin())
        for given, found, name in ((spacing_xy, img_spacing, "spacing_xy"),
                                   (origin_xy, img_origin, "origin_xy")):
            default = (1.0, 1.0) if name == "spacing_xy" else (0.0, 0.0)
            if _pair(given, name) != default and not np.allclose(_pair(given, name), found):
                raise ValueError(f"{name}={given!r} disagrees with the fixed itk.Image's "
                                 f"{found}")
        spacing_xy, origin_xy = img_spacing, img_origin
    spacing_xy = _pair(spacing_xy, "spacing_xy")
    origin_xy = _pair(origin_xy, "origin_xy")
    if not all(s > 0 for s in spacing_xy):
        raise ValueError(f"spacing_xy must be positive, got {spacing_xy}")

    if _is_itk_image(itk, moving) and not (
            np.allclose(tuple(moving.GetSpacing()), spacing_xy)
            and np.allclose(tuple(moving.GetOrigin()), origin_xy)):
        raise ValueError(f"the moving itk.Image has spacing {tuple(moving.GetSpacing())} and "
                         f"origin {tuple(moving.GetOrigin())}, but the fixed grid has "
                         f"{spacing_xy} and {origin_xy}; sections must share one grid")
    fixed_arr = _to_array(itk, fixed, "fixed")
    moving_arr = _to_array(itk, moving, "moving")
    shape = fixed_arr.shape
    if moving_arr.shape != shape:
        raise ValueError(f"fixed {shape} and moving {moving_arr.shape} must have the same "
                         f"grid (H, W)")
    fixed_channels = list(fixed_channels)
    moving_channels = list(moving_channels)
    if len(fixed_channels) != len(moving_channels):
        raise ValueError(f"got {len(fixed_channels)} fixed_channels but "
                         f"{len(moving_channels)} moving_channels; they must pair up")
    fixed_extra = [_to_array(itk, c, f"fixed_channels[{i}]") for i, c in enumerate(fixed_channels)]
    moving_extra = [_to_array(itk, c, f"moving_channels[{i}]")
                    for i, c in enumerate(moving_channels)]
    for i, (f, m) in enumerate(zip(fixed_extra, moving_extra)):
        if f.shape != shape or m.shape != shape:
            raise ValueError(f"channel {i + 1}: fixed {f.shape} and moving {m.shape} must have "
                             f"the sections' shape {shape}")
    n_channels = 1 + len(fixed_extra)

    maps = parameter_maps(params)
    _check_channels(maps, n_channels)
    if initial_mode not in ("external", "resample"):
        raise ValueError(f"initial_mode must be 'external' or 'resample', got {initial_mode!r}")
    if initial_field is not None:
        initial_field = _fields.validate_field(initial_field, name="initial_field",
                                               shape_yx=shape).copy()
        _check_no_penalty_with_initial(maps)
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != shape:
                raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
            if not mask.any():
                raise ValueError(f"{name} is empty")

    resample_first = initial_field is not None and initial_mode == "resample"
    moving_reg = moving_arr
    if resample_first:
        from .warp import warp

        stacked, inside = warp(np.stack([moving_arr] + moving_extra).astype(np.float32),
                               initial_field, spacing_xy=spacing_xy, order=1)
        moving_reg, moving_extra = stacked[0], list(stacked[1:])
        if moving_mask is not None:
            moving_mask = warp(np.asarray(moving_mask).astype(np.float32), initial_field,
                               spacing_xy=spacing_xy, order=0)[0] > 0.5
        if not inside.all():
            fixed_mask = inside if fixed_mask is None else (np.asarray(fixed_mask, bool) & inside)
            if not fixed_mask.any():
                raise ValueError("the initial field sends every fixed pixel (of the fixed "
                                 "mask) outside the moving section")

    image_type = itk.Image[itk.F, 2]
    fixed_img = _itk_image(itk, fixed_arr, spacing_xy, origin_xy)
    moving_img = _itk_image(itk, moving_reg, spacing_xy, origin_xy)
    method = itk.ElastixRegistrationMethod[image_type, image_type].New()
    method.SetFixedImage(fixed_img)
    method.SetMovingImage(moving_img)
    keep = [fixed_img, moving_img]
    for f, m in zip(fixed_extra, moving_extra):
        fi = _itk_image(itk, f, spacing_xy, origin_xy)
        mi = _itk_image(itk, m, spacing_xy, origin_xy)
        method.AddFixedImage(fi)
        method.AddMovingImage(mi)
        keep += [fi, mi]
    for mask, add in ((fixed_mask, method.AddFixedMask), (moving_mask, method.AddMovingMask)):
        if mask is not None:
            mask_img = _itk_image(itk, np.asarray(mask).astype(np.uint8), spacing_xy, origin_xy)
            for _ in range(n_channels):
                add(mask_img)
            keep.append(mask_img)
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap(m)
    method.SetParameterObject(po)
    initial_transform = None
    if initial_field is not None and not resample_first:
        initial_transform = _fields.to_itk_transform(initial_field, spacing_xy=spacing_xy,
                                                     origin_xy=origin_xy)
        method.SetExternalInitialTransform(initial_transform)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        method.SetNumberOfThreads(int(threads))

    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hybridreg-elastix-")
        out_dir = Path(tmp.name)
    else:
        out_dir = Path(log_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "elastix.log"
    try:
        method.SetOutputDirectory(str(out_dir))
        method.SetLogFileName("elastix.log")
        method.SetLogToFile(True)
        method.SetLogToConsole(False)
        log.debug("elastix: %d map(s) %s, %d channel(s), grid %s, initial field: %s",
                  len(maps), [m.get("Transform", ["?"])[0] for m in maps], n_channels, shape,
                  initial_field is not None)
        try:
            method.Update()
        except RuntimeError as exc:
            raise ElastixError(
                f"elastix failed ({len(maps)} map(s): "
                f"{[m.get('Transform', ['?'])[0] for m in maps]}): "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}\n"
                f"--- tail of the elastix log ({log_path if tmp is None else 'temporary'}) ---\n"
                f"{_log_tail(log_path)}") from exc
        log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        # (WriteResultImage "false": elastix skips the final resampling; see below)
        wrote_result = (maps[-1].get("WriteResultImage", ["true"])[0].lower() != "false"
                        and not resample_first)
        warped = (np.array(itk.array_from_image(method.GetOutput()), dtype=np.float32)
                  if wrote_result else None)
        tpo = method.GetTransformParameterObject()
        raw_tmaps = [_plain_map(tpo.GetParameterMap(i))
                     for i in range(tpo.GetNumberOfParameterMaps())]
        field = (bspline_map_field(raw_tmaps[0], shape, spacing_xy=spacing_xy,
                                   origin_xy=origin_xy) if len(raw_tmaps) == 1 else None)
        if field is None:
            field = _transformix_field(itk, image_type, moving_img, tpo, out_dir, shape,
                                       spacing_xy, origin_xy)
        has_external = any(m.get("Transform", [""])[0] == "ExternalTransform" for m in raw_tmaps)
        if resample_first:
            # elastix found b on the resampled section: the fixed point p goes to p + b(p)
            # there, which the initial field pulls from p + b(p) + u0(p + b(p)).
            field = _fields.compose(field, initial_field, spacing_xy=spacing_xy)
        elif initial_field is not None and not has_external:
            # Older itk-elastix: the transform parameters hold only the refinement b; elastix
            # applies the initial transform first, so the total map is compose(initial, b).
            log.debug("transform parameters omit the external initial transform: composing")
            field = _fields.compose(initial_field, field, spacing_xy=spacing_xy)
    finally:
        if tmp is not None:
            tmp.cleanup()
    del initial_transform, keep

    tmaps = []
    for m in raw_tmaps:
        m = dict(m)
        m.pop("TransformAddress", None)
        # The links elastix wrote point into its output folder (often removed by now); in a
        # ParameterObject, itk-elastix chains the maps by position anyway.
        for key in ("InitialTransformParameterFileName", "InitialTransformParametersFileName"):
            if key in m:
                m[key] = ["NoInitialTransform"]
        tmaps.append(m)
    field = np.ascontiguousarray(field, dtype=np.float32)
    if warped is None:
        from .warp import warp

        order = int(maps[-1].get("FinalBSplineInterpolationOrder", ["3"])[0])
        warped = warp(moving_arr.astype(np.float32, copy=False), field,
                      spacing_xy=spacing_xy, order=min(order, 3))[0].astype(np.float32)
    result = ElastixResult(
        field=field,
        warped=warped,
        transform=_fields.to_itk_transform(field, spacing_xy=spacing_xy, origin_xy=origin_xy),
        parameter_maps=maps,
        transform_parameter_maps=tmaps,
        final_metric=parse_final_metric(log_text),
        seconds=time.perf_counter() - t0,
        initial_field=initial_field,
        spacing_xy=spacing_xy,
        origin_xy=origin_xy,
        initial_mode="resample" if resample_first else "external",
    )
    log.info("elastix: %d map(s), %d channel(s), %dx%d px, final metric %s, %.2f s",
             len(maps), n_channels, shape[1], shape[0], result.final_metric, result.seconds)
    return result


# --- export ----------------------------------------------------------------------------------

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
    from .io import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(_format_parameter_file(_plain_map(mapping)))
    return path


def _format_parameter_file(m: Mapping[str, Sequence[str]]) -> str:
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


def _grid_entries(shape_yx, spacing_xy, origin_xy) -> dict[str, list[str]]:
    h, w = shape_yx
    return {
        "FixedImageDimension": ["2"],
        "MovingImageDimension": ["2"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Size": [str(int(w)), str(int(h))],
        "Index": ["0", "0"],
        "Spacing": [repr(float(s)) for s in spacing_xy],
        "Origin": [repr(float(o)) for o in origin_xy],
        "Direction": ["1", "0", "0", "1"],
        "UseDirectionCosines": ["true"],
    }


def _write_field_mha(path: Path, u, *, spacing_xy, origin_xy) -> None:
    from .io import write_field

    write_field(path, u, spacing_xy=spacing_xy, origin_xy=origin_xy, overwrite=True)


def _deformation_field_map(grid: Mapping[str, list[str]], field_link: str) -> dict:
    """A transformix map applying a displacement-field file (linear field interpolation)."""
    entry = dict(grid)
    entry.update({
        "Transform": ["DeformationFieldTransform"],
        "DeformationFieldFileName": [field_link],
        # elastix's default order 0 (nearest neighbour) would make the field piecewise constant
        "DeformationFieldInterpolationOrder": ["1"],
        "NumberOfParameters": ["0"],
        "HowToCombineTransforms": ["Compose"],
    })
    return entry


def _linker(directory: Path, absolute_paths: bool):
    base = directory.resolve()

    def link(name: str) -> str:
        return str(base / name) if absolute_paths else name

    return link


def _write_chain(chain, directory: Path, link, *, order: list[str],
                 default_pixel: list[str]) -> Path:
    """Write ``TransformParameters.<i>.txt`` files linked in order; return the last path."""
    paths = []
    for i, m in enumerate(chain):
        m = dict(m)
        m.pop("TransformAddress", None)
        previous = ["NoInitialTransform"] if i == 0 else [link(f"TransformParameters.{i - 1}.txt")]
        # elastix 5.0 reads the plural name, elastix >= 5.1 writes (and reads) the singular.
        m["InitialTransformParametersFileName"] = previous
        m["InitialTransformParameterFileName"] = list(previous)
        m.setdefault("HowToCombineTransforms", ["Compose"])
        m["ResampleInterpolator"] = ["FinalBSplineInterpolator"]
        m["FinalBSplineInterpolationOrder"] = list(order)
        m["Resampler"] = ["DefaultResampler"]
        m["DefaultPixelValue"] = list(default_pixel)
        m["ResultImagePixelType"] = ["float"]
        m["ResultImageFormat"] = ["mha"]
        m["CompressResultImage"] = ["false"]
        m["WriteResultImage"] = ["true"]
        path = directory / f"TransformParameters.{i}.txt"
        path.write_text(f"// hybridreg transformix chain, file {i} of {len(chain)}\n"
                        + _format_parameter_file(m))
        paths.append(path)
    log.info("wrote a transformix chain of %d file(s) to %s", len(paths), directory)
    return paths[-1]


def _check_order(order) -> list[str]:
    if int(order) not in range(6):
        raise ValueError(f"interpolation order must be 0..5, got {order!r}")
    return [str(int(order))]


def export_transformix_chain(result: ElastixResult, directory, *, absolute_paths: bool = True,
                             final_interpolation_order: int | None = None,
                             field_name: str = "initial_field.mha") -> Path:
    """Write ``result``'s transform as a chain of parameter files for ``transformix``.

    Writes ``TransformParameters.0.txt ... TransformParameters.N.txt`` into ``directory``,
    each linked to the previous one by ``InitialTransformParametersFileName`` (the name
    elastix 5.0 reads; the singular ``InitialTransformParameterFileName`` of elastix >= 5.1
    is written too), such that
    ``transformix -in moving.mha -out OUT -tp DIRECTORY/TransformParameters.N.txt``
    reproduces ``result.warped`` (elastix 5.0.1's ``transformix`` and later). With an
    initial field, the chain starts with a ``DeformationFieldTransform`` file pointing at
    the initial field, written as ``field_name`` (a 2-component float32 ``.mha`` in physical
    units, linearly interpolated: ``DeformationFieldInterpolationOrder 1``), followed by the
    maps elastix found; after ``initial_mode="resample"`` the maps elastix found come first
    and the initial field's file last (transformix applies the file a chain starts with
    first to the fixed points, and the initial field acted after those maps).

    The files ask for a ``float`` result image in ``.mha`` format.

    Parameters
    ----------
    result : ElastixResult
    directory : str or os.PathLike
        Created if missing; existing ``TransformParameters.*.txt`` files are overwritten.
    absolute_paths : bool
        Link files by absolute paths (default). transformix 5.0.1 resolves relative paths
        against its *working directory*, not the parameter file's folder: with
        ``absolute_paths=False`` the links are bare file names, and transformix must be run
        from inside ``directory``.
    final_interpolation_order : int, optional
        Override ``FinalBSplineInterpolationOrder`` (0-5) of the chain's resampling; by
        default the order elastix used is kept, so the result matches ``result.warped``.
    field_name : str
        File name of the initial field inside ``directory``.

    Returns
    -------
    Path
        The last file of the chain (the one to give to ``transformix -tp``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    link = _linker(directory, absolute_paths)
    grid = _grid_entries(result.shape_yx, result.spacing_xy, result.origin_xy)
    chain: list[dict[str, list[str]]] = []
    for m in result.transform_parameter_maps:
        kind = m.get("Transform", [""])[0]
        if kind == "ExternalTransform":
            if result.initial_field is None:
                raise ValueError("the result has an ExternalTransform map but no initial_field "
                                 "to export")
            chain.append(_deformation_field_map(grid, link(field_name)))
        elif kind == "File":
            raise ValueError("the result's transform parameters reference an ITK transform "
                             "file (Transform \"File\"); this cannot be exported for "
                             "transformix 5.0")
        else:
            chain.append(dict(m))
    if result.initial_field is not None:
        if result.initial_mode == "resample":
            chain.append(_deformation_field_map(grid, link(field_name)))
        elif not any(m.get("Transform", [""])[0] == "DeformationFieldTransform" for m in chain):
            # itk-elastix that does not report the external transform: put it in front.
            chain.insert(0, _deformation_field_map(grid, link(field_name)))
        _write_field_mha(directory / field_name, result.initial_field,
                         spacing_xy=result.spacing_xy, origin_xy=result.origin_xy)
    if not chain:
        raise ValueError("the result holds no transform parameter maps")

    # Resampling settings of the last map decide the output; copy them to every file.
    last = result.transform_parameter_maps[-1]
    order = last.get("FinalBSplineInterpolationOrder", ["3"])
    if final_interpolation_order is not None:
        order = _check_order(final_interpolation_order)
    return _write_chain(chain, directory, link, order=order,
                        default_pixel=last.get("DefaultPixelValue", ["0"]))


def export_field_chain(u: np.ndarray, directory, *, spacing_xy=(1.0, 1.0),
                       origin_xy=(0.0, 0.0), interpolation_order: int = 1,
                       absolute_paths: bool = True, field_name: str = "field.mha",
                       field_file=None) -> Path:
    """Write any field as a one-file transformix chain (a ``DeformationFieldTransform``).

    ``transformix -in moving.mha -out OUT -tp <returned file>`` then gives
    ``hybridreg.warp.warp(moving, u, order=interpolation_order)``: this is how a section's final
    transform is exported when it is not an elastix transform (a learned field, a
    drift-corrected composition).

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Pull field, physical units (written as ``directory/field_name``).
    directory : str or os.PathLike
    spacing_xy, origin_xy : (float, float)
    interpolation_order : int
        Image interpolation of the resampling (``FinalBSplineInterpolationOrder``, 0-5).
    absolute_paths : bool
        See :func:`export_transformix_chain`.
    field_file : path, optional
        An existing ``.mha`` holding ``u`` (e.g. written by :func:`hybridreg.io.write_field`):
        the chain links to it (by absolute path) instead of writing a copy.

    Returns
    -------
    Path
        ``directory/TransformParameters.0.txt``.
    """
    from .fields import validate_field

    u = validate_field(u)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    link = _linker(directory, absolute_paths)
    sp, org = _pair(spacing_xy, "spacing_xy"), _pair(origin_xy, "origin_xy")
    if field_file is None:
        _write_field_mha(directory / field_name, u, spacing_xy=sp, origin_xy=org)
        target = link(field_name)
    else:
        target = str(Path(field_file).resolve())
    entry = _deformation_field_map(_grid_entries(u.shape[1:], sp, org), target)
    return _write_chain([entry], directory, link, order=_check_order(interpolation_order),
                        default_pixel=["0"])


def write_itk_transform(path, transform) -> Path:
    """Write an ITK transform (e.g. ``ElastixResult.transform``) with ``itk.transformwrite``.

    Parameters
    ----------
    path : str or os.PathLike
        ``.h5`` (HDF5; holds displacement-field transforms) or ``.tfm``/``.txt``.
    transform : itk.Transform

    Returns
    -------
    Path
    """
    itk = load_itk()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    itk.transformwrite([transform], str(path))
    return path
