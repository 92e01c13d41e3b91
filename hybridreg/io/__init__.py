"""Stacks and displacement fields in and out of files.

Every layout transpose between files, ITK and numpy happens here (and in
:mod:`hybridreg.itkimage`) and nowhere else.

Stacks
    A stack is a numpy array ``(Z, H, W)`` (sections, rows, columns) of ``uint8``,
    ``uint16`` or ``float32`` with a physical spacing ``spacing_xyz = (x, y, z)``
    (``(1.0, 1.0, 1.0)`` when the file carries none). :func:`read_stack` and
    :func:`write_stack` handle, decided by the path:

    ``stack.tif`` / ``stack.tiff``
        Multi-page TIFF, one page per section, written as an ImageJ hyperstack
        (:mod:`hybridreg.io.tiff`); ``stack.ome.tif`` is written as OME-TIFF with the
        spacing as OME's ``PhysicalSizeX/Y/Z`` (and read back with it).
    a folder
        2D images (``*.tif``, ``*.tiff``, ``*.png``), one per section, in natural order;
        written as ``section_0000.tif``, ... A folder to write is an existing folder or a
        path ending in ``/`` (:mod:`hybridreg.io.folder`).
    ``file.h5:/path/in/file`` (also ``.hdf5``, ``.hdf``)
        An HDF5 dataset; a bare ``file.h5`` when the file holds exactly one dataset
        (:mod:`hybridreg.io.hdf5`).
    ``store.zarr`` or ``store.zarr:/group/array``
        Zarr. OME-Zarr images (NGFF v0.4 and v0.5) are read from their level 0; a bare
        ``store.zarr`` is written as an OME-Zarr image, ``store.zarr:/group/array`` as a
        plain array (:mod:`hybridreg.io.zarr`). :class:`SectionWriter` writes such an image
        one section at a time, resumably.
    ``stack.mha`` / ``.mhd`` / ``.nrrd`` / ``.nhdr`` / ``.nii`` / ``.nii.gz`` (read only)
        An ITK image, 3D (one section per slice) or 2D, with its spacing; vector images and
        non-identity directions are refused (:mod:`hybridreg.io.itkfiles`).

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
    fixed grid's spacing and origin (:mod:`hybridreg.io.fieldfiles`); see
    :mod:`hybridreg.fields` for the contract.

Writing
    Nothing is overwritten unless ``overwrite=True``, and paths given as ``inputs`` are never
    overwritten at all. Every write goes to a temporary name next to the target and is moved
    into place only when it has succeeded (:func:`atomic_output`), so an interrupted or
    failing write never leaves a half-written file under the final name. The one exception
    is :class:`SectionWriter` (a volume too large to write at once): it writes in place, one
    section at a time, and marks the store incomplete (a ``.NAME.progress`` folder next to
    it, listing the sections done) until every section is written
    (:mod:`hybridreg.io.resume`).

Sections as ITK images
    :func:`section_to_itk` and :func:`section_from_itk` live in :mod:`hybridreg.itkimage`
    and are re-exported here.

Modules: ``base`` (the stack type, validation, lazy sections), ``atomic``, ``tiff``,
``folder``, ``hdf5``, ``zarr``, ``resume``, ``fieldfiles``, and ``stacks`` (the dispatch by
path). Importing :mod:`hybridreg.io` imports none of the file libraries (tifffile, h5py,
zarr, SimpleITK, itk): each is imported on first use.
"""
from __future__ import annotations

from ..itkimage import section_from_itk, section_to_itk
from .atomic import atomic_output
from .base import LazySections, Stack, StackError
from .base import SectionSequence, cast_to_dtype  # noqa: F401  (public, not in __all__)
from .base import (WHOLE_SECTION_BYTES, SectionPlane, is_array_like, section_of,  # noqa: F401
                   strips)
from .fieldfiles import field_path, read_field, read_fields, write_field, write_fields
from .resume import SectionWriter
from .stacks import open_section_writer, read_stack, write_stack
from .zarr import is_ome_zarr_target

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
