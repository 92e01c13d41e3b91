"""The stack type, its validation, path specs and the lazy section interface.

Shared by every format module of :mod:`hybridreg.io`: :class:`Stack` and
:class:`StackError`; the checks of shape, dtype, values and spacing that every reader and
writer applies; ``file.h5:/dataset`` path specs; and :class:`LazySections`, a stack on disk
read one section at a time from a :class:`SectionSource` (one per format).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Stack", "StackError", "SectionSequence", "LazySections", "SectionSource",
           "SectionPlane", "cast_to_dtype", "section_of", "WHOLE_SECTION_BYTES"]

#: Sections of a lazy stack larger than this are never held whole: registration, rendering
#: and writing read and write the regions they work on (:class:`SectionPlane`).
WHOLE_SECTION_BYTES = 64 << 20

_CONTAINER_RE = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|zarr))(?::(?P<inner>.*))?$",
                           re.IGNORECASE)


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
        object.__setattr__(self, "spacing_xyz", as_spacing_xyz(self.spacing_xyz, "Stack"))

    def __repr__(self) -> str:
        lazy = ", lazy" if isinstance(self.data, LazySections) else ""
        return (f"Stack(shape_zyx={tuple(self.data.shape)}, dtype={self.data.dtype}, "
                f"spacing_xyz={self.spacing_xyz}, path={self.path!r}{lazy})")


# --- validation -------------------------------------------------------------------------------

def natural_key(name: str):
    """Sort key that orders embedded numbers by value: ``s2 < s10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def as_spacing_xyz(value, where: str) -> tuple[float, float, float]:
    """A spacing ``(x, y, z)`` of three positive finite floats, or a StackError naming
    ``where``."""
    try:
        sp = tuple(float(v) for v in np.asarray(value, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        raise StackError(f"{where}: spacing_xyz must be three numbers (x, y, z), got "
                         f"{value!r}") from None
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise StackError(f"{where}: spacing_xyz must be three positive finite numbers "
                         f"(x, y, z), got {value!r}")
    return sp


def spacing_from_attrs(attrs, where: str) -> tuple[float, float, float]:
    """The spacing of an HDF5 dataset or zarr array from its attributes: ``spacing_xyz``
    (x, y, z), ilastik's ``element_size_um`` (z, y, x), or ``(1.0, 1.0, 1.0)``."""
    if "spacing_xyz" in attrs:
        sp = [float(v) for v in np.ravel(attrs["spacing_xyz"])]
        if len(sp) == 2:
            sp.append(1.0)
        return as_spacing_xyz(sp, f"{where} (attribute spacing_xyz)")
    if "element_size_um" in attrs:
        zyx = [float(v) for v in np.ravel(attrs["element_size_um"])]
        if len(zyx) == 2:
            zyx.insert(0, 1.0)
        return as_spacing_xyz(zyx[::-1], f"{where} (attribute element_size_um, z y x)")
    return (1.0, 1.0, 1.0)


def canonical_dtype(dtype, where: str) -> np.dtype:
    """uint8, uint16 or float32 for a supported ``dtype`` (float64 gives float32)."""
    dt = np.dtype(dtype)
    if dt.kind == "u" and dt.itemsize in (1, 2):
        return np.dtype(np.uint8 if dt.itemsize == 1 else np.uint16)
    if dt.kind == "f" and dt.itemsize in (4, 8):
        return np.dtype(np.float32)
    raise StackError(f"{where}: unsupported dtype {dt.name}; expected uint8, uint16 or "
                     f"float32 (float64 is converted to float32)")


def check_shape(shape, where: str) -> tuple[int, int, int]:
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


def validate_stack(data, where: str, names: list[str] | None = None) -> np.ndarray:
    """Check a stack and return it as a contiguous ``(Z, H, W)`` array of a supported dtype.

    ``names`` (one per section) are added to messages about single sections.
    """
    arr = np.asarray(data)
    check_shape(arr.shape, where)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    dt = canonical_dtype(arr.dtype, where)
    if arr.dtype != dt:
        arr = arr.astype(dt)
    if dt.kind == "f":
        for k in range(arr.shape[0]):
            if not np.isfinite(arr[k]).all():
                what = f" ('{names[k]}')" if names else ""
                raise StackError(f"{where}: contains NaN or infinite values, first in section "
                                 f"{k}{what}")
    return np.ascontiguousarray(arr)


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


def section_chunks(shape) -> tuple[int, int, int]:
    """On-disk chunks of a ``(Z, H, W)`` HDF5 dataset or zarr array: one section along z, at
    most 1024 x 1024 in y, x."""
    return (1, min(shape[1], 1024), min(shape[2], 1024))


# --- path specs -------------------------------------------------------------------------------

def split_spec(spec) -> tuple[Path, str | None]:
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


# --- lazy stacks ------------------------------------------------------------------------------

class SectionSource:
    """Reads one raw section ``k`` of a file; picklable (path only, handles reopened).

    One subclass per format. ``shape`` is ``(Z, H, W)``, ``dtype`` the file's, ``where``
    names the file in messages; :meth:`read` opens ``_handle`` on first use.
    """

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

    def read_region(self, k: int, ys: slice, xs: slice) -> np.ndarray:
        """Rows ``ys`` and columns ``xs`` (slices with step 1, inside the section) of
        section ``k``. This default reads the whole section; formats that can read less
        (chunks, tiles, strips, byte ranges) override it."""
        return np.asarray(self.read(k))[ys, xs]


class SectionSequence:
    """Indexing, iteration and ``numpy.asarray`` for stacks that produce a section when
    indexed.

    Subclasses define ``shape``, ``dtype`` and ``section(k)``: ``seq[k]`` is ``section(k)``,
    a slice, an index array or a tuple index computes the sections it selects (and indexes
    into each with the rest of the tuple).
    """

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

    def __iter__(self):
        for k in range(self.shape[0]):
            yield self.section(k)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _region_key(key, shape) -> tuple[slice, slice, tuple]:
    """``(ys, xs, rest)`` of a 2-D index: slices with step 1 inside ``shape`` (an integer is
    a one-long slice, dropped again through ``rest``), and what is left to apply."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (2 - len(key))
    if len(key) != 2:
        raise IndexError(f"a section is 2-D: too many indices {key!r}")
    out, post = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            if not -n <= k < n:
                raise IndexError(f"index {k} out of range for a section axis of {n}")
            k = int(k) % n
            out.append(slice(k, k + 1))
            post.append(0)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step == 1:
                out.append(slice(start, max(start, stop)))
                post.append(slice(None))
            else:  # read the span of the indices, then step through it
                idx = range(start, stop, step)
                if not idx:
                    out.append(slice(0, 0))
                    post.append(slice(None))
                    continue
                lo, hi = min(idx), max(idx) + 1
                out.append(slice(lo, hi))
                post.append(slice(start - lo, None if stop - lo < 0 else stop - lo, step))
        else:
            raise IndexError(f"a section is read with integers and slices, got {k!r}")
    return out[0], out[1], tuple(post)


class SectionPlane:
    """One section of a lazy stack that reads only what is indexed (``plane[y0:y1, x0:x1]``).

    2-D and array-like (``shape``, ``dtype``, ``ndim``, slicing, ``numpy.asarray``): what
    :class:`hybridreg.tiling.TiledMethod`, :func:`hybridreg.warp.render` and the writers take
    for sections too large to read whole, so that memory stays that of a tile at any section
    size. Made by :meth:`LazySections.plane`; picklable when its reader is.
    """

    ndim = 2

    def __init__(self, read_region, shape, dtype, where: str = "section"):
        self._read = read_region
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.where = where

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        ys, xs, post = _region_key(key, self.shape)
        if ys.stop <= ys.start or xs.stop <= xs.start:
            out = np.empty((ys.stop - ys.start, xs.stop - xs.start), self.dtype)
        else:
            out = np.asarray(self._read(ys, xs))
        return out[post]

    def astype(self, dtype, copy: bool = True):
        return np.asarray(self[:, :]).astype(dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"SectionPlane({self.where}, shape={self.shape}, dtype={self.dtype})"


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

    def __init__(self, source: SectionSource):
        self._source = source
        self.shape = tuple(int(n) for n in source.shape)
        self.dtype = canonical_dtype(source.dtype, source.where)
        self.where = source.where
        self.reads = 0

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def section(self, k: int) -> np.ndarray:
        """Read section ``k``: ndarray (H, W) of ``self.dtype``."""
        k = self._index(k)
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
        return self._checked(arr, k)

    def _checked(self, arr: np.ndarray, k: int) -> np.ndarray:
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if self.dtype.kind == "f" and not np.isfinite(arr).all():
            raise StackError(f"{self.where}: contains NaN or infinite values in section {k}")
        return arr

    def _index(self, k) -> int:
        z = self.shape[0]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -z <= k < z:
            raise IndexError(f"{self.where}: section index {k!r} out of range for {z} "
                             f"sections")
        return int(k) % z

    def region(self, k: int, ys: slice, xs: slice) -> np.ndarray:
        """Rows ``ys``, columns ``xs`` (slices, step 1) of section ``k``, reading no more of
        the file than the format needs (a zarr or HDF5 chunk, a TIFF tile or strip, the
        rows' bytes of an uncompressed TIFF); checked like :meth:`section`."""
        k = self._index(k)
        try:
            arr = np.asarray(self._source.read_region(k, ys, xs))
        except StackError:
            raise
        except Exception as exc:
            raise StackError(f"cannot read section {k} of {self.where} (rows {ys.start}:"
                             f"{ys.stop}, columns {xs.start}:{xs.stop}): "
                             f"{type(exc).__name__}: {exc}") from exc
        expected = (ys.stop - ys.start, xs.stop - xs.start)
        if arr.shape != expected:
            raise StackError(f"{self.where}: region of section {k} read as {arr.shape}, "
                             f"expected {expected}")
        return self._checked(arr, k)

    def plane(self, k: int) -> SectionPlane:
        """Section ``k`` as a :class:`SectionPlane`: read region by region when indexed."""
        k = self._index(k)
        return SectionPlane(_PlaneReader(self, k), self.shape[1:], self.dtype,
                            f"section {k} of {self.where}")

    def __repr__(self) -> str:
        return (f"LazySections({self.where}, shape_zyx={self.shape}, dtype={self.dtype}, "
                f"{self.reads} section reads)")


class _PlaneReader:
    """``read_region(ys, xs)`` of one section of a :class:`LazySections` (picklable)."""

    def __init__(self, sections: LazySections, k: int):
        self.sections, self.k = sections, k

    def __call__(self, ys: slice, xs: slice) -> np.ndarray:
        return self.sections.region(self.k, ys, xs)


def is_array_like(obj) -> bool:
    """An array-like that is not an ndarray, read on demand when indexed: a lazy stack
    (:class:`LazySections`, a zarr array) or a section read region by region
    (:class:`SectionPlane`)."""
    return (not isinstance(obj, np.ndarray) and hasattr(obj, "shape")
            and hasattr(obj, "__getitem__"))


def section_of(stack, k: int, *, itemsize: int | None = None):
    """Section ``k`` of a stack as what the pipeline works on: an ndarray, or, for a stack
    that has ``plane(k)`` and sections over :data:`WHOLE_SECTION_BYTES` (at ``itemsize``
    bytes a pixel, default the stack's), a :class:`SectionPlane` read region by region."""
    if hasattr(stack, "plane"):
        h, w = (int(n) for n in stack.shape[-2:])
        size = np.dtype(stack.dtype).itemsize if itemsize is None else int(itemsize)
        if h * w * size > WHOLE_SECTION_BYTES:
            return stack.plane(k)
    return np.asarray(stack[k])


def strips(section, strip_px: int = 1 << 22):
    """A section (ndarray, or a plane read by region) a strip of rows at a time, about
    ``strip_px`` pixels each, as ndarrays: any section size."""
    h, w = section.shape
    step = max(1, strip_px // max(1, w))
    for y in range(0, h, step):
        yield np.asarray(section[y:y + step, :])
