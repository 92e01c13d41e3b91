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

from . import base
from .base import SectionSource, StackError, check_shape, section_of

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
    _check_complete(tif, file, s)
    return shape, s.dtype, _tiff_spacing(tif, page)


def _announced_sections(tif):
    """``(header, number of 2-D images)`` that a TIFF's first page says the file holds:
    ImageJ's ``images=``, tifffile's JSON ``shape``, OME-XML's SizeZ x SizeC x SizeT. Read
    from the description itself: tifffile drops these flags when the file is damaged."""
    import json

    import tifffile

    out = []
    try:
        text = tif.pages.first.description or ""
        if text.startswith("ImageJ="):
            for line in text.splitlines():
                if line.startswith("images="):
                    out.append(("ImageJ header", int(line[7:])))
        elif text.lstrip().startswith("{"):
            shape = json.loads(text).get("shape", [])
            if len(shape) > 2:
                out.append(("tifffile shape", int(np.prod(shape[:-2]))))
        elif "<OME" in text:
            image = tifffile.xml2dict(text)["OME"]["Image"]
            for im in image if isinstance(image, list) else [image]:
                px = im["Pixels"]
                out.append(("OME-XML", int(px.get("SizeZ", 1)) * int(px.get("SizeC", 1))
                            * int(px.get("SizeT", 1))))
                break
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        pass
    return out


class _TiffErrors(logging.Handler):
    """Collects what tifffile logs as errors while a file is opened (it logs, and goes on
    with what it could read, when a page offset points past the end of the file)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tifffile").removeHandler(self)
        return False

    def check(self, file: Path) -> None:
        bad = [m for m in self.messages if "invalid page offset" in m or "corrupt" in m]
        if bad:
            raise StackError(f"'{file}': truncated or damaged (an interrupted copy or "
                             f"write?): {bad[0].split('>')[-1].strip()}; copy or write it "
                             f"again; hybridreg reads a stack only when all of it can be "
                             f"read")


def _check_complete(tif, file: Path, series) -> None:
    """Raise StackError for a TIFF cut short: fewer sections than its ImageJ header
    announces, or image data past the end of the file (a copy that did not finish)."""
    size = tif.filehandle.size
    planes = int(np.prod(series.shape[:-2])) if len(series.shape) > 2 else 1
    what = ("truncated or damaged (an interrupted copy or write?): copy or write it again; "
            "hybridreg reads a stack only when all of it can be read")
    for header, announced in _announced_sections(tif):
        if announced > planes:
            raise StackError(f"'{file}': {what}: its {header} announces {announced} "
                             f"sections, only {planes} can be read")
    if series.dataoffset is not None:
        end = int(series.dataoffset) + int(series.nbytes)
        if end > size:
            raise StackError(f"'{file}': {what}: the {planes} section(s) need {end} bytes, "
                             f"the file has {size} (the last {end - size} are missing)")
        return
    for k, page in enumerate(series.pages):
        if page is None:
            continue
        ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise StackError(f"'{file}': {what}: the image data of section {k} ends at byte "
                             f"{max(ends)}, the file has {size}")


def read_tiff(file: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The raw data of a TIFF's one image series and its spacing ``(x, y, z)``."""
    import tifffile

    try:
        with _TiffErrors() as errors, tifffile.TiffFile(file) as tif:
            _, _, spacing = _tiff_info(tif, file)
            errors.check(file)
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
            with _TiffErrors() as errors, tifffile.TiffFile(file) as tif:
                shape, dtype, spacing = _tiff_info(tif, file)
                errors.check(file)
                n_pages = len(tif.series[0].pages)
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read '{file}': not a readable TIFF file (corrupt or "
                             f"truncated?): {type(exc).__name__}: {exc}") from exc
        zyx = check_shape(shape, f"'{file}'")
        return cls(file, zyx, dtype, per_page=n_pages == zyx[0]), spacing

    _layout = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout", None)
        return state

    def _tif(self):
        import tifffile

        if self._handle is None:
            self._handle = tifffile.TiffFile(self.file)
        return self._handle

    def read(self, k):
        if self.per_page:
            return self._tif().asarray(key=k, series=0)
        log.debug("%s: pages are not one per section; reading the whole series", self.file)
        return self._tif().series[0].asarray().reshape(self.shape)[k]

    def read_region(self, k, ys, xs):
        """Only the bytes of the region: row by row from an uncompressed, contiguous file
        (ImageJ's and tifffile's layout, what hybridreg writes); else the tiles or strips
        the region touches (tifffile's zarr store); the whole page only when the file's one
        strip per page is compressed."""
        if self._layout is None:
            self._layout = self._find_layout()
        kind, how = self._layout
        if kind == "raw":
            offset, dtype = how
            return _pread_region(self._tif().filehandle, offset, k, self.shape[1:], dtype,
                                 ys, xs)
        if kind == "zarr":
            return np.asarray(how[(k, ys, xs) if len(how.shape) == 3 else (ys, xs)])
        return np.asarray(self.read(k))[ys, xs]

    def _find_layout(self):
        tif = self._tif()
        series = tif.series[0]
        z, h, w = self.shape
        if int(np.prod(series.shape)) != z * h * w:
            return "whole", None
        dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        if series.dataoffset is not None and tif.filehandle.is_file:
            return "raw", (int(series.dataoffset), dtype)
        if self.per_page and len(series.shape) in (2, 3):
            import zarr

            store = series.aszarr()
            return "zarr", zarr.open_array(store=store, mode="r")
        return "whole", None


