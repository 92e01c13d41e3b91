"""HDF5 stacks: ``file.h5:/path/in/file`` (also ``.hdf5``, ``.hdf``).

A bare ``file.h5`` is fine when the file holds exactly one dataset (and is written as
dataset ``/data``). Spacing is read from a ``spacing_xyz`` attribute (x, y, z) or ilastik's
``element_size_um`` (z, y, x), and written as ``spacing_xyz``. Datasets are written with
chunks of one section along z (at most 1024 x 1024 in y, x) and gzip level 1. Writing a
named dataset into an existing file copies the file, changes the copy and swaps it in.
h5py is imported on first use.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .base import SectionSource, StackError, check_shape, section_chunks, spacing_from_attrs

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


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


def read_hdf5(file: Path, inner: str | None):
    """``(data, spacing_xyz, where)`` of dataset ``inner`` (or the only one) of ``file``."""
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
        spacing = spacing_from_attrs(obj.attrs, where)
    return np.asarray(data), spacing, where


class H5Source(SectionSource):
    """Sections of an HDF5 dataset: ``dataset[k]``."""

    def __init__(self, file: Path, inner: str, shape, dtype, where, two_d):
        self.file, self.inner = os.path.abspath(file), inner
        self.shape, self.dtype, self.where, self.two_d = shape, dtype, where, two_d

    @classmethod
    def open(cls, file: Path, inner):
        """``(source, spacing_xyz)`` of a dataset, from its metadata only."""
        import h5py

        try:
            with h5py.File(file, "r") as f:
                obj, inner = _hdf5_dataset(f, file, inner)
                where = f"'{file}:/{inner}'"
                shape, dtype = tuple(obj.shape), obj.dtype
                spacing = spacing_from_attrs(obj.attrs, where)
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read '{file}': not a readable HDF5 file (corrupt or "
                             f"truncated?): {exc}") from exc
        return cls(file, inner, check_shape(shape, where), dtype, where,
                   len(shape) == 2), spacing

    def read(self, k):
        if self._handle is None:
            self._open()
        return np.asarray(self._handle[()] if self.two_d else self._handle[k])

    def read_region(self, k, ys, xs):
        """The chunks the region touches only (h5py's hyperslab read)."""
        if self._handle is None:
            self._open()
        return np.asarray(self._handle[(ys, xs) if self.two_d else (k, ys, xs)])

    def _open(self):
        import h5py

        self._handle = h5py.File(self.file, "r")[self.inner]


def _h5_create(f, name: str, arr: np.ndarray, spacing, shown: str) -> None:
    try:
        ds = f.create_dataset(name, data=arr, chunks=section_chunks(arr.shape),
                              compression="gzip", compression_opts=1)
    except (TypeError, ValueError, KeyError) as exc:  # e.g. a parent of the path is a dataset
        raise StackError(f"cannot write '{shown}': {exc}") from exc
    ds.attrs["spacing_xyz"] = np.asarray(spacing, dtype=np.float64)


def write_hdf5(file: Path, inner: str | None, arr: np.ndarray, spacing, *,
               overwrite: bool) -> None:
    """Write ``arr`` (Z, H, W) as dataset ``inner`` (default ``/data``) of ``file``,
    atomically; other datasets of an existing file are kept."""
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
