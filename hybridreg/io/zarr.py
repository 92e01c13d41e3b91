"""zarr and OME-Zarr stacks: ``store.zarr`` or ``store.zarr:/group/array``.

Reading
    An OME-Zarr image (NGFF v0.4, or v0.5 where the metadata sit under ``ome``) is read
    from its level-0 array (the first of ``multiscales[0].datasets``), with the spacing from
    that level's ``scale`` (times any ``coordinateTransformations`` of the multiscale) and
    the unit of its x axis; axes must end in ``y, x`` with ``z`` before them, and ``t``/``c``
    axes of length 1 are dropped. A plain zarr array carries its spacing in a
    ``spacing_xyz`` attribute. A store that a section-by-section write left incomplete is
    refused (see :mod:`hybridreg.io.resume`).
Writing
    A bare ``store.zarr`` is written as an OME-Zarr image (NGFF v0.4: zarr format 2,
    level-0 array ``0``, chunks of one section along z and at most 1024 x 1024 in y, x,
    ``/`` chunk keys, ``multiscales`` with axes ``z, y, x`` of type ``space``, their
    ``unit`` where known, and a ``scale`` of ``(z, y, x)`` spacing); such a store can also be
    written one section at a time, resumably (:func:`hybridreg.io.open_section_writer`).
    ``store.zarr:/group/array`` is written as a plain array, into an existing store if there
    is one.

zarr is imported on first use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_output, existing, remove
from .base import (SectionSource, StackError, as_spacing_xyz, check_shape, section_chunks,
                   spacing_from_attrs, split_spec)
from .resume import progress_dir

__all__ = ["is_ome_zarr_target"]

ZARR_SUFFIXES = (".zarr",)

_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def is_zarr(folder: Path) -> bool:
    """Whether ``folder`` holds zarr metadata (a zarr v2 or v3 array or group)."""
    return any((folder / m).exists() for m in _ZARR_MARKERS)


def is_ome_zarr_target(path) -> bool:
    """Whether ``path`` is written as an OME-Zarr image: a bare ``store.zarr`` (no ``:/``).

    Such targets can be written section by section with
    :func:`hybridreg.io.open_section_writer`.
    """
    file, inner = split_spec(path)
    return file.suffix.lower() in ZARR_SUFFIXES and inner is None


# --- reading ----------------------------------------------------------------------------------

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

    if progress_dir(file).exists():
        raise StackError(f"'{file}': incomplete: an interrupted run was writing it section by "
                         f"section (markers in '{progress_dir(file)}'); finish it with "
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
    return node, node_path, 0, spacing_from_attrs(dict(node.attrs), where), None, where


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
    spacing = as_spacing_xyz((scale["x"], scale["y"], scale.get("z", 1.0)),
                             f"{where} (OME-Zarr scale)")
    return arr, array_path, lead, spacing, units.get("x"), where


def read_zarr(file: Path, inner: str | None):
    """``(data, spacing_xyz, where, unit)`` of array ``inner`` of a store, or of its only
    array, or of its OME-Zarr level 0."""
    arr, _, lead, spacing, unit, where = _zarr_locate(file, inner)
    try:
        data = np.asarray(arr[(0,) * lead + (...,)])
    except Exception as exc:
        raise StackError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
    return data, spacing, where, unit


class ZarrSource(SectionSource):
    """Sections of a zarr array: ``array[k]`` (its own chunks only)."""

    def __init__(self, file: Path, array_path, lead: int, shape, dtype, where, two_d):
        self.file, self.array_path, self.lead = os.path.abspath(file), array_path, lead
        self.shape, self.dtype, self.where, self.two_d = shape, dtype, where, two_d

    @classmethod
    def open(cls, file: Path, inner):
        """``(source, spacing_xyz, unit)`` of a zarr array, from its metadata only."""
        arr, array_path, lead, spacing, unit, where = _zarr_locate(file, inner)
        raw = tuple(arr.shape[lead:])
        src = cls(file, array_path, lead, check_shape(raw, where), arr.dtype, where,
                  len(raw) == 2)
        src._handle = arr
        return src, spacing, unit

    def read(self, k):
        if self._handle is None:
            self.read_handle()
        key = (0,) * self.lead + ((...,) if self.two_d else (k, ...))
        return np.asarray(self._handle[key])

    def read_region(self, k, ys, xs):
        """The chunks the region touches only."""
        if self._handle is None:
            self.read_handle()
        key = (0,) * self.lead + ((ys, xs) if self.two_d else (k, ys, xs))
        return np.asarray(self._handle[key])

    def read_handle(self):
        import zarr

        self._handle = zarr.open_array(store=self.file, path=self.array_path or "", mode="r")


# --- writing ----------------------------------------------------------------------------------

def _zarr_create(store: Path, arr: np.ndarray, spacing, *, zarr_format: int = 3) -> None:
    import zarr

    z = zarr.create_array(store=str(store), shape=arr.shape, dtype=arr.dtype,
                          chunks=section_chunks(arr.shape), zarr_format=zarr_format,
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


def ome_create(store: Path, shape, dtype, spacing, unit: str | None, name: str):
    """An OME-Zarr (NGFF v0.4) image at ``store``; returns its level-0 array."""
    import zarr

    group = zarr.open_group(str(store), mode="w", zarr_format=2,
                            attributes=_ome_attrs(spacing, unit, name))
    return group.create_array("0", shape=tuple(shape), dtype=dtype,
                              chunks=section_chunks(shape), fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "/"})


def ome_level0(store: Path):
    """The level-0 array of an OME-Zarr image made by :func:`ome_create`, open to write."""
    import zarr

    return zarr.open_array(store=str(store), path="0", mode="r+")


def write_zarr(store: Path, inner: str | None, arr: np.ndarray, spacing, *,
               overwrite: bool, unit: str | None = None) -> None:
    """Write ``arr`` (Z, H, W) as an OME-Zarr image (``inner`` None) or as array ``inner``
    of ``store``, atomically; other members of an existing store are kept."""
    import zarr

    if inner is None or not os.path.exists(store):
        if existing(store) == "dir" and overwrite and not is_zarr(store):
            raise StackError(f"'{store}' exists and is not a zarr store; refusing to replace it")
        with atomic_output(store, overwrite=overwrite) as tmp:
            if inner is None:
                ome_create(tmp, arr.shape, arr.dtype, spacing, unit, store.stem)[...] = arr
            else:
                group = zarr.open_group(str(tmp), mode="w")
                z = group.create_array(name=inner, shape=arr.shape, dtype=arr.dtype,
                                       chunks=section_chunks(arr.shape),
                                       attributes={"spacing_xyz": [float(s) for s in spacing]})
                z[...] = arr
        if inner is None:
            remove(progress_dir(store))  # a complete store replaced one left incomplete
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
