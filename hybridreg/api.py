"""The ITK-style Python API: ``hybridreg.register`` and ``hybridreg.align_stack``.

In the manner of ``itk.elastix_registration_method``: images in (``itk.Image`` or numpy
arrays), images and transforms out, spacing and origin kept::

    import itk, hybridreg
    fixed = itk.imread("s001.tif", itk.F)
    moving = itk.imread("s002.tif", itk.F)
    result_image, transform = hybridreg.register(fixed, moving, method="hybrid")
    itk.imwrite(result_image, "s002_aligned.mha")

    out = hybridreg.align_stack(itk.imread("stack.tif", itk.F), method="hybrid")
    itk.imwrite(out.image, "aligned.mha")      # spacing and origin of the input stack

``register`` returns a :class:`Registration`, ``align_stack`` a :class:`StackRegistration`;
both unpack like elastix's ``(image, transform)`` pair and also carry the contract field
(:mod:`hybridreg.fields`: pull direction, physical units) and the method's full result.
Only axis-aligned grids are supported (identity direction); anything else is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any, Sequence

import numpy as np

__all__ = ["register", "align_stack", "Registration", "StackRegistration"]


def _section(obj, name: str, spacing_xy, origin_xy):
    """``(array, spacing_xy, origin_xy, from_itk)`` of a 2D itk.Image or array."""
    from .itkimage import is_itk_image, section_from_itk

    if is_itk_image(obj):
        try:
            arr, sp, org = section_from_itk(obj)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        for given, found, what in ((spacing_xy, sp, "spacing_xy"), (origin_xy, org, "origin_xy")):
            if given is not None and not np.allclose(given, found):
                raise ValueError(f"{what}={tuple(given)} disagrees with the {name} "
                                 f"itk.Image's {found}")
        return arr, sp, org, True
    arr = np.asarray(obj)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D itk.Image or an array (H, W), got shape "
                         f"{arr.shape}")
    sp = (1.0, 1.0) if spacing_xy is None else tuple(float(s) for s in spacing_xy)
    org = (0.0, 0.0) if origin_xy is None else tuple(float(o) for o in origin_xy)
    return arr, sp, org, False


@dataclass(frozen=True)
class Registration:
    """What :func:`register` returns; unpacks as ``image, transform``.

    Attributes
    ----------
    image : itk.Image
        The moving section resampled onto the fixed grid (float32), with the fixed
        section's spacing and origin.
    transform : itk.DisplacementFieldTransform
        Maps fixed points to moving points (ITK's convention; reproduces ``image`` with
        ``itk.resample_image_filter``).
    field : ndarray, shape (2, H, W), float32
        The same transform as a pull field in physical units (:mod:`hybridreg.fields`).
    spacing_xy, origin_xy : (float, float)
    result : RegistrationResult
        The method's full result (warnings, timings, ``info``: for ``hybrid`` the elastix
        result and the parameter maps it ran).
    result_transform_parameters : itk.ParameterObject or None
        What ``itk.elastix_registration_method`` returns next to the image: the transform
        parameter maps elastix found (elastix and hybrid; for hybrid the refinement, which
        acts after the learned start: ``field`` and ``transform`` hold the whole), None for
        the other methods. Built when first read (imports itk).
    """

    image: Any
    transform: Any
    field: np.ndarray
    spacing_xy: tuple
    origin_xy: tuple
    result: Any

    def __iter__(self):
        return iter((self.image, self.transform))

    @property
    def result_transform_parameters(self):
        er = self.result.info.get("elastix") if isinstance(self.result.info, dict) else None
        if er is None:
            return None
        from .elastix import parameter_object

        return parameter_object(er.transform_parameter_maps)


#: itk-elastix's keyword names, and hybridreg's where they mean the same.
ITK_ELASTIX_NAMES = {"parameter_object": "params", "number_of_threads": "threads"}


def _itk_elastix_names(options: dict) -> dict:
    """``options`` with itk-elastix's names (``parameter_object``, ``number_of_threads``)
    renamed to hybridreg's; both names at once is an error."""
    out = dict(options)
    for theirs, ours in ITK_ELASTIX_NAMES.items():
        if theirs in out:
            if ours in out:
                raise TypeError(f"give {theirs}= (itk-elastix's name) or {ours}=, not both")
            out[ours] = out.pop(theirs)
    return out


