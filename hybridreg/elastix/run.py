"""Pair registration with elastix: :func:`register_pair`, its result, its log and its field.

Fields follow the contract of :mod:`hybridreg.fields`: pull fields ``(2, H, W)``, channel 0
= u_x, physical units with ``spacing_xy`` / ``origin_xy``.

Initial fields
    :func:`register_pair` applies ``initial_field`` with ``SetExternalInitialTransform`` (a
    ``DisplacementFieldTransform``). ``SetInitialTransform`` with such a transform is silently
    ignored by itk-elastix, and transform penalties (``TransformBendingEnergyPenalty``) fail
    after an external initial transform: use the ``refine_bspline_*`` maps. Elastix applies
    the initial transform first: the total map is ``p -> q = p + initial(p) -> q + b(q)``,
    i.e. ``fields.compose(initial, b)``. With itk-elastix 0.25 the transform parameter
    object then holds two maps, an ``ExternalTransform`` (which refers to the in-memory
    transform by its address) and the B-spline, and transformix on that object gives the
    *total* field; :func:`register_pair` returns the total field either way. With
    ``initial_mode="resample"`` elastix never sees the initial field: the moving section is
    resampled with it first, elastix finds ``b`` on that, and the total is
    ``fields.compose(b, initial)`` (the B-spline acts first); evaluating an external
    transform is what makes elastix slow with one. A lone B-spline map's field is evaluated
    in numpy (:func:`bspline_map_field`); every other result's field comes from transformix.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import fields as _fields
from ..checks import as_xy
from ..itkimage import from_itk, is_itk_image, to_itk
from .loading import load_itk
from .params import (check_channels, check_no_penalty_with_initial, image_metrics,
                     parameter_maps, parameter_object, plain_map,
                     scale_penalties_to_spacing)

log = logging.getLogger(__name__)


class ElastixError(RuntimeError):
    """elastix or transformix failed; the message carries the tail of elastix's log."""


class ElastixConfigError(ElastixError, ValueError):
    """elastix cannot run the parameter maps at all (a component that does not exist, a
    value it cannot use): the user's to fix, the same for every pair, so never a fallback.
    The message is one line; the log's tail is in ``log_tail`` and logged at DEBUG level
    (``-v -v``)."""

    log_tail = ""


_CONFIG_PATTERNS = (
    (re.compile(r"The following component could not be created: (\S+)"),
     "the component {0!r} does not exist in this elastix (check its spelling, and elastix's "
     "manual for the components of each kind)"),
    (re.compile(r"(\S+)\(index \d+\) - This component is not installed"),
     "the component {0!r} is not installed in this elastix"),
    (re.compile(r'Casting entry number (\d+) for the parameter "(\w+)" failed!\s*'
                r'You tried to cast "([^"]*)"'),
     "the value {2!r} of {1} (entry {0}) is not of the kind elastix expects there"),
)


def config_error_in(log_text: str) -> str | None:
    """The one-line cause when an elastix log shows that the parameter maps themselves cannot
    run (not that a registration went wrong); None otherwise."""
    kind = re.search(r"error occurred while creating (\w+?) ?\d*\.", log_text)
    for pattern, message in _CONFIG_PATTERNS:
        found = pattern.search(log_text)
        if found:
            what = message.format(*found.groups())
            return f"{what}{f' ({kind.group(1)})' if kind else ''}"
    if "One or more components could not be created" in log_text:
        return "one or more components of the parameter map could not be created"
    return None


