"""Multi-page TIFF stacks: ``stack.tif`` / ``stack.tiff``, one page per section.

Written as an ImageJ hyperstack: the x/y spacing is stored as ``1 / XResolution`` and
``1 / YResolution``, the z spacing as the ImageJ ``spacing`` entry, which is how Fiji reads
them. On reading, resolution tags are trusted in ImageJ files and in files whose
``ResolutionUnit`` is NONE; the dots-per-inch defaults that other software writes are
ignored. tifffile is imported on first use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .base import SectionSource, StackError, check_shape

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")

_COLOUR_PHOTOMETRIC = ("RGB", "PALETTE", "YCBCR", "SEPARATED", "CIELAB", "ICCLAB", "ITULAB")


def _ome_spacing(tif) -> tuple[float, float, float] | None:
    """PhysicalSizeX/Y/Z of an OME-TIFF's first image (1.0 where absent), or None."""
    import tifffile

    try:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
        return tuple(float(pixels.get(f"PhysicalSize{a}", 1.0)) for a in "XYZ")
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _tiff_spacing(tif, page) -> tuple[float, float, float]:
    if tif.is_ome:
        ome = _ome_spacing(tif)
        if ome is not None:
            return ome
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


def read_tiff(file: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The raw data of a TIFF's one image series and its spacing ``(x, y, z)``."""
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


class TiffSource(SectionSource):
    """Sections of a TIFF: one page each (the whole series when pages are not sections)."""

    def __init__(self, file: Path, shape, dtype, per_page: bool):
        self.file, self.shape, self.dtype = os.path.abspath(file), shape, dtype
        self.where, self.per_page = f"'{file}'", per_page

    @classmethod
    def open(cls, file: Path):
        """``(source, spacing_xyz)`` of a TIFF file, from its metadata only."""
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
        zyx = check_shape(shape, f"'{file}'")
        return cls(file, zyx, dtype, per_page=n_pages == zyx[0]), spacing

    def read(self, k):
        import tifffile

        if self._handle is None:
            self._handle = tifffile.TiffFile(self.file)
        if self.per_page:
            return self._handle.asarray(key=k, series=0)
        log.debug("%s: pages are not one per section; reading the whole series", self.file)
        return self._handle.series[0].asarray().reshape(self.shape)[k]


def write_tiff(path: Path, arr: np.ndarray, spacing, *, ome: bool = False) -> None:
    """Write ``arr`` ((Z,) H, W) as an ImageJ TIFF with spacing ``(x, y, z)``, in place;
    with ``ome`` an OME-TIFF (OME-XML ``PhysicalSizeX/Y/Z``; what ``.ome.tif`` paths get).

    ``arr`` may be a lazy stack (``shape``, ``dtype``, ``arr[k]``, e.g. an aligned stack
    computed on demand): its sections are then computed and written one page at a time.
    """
    import tifffile

    sx, sy, sz = spacing
    axes = "ZYX" if len(arr.shape) == 3 else "YX"
    if ome:  # OME-TIFF: OME-XML with the physical sizes; BigTIFF past 4 GB
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
        data = arr if isinstance(arr, np.ndarray) else (
            np.asarray(arr[k], dtype) for k in range(shape[0]))
        tifffile.imwrite(path, data=data, shape=shape, dtype=dtype, ome=True,
                         bigtiff=int(np.prod(shape)) * dtype.itemsize > 2 ** 32 - 2 ** 25,
                         metadata={"axes": axes, "PhysicalSizeX": sx, "PhysicalSizeY": sy,
                                   "PhysicalSizeZ": sz})
        return
    kw = dict(resolution=(1.0 / sx, 1.0 / sy), metadata={"spacing": sz, "axes": axes})
    if isinstance(arr, np.ndarray):
        tifffile.imwrite(path, arr, imagej=True, **kw)
        return
    shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
    big = int(np.prod(shape)) * dtype.itemsize > 2 ** 32 - 2 ** 25
    pages = (np.asarray(arr[k], dtype) for k in range(shape[0]))
    # ImageJ's format ends at 4 GB: larger stacks are BigTIFF (one page per section)
    tifffile.imwrite(path, data=pages, shape=shape, dtype=dtype, imagej=not big,
                     bigtiff=big, **kw)