@dataclass(frozen=True)
class StackRegistration:
    """What :func:`align_stack` returns; unpacks as ``image, transforms``.

    Attributes
    ----------
    image : itk.Image
        The aligned stack, 3D (x, y, z), float32, with the input's spacing and origin.
    transforms : list of itk.DisplacementFieldTransform
        One per section (section 0's is the identity unless the joint solve moved it).
    fields : ndarray, shape (Z, 2, H, W), float32
        Pull fields, physical units.
    table : list of dict
        One row per section (flags, warnings, timings; see :func:`hybridreg.stack.align_stack`).
    alignment : StackAlignment
        The full result of :func:`hybridreg.stack.align_stack`.
    """

    image: Any
    transforms: list
    fields: np.ndarray
    table: list
    alignment: Any = dc_field(repr=False)

    def __iter__(self):
        return iter((self.image, self.transforms))


def register(fixed, moving, *, method="hybrid", references: Sequence = (),
             spacing_xy=None, origin_xy=None, intensity="auto", fixed_mask=None,
             moving_mask=None, log_to_console: bool = False, **options) -> Registration:
    """Register ``moving`` onto ``fixed``, ITK style.

    Parameters
    ----------
    fixed, moving : itk.Image (2D, scalar) or ndarray (H, W)
        On one grid. With ``itk.Image`` inputs their spacing and origin are used.
    method : str or method object
        ``"hybrid"`` (default), ``"learned"``, ``"ssemnet"``, ``"elastix"``, or an object
        from :func:`hybridreg.methods.get_method`.
    references : sequence of itk.Image or ndarray
        Older aligned sections (oldest first) for the methods that use a window.
    spacing_xy, origin_xy : (float, float), optional
        The grid of array inputs (default spacing 1, origin 0).
    intensity : str or (float, float)
        How the two sections are put on the networks' 0-255 scale (learned, ssemnet,
        hybrid by name, unless ``intensity_scale`` is given): ``"auto"`` (default: ``uint8``
        and floats in [0, 255] as they are, floats in [0, 1] times 255, anything else by its
        0.1 and 99.9 percentiles), ``"percentiles"``, ``"none"`` or ``(lo, hi)``; see
        :func:`hybridreg.methods.intensity_map`.
    fixed_mask, moving_mask : itk.Image or ndarray (H, W), optional
        elastix's masks (nonzero = use, zero = excluded), for ``elastix`` and ``hybrid``
        (its refinement); the learned methods do not take masks yet (an error).
    log_to_console : bool
        Print elastix's log (elastix and hybrid), as itk-elastix does.
    **options
        Options of the method (e.g. ``model=``, ``features=``, ``params=``, ``threads=``);
        itk-elastix's names ``parameter_object=`` and ``number_of_threads=`` are taken for
        ``params=`` and ``threads=``.

    Returns
    -------
    Registration
        ``image, transform = hybridreg.register(...)`` works as with
        ``itk.elastix_registration_method``; ``result_transform_parameters`` is the
        ``itk.ParameterObject`` it returns next to the image.
    """
    from .fields import to_itk_transform
    from .itkimage import section_to_itk
    from .methods.registry import build_method, with_intensity

    f, sp, org, _ = _section(fixed, "fixed", spacing_xy, origin_xy)
    m, msp, morg, _ = _section(moving, "moving", spacing_xy, origin_xy)
    if not (np.allclose(sp, msp) and np.allclose(org, morg)):
        raise ValueError(f"fixed (spacing {sp}, origin {org}) and moving (spacing {msp}, "
                         f"origin {morg}) must share one grid")
    refs = [_section(r, f"references[{i}]", sp, org)[0] for i, r in enumerate(references)]
    options, _ = with_intensity(method, _itk_elastix_names(options), np.stack([f, m]),
                                intensity)
    impl = build_method(method, options)
    masks = {k: v for k, v in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask))
             if v is not None}
    if masks:
        from .methods.base import checked_mask, takes_masks

        if not takes_masks(impl):
            raise ValueError(f"the {impl.name} method does not take masks (every built-in "
                             f"method does)")
        masks = {k: checked_mask(v, f.shape, k) for k, v in masks.items()}
    res = impl.register(f, m, references=refs, spacing_xy=sp, origin_xy=org, **masks)
    if log_to_console and isinstance(res.info, dict) and res.info.get("elastix") is not None:
        print(res.info["elastix"].log)
    image = section_to_itk(res.warped, spacing_xy=sp, origin_xy=org)
    transform = to_itk_transform(res.field, spacing_xy=sp, origin_xy=org)
    return Registration(image=image, transform=transform, field=res.field, spacing_xy=sp,
                        origin_xy=org, result=res)