def _to_array(image, name: str) -> np.ndarray:
    """A 2D section (ndarray or itk.Image) as a contiguous, finite float32 array."""
    if is_itk_image(image):
        arr = from_itk(image, what=name, dimension=2)[0]
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
        ``(WriteResultImage "false")`` elastix skips that resampling and ``warped`` is
        :func:`hybridreg.warp.warp` of the moving section with ``field`` at that order (at
        most 3; spline interpolation, like elastix's).
    transform : itk.DisplacementFieldTransform
        ``fields.to_itk_transform(field)``: reproduces the result in ITK (built when first
        used).
    parameter_maps : list of dict
        The maps that were run, ``{name: [str, ...]}``.
    transform_parameter_maps : list of dict
        Elastix's transform parameter maps, in order. Their file links
        (``InitialTransformParameterFileName``) are reset to ``"NoInitialTransform"``: in an
        ``itk.ParameterObject`` (:func:`~hybridreg.elastix.parameter_object`) itk-elastix
        chains maps by position, and ``itk.transformix_filter`` with all of them reproduces
        ``warped``. After
        an initial field the first is an ``ExternalTransform`` map that stands for the
        initial field (its in-memory ``TransformAddress`` is removed: it would dangle);
        with ``initial_mode="resample"`` the maps are only what elastix found on the
        resampled section, and the initial field acts *after* them (see ``initial_mode``).
        See :func:`~hybridreg.elastix.export_transformix_chain` for files that reproduce the
        result on disk.
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
    log : str
        elastix's log of the run (what itk-elastix prints with ``log_to_console=True``).
    """

    field: np.ndarray
    warped: np.ndarray
    parameter_maps: list
    transform_parameter_maps: list
    final_metric: float | None
    seconds: float
    initial_field: np.ndarray | None = None
    spacing_xy: tuple = (1.0, 1.0)
    origin_xy: tuple = (0.0, 0.0)
    initial_mode: str = "external"
    log: str = dataclasses.field(default="", repr=False)

    @property
    def shape_yx(self) -> tuple[int, int]:
        return tuple(self.field.shape[1:])

    @functools.cached_property
    def transform(self):
        """``fields.to_itk_transform(field)`` (an ``itk.DisplacementFieldTransform``)."""
        return _fields.to_itk_transform(self.field, spacing_xy=self.spacing_xy,
                                        origin_xy=self.origin_xy)


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline kernel."""
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6,
                    np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def bspline_map_field(tmap: Mapping[str, Sequence[str]], shape_yx, *, spacing_xy=(1.0, 1.0),
                      origin_xy=(0.0, 0.0)) -> np.ndarray | None:
    """The pull field of one elastix ``BSplineTransform`` parameter map on a grid, in numpy.

    What transformix computes for a map without initial transform, at a fraction of its cost:
    the cubic B-spline is separable, so each component is ``By @ C @ Bx.T`` with the
    kernel's weights of the pixels against the control points (tested against transformix).
    Returns None for anything else (another transform or spline order, a chained or cyclic
    map, a rotated grid), which the caller leaves to transformix.
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
                  initial_mode: str = "external",
                  moving_resampled: np.ndarray | None = None) -> ElastixResult:
    """Register a moving section to a fixed section with elastix.

    Parameters
    ----------
    fixed, moving : ndarray, shape (H, W), or itk.Image
        The sections, on one grid. With an ``itk.Image`` for ``fixed``, its spacing and
        origin are used (and must agree with ``spacing_xy`` / ``origin_xy`` if those are given
        too).
    params
        Elastix parameter maps, as in :func:`~hybridreg.elastix.parameter_object` (a path,
        dict, name, object, or a list of these for a chain).
    spacing_xy, origin_xy : (float, float)
        The grid, in physical units.
    fixed_channels, moving_channels : sequence of ndarray, shape (H, W)
        Extra similarity channels (e.g. feature maps), added with ``AddFixedImage`` /
        ``AddMovingImage``. Every map must then have one image metric, pyramid pair and
        interpolator per channel (section included), as
        :func:`~hybridreg.elastix.refinement_map` writes.
    initial_field : ndarray, shape (2, H, W), optional
        A pull field in physical units to start from (see ``initial_mode``). With the
        external initial transform the maps must not carry transform penalties; with the
        resample start they may.
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
        transformix chain, and differs only by the second interpolation; it saves
        elastix's cost of an external transform.
    moving_resampled : ndarray, shape (H, W), optional
        With ``initial_mode="resample"``: the moving section already resampled with
        ``initial_field`` (``warp(moving, initial_field, order=1)``, e.g. the learned
        method's own result), so that it is not resampled again. Its channels and mask
        still are.

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

    if is_itk_image(fixed):
        img_spacing = tuple(float(s) for s in fixed.GetSpacing())
        img_origin = tuple(float(o) for o in fixed.GetOrigin())
        for given, found, name in ((spacing_xy, img_spacing, "spacing_xy"),
                                   (origin_xy, img_origin, "origin_xy")):
            default = (1.0, 1.0) if name == "spacing_xy" else (0.0, 0.0)
            if as_xy(given, name) != default and not np.allclose(as_xy(given, name), found):
                raise ValueError(f"{name}={given!r} disagrees with the fixed itk.Image's "
                                 f"{found}")
        spacing_xy, origin_xy = img_spacing, img_origin
    spacing_xy = as_xy(spacing_xy, "spacing_xy", positive=True)
    origin_xy = as_xy(origin_xy, "origin_xy")

    if is_itk_image(moving) and not (
            np.allclose(tuple(moving.GetSpacing()), spacing_xy)
            and np.allclose(tuple(moving.GetOrigin()), origin_xy)):
        raise ValueError(f"the moving itk.Image has spacing {tuple(moving.GetSpacing())} and "
                         f"origin {tuple(moving.GetOrigin())}, but the fixed grid has "
                         f"{spacing_xy} and {origin_xy}; sections must share one grid")
    fixed_arr = _to_array(fixed, "fixed")
    moving_arr = _to_array(moving, "moving")
    shape = fixed_arr.shape
    if moving_arr.shape != shape:
        raise ValueError(f"fixed {shape} and moving {moving_arr.shape} must have the same "
                         f"grid (H, W)")
    fixed_channels = list(fixed_channels)
    moving_channels = list(moving_channels)
    if len(fixed_channels) != len(moving_channels):
        raise ValueError(f"got {len(fixed_channels)} fixed_channels but "
                         f"{len(moving_channels)} moving_channels; they must pair up")
    fixed_extra = [_to_array(c, f"fixed_channels[{i}]") for i, c in enumerate(fixed_channels)]
    moving_extra = [_to_array(c, f"moving_channels[{i}]")
                    for i, c in enumerate(moving_channels)]
    for i, (f, m) in enumerate(zip(fixed_extra, moving_extra)):
        if f.shape != shape or m.shape != shape:
            raise ValueError(f"channel {i + 1}: fixed {f.shape} and moving {m.shape} must have "
                             f"the sections' shape {shape}")
    n_channels = 1 + len(fixed_extra)

    # penalty weights are for pixel units: the result must not depend on the spacing's unit
    maps = scale_penalties_to_spacing(parameter_maps(params), spacing_xy)
    check_channels(maps, n_channels)
    if initial_mode not in ("external", "resample"):
        raise ValueError(f"initial_mode must be 'external' or 'resample', got {initial_mode!r}")
    if initial_field is not None:
        initial_field = _fields.validate_field(initial_field, name="initial_field",
                                               shape_yx=shape).copy()
        if initial_mode == "external":  # elastix sees no initial transform when resampling
            check_no_penalty_with_initial(maps)
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != shape:
                raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
            if not mask.any():
                raise ValueError(f"{name} is empty")

    resample_first = initial_field is not None and initial_mode == "resample"
    if moving_resampled is not None and not resample_first:
        raise ValueError("moving_resampled goes with initial_field and initial_mode='resample'")
    moving_reg = moving_arr
    if resample_first:
        from ..warp import valid_mask, warp

        if moving_resampled is None:
            stacked, inside = warp(np.stack([moving_arr] + moving_extra).astype(np.float32),
                                   initial_field, spacing_xy=spacing_xy, order=1)
            moving_reg, moving_extra = stacked[0], list(stacked[1:])
        else:
            moving_reg = _to_array(moving_resampled, "moving_resampled")
            if moving_reg.shape != shape:
                raise ValueError(f"moving_resampled has shape {moving_reg.shape}, expected "
                                 f"{shape}")
            inside = valid_mask(initial_field, spacing_xy=spacing_xy)
            if moving_extra:
                moving_extra = list(warp(np.stack(moving_extra).astype(np.float32),
                                         initial_field, spacing_xy=spacing_xy, order=1)[0])
        if moving_mask is not None:
            moving_mask = warp(np.asarray(moving_mask).astype(np.float32), initial_field,
                               spacing_xy=spacing_xy, order=0)[0] > 0.5
        if not inside.all():
            fixed_mask = inside if fixed_mask is None else (np.asarray(fixed_mask, bool) & inside)
            if not fixed_mask.any():
                raise ValueError("the initial field sends every fixed pixel (of the fixed "
                                 "mask) outside the moving section")

    # a transform penalty in a multi-image registration needs an image pair of its own
    # (elastix: one pyramid per metric); it does not look at it: the section again
    n_penalties = max(len(m.get("Metric", [])) - len(image_metrics(m)) for m in maps)
    if fixed_extra and n_penalties > 0:
        fixed_extra = fixed_extra + [fixed_arr] * n_penalties
        moving_extra = moving_extra + [moving_reg] * n_penalties
    image_type = itk.Image[itk.F, 2]
    fixed_img = to_itk(fixed_arr, spacing=spacing_xy, origin=origin_xy)
    moving_img = to_itk(moving_reg, spacing=spacing_xy, origin=origin_xy)
    method = itk.ElastixRegistrationMethod[image_type, image_type].New()
    method.SetFixedImage(fixed_img)
    method.SetMovingImage(moving_img)
    keep = [fixed_img, moving_img]
    for f, m in zip(fixed_extra, moving_extra):
        fi = to_itk(f, spacing=spacing_xy, origin=origin_xy)
        mi = to_itk(m, spacing=spacing_xy, origin=origin_xy)
        method.AddFixedImage(fi)
        method.AddMovingImage(mi)
        keep += [fi, mi]
    for mask, add in ((fixed_mask, method.AddFixedMask), (moving_mask, method.AddMovingMask)):
        if mask is not None:
            mask_img = to_itk(np.asarray(mask).astype(np.uint8), spacing=spacing_xy,
                              origin=origin_xy)
            for _ in range(1 + len(fixed_extra)):  # one per image pair
                add(mask_img)
            keep.append(mask_img)
    method.SetParameterObject(parameter_object(maps))
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
            text = log_path.read_text(errors="replace") if log_path.is_file() else ""
            cause = config_error_in(text)
            if cause is not None:
                tail = _log_tail(log_path)
                log.debug("elastix log:\n%s", tail)
                err = ElastixConfigError(f"elastix cannot run the parameter map(s) "
                                         f"{[m.get('Transform', ['?'])[0] for m in maps]}: "
                                         f"{cause}")
                err.log_tail = tail
                raise err from None
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
        warped = (np.asarray(from_itk(method.GetOutput(), what="elastix's result image",
                                      dimension=2)[0], dtype=np.float32)
                  if wrote_result else None)
        tpo = method.GetTransformParameterObject()
        raw_tmaps = [plain_map(tpo.GetParameterMap(i))
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
        from ..warp import warp

        order = int(maps[-1].get("FinalBSplineInterpolationOrder", ["3"])[0])
        warped = warp(moving_arr.astype(np.float32, copy=False), field,
                      spacing_xy=spacing_xy, order=min(order, 3))[0].astype(np.float32)
    result = ElastixResult(
        field=field,
        warped=warped,
        parameter_maps=maps,
        transform_parameter_maps=tmaps,
        final_metric=parse_final_metric(log_text),
        seconds=time.perf_counter() - t0,
        initial_field=initial_field,
        spacing_xy=spacing_xy,
        origin_xy=origin_xy,
        initial_mode="resample" if resample_first else "external",
        log=log_text,
    )
    log.info("elastix: %d map(s), %d channel(s), %dx%d px, final metric %s, %.2f s",
             len(maps), n_channels, shape[1], shape[0], result.final_metric, result.seconds)
    return result
