"""Displacement fields on disk: one ITK vector image per section, ``DIR/section_0000.mha``.

Each file is a compressed 2-component ``.mha`` (u_x, u_y) in physical units, with the fixed
grid's spacing and origin and an identity direction; see :mod:`hybridreg.fields` for the
contract. Written and read through SimpleITK (imported on first use), converted by
:mod:`hybridreg.itkimage`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from ..checks import as_xy
from ..fields import validate_field
from ..itkimage import from_sitk, to_sitk
from .atomic import atomic_output
from .base import StackError

log = logging.getLogger(__name__)

__all__ = ["field_path", "write_field", "read_field", "write_fields", "read_fields"]

FIELD_SUFFIX = ".mha"

_FIELD_RE = re.compile(r"^section_(\d+)\.mha$")


def field_path(directory, k: int) -> Path:
    """Path of section ``k``'s field: ``directory/section_0000.mha`` (more digits past 9999)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"section index must be a non-negative integer, got {k!r}")
    return Path(directory) / f"section_{int(k):04d}{FIELD_SUFFIX}"


def write_field(path, u, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0),
                overwrite: bool = False) -> None:
    """Write one displacement field as a compressed 2-component ``.mha`` vector image.

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.mha`` file (written atomically).
    u : ndarray, shape (2, H, W)
        Pull field in physical units; channel 0 is u_x, channel 1 u_y (see
        :mod:`hybridreg.fields`). Stored as float32: ITK Python reads 2D vector images of
        float only (``itk.imread`` gives ``itk.Image[itk.Vector[itk.F, 2], 2]``); convert to
        float64 for ``DisplacementFieldTransform[itk.D, 2]``, e.g.
        ``u, sp, org = read_field(path); fields.to_itk_transform(u, spacing_xy=sp,
        origin_xy=org)``.
    spacing_xy, origin_xy : (float, float)
        The fixed grid's spacing and origin, as (x, y).
    overwrite : bool
        Replace an existing file.
    """
    path = Path(path)
    if path.suffix.lower() != FIELD_SUFFIX:
        raise StackError(f"'{path}': fields are written as .mha files, got suffix "
                         f"{path.suffix!r}")
    try:
        u = validate_field(u, name=f"field for '{path}'")
        spacing = as_xy(spacing_xy, "spacing_xy", positive=True)
        origin = as_xy(origin_xy, "origin_xy")
    except (TypeError, ValueError) as exc:
        raise StackError(f"writing '{path}': {exc}") from None
    import SimpleITK as sitk

    img = to_sitk(np.moveaxis(u, 0, -1).astype(np.float32, copy=False), spacing=spacing,
                  origin=origin, is_vector=True)
    with atomic_output(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(img, str(tmp), True, 9)  # zlib's best: fields are written once


def read_field(path) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Read one displacement field written by :func:`write_field` (or by transformix).

    Returns
    -------
    u : ndarray, shape (2, H, W), float32
        Physical units; channel 0 is u_x, channel 1 u_y.
    spacing_xy, origin_xy : (float, float)
    """
    path = Path(path)
    if not path.is_file():
        raise StackError(f"'{path}': no such field file")
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise StackError(f"cannot read '{path}': not a readable image (corrupt or "
                         f"truncated?)") from exc
    if img.GetDimension() != 2:
        raise StackError(f"'{path}': is a {img.GetDimension()}D image; a field is 2D")
    n = img.GetNumberOfComponentsPerPixel()
    if n != 2:
        raise StackError(f"'{path}': has {n} components per pixel; a 2D displacement field "
                         f"has 2 (u_x, u_y)")
    if not np.allclose(img.GetDirection(), (1.0, 0.0, 0.0, 1.0)):
        raise StackError(f"'{path}': non-identity direction {img.GetDirection()}; hybridreg "
                         f"supports axis-aligned grids only")
    arr, spacing, origin = from_sitk(img)
    u = np.moveaxis(arr, -1, 0)
    try:
        u = validate_field(u, name=f"field in '{path}'")
    except ValueError as exc:
        raise StackError(str(exc)) from None
    return np.ascontiguousarray(u), spacing, origin


def _numbered_fields(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir():
        m = _FIELD_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda t: (t[0], t[1].name))


def write_fields(directory, fields, *, spacing_xy, origin_xy,
                 overwrite: bool = False) -> None:
    """Write a stack of fields as ``directory/section_0000.mha``, ... (one file per section).

    Each file is written atomically; other files in ``directory`` (e.g. transforms) are left
    alone. With ``overwrite=True``, ``section_*.mha`` files numbered past the new stack are
    removed, so that :func:`read_fields` gives back exactly ``fields``.

    Parameters
    ----------
    directory : str or os.PathLike
        Created if missing.
    fields : ndarray, shape (Z, 2, H, W)
        Physical units, one pull field per section on the common fixed grid.
    spacing_xy, origin_xy : (float, float)
        The fixed grid's spacing and origin, as (x, y).
    overwrite : bool
        Replace existing field files. Without it, a directory that already holds any
        ``section_*.mha`` is refused.
    """
    directory = Path(directory)
    arr = np.asarray(fields)
    if arr.ndim != 4 or arr.shape[1] != 2:
        raise StackError(f"writing '{directory}': fields must have shape (Z, 2, H, W), got "
                         f"{arr.shape}")
    if arr.shape[0] == 0:
        raise StackError(f"writing '{directory}': no fields (Z = 0)")
    for k in range(arr.shape[0]):  # validate all before writing any
        try:
            validate_field(arr[k], name=f"field {k}")
        except ValueError as exc:
            raise StackError(f"writing '{directory}': {exc}") from None
    if os.path.lexists(directory) and not directory.is_dir():
        raise StackError(f"'{directory}' is not a folder; cannot write fields there")
    existing = _numbered_fields(directory) if directory.is_dir() else []
    if existing and not overwrite:
        raise StackError(f"'{existing[0][1]}' already exists ({len(existing)} field files in "
                         f"'{directory}'); pass overwrite=True to replace them")
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(arr.shape[0]):
        write_field(field_path(directory, k), arr[k], spacing_xy=spacing_xy,
                    origin_xy=origin_xy, overwrite=overwrite)
    keep = {field_path(directory, k).name for k in range(arr.shape[0])}
    for _, p in existing:
        if p.name not in keep:
            log.warning("removing stale field %s (past the %d fields just written)", p,
                        arr.shape[0])
            p.unlink()
    log.info("wrote %d fields of %dx%d to %s", arr.shape[0], arr.shape[2], arr.shape[3],
             directory)


def read_fields(directory) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Read ``directory/section_0000.mha``, ... back into a stack of fields.

    Returns
    -------
    fields : ndarray, shape (Z, 2, H, W), float32
        Physical units.
    spacing_xy, origin_xy : (float, float)
        The common grid.

    Raises
    ------
    StackError
        If the folder is missing or holds no fields, the numbering is not contiguous from
        0, or the fields' grids (shape, spacing, origin) differ.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StackError(f"'{directory}': no such folder of fields")
    numbered = _numbered_fields(directory)
    if not numbered:
        raise StackError(f"'{directory}': no field files (section_NNNN.mha)")
    for (k0, p0), (k1, p1) in zip(numbered, numbered[1:]):
        if k0 == k1:
            raise StackError(f"'{directory}': two files for section {k0}: '{p0.name}' and "
                             f"'{p1.name}'")
    for expected, (k, p) in enumerate(numbered):
        if k != expected:
            raise StackError(f"'{directory}': field numbering is not contiguous from 0: "
                             f"section {expected} is missing (next file is '{p.name}')")
    u0, spacing, origin = read_field(numbered[0][1])
    out = np.empty((len(numbered),) + u0.shape, dtype=np.float32)
    out[0] = u0
    for k, p in numbered[1:]:
        u, sp, og = read_field(p)
        if (u.shape != u0.shape or not np.allclose(sp, spacing, rtol=1e-9, atol=0)
                or not np.allclose(og, origin, rtol=1e-9, atol=1e-9)):
            raise StackError(
                f"'{p}': grid (shape {u.shape[1:]}, spacing_xy {sp}, origin_xy {og}) differs "
                f"from that of '{numbered[0][1].name}' (shape {u0.shape[1:]}, spacing_xy "
                f"{spacing}, origin_xy {origin}); all fields of a stack share one grid")
        out[k] = u
    log.info("read %d fields of %dx%d from %s", *out.shape[:1], *out.shape[2:], directory)
    return out, spacing, origin