def _stack(stack, spacing_xyz, origin_xyz):
    from .itkimage import from_itk, is_itk_image

    if is_itk_image(stack):
        if stack.GetImageDimension() != 3:
            raise ValueError(f"stack: expected a 3D itk.Image (x, y, z), got dimension "
                             f"{stack.GetImageDimension()}")
        return from_itk(stack, what="stack", dimension=3)
    if isinstance(stack, (list, tuple)) and stack and is_itk_image(stack[0]):
        secs = [_section(s, f"stack[{i}]", None, None) for i, s in enumerate(stack)]
        sp2, org2 = secs[0][1], secs[0][2]
        for i, s in enumerate(secs):
            if not (np.allclose(s[1], sp2) and np.allclose(s[2], org2)):
                raise ValueError(f"stack[{i}] has spacing {s[1]} and origin {s[2]}, section 0 "
                                 f"has {sp2} and {org2}: sections must share one grid")
        arr = np.stack([s[0] for s in secs])
        sz = 1.0 if spacing_xyz is None else float(spacing_xyz[2])
        return arr, (*sp2, sz), (*org2, 0.0)
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"stack must be a 3D itk.Image, a list of 2D itk.Images or an array "
                         f"(Z, H, W), got shape {arr.shape}")
    sp = (1.0, 1.0, 1.0) if spacing_xyz is None else tuple(float(s) for s in spacing_xyz)
    org = (0.0, 0.0, 0.0) if origin_xyz is None else tuple(float(o) for o in origin_xyz)
    return arr, sp, org


def align_stack(stack, *, method="hybrid", spacing_xyz=None, origin_xyz=None,
                progress: bool = False, intensity="auto", **options) -> StackRegistration:
    """Align a stack, ITK style.

    Parameters
    ----------
    stack : itk.Image (3D), list of 2D itk.Image, or ndarray (Z, H, W)
    method : str or method object
        As in :func:`register`.
    spacing_xyz, origin_xyz : (float, float, float), optional
        The grid of an array input (default spacing 1, origin 0).
    progress : bool
        A progress bar on stderr.
    intensity : str or (float, float)
        How the stack is put on the networks' 0-255 scale, one map for the whole stack: as
        in :func:`register`.
    **options
        Options of :func:`hybridreg.stack.align_stack` (``mode``, ``neighbours``,
        ``prior``, ``anchor``, ``window``, ``drift_window``, ``work_dir``, ``order``,
        ``client``, ``stride``, ``masks``: defect masks as a 3D itk.Image, a list of 2D
        ones or an array (elastix's convention), or ``"auto"``, ``max_skip``,
        ``node_weights``); the
        others go to the method (itk-elastix's
        ``parameter_object=`` and ``number_of_threads=`` as in :func:`register`).

    Returns
    -------
    StackRegistration
        ``image, transforms = hybridreg.align_stack(...)``.
    """
    from .fields import to_itk_transform
    from .itkimage import to_itk
    from .methods.registry import build_method, with_intensity
    from .stack import align_stack as _align

    arr, sp, org = _stack(stack, spacing_xyz, origin_xyz)
    stack_opts = {k: options.pop(k) for k in ("mode", "neighbours", "prior", "anchor",
                                              "window", "drift_window", "work_dir", "order",
                                              "client", "stride", "masks", "max_skip",
                                              "node_weights")
                  if k in options}
    masks = stack_opts.get("masks")
    if isinstance(masks, str):
        from .defects import stack_masks

        stack_opts["masks"] = stack_masks(masks, arr)
    elif masks is not None:
        stack_opts["masks"] = _stack(masks, spacing_xyz, origin_xyz)[0]
    options, _ = with_intensity(method, _itk_elastix_names(options), arr, intensity)
    impl = build_method(method, options)
    res = _align(arr, impl, spacing_xy=sp[:2], origin_xy=org[:2], progress=progress,
                 **stack_opts)
    aligned = np.ascontiguousarray(np.asarray(res.aligned), dtype=np.float32)
    image = to_itk(aligned, spacing=sp, origin=org)
    # each a displacement-field transform of the section's coarse map (nodes, their spacing
    # and origin): ITK interpolates it as hybridreg does
    transforms = [to_itk_transform(m, spacing_xy=res.grid.node_spacing_xy,
                                   origin_xy=res.grid.origin_xy) for m in res.maps]
    return StackRegistration(image=image, transforms=transforms,
                             fields=np.asarray(res.fields),
                             table=res.table, alignment=res)