def _pread_region(fh, offset: int, k: int, shape_hw, dtype: np.dtype, ys: slice, xs: slice
                  ) -> np.ndarray:
    """Rows ``ys``, columns ``xs`` of section ``k`` of uncompressed sections stored one
    after another from ``offset``: one read per row (one in all for whole rows)."""
    h, w = shape_hw
    size = dtype.itemsize
    ny, nx = ys.stop - ys.start, xs.stop - xs.start
    start = offset + (k * h * w + ys.start * w + xs.start) * size

    def read(at: int, n: int) -> bytes:
        fh.seek(at)
        data = fh.read(n)
        if len(data) < n:
            raise StackError(f"'{fh.path}': ends at byte {at + len(data)}, before the end of "
                             f"section {k}'s rows {ys.start}:{ys.stop} (the file was cut "
                             f"short after it was opened?)")
        return data

    if nx == w:
        out = np.frombuffer(read(start, ny * w * size), dtype).reshape(ny, w)
    else:
        out = np.empty((ny, nx), dtype)
        for r in range(ny):
            out[r] = np.frombuffer(read(start + r * w * size, nx * size), dtype)
    return out.astype(dtype.newbyteorder("="), copy=False)


def write_tiff(path: Path, arr: np.ndarray, spacing, *, ome: bool = False) -> None:
    """Write ``arr`` ((Z,) H, W) as an ImageJ TIFF with spacing ``(x, y, z)``, in place;
    with ``ome`` an OME-TIFF (OME-XML ``PhysicalSizeX/Y/Z``; what ``.ome.tif`` paths get).

    ``arr`` may be a lazy stack (``shape``, ``dtype``, ``arr[k]``, e.g. an aligned stack
    computed on demand): its sections are then computed and written one page at a time;
    sections over :data:`hybridreg.io.WHOLE_SECTION_BYTES` one band of tiles at a time, as
    a tiled BigTIFF OME-TIFF.
    """
    import tifffile

    sx, sy, sz = spacing
    axes = "ZYX" if len(arr.shape) == 3 else "YX"
    if (not isinstance(arr, np.ndarray) and len(arr.shape) == 3
            and arr.shape[1] * arr.shape[2] * np.dtype(arr.dtype).itemsize
            > base.WHOLE_SECTION_BYTES):
        _write_tiled(tifffile, path, arr, (sx, sy, sz))
        return
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


#: Tile side of the TIFF pages written for sections over
#: :data:`hybridreg.io.WHOLE_SECTION_BYTES`.
TIFF_TILE_PX = 512


def _write_tiled(tifffile, path, arr, spacing) -> None:
    """A lazy stack of large sections as a tiled BigTIFF OME-TIFF (ImageJ's TIFF holds no
    tiles; OME-XML carries the spacing), computed one band of tile rows at a time."""
    z, h, w = (int(n) for n in arr.shape)
    dtype = np.dtype(arr.dtype)
    t = TIFF_TILE_PX

    def tiles():
        for k in range(z):
            section = section_of(arr, k)
            for y0 in range(0, h, t):
                band = np.asarray(section[y0:min(h, y0 + t), :], dtype)
                for x0 in range(0, w, t):
                    yield band[:, x0:x0 + t]

    sx, sy, sz = spacing
    log.info("%s: sections of %dx%d written as tiled OME-TIFF pages (%d px tiles)", path, h,
             w, t)
    tifffile.imwrite(path, data=tiles(), shape=(z, h, w), dtype=dtype, tile=(t, t),
                     ome=True, bigtiff=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": sx, "PhysicalSizeY": sy,
                               "PhysicalSizeZ": sz})
