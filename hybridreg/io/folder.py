"""Image folders: 2D images (``*.tif``, ``*.tiff``, ``*.png``), one per section.

Sections are read in natural order (``section_2`` before ``section_10``); hidden files and
other files are skipped. Written as ``section_0000.tif``, ... (more digits beyond 10000
sections). A folder to write is an existing folder or a path ending in ``/``; with
``overwrite`` it is only replaced if it holds nothing but images. PNG files are read
through SimpleITK, imported on first use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_output, existing
from .base import SectionSource, StackError, check_shape, natural_key
from .tiff import TIFF_SUFFIXES, read_tiff, write_tiff

log = logging.getLogger(__name__)

SECTION_SUFFIXES = (".tif", ".tiff", ".png")


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
        img, spacing = read_tiff(file)
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
                   key=lambda p: natural_key(p.name))
    if not files:
        raise StackError(f"'{folder}': empty stack: the folder holds no images "
                         f"(*.tif, *.tiff, *.png)")
    return files


def read_folder(folder: Path):
    """``(data, spacing_xyz, file names)`` of a folder of sections, all of one shape and
    dtype; the spacing is the first TIFF's."""
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


class FolderSource(SectionSource):
    """Sections of an image folder: one file each."""

    def __init__(self, folder: Path, files: list[str], shape, dtype):
        self.files, self.shape, self.dtype = files, shape, dtype
        self.where = f"'{folder}'"

    @classmethod
    def open(cls, folder: Path):
        """``(source, spacing_xyz)`` of a folder; reads its first section only."""
        files = _section_files(folder)
        first, spacing = _read_section_file(files[0])
        zyx = check_shape((len(files),) + first.shape, f"'{folder}'")
        # absolute paths: a Dask worker may run in another working directory
        return (cls(folder, [os.path.abspath(f) for f in files], zyx, first.dtype),
                spacing or (1.0, 1.0, 1.0))

    def read(self, k):
        img, _ = _read_section_file(Path(self.files[k]))
        if img.shape != self.shape[1:] or img.dtype != self.dtype:
            raise StackError(f"'{self.files[k]}': section {k} has shape {tuple(img.shape)} and "
                             f"dtype {img.dtype}, but the first section "
                             f"'{Path(self.files[0]).name}' has shape {self.shape[1:]} and "
                             f"dtype {self.dtype}; all sections of a folder must have one "
                             f"shape and dtype")
        return img

    def read_region(self, k, ys, xs):
        """A TIFF section reads the region only (:meth:`TiffSource.read_region`); other
        formats are read whole."""
        from .tiff import TiffSource

        file = Path(self.files[k])
        if file.suffix.lower() not in TIFF_SUFFIXES:
            return self.read(k)[ys, xs]
        if self._handle is None or self._handle[0] != k:  # the last file's source, kept
            src, _ = TiffSource.open(file)
            if src.shape[1:] != self.shape[1:] or np.dtype(src.dtype) != np.dtype(self.dtype):
                return self.read(k)[ys, xs]  # read() names what differs
            self._handle = (k, src)
        return self._handle[1].read_region(0, ys, xs)


def write_folder(folder: Path, arr: np.ndarray, spacing, *, overwrite: bool) -> None:
    """Write ``arr`` (Z, H, W) as ``folder/section_0000.tif``, ..., atomically."""
    state = existing(folder)
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
            write_tiff(tmp / f"section_{k:0{width}d}.tif", arr[k], spacing)
