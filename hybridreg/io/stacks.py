"""Reading and writing whole stacks, whatever the format: the path decides.

:func:`read_stack` and :func:`write_stack` dispatch to the format modules (TIFF, image
folders, HDF5, zarr/OME-Zarr) by suffix; :func:`open_section_writer` starts or resumes an
OME-Zarr image written one section at a time.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np

from .atomic import atomic_output, existing, refuse_inputs, remove
from .base import (LazySections, Stack, StackError, as_spacing_xyz, canonical_dtype,
                   check_shape, split_spec, validate_stack)
from .folder import FolderSource, read_folder, write_folder
from .hdf5 import HDF5_SUFFIXES, H5Source, read_hdf5, write_hdf5
from .itkfiles import ITKImageSource, is_itk_image, read_itk_image
from .resume import SectionWriter, progress_dir, read_manifest, start_progress
from .tiff import TIFF_SUFFIXES, TiffSource, read_tiff, write_tiff
from .zarr import (ZARR_SUFFIXES, ZarrSource, is_ome_zarr_target, is_zarr, ome_create,
                   ome_level0, read_zarr, write_zarr)

log = logging.getLogger(__name__)

__all__ = ["read_stack", "write_stack", "open_section_writer"]

_FORMATS = ("'.tif'/'.tiff' (multi-page TIFF), '.h5'/'.hdf5'/'.hdf'[:/dataset], "
            "'.zarr'[:/array], a folder (an existing folder or a path ending in '/'), or "
            "for reading an ITK image ('.mha', '.mhd', '.nrrd', '.nhdr', '.nii', '.nii.gz')")


def read_stack(path, *, lazy: bool = False) -> Stack:
    """Read a stack of sections from a TIFF, an image folder, HDF5 or zarr (OME-Zarr).

    Parameters
    ----------
    path : str or os.PathLike
        ``stack.tif``, a folder of 2D images, ``file.h5[:/dataset]`` or
        ``store.zarr[:/group/array]`` (see :mod:`hybridreg.io`).
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
    file, inner = split_spec(text)
    if not os.path.exists(file):
        raise StackError(f"'{file}': no such file or folder")
    suffix = file.suffix.lower()
    names = None
    unit = None
    zarr_store = suffix in ZARR_SUFFIXES or (file.is_dir() and is_zarr(file))
    if lazy:
        if suffix in HDF5_SUFFIXES:
            source, spacing = H5Source.open(file, inner)
        elif zarr_store:
            source, spacing, unit = ZarrSource.open(file, inner)
        elif file.is_dir():
            source, spacing = FolderSource.open(file)
        elif suffix in TIFF_SUFFIXES:
            source, spacing = TiffSource.open(file)
        elif is_itk_image(file):
            source, spacing = ITKImageSource.open(file)
        else:
            raise StackError(f"'{file}': unknown stack format {suffix!r}; expected {_FORMATS}")
        data = LazySections(source)
        where = source.where
    elif suffix in HDF5_SUFFIXES:
        data, spacing, where = read_hdf5(file, inner)
    elif zarr_store:
        data, spacing, where, unit = read_zarr(file, inner)
    elif file.is_dir():
        data, spacing, names = read_folder(file)
        where = f"'{file}'"
    elif suffix in TIFF_SUFFIXES:
        data, spacing = read_tiff(file)
        where = f"'{file}'"
    elif is_itk_image(file):
        data, spacing = read_itk_image(file)
        where = f"'{file}'"
    else:
        raise StackError(f"'{file}': unknown stack format {suffix!r}; expected {_FORMATS}")
    if not lazy:
        data = validate_stack(data, where, names)
    stack = Stack(data=data, spacing_xyz=as_spacing_xyz(spacing, where), path=text, unit=unit)
    log.info("read %s%s: %d sections of %dx%d (H x W) %s, spacing_xyz=%s", text,
             " (lazily)" if lazy else "", *data.shape, data.dtype, stack.spacing_xyz)
    return stack


def _write_kind(text: str):
    file, inner = split_spec(text)
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
    kind, file, inner = _write_kind(text)
    lazy = (kind == "tiff" and not isinstance(data, np.ndarray) and hasattr(data, "shape")
            and hasattr(data, "dtype") and len(data.shape) == 3)
    # a lazy stack into a TIFF: computed and written one page at a time
    arr = data if lazy else validate_stack(data, f"data to write to '{text}'")
    spacing = as_spacing_xyz((1.0, 1.0, 1.0) if spacing_xyz is None else spacing_xyz,
                             f"writing '{text}'")
    refuse_inputs(file, inner, inputs, text)
    if kind == "tiff":
        with atomic_output(file, overwrite=overwrite) as tmp:
            write_tiff(tmp, arr, spacing,
                       ome=file.name.lower().endswith((".ome.tif", ".ome.tiff")))
    elif kind == "folder":
        write_folder(file, arr, spacing, overwrite=overwrite)
    elif kind == "hdf5":
        write_hdf5(file, inner, arr, spacing, overwrite=overwrite)
    else:
        write_zarr(file, inner, arr, spacing, overwrite=overwrite, unit=unit)
    log.info("wrote %s: %d sections of %dx%d (H x W) %s, spacing_xyz=%s", text, *arr.shape,
             np.dtype(arr.dtype), spacing)


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
    text = os.fspath(path)
    if not is_ome_zarr_target(text):
        raise StackError(f"'{text}': writing section by section needs a bare 'store.zarr' "
                         f"path (an OME-Zarr image), not a group member or another format")
    file, _ = split_spec(text)
    where = f"writing '{text}'"
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3:
        raise StackError(f"{where}: shape_zyx must be (Z, H, W), got {shape_zyx!r}")
    shape = check_shape(shape, where)
    dt = canonical_dtype(dtype, where)
    spacing = as_spacing_xyz((1.0, 1.0, 1.0) if spacing_xyz is None else spacing_xyz, where)
    refuse_inputs(file, None, inputs, text)
    progress = progress_dir(file)
    manifest = {"shape_zyx": list(shape), "dtype": dt.str, "spacing_xyz": list(spacing),
                "unit": unit}
    state = existing(file)
    if resume and state == "dir" and progress.is_dir():
        try:
            old = read_manifest(progress)
            array = ome_level0(file)
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
        if not (is_zarr(file) or progress.is_dir()):
            raise StackError(f"'{file}' exists and is not a zarr store; refusing to replace it")
    if state is not None:
        remove(file)
    # the markers' folder first: a run killed at any later point leaves a store marked
    # incomplete (and resumable), never one that looks finished
    start_progress(progress, manifest)
    array = ome_create(file, shape, dt, spacing, unit, file.stem)
    log.info("writing %s section by section: %d sections of %dx%d %s", file, *shape, dt)
    return SectionWriter(file, array, progress, shape, dt, spacing, unit)
