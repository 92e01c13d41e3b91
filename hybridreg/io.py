"""Stacks and displacement fields in and out of files.

Every layout transpose between files, ITK and numpy happens here and nowhere else.

Stacks
    A stack is a numpy array ``(Z, H, W)`` (sections, rows, columns) of ``uint8``,
    ``uint16`` or ``float32`` with a physical spacing ``spacing_xyz = (x, y, z)``
    (``(1.0, 1.0, 1.0)`` when the file carries none). :func:`read_stack` and
    :func:`write_stack` handle, decided by the path:

    ``stack.tif`` / ``stack.tiff``
        Multi-page TIFF, one page per section. Written as an ImageJ hyperstack: the x/y
        spacing is stored as ``1 / XResolution`` and ``1 / YResolution``, the z spacing as
        the ImageJ ``spacing`` entry, which is how Fiji reads them. On reading, resolution
        tags are trusted in ImageJ files and in files whose ``ResolutionUnit`` is NONE; the
        dots-per-inch defaults that other software writes are ignored.
    a folder
        2D images (``*.tif``, ``*.tiff``, ``*.png``), one per section, in natural order
        (``section_2`` before ``section_10``). Written as ``section_0000.tif``, ... (more
        digits beyond 10000 sections). A folder to write is an existing folder or a path
        ending in ``/``.
    ``file.h5:/path/in/file`` (also ``.hdf5``, ``.hdf``)
        An HDF5 dataset; a bare ``file.h5`` is fine when the file holds exactly one
        dataset (and is written as dataset ``/data``). Spacing is read from a
        ``spacing_xyz`` attribute (x, y, z) or ilastik's ``element_size_um`` (z, y, x), and
        written as ``spacing_xyz``.
    ``store.zarr`` or ``store.zarr:/group/array``
        Zarr. An OME-Zarr image (NGFF v0.4, or v0.5 where the metadata sit under ``ome``)
        is read from its level-0 array (the first of ``multiscales[0].datasets``), with the
        spacing from that level's ``scale`` (times any ``coordinateTransformations`` of the
        multiscale) and the unit of its x axis; axes must end in ``y, x`` with ``z`` before
        them, and ``t``/``c`` axes of length 1 are dropped. A plain zarr array carries its
        spacing in a ``spacing_xyz`` attribute. A bare ``store.zarr`` is *written* as an
        OME-Zarr image (NGFF v0.4: zarr format 2, level-0 array ``0``, chunks of one section
        along z and at most 1024 x 1024 in y, x, ``/`` chunk keys, ``multiscales`` with axes
        ``z, y, x`` of type ``space``, their ``unit`` where known, and a ``scale`` of
        ``(z, y, x)`` spacing); ``store.zarr:/group/array`` is written as a plain array.
        :class:`SectionWriter` writes such a store one section at a time, resumably.

    ``read_stack(path, lazy=True)`` reads nothing but the metadata: its ``data`` is a
    :class:`LazySections` that reads (and checks) one section when it is indexed, so a volume
    larger than memory can be aligned section by section. Lazy zarr, HDF5, TIFF and folder
    stacks are all read this way; a Dask worker given a :class:`LazySections` reads its own
    sections from the path.

    Anything else (colour images, 4D data, other dtypes, empty stacks, NaN or infinite
    values, sections of different shapes) raises :class:`StackError` with a message that
    names the file and the problem. ``float64`` data is converted to ``float32``.

Fields
    One ITK vector image per section, ``DIR/section_0000.mha``, in physical units with the
    fixed grid's spacing and origin; see :mod:`hybridreg.fields` for the contract.

Writing
    Nothing is overwritten unless ``overwrite=True``, and paths given as ``inputs`` are never
    overwritten at all. Every write goes to a temporary name next to the target and is moved
    into place only when it has succeeded (:func:`atomic_output`), so an interrupted or
    failing write never leaves a half-written file under the final name. The one exception
    is :class:`SectionWriter` (a volume too large to write at once): it writes in place, one
    section at a time, and marks the store incomplete (a ``.NAME.progress`` folder next to
    it, listing the sections done) until every section is written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .fields import validate_field

log = logging.getLogger(__name__)

__all__ = [
    "Stack",
    "StackError",
    "LazySections",
    "SectionWriter",
    "read_stack",
    "write_stack",
    "open_section_writer",
    "is_ome_zarr_target",
    "atomic_output",
    "section_to_itk",
    "section_from_itk",
    "field_path",
    "write_field",
    "read_field",
    "write_fields",
    "read_fields",
]

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIXES = (".zarr",)
SECTION_SUFFIXES = (".tif", ".tiff", ".png")
FIELD_SUFFIX = ".mha"

_CONTAINER_RE = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|zarr))(?::(?P<inner>.*))?$",
                           re.IGNORECASE)
_FIELD_RE = re.compile(r"^section_(\d+)\.mha$")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_COLOUR_PHOTOMETRIC = ("RGB", "PALETTE", "YCBCR", "SEPARATED", "CIELAB", "ICCLAB", "ITULAB")
_FORMATS = ("'.tif'/'.tiff' (multi-page TIFF), '.h5'/'.hdf5'/'.hdf'[:/dataset], "
            "'.zarr'[:/array], or a folder (an existing folder or a path ending in '/')")


class StackError(ValueError):
    """A stack or field file that cannot be read or written; the message names the file."""


@dataclass(frozen=True, eq=False)
class Stack:
    """A stack of sections with its physical spacing.

    Attributes
    ----------
    data : ndarray, shape (Z, H, W)
        ``uint8``, ``uint16`` or ``float32``; axis 0 is the section, then rows (y) and
        columns (x).
    spacing_xyz : (float, float, float)
        Physical spacing along x (columns), y (rows) and z (sections); ``(1.0, 1.0, 1.0)``
        when the file carries none.
    path : str or None
        Where the stack was read from, as given (including any ``:/dataset`` part).
    unit : str or None
        Unit of the spacing where the file names one (OME-Zarr axes), e.g. ``"nanometer"``.

    Notes
    -----
    ``read_stack(path, lazy=True)`` gives a ``data`` that is a :class:`LazySections` (array-
    like, read one section at a time) instead of an ndarray.
    """

    data: np.ndarray = field(repr=False)
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    path: str | None = None
    unit: str | None = None

    def __post_init__(self):
        if np.ndim(self.data) != 3:
            raise ValueError(f"Stack.data must have shape (Z, H, W), got shape "
                             f"{np.shape(self.data)}")
        object.__setattr__(self, "spacing_xyz", _spacing_xyz(self.spacing_xyz, "Stack"))

    def __repr__(self) -> str:
        lazy = ", lazy" if isinstance(self.data, LazySections) else ""
        return (f"Stack(shape_zyx={tuple(self.data.shape)}, dtype={self.data.dtype}, "
                f"spacing_xyz={self.spacing_xyz}, path={self.path!r}{lazy})")


# --- small helpers ----------------------------------------------------------------------------

def _natural_key(name: str):
    """Sort key that orders embedded numbers by value: ``s2 < s10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _spacing_xyz(value, where: str) -> tuple[float, float, float]:
    try:
        sp = tuple(float(v) for v in np.asarray(value, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        raise StackError(f"{where}: spacing_xyz must be three numbers (x, y, z), got "
                         f"{value!r}") from None
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise StackError(f"{where}: spacing_xyz must be three positive finite numbers "
                         f"(x, y, z), got {value!r}")
    return sp


def _pair(value, name: str, *, positive: bool) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (x, y) of numbers, got {value!r}") from None
    if len(pair) != 2 or not all(np.isfinite(pair)):
        raise ValueError(f"{name} must be a pair (x, y) of finite numbers, got {value!r}")
    if positive and not all(p > 0 for p in pair):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def _canonical_dtype(dtype, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind == "u" and dt.itemsize in (1, 2):
        return np.dtype(np.uint8 if dt.itemsize == 1 else np.uint16)
    if dt.kind == "f" and dt.itemsize in (4, 8):
        return np.dtype(np.float32)
    raise StackError(f"{where}: unsupported dtype {dt.name}; expected uint8, uint16 or "
                     f"float32 (float64 is converted to float32)")


def _check_shape(shape, where: str) -> tuple[int, int, int]:
    """The ``(Z, H, W)`` of data of ``shape`` (2D: Z = 1), or a StackError saying why not."""
    shape = tuple(int(n) for n in shape)
    if len(shape) in (3, 4) and shape[-1] in (3, 4) and shape[-2] > 4:
        raise StackError(f"{where}: looks like a colour (RGB/RGBA) image, shape {shape} with "
                         f"a trailing axis of {shape[-1]}; hybridreg needs grayscale "
                         f"sections: convert it to grayscale first")
    if len(shape) not in (2, 3):
        raise StackError(f"{where}: not a 2D section or 3D grayscale stack (Z, H, W): got "
                         f"{len(shape)}D data of shape {shape}")
    zyx = shape if len(shape) == 3 else (1,) + shape
    if zyx[0] == 0:
        raise StackError(f"{where}: empty stack (0 sections), shape {shape}")
    if zyx[1] == 0 or zyx[2] == 0:
        raise StackError(f"{where}: empty stack: zero-size sections, shape {shape}")
    return zyx


def _validate_stack(data, where: str, names: list[str] | None = None) -> np.ndarray:
    """Check a stack and return it as a contiguous ``(Z, H, W)`` array of a supported dtype.

    ``names`` (one per section) are added to messages about single sections.
    """
    arr = np.asarray(data)
    _check_shape(arr.shape, where)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    dt = _canonical_dtype(arr.dtype, where)
    if arr.dtype != dt:
        arr = arr.astype(dt)
    if dt.kind == "f":
        for k in range(arr.shape[0]):
            if not np.isfinite(arr[k]).all():
                what = f" ('{names[k]}')" if names else ""
                raise StackError(f"{where}: contains NaN or infinite values, first in section "
                                 f"{k}{what}")
    return np.ascontiguousarray(arr)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as exc:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary output %s: %s", path, exc)


def _temp_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in (".gz", ".bz2", ".xz"):
        return "".join(suffixes[-2:])
    return path.suffix


def _existing(path: Path) -> str | None:
    """``None`` (absent), ``'empty-dir'``, ``'dir'`` or ``'file'``."""
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return "dir" if any(path.iterdir()) else "empty-dir"
    return "file"


def _split_spec(spec) -> tuple[Path, str | None]:
    """``'file.h5:/a/b'`` -> ``(Path('file.h5'), 'a/b')``; plain paths give ``(path, None)``."""
    if isinstance(spec, Stack):
        if spec.path is None:
            raise StackError("an input Stack has no path; pass its file path instead")
        spec = spec.path
    text = os.fspath(spec)
    m = _CONTAINER_RE.match(text)
    if m:
        inner = (m.group("inner") or "").strip("/")
        return Path(m.group("file")), inner or None
    return Path(text), None


def _paths_overlap(a: Path, b: Path) -> bool:
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def _inner_overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    pa, pb = a.split("/"), b.split("/")
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


def _refuse_inputs(target: Path, inner: str | None, inputs, shown: str) -> None:
    for spec in inputs:
        ifile, iinner = _split_spec(spec)
        if not _paths_overlap(target, ifile):
            continue
        same_file = os.path.realpath(target) == os.path.realpath(ifile)
        if same_file and not _inner_overlap(inner, iinner):
            continue
        name = spec.path if isinstance(spec, Stack) else os.fspath(spec)
        raise StackError(f"refusing to write '{shown}': it would overwrite the input "
                         f"'{name}' (inputs are never overwritten, even with overwrite=True)")


# --- atomic output ----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path, *, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Write to a temporary path next to ``path`` and move it into place on success.

    Yields a path that does not exist yet, in the same folder as ``path`` and with the same
    suffix (so that writers that choose the format by suffix work). The block creates a file
    or a folder there. When the block succeeds, the result is moved onto ``path`` with
    ``os.replace`` (a folder replaces an existing folder via a rename to a backup name); when
    it raises, the temporary output is deleted and nothing under ``path`` changes.

    Parameters
    ----------
    path : str or os.PathLike
        Final file or folder. Missing parent folders are created.
    overwrite : bool
        Replace an existing ``path``. An existing empty folder is replaced without it.
    inputs : iterable of str, os.PathLike or Stack
        Paths that must never be overwritten, even with ``overwrite=True``: ``path`` may not
        be, contain or lie inside any of them. ``file.h5:/dataset`` forms are accepted.

    Raises
    ------
    StackError
        If ``path`` exists and ``overwrite`` is false, if ``path`` would overwrite an input,
        or if the block wrote nothing.

    Examples
    --------
    >>> with atomic_output("out/result.tif") as tmp:   # doctest: +SKIP
    ...     tifffile.imwrite(tmp, data)
    """
    final = Path(os.fspath(path))
    if final.name in ("", ".", ".."):
        raise StackError(f"'{path}': not a valid output path")
    _refuse_inputs(final, None, inputs, str(final))
    if _existing(final) in ("file", "dir") and not overwrite:
        raise StackError(f"'{final}' already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = final.with_name(f".{final.name}.{token}.tmp{_temp_suffix(final)}")
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise StackError(f"'{final}': nothing was written to the temporary output {tmp}")
        _move_into_place(tmp, final, overwrite=overwrite, token=token)
    except BaseException:
        _remove(tmp)
        raise
    log.debug("wrote %s", final)


def _move_into_place(tmp: Path, final: Path, *, overwrite: bool, token: str) -> None:
    state = _existing(final)
    if state in ("file", "dir") and not overwrite:
        raise StackError(f"'{final}' appeared while it was being written; pass overwrite=True "
                         f"to replace it")
    tmp_is_dir = tmp.is_dir()
    if state is not None and (state != "file") != tmp_is_dir:
        have = "a file" if state == "file" else "a folder"
        new = "a folder" if tmp_is_dir else "a file"
        raise StackError(f"'{final}' is {have}; refusing to replace it with {new}")
    if not tmp_is_dir:
        os.replace(tmp, final)
        return
    if state == "empty-dir":
        os.rmdir(final)
        state = None
    if state is None:
        os.replace(tmp, final)
        return
    backup = final.with_name(f".{final.name}.{token}.old")
    os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(backup, final)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# --- reading stacks ---------------------------------------------------------------------------

def cast_to_dtype(data: np.ndarray, dtype) -> np.ndarray:
    """Image values to ``dtype``: rounded and clipped to its range for integers, a plain cast
    for floats, ``>= 0.5`` for bool (e.g. a float result back to the input stack's uint8)."""
    dtype = np.dtype(dtype)
    data = np.asarray(data)
    if dtype == bool:
        return data >= 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    return data.astype(dtype)


def read_stack(path, *, lazy: bool = False) -> Stack:
    """Read a stack of sections from a TIFF, an image folder, HDF5 or zarr (OME-Zarr).

    Parameters
    ----------
    path : str or os.PathLike
        ``stack.tif``, a folder of 2D images, ``file.h5[:/dataset]`` or
        ``store.zarr[:/group/array]`` (see the module docstring).
    lazy : bool
        Read only the metadata now: ``data`` is a :class:`LazySections` that reads one
        section when it is indexed (``data[k]``), checking its values then (NaN raises
        :class:`StackError` naming the section). For volumes larger than memory.

    Returns
    -------
    Stack
        ``data`` of shape (Z, H, W), uint8, uint16 or float32 (a single 2D image gives
        Z = 1; float64 is converted to float32), with ``spacing_xyz`` from the file or
        ``(1.0, 1.0, 1.0)``.

    Raises
    ------
    StackError
        Missing or unreadable files, missing datasets, colour images, data that is not 2D
        or 3D, empty stacks, unsupported dtypes, sections of different shapes, NaN or
        infinite values, a zarr store left incomplete by an interrupted write. The message
        names the file and the problem.
    """
    text = os.fspath(path)
    file, inner = _split_spec(text)
    if not os.path.exists(file):
        raise StackError(f"'{file}': no such file or folder")
    suffix = file.suffix.lower()
    names = None
    unit = None
    is_zarr = suffix in ZARR_SUFFIXES or (file.is_dir() and _is_zarr(file))
    if lazy:
        if suffix in HDF5_SUFFIXES:
            source, spacing = _H5Source.open(file, inner)
        elif is_zarr:
            source, spacing, unit = _ZarrSource.open(file, inner)
        elif file.is_dir():
            source, spacing = _FolderSource.open(file)
        elif suffix in TIFF_SUFFIXES:
            source, spacing = _TiffSource.open(file)
        else:
            raise StackError(f"'{file}': unknown stack format {suffix!r}; expected {_FORMATS}")
        data = LazySections(source)
        where = source.where
    elif suffix in HDF5_SUFFIXES:
        data, spacing, where = _read_hdf5(file, inner)
    elif is_zarr:
        data, spacing, where, unit = _read_zarr(file, inner)
    elif file.is_dir():
        data, spacing, names = _read_folder(file)
        where = f"'{file}'"
    elif suffix in TIFF_SUFFIXES:
        data, spacing = _read_tiff(file)
        where = f"'{file}'"
    else:
        raise StackError(f"'{file}': unknown stack format {suffix!r}; expected {_FORMATS}")
    if not lazy:
        data = _validate_stack(data, where, names)
    stack = Stack(data=data, spacing_xyz=_spacing_xyz(spacing, where), path=text, unit=unit)
    log.info("read %s%s: %d sections of %dx%d (H x W) %s, spacing_xyz=%s", text,
             " (lazily)" if lazy else "", *data.shape, data.dtype, stack.spacing_xyz)
    return stack


def _is_zarr(folder: Path) -> bool:
    return any((folder / m).exists() for m in _ZARR_MARKERS)


def _tiff_spacing(tif, page) -> tuple[float, float, float]:
    sx = sy = sz = 1.0
    ij = tif.imagej_metadata if tif.is_imagej else None
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if ij is not None or unit == 1:
        def spacing(tag_name):
            tag = page.tags.get(tag_name)
            if tag is None:
                return 1.0
            num, den = tag.value
            return float(den) / float(num) if num and den else 1.0
        sx, sy = spacing("XResolution"), spacing("YResolution")
    elif page.tags.get("XResolution") is not None:
        log.debug("%s: ignoring XResolution/YResolution in unit %d (not ImageJ, not unitless)",
                  tif.filehandle.path, unit)
    if ij is not None:
        try:
            sz = float(ij.get("spacing", 1.0))
        except (TypeError, ValueError):
            sz = 1.0
    return sx, sy, sz


def _tiff_info(tif, file: Path):
    """Check a TIFF's one image series; its ``(shape, dtype, spacing_xyz)``."""
    series = tif.series
    if not series:
        raise StackError(f"'{file}': empty stack: the TIFF holds no images")
    if len(series) > 1:
        shapes = [tuple(s.shape) for s in series]
        raise StackError(f"'{file}': holds {len(series)} image series of different "
                         f"shapes {shapes}; expected one page per section, all of one "
                         f"shape")
    s = series[0]
    axes, shape = s.axes, tuple(s.shape)
    page = tif.pages[0]
    photometric = getattr(page.photometric, "name", str(page.photometric))
    n_samples = shape[axes.index("S")] if "S" in axes else 1
    if photometric in _COLOUR_PHOTOMETRIC or n_samples > 1:
        raise StackError(f"'{file}': is a colour image (photometric {photometric}, "
                         f"{n_samples} samples per pixel, shape {shape}, axes "
                         f"{axes!r}); hybridreg needs grayscale sections: convert it "
                         f"to grayscale first")
    if len(shape) == 3 and axes[0] == "C":
        log.warning("%s: treating the %d channels (axes %r) as sections", file,
                    shape[0], axes)
    return shape, s.dtype, _tiff_spacing(tif, page)


def _read_tiff(file: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            _, _, spacing = _tiff_info(tif, file)
            data = tif.series[0].asarray()
    except StackError:
        raise
    except Exception as exc:
        raise StackError(f"cannot read '{file}': not a readable TIFF file (corrupt or "
                         f"truncated?): {type(exc).__name__}: {exc}") from exc
    return data, spacing


def _read_png(file: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(file))
    except Exception as exc:
        raise StackError(f"cannot read '{file}': not a readable image (corrupt or "
                         f"truncated?)") from exc
    n = img.GetNumberOfComponentsPerPixel()
    if n > 1:
        raise StackError(f"'{file}': is a colour image ({n} components per pixel); hybridreg "
                         f"needs grayscale sections: convert it to grayscale first")
    return sitk.GetArrayFromImage(img)


def _read_section_file(file: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    if file.suffix.lower() in TIFF_SUFFIXES:
        img, spacing = _read_tiff(file)
    else:
        img, spacing = _read_png(file), None
    if img.ndim != 2:
        raise StackError(f"'{file}': expected one 2D section per file in a folder, got shape "
                         f"{tuple(img.shape)}")
    return img, spacing


def _section_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in SECTION_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise StackError(f"'{folder}': empty stack: the folder holds no images "
                         f"(*.tif, *.tiff, *.png)")
    return files


def _read_folder(folder: Path):
    files = _section_files(folder)
    first, spacing = _read_section_file(files[0])
    out = np.empty((len(files),) + first.shape, dtype=first.dtype)
    out[0] = first
    for k, f in enumerate(files[1:], start=1):
        img, _ = _read_section_file(f)
        if img.shape != first.shape:
            raise StackError(f"'{f}': section {k} has shape {tuple(img.shape)} (H, W), but the "
                             f"first section '{files[0].name}' has shape {tuple(first.shape)}; "
                             f"all sections of a folder must have one shape")
        if img.dtype != first.dtype:
            raise StackError(f"'{f}': section {k} has dtype {img.dtype}, but the first section "
                             f"'{files[0].name}' has dtype {first.dtype}; all sections of a "
                             f"folder must have one dtype")
        out[k] = img
    log.debug("%s: %d sections, first %s, last %s", folder, len(files), files[0].name,
              files[-1].name)
    return out, spacing or (1.0, 1.0, 1.0), [f.name for f in files]


def _spacing_from_attrs(attrs, where: str) -> tuple[float, float, float]:
    if "spacing_xyz" in attrs:
        sp = [float(v) for v in np.ravel(attrs["spacing_xyz"])]
        if len(sp) == 2:
            sp.append(1.0)
        return _spacing_xyz(sp, f"{where} (attribute spacing_xyz)")
    if "element_size_um" in attrs:
        zyx = [float(v) for v in np.ravel(attrs["element_size_um"])]
        if len(zyx) == 2:
            zyx.insert(0, 1.0)
        return _spacing_xyz(zyx[::-1], f"{where} (attribute element_size_um, z y x)")
    return (1.0, 1.0, 1.0)


def _hdf5_dataset(f, file: Path, inner: str | None):
    """``(dataset, its path)`` in the open HDF5 file ``f``: ``inner``, or the only dataset.

    Raises StackError naming the file's datasets when there is no such dataset or, without
    ``inner``, not exactly one.
    """
    import h5py

    datasets: list[str] = []
    f.visititems(lambda name, obj: datasets.append(name)
                 if isinstance(obj, h5py.Dataset) else None)
    listing = ", ".join(f"'/{d}'" for d in datasets) or "none"
    if inner is None:
        if len(datasets) != 1:
            raise StackError(f"'{file}': holds {len(datasets)} datasets ({listing}); name "
                             f"one as '{file}:/dataset'")
        inner = datasets[0]
    try:
        obj = f.get(inner)
    except Exception:
        obj = None
    if not isinstance(obj, h5py.Dataset):
        raise StackError(f"'{file}': no dataset '/{inner}' (datasets in the file: "
                         f"{listing})")
    return obj, inner


def _read_hdf5(file: Path, inner: str | None):
    import h5py

    try:
        f = h5py.File(file, "r")
    except Exception as exc:
        raise StackError(f"cannot read '{file}': not a readable HDF5 file (corrupt or "
                         f"truncated?): {exc}") from exc
    with f:
        obj, inner = _hdf5_dataset(f, file, inner)
        where = f"'{file}:/{inner}'"
        try:
            data = obj[()]
        except Exception as exc:
            raise StackError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
        spacing = _spacing_from_attrs(obj.attrs, where)
    return np.asarray(data), spacing, where


def _progress_dir(store: Path) -> Path:
    """The folder of :class:`SectionWriter`'s completion markers, next to the store."""
    return store.with_name(f".{store.name}.progress")


def _ome_multiscales(attrs: dict):
    """``multiscales`` of NGFF v0.4 (top level) or v0.5 (under ``ome``), or None."""
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return ms


def _ome_scale(transforms, n: int, where: str) -> list[float]:
    scale = [1.0] * n
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale":
            values = [float(v) for v in t.get("scale", ())]
            if len(values) != n:
                raise StackError(f"{where}: OME-Zarr scale {values} has {len(values)} values "
                                 f"for {n} axes")
            scale = [a * b for a, b in zip(scale, values)]
    return scale


def _zarr_locate(file: Path, inner: str | None):
    """Find the array to read in a zarr store (the level 0 of an OME-Zarr image).

    Returns ``(array, array_path, lead, spacing_xyz, unit, where)``: ``lead`` is the number of
    leading length-1 axes (t, c) to drop.
    """
    import zarr

    if _progress_dir(file).exists():
        raise StackError(f"'{file}': incomplete: an interrupted run was writing it section by "
                         f"section (markers in '{_progress_dir(file)}'); finish it with "
                         f"'hybridreg align ... --resume' or delete it")
    try:
        root = zarr.open(str(file), mode="r")
    except Exception as exc:
        raise StackError(f"cannot read '{file}': not a readable zarr store (corrupt or "
                         f"incomplete?): {type(exc).__name__}: {exc}") from exc
    node, node_path = root, None
    if inner is not None:
        if isinstance(root, zarr.Array):
            raise StackError(f"'{file}': is a single zarr array, it has no member '/{inner}'")
        try:
            node = root[inner]
        except Exception:
            node = None
        node_path = inner
    if isinstance(node, zarr.Group):
        ms = _ome_multiscales(dict(node.attrs))
        if ms:
            return _ome_locate(file, node, node_path, ms)
        if inner is None:
            arrays = [name for name, m in node.members(max_depth=None)
                      if isinstance(m, zarr.Array)]
            listing = ", ".join(f"'/{a}'" for a in sorted(arrays)) or "none"
            if len(arrays) != 1:
                raise StackError(f"'{file}': holds {len(arrays)} arrays ({listing}); name one "
                                 f"as '{file}:/group/array'")
            node_path = arrays[0]
            node = root[node_path]
    if not isinstance(node, zarr.Array):
        arrays = ([name for name, m in root.members(max_depth=None)
                   if isinstance(m, zarr.Array)] if isinstance(root, zarr.Group) else [])
        listing = ", ".join(f"'/{a}'" for a in sorted(arrays)) or "none"
        raise StackError(f"'{file}': no array '/{inner}' (arrays in the store: {listing})")
    where = f"'{file}:/{node_path}'" if node_path else f"'{file}'"
    return node, node_path, 0, _spacing_from_attrs(dict(node.attrs), where), None, where


def _ome_locate(file: Path, group, group_path: str | None, ms):
    import zarr

    shown = f"'{file}:/{group_path}'" if group_path else f"'{file}'"
    try:
        m = ms[0]
        axes = [a if isinstance(a, str) else a["name"] for a in m.get("axes", ())]
        units = {(a if isinstance(a, str) else a["name"]):
                 (None if isinstance(a, str) else a.get("unit")) for a in m.get("axes", ())}
        level0 = m["datasets"][0]
        path = str(level0["path"])
    except (KeyError, IndexError, TypeError) as exc:
        raise StackError(f"{shown}: malformed OME-Zarr multiscales metadata "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        arr = group[path]
    except Exception:
        arr = None
    if not isinstance(arr, zarr.Array):
        raise StackError(f"{shown}: OME-Zarr level 0 '{path}' named in multiscales is not an "
                         f"array in the store")
    array_path = f"{group_path}/{path}" if group_path else path
    where = f"'{file}:/{array_path}'"
    if not axes:  # NGFF <= 0.3: 5D t, c, z, y, x
        axes = ["t", "c", "z", "y", "x"][-arr.ndim:]
    if len(axes) != arr.ndim or axes[-2:] != ["y", "x"]:
        raise StackError(f"{where}: OME-Zarr axes {axes} for an array of shape {arr.shape}; "
                         f"hybridreg reads images whose axes end in y, x")
    lead = len(axes) - 2 - (1 if "z" in axes else 0)
    if (axes[lead:-2] not in ([], ["z"])
            or any(n != 1 for n in arr.shape[:lead])):
        raise StackError(f"{where}: OME-Zarr axes {axes} with shape {arr.shape}: only t and c "
                         f"axes of length 1 can come before z, y, x")
    scale = _ome_scale(level0.get("coordinateTransformations"), len(axes), where)
    outer = _ome_scale(m.get("coordinateTransformations"), len(axes), where)
    scale = dict(zip(axes, (a * b for a, b in zip(scale, outer))))
    spacing = _spacing_xyz((scale["x"], scale["y"], scale.get("z", 1.0)),
                           f"{where} (OME-Zarr scale)")
    return arr, array_path, lead, spacing, units.get("x"), where


def _read_zarr(file: Path, inner: str | None):
    arr, _, lead, spacing, unit, where = _zarr_locate(file, inner)
    try:
        data = np.asarray(arr[(0,) * lead + (...,)])
    except Exception as exc:
        raise StackError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
    return data, spacing, where, unit


# --- lazy stacks ------------------------------------------------------------------------------

class _Source:
    """Reads one raw section ``k`` of a file; picklable (path only, handles reopened)."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    where: str
    _handle = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_handle", None)
        return state

    def read(self, k: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class _ZarrSource(_Source):
    def __init__(self, file: Path, array_path, lead: int, shape, dtype, where, two_d):
        self.file, self.array_path, self.lead = str(file), array_path, lead
        self.shape, self.dtype, self.where, self.two_d = shape, dtype, where, two_d

    @classmethod
    def open(cls, file: Path, inner):
        arr, array_path, lead, spacing, unit, where = _zarr_locate(file, inner)
        raw = tuple(arr.shape[lead:])
        src = cls(file, array_path, lead, _check_shape(raw, where), arr.dtype, where,
                  len(raw) == 2)
        src._handle = arr
        return src, spacing, unit

    def read(self, k):
        if self._handle is None:
            import zarr

            self._handle = zarr.open_array(store=self.file, path=self.array_path or "",
                                           mode="r")
        key = (0,) * self.lead + ((...,) if self.two_d else (k, ...))
        return np.asarray(self._handle[key])


class _H5Source(_Source):
    def __init__(self, file: Path, inner: str, shape, dtype, where, two_d):
        self.file, self.inner = str(file), inner
        self.shape, self.dtype, self.where, self.two_d = shape, dtype, where, two_d

    @classmethod
    def open(cls, file: Path, inner):
        import h5py

        try:
            with h5py.File(file, "r") as f:
                obj, inner = _hdf5_dataset(f, file, inner)
                where = f"'{file}:/{inner}'"
                shape, dtype = tuple(obj.shape), obj.dtype
                spacing = _spacing_from_attrs(obj.attrs, where)
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read '{file}': not a readable HDF5 file (corrupt or "
                             f"truncated?): {exc}") from exc
        return cls(file, inner, _check_shape(shape, where), dtype, where,
                   len(shape) == 2), spacing

    def read(self, k):
        if self._handle is None:
            import h5py

            self._handle = h5py.File(self.file, "r")[self.inner]
        return np.asarray(self._handle[()] if self.two_d else self._handle[k])


class _TiffSource(_Source):
    def __init__(self, file: Path, shape, dtype, per_page: bool):
        self.file, self.shape, self.dtype = str(file), shape, dtype
        self.where, self.per_page = f"'{file}'", per_page

    @classmethod
    def open(cls, file: Path):
        import tifffile

        try:
            with tifffile.TiffFile(file) as tif:
                shape, dtype, spacing = _tiff_info(tif, file)
                n_pages = len(tif.series[0].pages)
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read '{file}': not a readable TIFF file (corrupt or "
                             f"truncated?): {type(exc).__name__}: {exc}") from exc
        zyx = _check_shape(shape, f"'{file}'")
        return cls(file, zyx, dtype, per_page=n_pages == zyx[0]), spacing

    def read(self, k):
        import tifffile

        if self._handle is None:
            self._handle = tifffile.TiffFile(self.file)
        if self.per_page:
            return self._handle.asarray(key=k, series=0)
        log.debug("%s: pages are not one per section; reading the whole series", self.file)
        return self._handle.series[0].asarray().reshape(self.shape)[k]


class _FolderSource(_Source):
    def __init__(self, folder: Path, files: list[str], shape, dtype):
        self.files, self.shape, self.dtype = files, shape, dtype
        self.where = f"'{folder}'"

    @classmethod
    def open(cls, folder: Path):
        files = _section_files(folder)
        first, spacing = _read_section_file(files[0])
        zyx = _check_shape((len(files),) + first.shape, f"'{folder}'")
        return cls(folder, [str(f) for f in files], zyx, first.dtype), spacing or (1.0, 1.0, 1.0)

    def read(self, k):
        img, _ = _read_section_file(Path(self.files[k]))
        if img.shape != self.shape[1:] or img.dtype != self.dtype:
            raise StackError(f"'{self.files[k]}': section {k} has shape {tuple(img.shape)} and "
                             f"dtype {img.dtype}, but the first section "
                             f"'{Path(self.files[0]).name}' has shape {self.shape[1:]} and "
                             f"dtype {self.dtype}; all sections of a folder must have one "
                             f"shape and dtype")
        return img


class SectionSequence:
    """Iteration and ``numpy.asarray`` for stacks that produce a section when indexed.

    Subclasses define ``shape``, ``section(k)`` and ``__getitem__`` (with slices).
    """

    def __iter__(self):
        for k in range(self.shape[0]):
            yield self.section(k)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class LazySections(SectionSequence):
    """A stack on disk, read one section at a time (``read_stack(path, lazy=True)``).

    Behaves like a read-only array of shape ``(Z, H, W)``: ``shape``, ``dtype`` (uint8,
    uint16 or float32), ``ndim``, ``len``, iteration, and indexing. ``sections[k]`` reads
    section ``k`` only, converts float64 to float32 and checks it (NaN or infinite values
    raise :class:`StackError` naming the section); a slice or a tuple index reads the
    sections it selects; ``np.asarray(sections)`` reads them all.

    Instances pickle by path (no open file handles), so a Dask worker that receives one
    reads its own sections. ``reads`` counts the sections read by this instance.
    """

    ndim = 3

    def __init__(self, source: _Source):
        self._source = source
        self.shape = tuple(int(n) for n in source.shape)
        self.dtype = _canonical_dtype(source.dtype, source.where)
        self.where = source.where
        self.reads = 0

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def section(self, k: int) -> np.ndarray:
        """Read section ``k``: ndarray (H, W) of ``self.dtype``."""
        z = self.shape[0]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -z <= k < z:
            raise IndexError(f"{self.where}: section index {k!r} out of range for {z} "
                             f"sections")
        k = int(k) % z
        try:
            arr = np.asarray(self._source.read(k))
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read section {k} of {self.where}: "
                             f"{type(exc).__name__}: {exc}") from exc
        self.reads += 1
        if arr.shape != self.shape[1:]:
            raise StackError(f"{self.where}: section {k} has shape {arr.shape}, expected "
                             f"{self.shape[1:]}")
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if self.dtype.kind == "f" and not np.isfinite(arr).all():
            raise StackError(f"{self.where}: contains NaN or infinite values in section {k}")
        return arr

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.section(key)
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.section(key)[rest]
        if key is Ellipsis:
            key = slice(None)
        ks = range(self.shape[0])[key] if isinstance(key, slice) else np.asarray(key)
        out = [self.section(int(k))[rest] for k in ks]
        if not out:
            return np.empty((0,) + self.shape[1:], self.dtype)[(slice(None),) + rest]
        return np.stack(out)

    def __repr__(self) -> str:
        return (f"LazySections({self.where}, shape_zyx={self.shape}, dtype={self.dtype}, "
                f"{self.reads} section reads)")


# --- writing stacks ---------------------------------------------------------------------------

def _write_kind(text: str) -> tuple[str, Path, str | None]:
    file, inner = _split_spec(text)
    suffix = file.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5", file, inner
    if suffix in ZARR_SUFFIXES:
        return "zarr", file, inner
    if suffix in TIFF_SUFFIXES:
        return "tiff", file, None
    if text.endswith(("/", os.sep)) or file.is_dir():
        return "folder", file, None
    raise StackError(f"'{text}': cannot tell the output format from the path (suffix "
                     f"{suffix!r}); use {_FORMATS}")


def _chunks(shape) -> tuple[int, int, int]:
    return (1, min(shape[1], 1024), min(shape[2], 1024))


def write_stack(path, data, *, spacing_xyz=None, unit: str | None = None,
                overwrite: bool = False, inputs: Iterable = ()) -> None:
    """Write a stack atomically as TIFF, an image folder, HDF5 or zarr, keeping its dtype.

    Parameters
    ----------
    path : str or os.PathLike
        ``stack.tif``/``.tiff``, a folder (an existing one, or a path ending in ``/``:
        ``section_0000.tif``, ...), ``file.h5[:/dataset]`` (bare: dataset ``/data``) or
        ``store.zarr[:/group/array]``. Writing a named dataset into an existing HDF5 file
        copies the file, changes the copy and swaps it in.
    data : ndarray, shape (Z, H, W) or (H, W); or Stack
        uint8, uint16 or float32 (float64 is written as float32). A 2D array is one section.
        A :class:`Stack` also gives its spacing, unless ``spacing_xyz`` is passed.
    spacing_xyz : (float, float, float), optional
        Physical spacing (x, y, z); default ``(1.0, 1.0, 1.0)``.
    unit : str, optional
        Unit of the spacing, written to OME-Zarr axes (a bare ``store.zarr``); a
        :class:`Stack` gives its own unless this is passed.
    overwrite : bool
        Replace an existing target. A folder is only replaced if it holds nothing but
        images, a zarr target only if it is a zarr store.
    inputs : iterable of str, os.PathLike or Stack
        Paths never to overwrite, even with ``overwrite=True``.

    Raises
    ------
    StackError
        For invalid data (same rules as :func:`read_stack`), an unknown format, an existing
        target without ``overwrite``, or a target that is one of ``inputs``.
    """
    text = os.fspath(path)
    if isinstance(data, Stack):
        if spacing_xyz is None:
            spacing_xyz = data.spacing_xyz
        if unit is None:
            unit = data.unit
        data = data.data
    arr = _validate_stack(data, f"data to write to '{text}'")
    spacing = _spacing_xyz((1.0, 1.0, 1.0) if spacing_xyz is None else spacing_xyz,
                           f"writing '{text}'")
    kind, file, inner = _write_kind(text)
    _refuse_inputs(file, inner, inputs, text)
    if kind == "tiff":
        with atomic_output(file, overwrite=overwrite) as tmp:
            _write_tiff(tmp, arr, spacing)
    elif kind == "folder":
        _write_folder(file, arr, spacing, overwrite=overwrite)
    elif kind == "hdf5":
        _write_hdf5(file, inner, arr, spacing, overwrite=overwrite)
    else:
        _write_zarr(file, inner, arr, spacing, overwrite=overwrite, unit=unit)
    log.info("wrote %s: %d sections of %dx%d (H x W) %s, spacing_xyz=%s", text, *arr.shape,
             arr.dtype, spacing)


def _write_tiff(path: Path, arr: np.ndarray, spacing) -> None:
    import tifffile

    sx, sy, sz = spacing
    tifffile.imwrite(path, arr, imagej=True, resolution=(1.0 / sx, 1.0 / sy),
                     metadata={"spacing": sz, "axes": "ZYX" if arr.ndim == 3 else "YX"})


def _write_folder(folder: Path, arr: np.ndarray, spacing, *, overwrite: bool) -> None:
    state = _existing(folder)
    if state == "file":
        raise StackError(f"'{folder}' is a file; cannot write a folder of sections there")
    if state == "dir" and overwrite:
        others = [p.name for p in folder.iterdir() if not p.name.startswith(".")
                  and not (p.is_file() and p.suffix.lower() in SECTION_SUFFIXES)]
        if others:
            raise StackError(f"'{folder}' holds more than images (e.g. '{others[0]}'); "
                             f"refusing to replace the folder: write elsewhere or clear it")
    width = max(4, len(str(arr.shape[0] - 1)))
    with atomic_output(folder, overwrite=overwrite) as tmp:
        tmp.mkdir()
        for k in range(arr.shape[0]):
            _write_tiff(tmp / f"section_{k:0{width}d}.tif", arr[k], spacing)


def _h5_create(f, name: str, arr: np.ndarray, spacing, shown: str) -> None:
    try:
        ds = f.create_dataset(name, data=arr, chunks=_chunks(arr.shape), compression="gzip",
                              compression_opts=1)
    except (TypeError, ValueError, KeyError) as exc:  # e.g. a parent of the path is a dataset
        raise StackError(f"cannot write '{shown}': {exc}") from exc
    ds.attrs["spacing_xyz"] = np.asarray(spacing, dtype=np.float64)


def _write_hdf5(file: Path, inner: str | None, arr: np.ndarray, spacing, *,
                overwrite: bool) -> None:
    import h5py

    if inner is None or not os.path.exists(file):
        with atomic_output(file, overwrite=overwrite) as tmp:
            with h5py.File(tmp, "w") as f:
                _h5_create(f, inner or "data", arr, spacing, f"{file}:/{inner or 'data'}")
        return
    if not file.is_file():
        raise StackError(f"'{file}' is not a file; cannot write an HDF5 dataset into it")
    try:
        with h5py.File(file, "r") as f:
            obj = f.get(inner)
            is_group = isinstance(obj, h5py.Group)
            exists = obj is not None
    except Exception as exc:
        raise StackError(f"cannot add '/{inner}' to '{file}': the existing file is not a "
                         f"readable HDF5 file: {exc}") from exc
    if is_group:
        raise StackError(f"'{file}:/{inner}' is a group, not a dataset; refusing to replace it")
    if exists and not overwrite:
        raise StackError(f"'{file}:/{inner}' already exists; pass overwrite=True to replace it")
    with atomic_output(file, overwrite=True) as tmp:
        shutil.copy2(file, tmp)
        with h5py.File(tmp, "a") as f:
            if exists:
                del f[inner]
            _h5_create(f, inner, arr, spacing, f"{file}:/{inner}")


def _zarr_create(store: Path, arr: np.ndarray, spacing, *, zarr_format: int = 3) -> None:
    import zarr

    z = zarr.create_array(store=str(store), shape=arr.shape, dtype=arr.dtype,
                          chunks=_chunks(arr.shape), zarr_format=zarr_format,
                          attributes={"spacing_xyz": [float(s) for s in spacing]})
    z[...] = arr


def _ome_attrs(spacing, unit: str | None, name: str) -> dict:
    sx, sy, sz = (float(v) for v in spacing)
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in "zyx"]
    return {"multiscales": [{
        "version": "0.4", "name": name, "axes": axes,
        "datasets": [{"path": "0",
                      "coordinateTransformations": [{"type": "scale",
                                                     "scale": [sz, sy, sx]}]}],
        "metadata": {"written_by": "hybridreg"}}]}


def _ome_create(store: Path, shape, dtype, spacing, unit: str | None, name: str):
    """An OME-Zarr (NGFF v0.4) image at ``store``; returns its level-0 array."""
    import zarr

    group = zarr.open_group(str(store), mode="w", zarr_format=2,
                            attributes=_ome_attrs(spacing, unit, name))
    return group.create_array("0", shape=tuple(shape), dtype=dtype, chunks=_chunks(shape),
                              fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})


def _write_zarr(store: Path, inner: str | None, arr: np.ndarray, spacing, *,
                overwrite: bool, unit: str | None = None) -> None:
    import zarr

    if inner is None or not os.path.exists(store):
        if _existing(store) == "dir" and overwrite and not _is_zarr(store):
            raise StackError(f"'{store}' exists and is not a zarr store; refusing to replace it")
        with atomic_output(store, overwrite=overwrite) as tmp:
            if inner is None:
                _ome_create(tmp, arr.shape, arr.dtype, spacing, unit, store.stem)[...] = arr
            else:
                group = zarr.open_group(str(tmp), mode="w")
                z = group.create_array(name=inner, shape=arr.shape, dtype=arr.dtype,
                                       chunks=_chunks(arr.shape),
                                       attributes={"spacing_xyz": [float(s) for s in spacing]})
                z[...] = arr
        if inner is None:
            _remove(_progress_dir(store))  # a complete store replaced one left incomplete
        return
    try:
        root = zarr.open(str(store), mode="r")
    except Exception as exc:
        raise StackError(f"cannot add '/{inner}' to '{store}': the existing store is not "
                         f"readable: {exc}") from exc
    if not isinstance(root, zarr.Group):
        raise StackError(f"'{store}' is a single zarr array, not a group; cannot add "
                         f"'/{inner}' to it")
    try:
        member = root[inner]
    except KeyError:
        member = None
    if isinstance(member, zarr.Group):
        raise StackError(f"'{store}:/{inner}' is a group, not an array; refusing to replace it")
    if member is not None and not overwrite:
        raise StackError(f"'{store}:/{inner}' already exists; pass overwrite=True to replace it")
    parent = inner.rpartition("/")[0]
    if parent:
        try:
            zarr.open_group(str(store), mode="r+").require_group(parent)
        except OSError:
            raise
        except Exception as exc:  # e.g. a parent of the path is an array
            raise StackError(f"cannot write '{store}:/{inner}': cannot make group "
                             f"'/{parent}': {type(exc).__name__}: {exc}") from exc
    with atomic_output(store / inner, overwrite=overwrite) as tmp:
        _zarr_create(tmp, arr, spacing, zarr_format=root.metadata.zarr_format)


def is_ome_zarr_target(path) -> bool:
    """Whether ``path`` is written as an OME-Zarr image: a bare ``store.zarr`` (no ``:/``).

    Such targets can be written section by section with :func:`open_section_writer`.
    """
    file, inner = _split_spec(path)
    return file.suffix.lower() in ZARR_SUFFIXES and inner is None


class SectionWriter:
    """Writes a stack into an OME-Zarr image one section at a time, resumably.

    Made by :func:`open_section_writer`. Section ``k`` fills its own chunks (one section per
    chunk along z; zarr writes every chunk file atomically); once they are all written, an
    empty marker file ``section_kkkkkk`` is added to the folder ``.NAME.progress`` next to
    the store. While that folder exists the store is incomplete: :func:`read_stack` refuses
    it, and ``open_section_writer(..., resume=True)`` continues it, so only sections without
    a marker need writing (:meth:`missing`). :meth:`close` checks that every section was
    written and removes the folder. Used as a context manager, it closes on success and
    leaves the store resumable when the block raises.

    Attributes
    ----------
    path : pathlib.Path
    shape : (int, int, int)
        (Z, H, W).
    dtype : numpy.dtype
    spacing_xyz : (float, float, float)
    unit : str or None
    """

    def __init__(self, path: Path, array, progress: Path, shape, dtype, spacing_xyz, unit):
        self.path, self._array, self._progress = path, array, progress
        self.shape, self.dtype, self.spacing_xyz, self.unit = shape, dtype, spacing_xyz, unit

    def _marker(self, k: int) -> Path:
        return self._progress / f"section_{k:06d}"

    def done(self) -> set[int]:
        """Indices of the sections already written (all of them once closed)."""
        if not self._progress.is_dir():
            return set(range(self.shape[0]))
        return {int(p.name[8:]) for p in self._progress.iterdir()
                if p.name.startswith("section_") and p.name[8:].isdigit()}

    def missing(self) -> list[int]:
        """Indices of the sections still to write, ascending."""
        done = self.done()
        return [k for k in range(self.shape[0]) if k not in done]

    def write(self, k: int, section) -> None:
        """Write section ``k``: ndarray (H, W), cast to the store's dtype (integers rounded
        and clipped, see :func:`cast_to_dtype`)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) \
                or not 0 <= k < self.shape[0]:
            raise IndexError(f"'{self.path}': section index {k!r} out of range for "
                             f"{self.shape[0]} sections")
        arr = np.asarray(section)
        if arr.shape != tuple(self.shape[1:]):
            raise StackError(f"'{self.path}': section {k} has shape {arr.shape}, the store "
                             f"holds sections of {tuple(self.shape[1:])} (H, W)")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise StackError(f"'{self.path}': section {k} to write contains NaN or infinite "
                             f"values")
        if arr.dtype != self.dtype:
            arr = cast_to_dtype(arr, self.dtype)
        self._array[int(k)] = arr
        self._marker(int(k)).touch()

    def close(self) -> None:
        """Finish the store: every section must have been written."""
        missing = self.missing()
        if missing:
            raise StackError(f"'{self.path}': {len(missing)} of {self.shape[0]} sections not "
                             f"written yet (first: {missing[0]}); the store stays incomplete")
        shutil.rmtree(self._progress, ignore_errors=True)
        log.info("wrote %s: %d sections of %dx%d (H x W) %s, spacing_xyz=%s", self.path,
                 *self.shape, self.dtype, self.spacing_xyz)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        return False


def open_section_writer(path, *, shape_zyx, dtype, spacing_xyz=None, unit: str | None = None,
                        overwrite: bool = False, resume: bool = False,
                        inputs: Iterable = ()) -> SectionWriter:
    """Create (or continue) an OME-Zarr image to write section by section.

    Parameters
    ----------
    path : str or os.PathLike
        A bare ``store.zarr`` (see :func:`is_ome_zarr_target`).
    shape_zyx : (int, int, int)
        Sections, rows, columns.
    dtype : numpy dtype
        uint8, uint16 or float32.
    spacing_xyz : (float, float, float), optional
        Physical spacing (x, y, z), written as the OME-Zarr ``scale`` (z, y, x); default
        ``(1.0, 1.0, 1.0)``.
    unit : str, optional
        Unit of the spacing for the OME-Zarr axes (e.g. ``"nanometer"``).
    overwrite : bool
        Replace an existing store (only a zarr store, never any other folder).
    resume : bool
        Continue a store this function created and an interrupted run left incomplete, when
        its shape, dtype, spacing and unit match: the sections already written stay, and
        :meth:`SectionWriter.missing` lists the rest. Otherwise (no such store, another
        shape, a complete store) the store is started over, as with ``overwrite``.
    inputs : iterable of str, os.PathLike or Stack
        Paths never to overwrite.

    Returns
    -------
    SectionWriter

    Raises
    ------
    StackError
        A path that is not a bare ``.zarr``, invalid shape, dtype or spacing, an existing
        target without ``overwrite``/``resume``, a target that is one of ``inputs`` or not
        a zarr store.
    """
    import json

    import zarr

    text = os.fspath(path)
    if not is_ome_zarr_target(text):
        raise StackError(f"'{text}': writing section by section needs a bare 'store.zarr' "
                         f"path (an OME-Zarr image), not a group member or another format")
    file, _ = _split_spec(text)
    where = f"writing '{text}'"
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3:
        raise StackError(f"{where}: shape_zyx must be (Z, H, W), got {shape_zyx!r}")
    shape = _check_shape(shape, where)
    dt = _canonical_dtype(dtype, where)
    spacing = _spacing_xyz((1.0, 1.0, 1.0) if spacing_xyz is None else spacing_xyz, where)
    _refuse_inputs(file, None, inputs, text)
    progress = _progress_dir(file)
    manifest = {"shape_zyx": list(shape), "dtype": dt.str, "spacing_xyz": list(spacing),
                "unit": unit}
    state = _existing(file)
    if resume and state == "dir" and progress.is_dir():
        try:
            old = json.loads((progress / "manifest.json").read_text())
            array = zarr.open_array(store=str(file), path="0", mode="r+")
            ok = old == manifest and tuple(array.shape) == shape and array.dtype == dt
        except Exception as exc:  # a store cut short before its metadata was complete
            log.debug("cannot reopen %s: %s", file, exc)
            ok = False
        if ok:
            writer = SectionWriter(file, array, progress, shape, dt, spacing, unit)
            log.info("resuming %s: %d of %d sections already written", file,
                     len(writer.done()), shape[0])
            return writer
        log.info("%s cannot be resumed (another shape, dtype or spacing, or incomplete "
                 "metadata): starting it over", file)
    if state == "file":
        raise StackError(f"'{file}' is a file; cannot write a zarr store there")
    if state == "dir":
        if not (overwrite or resume):
            raise StackError(f"'{file}' already exists; pass overwrite=True to replace it")
        if not (_is_zarr(file) or progress.is_dir()):
            raise StackError(f"'{file}' exists and is not a zarr store; refusing to replace it")
    if state is not None:
        _remove(file)
    _remove(progress)
    # the markers' folder first: a run killed at any later point leaves a store marked
    # incomplete (and resumable), never one that looks finished
    progress.mkdir(parents=True)
    with atomic_output(progress / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest))
    array = _ome_create(file, shape, dt, spacing, unit, file.stem)
    log.info("writing %s section by section: %d sections of %dx%d %s", file, *shape, dt)
    return SectionWriter(file, array, progress, shape, dt, spacing, unit)


# --- sections and ITK -------------------------------------------------------------------------

def section_to_itk(section, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0), dtype=np.float32):
    """One section to a 2D ``itk.Image`` with spacing, origin and identity direction set.

    Parameters
    ----------
    section : ndarray, shape (H, W)
        Rows are y, columns x.
    spacing_xy, origin_xy : (float, float)
        Physical spacing and the physical position of pixel (0, 0), as (x, y).
    dtype : numpy dtype or None
        Pixel type of the image (default float32); ``None`` keeps the section's dtype.

    Returns
    -------
    itk.Image
        2D scalar image of size (W, H) in ITK's (x, y) order.
    """
    arr = np.asarray(section)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"section must be a non-empty 2D array (H, W), got shape {arr.shape}")
    sx, sy = _pair(spacing_xy, "spacing_xy", positive=True)
    ox, oy = _pair(origin_xy, "origin_xy", positive=False)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    import itk  # lazy: importing hybridreg must not import itk

    img = itk.image_from_array(np.ascontiguousarray(arr))
    img.SetSpacing([sx, sy])
    img.SetOrigin([ox, oy])
    direction = itk.Matrix[itk.D, 2, 2]()
    direction.SetIdentity()
    img.SetDirection(direction)
    return img


def section_from_itk(image) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """A 2D scalar ``itk.Image`` to ``(section, spacing_xy, origin_xy)``.

    Returns
    -------
    section : ndarray, shape (H, W)
        A copy, in the image's pixel type.
    spacing_xy, origin_xy : (float, float)

    Raises
    ------
    ValueError
        For images that are not 2D, vector images and non-identity directions.
    """
    import itk

    if image.GetImageDimension() != 2:
        raise ValueError(f"expected a 2D image, got dimension {image.GetImageDimension()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
                         f"components per pixel (for fields use hybridreg.fields.from_itk)")
    direction = np.asarray(image.GetDirection())
    if not np.allclose(direction, np.eye(2)):
        raise ValueError(f"image has a non-identity direction {direction.tolist()}; hybridreg "
                         f"supports axis-aligned grids only")
    arr = np.array(itk.array_from_image(image), copy=True)
    return (arr, tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()))


# --- fields -----------------------------------------------------------------------------------

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
        spacing = _pair(spacing_xy, "spacing_xy", positive=True)
        origin = _pair(origin_xy, "origin_xy", positive=False)
    except ValueError as exc:
        raise StackError(f"writing '{path}': {exc}") from None
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(u, 0, -1), dtype=np.float32),
                                 isVector=True)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((1.0, 0.0, 0.0, 1.0))
    with atomic_output(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(img, str(tmp), True)


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
    u = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0)
    try:
        u = validate_field(u, name=f"field in '{path}'")
    except ValueError as exc:
        raise StackError(str(exc)) from None
    return (np.ascontiguousarray(u), tuple(float(s) for s in img.GetSpacing()),
            tuple(float(o) for o in img.GetOrigin()))


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
