"""Serial alignment of a whole stack with any registration method.

Two modes:

``mode="joint"`` (default)
    Every section is registered to its ``neighbours`` next sections, raw to raw; the pairs are
    independent of each other. All section fields are then found at once by
    :func:`hybridreg.joint.solve_joint`, which spreads the pairs' errors instead of chaining
    them, with a prior (weight ``prior``) that each section's own distortion is small. The
    aligned stack is on average where the raw sections were, or, with ``anchor=k``, where
    section k is.
``mode="sequential"``
    Section 0 stays; section k (raw) is registered to the already-aligned section k-1 (and,
    with ``window > 1``, the ``window - 1`` aligned sections before it, as references). The
    field found maps the common grid straight to raw section k. This is the classic way and
    the one FAEMReg uses; it accumulates every pair's error along the stack (drift).
    ``drift_window=n`` then removes the drift: every field minus the mean of the fields of the
    ``n`` sections centred on it (:func:`drift_corrected`).

Parallel: in joint mode the pairs are independent tasks; with a ``dask.distributed`` client
(``client=``) they run on its workers, each worker process loading itk's elastix wrapping
(or the network) once, and their results are collected, checkpointed and solved here. A task
whose worker dies is rescheduled by Dask. Registrations are deterministic for a given method
configuration (fix the method's thread count), so 1 or N workers give the same output.

Transforms: every pair's and every section's transform is a coarse map on the run's
:class:`hybridreg.fields.MapGrid` (nodes every ``stride`` px, 32 by default): a method's
dense field is projected on the nodes as soon as it is found (a
:class:`hybridreg.tiling.TiledMethod` builds the map tile by tile), the joint solve works on
the maps, and aligned sections are rendered from them chunk by chunk
(:func:`hybridreg.warp.render`).

Defects (``masks=``; :mod:`hybridreg.defects`): each pair's registration gets its two
sections' masks and its map trusts no node near their defects (filled from the trusted
nodes around); a section mostly masked is skipped, bridged by pairs across it and
interpolated along z. In the joint mode a section that a fold or a crack splits into parts
is solved with a lower prior (:data:`SPLIT_PRIOR`) and keeps its parts' offsets
(:func:`hybridreg.joint.part_offsets`); the sequential chain registers each section with
the aligned mask of the one before it. ``node_weights=True`` (joint) also weights each
pair's map per node by its local match (:func:`node_confidence`).

Resume: with a ``work_dir``, each pair's (or section's) map and table row are written there
atomically as soon as they are done; a later call with the same ``work_dir`` loads them
instead of registering again. Aligned sections are always computed from the stored float32
maps, so an interrupted and resumed run gives output identical to an uninterrupted one.

A registration that raises is not fatal: the pair is left out of the joint solve (sequential:
the section keeps the transform of the one before it) and flagged in the table.

Large stacks: ``stack`` may be a lazy array (``hybridreg.io.read_stack(path, lazy=True)``, or
any array-like with ``shape``, ``dtype`` and ``stack[k]``, e.g. a zarr array). Sections are
then read when a pair needs them (a few are cached), a Dask worker given a
:class:`hybridreg.io.LazySections` reads its own sections from the file, and the result's
``aligned`` is an :class:`AlignedSections` that warps a section when it is indexed;
:func:`save_alignment` writes it to an OME-Zarr store (or a TIFF) section by section. Memory
then holds the maps (``Z x 2 x H/S x W/S`` float32, which the joint solve needs at once), a
few sections in their own dtype and one tile's work, never the image volume. (A float stack
is read once up front to check for NaN, and once more to fingerprint it when there is a
``work_dir``.) Sections too large to register whole: wrap the method in
:class:`hybridreg.tiling.TiledMethod` (``hybridreg align`` does so by itself when they do not
fit its memory limit).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fields import DEFAULT_STRIDE, MapGrid, validate_field
from .io import SectionPlane, SectionSequence, is_array_like, section_of, strips
from .joint import check_anchor, check_prior, pair_list, solve_joint
from .methods.base import Method
from .outputs import save_alignment
from .warp import render, warp

log = logging.getLogger(__name__)

__all__ = ["StackAlignment", "AlignedSections", "DenseFields", "align_stack", "apply_fields",
           "save_alignment"]

#: pairs whose final weight in the joint solve falls below this are flagged
LOW_PAIR_WEIGHT = 0.2
#: sections with a side below this get a warning: too small for any method to register
#: reliably (the learned network's coarsest cell is 32 px, elastix's 4-level pyramid
#: reduces 64 px to 8)
MIN_USEFUL_PX = 64


@dataclass(frozen=True)
class StackAlignment:
    """Result of :func:`align_stack`.

    Attributes
    ----------
    aligned : ndarray or AlignedSections, shape (Z, H, W), float32
        An ndarray when the input stack was one; for a lazy input stack an
        :class:`AlignedSections`, which warps a section when it is indexed
        (``np.asarray(result.aligned)`` computes them all).
    maps : ndarray or MapStack, shape (Z, 2, h, w), float32
        Every section's transform, a coarse map on ``grid`` (:mod:`hybridreg.fields`):
        ``aligned[k] = render(stack[k], maps[k], grid)``. A :class:`MapStack` (on disk,
        read one map at a time) when a run's maps exceed :data:`MAPS_IN_MEMORY_BYTES`.
    grid : hybridreg.fields.MapGrid
        The maps' nodes (stride, spacing, origin) and the section grid.
    table : list of dict
        One row per section: ``section``, ``seconds`` (registration time of the pairs whose
        moving section it is), ``metric``, ``flagged``, ``warnings``, and in joint mode
        ``pairs`` (how many pairs touch it) and ``min_pair_weight``.
    pairs : list of dict
        Joint mode: one row per pair (``fixed``, ``moving``, ``metric``, ``seconds``,
        ``residual_px``, ``weight``, ``warnings``); empty in sequential mode.
    spacing_xy, origin_xy : (float, float)
    order : int
        Interpolation order the aligned sections were resampled with.
    """

    aligned: np.ndarray
    maps: np.ndarray
    table: list
    pairs: list
    spacing_xy: tuple[float, float]
    origin_xy: tuple[float, float]
    order: int = 1
    grid: MapGrid | None = None

    @property
    def fields(self) -> "DenseFields":
        """The dense pull fields ``(Z, 2, H, W)`` (physical units), computed from the maps
        when indexed (``np.asarray`` computes them all: ``Z * 8`` bytes a pixel):
        ``aligned[k] = warp(stack[k], fields[k])``."""
        return DenseFields(self.maps, self.grid)


#: A run's coarse maps (every pair's and every section's) above this many bytes in all are
#: kept on disk (:class:`MapStack`) and solved a few sections at a time: memory stays
#: bounded at any section size and number of sections.
MAPS_IN_MEMORY_BYTES = 512 << 20


#: Node rows per chunk of a :class:`MapStack` on disk (the joint solve reads blocks of
#: hundreds of rows; 16-row chunks cost 4x more per map in zarr's per-chunk overhead).
MAP_CHUNK_ROWS = 64


class MapStack(SectionSequence):
    """Coarse maps ``(N, 2, h, w)`` float32 in a zarr array on disk (a run's scratch).

    Array-like: ``maps[k]`` reads one map, ``maps[k] = m`` writes it, a tuple index
    (``maps[:, :, r0:r1]``) reads or writes a block of node rows of every map, and
    ``numpy.asarray`` reads them all. Picklable by path. Without a folder (or with
    ``temporary=True``) the array is removed with the object. ``dtype`` float64 is for the
    joint solve's scratch.
    """

    ndim = 4

    def __init__(self, shape, folder=None, name: str = "maps.zarr", *,
                 dtype=np.float32, temporary: bool = False):
        import tempfile
        import weakref

        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if folder is None:
            folder = tempfile.mkdtemp(prefix="hybridreg-maps-")
            weakref.finalize(self, _remove_tree, folder)
        self.path = str(Path(folder) / name)
        if temporary:
            weakref.finalize(self, _remove_tree, self.path)
        # chunks of MAP_CHUNK_ROWS node rows of one map: the joint solve reads blocks of
        # rows of a few maps at a time
        self._chunks = (1, self.shape[1], min(self.shape[2], MAP_CHUNK_ROWS), self.shape[3])
        self._array = self._open("w")

    def _open(self, mode):
        import zarr

        if mode == "w":
            # uncompressed: maps are noisy floats (zstd saves little) and are read and
            # written a few times a solve step; measured 4x faster per map at 513^2 nodes
            return zarr.create_array(self.path, shape=self.shape, dtype=self.dtype,
                                     chunks=self._chunks, fill_value=0.0, compressors=None,
                                     overwrite=True)
        return zarr.open_array(self.path, mode=mode)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = self._open("r+")

    def __len__(self) -> int:
        return self.shape[0]

    def section(self, k: int) -> np.ndarray:
        return np.asarray(self._array[int(k)])

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) > 1:
            return np.asarray(self._array[key])
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        self._array[key] = np.asarray(value, self.dtype)

    def __repr__(self) -> str:
        return f"MapStack({self.path}, shape={self.shape})"


class _PairMap:
    """One pair's map, row ``index`` of a :class:`MapStack`, read by slicing (what
    :func:`hybridreg.joint.solve_joint` reads a block of rows at a time); ``channel``: that
    channel alone (a pair's node weights, ``(h, w)``)."""

    def __init__(self, store: MapStack, index: int, channel: int | None = None):
        self.store, self.index, self.channel = store, index, channel
        self.shape = store.shape[1:] if channel is None else store.shape[2:]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        head = (self.index,) if self.channel is None else (self.index, self.channel)
        return self.store[head + key]


def _remove_tree(folder) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _map_storage(n: int, grid: MapGrid, *, others: int = 0, folder=None, name="maps.zarr",
                 channels: int = 2):
    """``n`` zero maps on ``grid``: an ndarray, or a :class:`MapStack` on disk (in
    ``folder``, else a temporary one) when they and ``others`` maps more would take over
    :data:`MAPS_IN_MEMORY_BYTES`. ``channels``: 1 for node weights."""
    shape = (int(n), channels) + grid.node_shape
    if (n * channels + others * 2) * int(np.prod(grid.node_shape)) * 4 <= MAPS_IN_MEMORY_BYTES:
        return np.zeros(shape, np.float32)
    log.info("%d coarse maps of %dx%d nodes (and %d more) kept on disk in %s", n,
             *grid.node_shape, others, folder or "a temporary folder")
    return MapStack(shape, folder, name)


class DenseFields(SectionSequence):
    """A stack's coarse maps seen as dense fields, upsampled one section at a time.

    Array-like of shape ``(Z, 2, H, W)``, float32: ``fields[k]`` is
    ``grid.dense(maps[k])``.
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, maps: np.ndarray, grid: MapGrid):
        self.maps, self.grid = maps, grid
        self.shape = (len(maps), 2) + grid.shape_yx

    def __len__(self) -> int:
        return self.shape[0]

    def section(self, k: int) -> np.ndarray:
        return self.grid.dense(self.maps[int(k)])


class AlignedSections(SectionSequence):
    """The aligned stack of a lazy input, warped one section at a time on demand.

    Array-like of shape ``(Z, H, W)``, dtype float32: ``aligned[k]`` is
    ``render(stack[k], maps[k], grid, order=order)`` (the same as
    ``warp(stack[k], fields[k], order=order)[0]`` with the dense field), computed chunk by
    chunk when asked for; slices and ``np.asarray`` compute the sections they select.

    Parameters
    ----------
    stack : array-like, shape (Z, H, W)
        The raw sections (read with ``stack[k]``).
    maps : ndarray, shape (Z, 2, h, w)
        Coarse maps on ``grid``, or dense fields ``(Z, 2, H, W)`` when ``grid`` is None.
    grid : hybridreg.fields.MapGrid, optional
        The maps' grid; default: dense fields on a grid of ``spacing_xy``.
    spacing_xy : (float, float)
        The section spacing (used when ``grid`` is None).
    order : int
        Interpolation order.
    dtype : numpy dtype, optional
        Output dtype (integers rounded and clipped); default float32.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, stack, maps: np.ndarray, grid: MapGrid | None = None, *,
                 spacing_xy=(1.0, 1.0), order: int = 1, dtype=None):
        self.stack, self.maps = stack, maps
        self.shape = tuple(int(n) for n in stack.shape)
        if grid is None:
            grid = MapGrid(self.shape[1:], stride=1, spacing_xy=spacing_xy)
        self.grid = grid
        self.spacing_xy, self.order = grid.spacing_xy, order
        if dtype is not None:
            self.dtype = np.dtype(dtype)
        if (len(maps) != self.shape[0] or tuple(maps.shape[1:]) != (2,) + grid.node_shape
                or grid.shape_yx != self.shape[1:]):
            raise ValueError(f"maps {tuple(maps.shape)} on {grid} do not match the stack "
                             f"{self.shape}")

    def __len__(self) -> int:
        return self.shape[0]

    def section(self, k: int) -> np.ndarray:
        """Aligned section ``k``: ndarray (H, W), float32."""
        return render(section_of(self.stack, int(k)), self.maps[int(k)], self.grid,
                      order=self.order, dtype=self.dtype)

    def plane(self, k: int) -> SectionPlane:
        """Aligned section ``k`` computed region by region when indexed (what the writers
        use for sections too large to hold: only the region's rows and columns are
        rendered, from the region of the raw section they need)."""
        k = range(self.shape[0])[k]
        return SectionPlane(_AlignedRegion(self, k), self.shape[1:], self.dtype,
                            f"aligned section {k}")


class _AlignedRegion:
    """``(ys, xs) -> region`` of one aligned section (picklable: a Dask worker's task)."""

    def __init__(self, aligned: AlignedSections, k: int):
        self.aligned, self.k = aligned, k

    def __call__(self, ys: slice, xs: slice) -> np.ndarray:
        a = self.aligned
        return render(section_of(a.stack, self.k), a.maps[self.k], a.grid, order=a.order,
                      dtype=a.dtype, rows=(ys.start, ys.stop), cols=(xs.start, xs.stop))



def _is_lazy(stack) -> bool:
    """A stack read on demand: an array-like that is not an ndarray (LazySections, zarr...)."""
    return is_array_like(stack) and hasattr(stack, "dtype")


class _SectionCache:
    """Sections of a stack read on demand, the last ``size`` kept: ndarrays in the stack's
    own dtype (a 16384^2 uint8 section is 268 MB, 1 GB as float32), or, for sections over
    :data:`hybridreg.io.WHOLE_SECTION_BYTES`, planes that read the regions asked for."""

    def __init__(self, stack, size: int):
        self.stack, self.size = stack, max(1, int(size))
        self._cache: dict = {}

    def __getitem__(self, k: int) -> np.ndarray:
        if k not in self._cache:
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = section_of(self.stack, k)
        return self._cache[k]


def apply_fields(stack: np.ndarray, fields: np.ndarray, *, spacing_xy=(1.0, 1.0),
                 order: int = 1, grid: MapGrid | None = None) -> np.ndarray:
    """Warp every section with its field: ``out[k] = warp(stack[k], fields[k])``.

    ``fields`` are dense ``(Z, 2, H, W)``, or coarse maps on ``grid``. ``order=0`` (nearest
    neighbour) keeps the dtype, for labels.
    """
    stack = np.asarray(stack)
    if grid is not None:
        if stack.ndim != 3 or grid.shape_yx != stack.shape[1:] or len(fields) != len(stack):
            raise ValueError(f"maps on {grid} do not match the stack {stack.shape}")
        return np.stack([render(stack[k], fields[k], grid, order=order)
                         for k in range(stack.shape[0])])
    fields = np.asarray(fields)
    if stack.ndim != 3 or fields.shape != (stack.shape[0], 2) + stack.shape[1:]:
        expected = (stack.shape[0], 2) + stack.shape[1:] if stack.ndim == 3 else "(Z, 2, H, W)"
        raise ValueError(f"fields {fields.shape} do not match the stack {stack.shape}: "
                         f"expected {expected}")
    return np.stack([warp(stack[k], fields[k], spacing_xy=spacing_xy, order=order)[0]
                     for k in range(stack.shape[0])])


# --- resume ----------------------------------------------------------------------------------

def _stack_bytes(stack):
    """The stack's bytes in memory order, a strip of rows at a time for a lazy stack (its
    large sections read region by region), never copied whole."""
    if isinstance(stack, np.ndarray):
        yield np.ascontiguousarray(stack)
        return
    for k in range(stack.shape[0]):
        for strip in strips(section_of(stack, k)):
            yield np.ascontiguousarray(strip)


def _fingerprint(stack, method: Method, settings: dict) -> dict:
    """What a run's checkpoints belong to: ``fingerprint`` (one digest of it all) and its
    parts, ``stack`` (a digest of the sections), ``method`` (the method's config) and
    ``settings``, so that a refused resume can say which part differs."""
    h, data = hashlib.sha256(), hashlib.sha256()
    head = str(tuple(stack.shape)).encode() + str(stack.dtype).encode()
    h.update(head)
    data.update(head)
    for chunk in _stack_bytes(stack):
        h.update(chunk)
        data.update(chunk)
    config = json.dumps(getattr(method, "config", method.name), sort_keys=True, default=str)
    h.update(config.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return {"fingerprint": h.hexdigest(), "stack": data.hexdigest(),
            "method": json.loads(config), "settings": json.loads(json.dumps(settings))}


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints' parts, in words (empty if it cannot tell)."""
    out = []
    if "stack" in saved and saved["stack"] != now["stack"]:
        out.append("the stack's sections differ")
    for part in ("method", "settings"):
        a, b = saved.get(part), now[part]
        if part not in saved or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{'method option' if part == 'method' else 'setting'}(s) "
                       f"{', '.join(keys)} differ")
        else:
            out.append(f"the {part} differs ({a!r} then, {b!r} now)")
    return out


class _WorkDir:
    """Checkpoints: ``<name>.mha`` (a coarse map) and ``<name>.json`` (its row), one per item."""

    def __init__(self, path, fingerprint: dict, grid: MapGrid):
        from . import io

        self.io = io
        self.path = Path(path)
        self.spacing_xy, self.origin_xy = grid.node_spacing_xy, grid.node_origin_xy
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("fingerprint") != fingerprint["fingerprint"]:
                what = _differences(saved, fingerprint)
                raise ValueError(
                    f"work folder {self.path} holds a run of another stack, method or setting"
                    f"{' (' + '; '.join(what) + ')' if what else ''}; use a fresh folder (or "
                    f"delete it) to start over")
        else:
            with io.atomic_output(manifest) as tmp:
                Path(tmp).write_text(json.dumps(fingerprint))

    def load(self, name: str):
        row_path = self.path / f"{name}.json"
        field_path = self.path / f"{name}.mha"
        if not (row_path.exists() and field_path.exists()):
            return None
        u, _, _ = self.io.read_field(field_path)
        row = json.loads(row_path.read_text())
        if row.pop("confidence", None):
            row["confidence"] = np.load(self.path / f"{name}.confidence.npy")
        return u, row

    def save(self, name: str, u: np.ndarray, row: dict) -> None:
        # the field and the node weights first, the row last: a row on disk means the item
        # is complete
        self.io.write_field(self.path / f"{name}.mha", u, spacing_xy=self.spacing_xy,
                            origin_xy=self.origin_xy, overwrite=True)
        row = dict(row)
        conf = row.pop("confidence", None)
        if conf is not None:
            with self.io.atomic_output(self.path / f"{name}.confidence.npy",
                                       overwrite=True) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.asarray(conf, np.float32))
            row["confidence"] = True
        with self.io.atomic_output(self.path / f"{name}.json", overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(row))


def _one_line(exc: Exception) -> str:
    """The most telling line of an error (elastix errors are whole logs)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return ln[len("Description:"):].strip()
    return lines[0] if lines else type(exc).__name__


def register_map(method: Method, fixed, moving, refs, grid: MapGrid, *, what: str = "pair",
                 masks=None):
    """Register a pair and give its transform as a coarse map on ``grid``.

    A method with ``register_map`` (:class:`hybridreg.tiling.TiledMethod`: large sections,
    tile by tile) makes the map itself, never holding a dense field of the section; any
    other registers the pair densely and the field is projected on the nodes.

    ``masks``: ``(fixed_mask, moving_mask)`` for a method that takes them
    (:func:`hybridreg.methods.base.takes_masks`); the map's nodes near a defect of either
    section are then filled from the trusted nodes around
    (:func:`hybridreg.defects.trusted_map`).

    Returns
    -------
    (ndarray (2, h, w), RegistrationResult)
        The map, and the method's result (``field`` may be the map itself).
    """
    kw = {} if masks is None else {"fixed_mask": masks[0], "moving_mask": masks[1]}
    if hasattr(method, "register_map"):
        res = method.register_map(fixed, moving, grid, references=refs, **kw)
        m = grid.validate(res.field, name=f"map of {what}")
    else:
        res = method.register(fixed, moving, references=refs, spacing_xy=grid.spacing_xy,
                              origin_xy=grid.origin_xy, **kw)
        m = grid.project(validate_field(res.field, name=f"field of {what}",
                                        shape_yx=grid.shape_yx))
    if masks is not None:
        from .defects import trusted_map

        m = trusted_map(m, masks[0], masks[1], grid)
    return m, res


def _register(method: Method, fixed, moving, refs, *, grid: MapGrid, what,
              pair_ncc: bool = True, keep_warped: bool = False, masks=None,
              node_weights: bool = False):
    """Run one registration; never raises: a failure comes back as (None, row).

    The transform comes back as a coarse map on ``grid`` (:func:`register_map`).
    ``pair_ncc``: measure the registered pair's NCC (the joint solve's similarity weights
    use it; the sequential chain does not, and skips its warp); ``node_weights``: and its
    node weights, ``row["confidence"]`` (:func:`node_confidence`). ``keep_warped``: put the
    method's own warped section in ``row["warped"]`` (dense maps only, ``grid.stride == 1``;
    a method with ``warped_order = n`` promises it is ``warp(moving, field, order=n)``).
    """
    t0 = time.perf_counter()
    warnings: list[str] = []
    metric = None
    u = None
    warped = None
    try:
        u, res = register_map(method, fixed, moving, refs, grid, what=what, masks=masks)
        metric = res.metric
        warped = res.warped if grid.stride == 1 else None
        warnings += list(res.warnings)
    except Exception as exc:  # one bad section must not end a long run
        from .elastix.run import ElastixConfigError  # (no itk: the wrapping loads lazily)

        if isinstance(exc, ElastixConfigError):
            raise  # but a parameter file elastix cannot run ends it: it fails every pair
        log.warning("%s: %s failed (%s: %s)", what, method.name, type(exc).__name__, exc)
        warnings.append(f"registration failed: {type(exc).__name__}: {_one_line(exc)}")
    seconds = round(time.perf_counter() - t0, 4)
    ncc, confidence = None, None
    if u is not None and pair_ncc:
        ncc, local = _pair_similarity(fixed, moving, u, grid, local=node_weights)
        confidence = node_confidence(local) if node_weights else None
    row = {"metric": None if metric is None else float(metric), "seconds": seconds,
           "ncc": ncc, "failed": u is None, "warnings": "; ".join(warnings),
           "confidence": confidence}
    if keep_warped:
        row["warped"] = warped  # None whenever u is: it is set after the field is valid
    return u, row


def _pair_masks(masks, i: int, j: int):
    """``(mask of section i, mask of section j)``: ndarrays, or planes read region by
    region for sections too large to hold (:func:`hybridreg.io.section_of`); None without
    masks."""
    if masks is None:
        return None
    return section_of(masks, i), section_of(masks, j)


def _register_sections(method: Method, stack, i: int, j: int, mask_stack=None, **kwargs):
    """:func:`_register` of sections ``i`` (fixed) and ``j`` (moving), read here (on a
    Dask worker: by the worker, from the file of a lazy stack), with their masks."""
    return _register(method, section_of(stack, i), section_of(stack, j), [],
                     masks=_pair_masks(mask_stack, i, j), **kwargs)


#: Sections larger than this many pixels have their pair NCC measured on a reduced copy.
NCC_MAX_PX = 1024 * 1024


def _pair_similarity(fixed, moving, m, grid: MapGrid, *, local: bool = True):
    """NCC of the fixed section and the registered moving one, on content both share, over
    the whole section and (``local``) around each node: ``(ncc or None, local or None)``,
    ``local`` of shape ``grid.node_shape`` (:func:`local_ncc`; NaN where a node sees too
    little content).

    Sections over :data:`NCC_MAX_PX` pixels are reduced by block means first (the NCC is
    only a pair's weight in the joint solve, relative to the stack's other pairs, which are
    measured alike), so that its memory stays bounded at any section size.
    """
    from .fields import resample
    from .methods.base import content_mask
    from .metrics import ncc
    from .tiling import downsample

    h, w = grid.shape_yx
    f = 1
    if h * w > NCC_MAX_PX:
        f = int(np.ceil(np.sqrt(h * w / NCC_MAX_PX)))
        fixed, moving = downsample(fixed, f), downsample(moving, f)
        sx, sy = grid.spacing_xy
        spacing = (sx * f, sy * f)
        origin = (grid.origin_xy[0] + (f - 1) / 2 * sx, grid.origin_xy[1] + (f - 1) / 2 * sy)
        u = resample(m, spacing_xy=grid.node_spacing_xy, origin_xy=grid.node_origin_xy,
                     to_shape_yx=fixed.shape, to_spacing_xy=spacing, to_origin_xy=origin)
        warped, valid = warp(moving, u, spacing_xy=spacing)
    else:  # the dense field once: the warp and where it samples inside the section
        fixed = np.asarray(fixed, np.float32)
        warped, valid = warp(moving, grid.dense(m), spacing_xy=grid.spacing_xy)
    mask = valid
    for section in (fixed, warped):
        cm = content_mask(section)
        if cm is not None:
            mask = mask & cm
    local = local_ncc(fixed, warped, mask, grid, factor=f) if local else None
    if mask.sum() < 16:
        return None, local
    value = ncc(fixed, warped, mask=mask)
    return (None if not np.isfinite(value) else round(float(value), 5)), local


#: :func:`local_ncc`'s window reaches at least this many (reduced) pixels from its node.
LOCAL_NCC_MIN_REACH_PX = 8


def local_ncc(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray, grid: MapGrid, *,
              factor: int = 1) -> np.ndarray:
    """NCC of ``fixed`` and ``warped`` around each node of ``grid``, over ``mask``.

    The window of a node is its support (the pixels within ``stride`` of it, which the map's
    interpolation reads from it), widened to :data:`LOCAL_NCC_MIN_REACH_PX` pixels where the
    images are reduced copies (``factor``: section pixels per image pixel). Sums over cells
    of ``stride / factor`` pixels, then over each node's cells: cost linear in the pixels.

    Returns
    -------
    ndarray, shape grid.node_shape, float32
        NaN where under a quarter of a node's window (inside the images) is usable, or
        where either image has no contrast there.
    """
    hi, wi = fixed.shape
    c = max(1, int(round(grid.stride / factor)))
    reach = max(1, -(-LOCAL_NCC_MIN_REACH_PX // c))  # cells each side of a node
    hc, wc = -(-hi // c), -(-wi // c)

    def cells(a):
        out = np.zeros((hc * c, wc * c))
        out[:hi, :wi] = a
        return out.reshape(hc, c, wc, c).sum(axis=(1, 3))

    mk = mask.astype(np.float64)
    a = np.where(mask, fixed, 0.0).astype(np.float64)
    b = np.where(mask, warped, 0.0).astype(np.float64)
    # and each cell's pixels inside the images (the last row and column of cells are cut)
    inside = np.outer(np.minimum(c, hi - c * np.arange(hc)),
                      np.minimum(c, wi - c * np.arange(wc)))
    sums = [cells(mk), cells(a), cells(b), cells(a * a), cells(b * b), cells(a * b),
            inside.astype(np.float64)]
    hn, wn = grid.node_shape
    # node n sits at cell position n * stride / (factor * c); its window: `reach` cells each
    # side, as an integral image over the cells
    def window(n_nodes, n_cells):
        at = np.rint(np.arange(n_nodes) * grid.stride / (factor * c)).astype(int)
        return np.clip(at - reach, 0, n_cells), np.clip(at + reach, 0, n_cells)

    (y0, y1), (x0, x1) = window(hn, hc), window(wn, wc)
    box = []
    for sm in sums:
        ii = np.zeros((hc + 1, wc + 1))
        ii[1:, 1:] = sm.cumsum(0).cumsum(1)
        box.append(ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0])
    n, sa, sb, saa, sbb, sab, area = box  # (area: the window's pixels inside the image)
    va = n * saa - sa * sa
    vb = n * sbb - sb * sb
    ok = (n >= 0.25 * area) & (va > 1e-6 * n * n) & (vb > 1e-6 * n * n)
    out = np.full((hn, wn), np.nan, np.float32)
    out[ok] = ((n * sab - sa * sb)[ok] / np.sqrt(va[ok] * vb[ok])).astype(np.float32)
    return out


#: The lowest node weight of :func:`node_confidence` (a node that matched nothing keeps
#: some weight: local NCC between neighbouring sections is noisy). Chosen on ISBI 2012's
#: test stack among 0.02-0.3 and a squared ramp (benchmarks/RESULTS.md, "Per-node weights
#: in the joint solve").
MIN_NODE_WEIGHT = 0.3


def node_confidence(local) -> np.ndarray | None:
    """A pair's node weights for the joint solve from how well it matched around each node
    (:func:`local_ncc`): ``MIN_NODE_WEIGHT + (1 - MIN_NODE_WEIGHT) * clip(local /
    reference, 0, 1)``, the reference the 75th percentile of the pair's own local NCC (a
    pair is compared with itself; the similarity weights compare pairs). Nodes without a
    local NCC (no usable content around them) get the lowest weight; None without any.

    A defect's nodes are not down-weighted here: their values are filled from the trusted
    nodes around (:func:`hybridreg.defects.trusted_map`), and down-weighting the filled
    nodes too raised the error (RESULTS.md)."""
    if local is None or np.isfinite(local).sum() < 4:
        return None
    ref = float(np.nanpercentile(local, 75))
    if ref <= 0:
        return None
    r = np.clip(np.nan_to_num(local, nan=0.0) / ref, 0.0, 1.0)
    return (MIN_NODE_WEIGHT + (1.0 - MIN_NODE_WEIGHT) * r).astype(np.float32)


def _similarity_weights(rows: dict) -> dict:
    """Confidence per pair from its NCC after registration, relative to comparable pairs.

    ``(ncc / reference)^2`` clipped to [0, 1]. The reference is the 75th percentile of the NCC
    of the pairs *at the same distance* (sections further apart are less alike, so a pair two
    sections apart is compared with other such pairs), and the 75th percentile rather than the
    median because one bad section touches up to 2 x neighbours pairs, which in a short stack
    is most of them. A pair that matched as well as is typical keeps weight 1; one that
    matched nothing (a blank or noise section) drops towards 0.
    """
    by_distance: dict = {}
    for (i, j), r in rows.items():
        if r.get("ncc") is not None:
            by_distance.setdefault(abs(j - i), []).append(r["ncc"])
    reference = {dist: float(np.percentile(v, 75)) for dist, v in by_distance.items()
                 if len(v) >= 2 and np.percentile(v, 75) > 0}
    if not reference:
        return {}
    weights = {}
    for (i, j), r in rows.items():
        dist = abs(j - i)
        # too few pairs at this distance (a short stack, a bad section): the nearest distance's
        ref = reference.get(dist) or reference[min(reference, key=lambda e: (abs(e - dist), e))]
        # no NCC at all: a section without any content to match (blank, saturated)
        weights[(i, j)] = (float(np.clip(r["ncc"] / ref, 0.0, 1.0)) ** 2
                           if r.get("ncc") is not None else 0.0)
    return weights


# --- alignment -------------------------------------------------------------------------------

def align_stack(stack: np.ndarray, method: Method, *, spacing_xy=(1.0, 1.0),
                origin_xy=(0.0, 0.0), mode: str = "joint", neighbours: int = 1,
                prior: float = 0.3, window: int = 1, drift_window: int = 0,
                anchor: int | None = None, work_dir=None, order: int = 1,
                progress: bool = False, client=None,
                stride: int = DEFAULT_STRIDE, masks=None, max_skip: int = 3,
                node_weights: bool = False) -> StackAlignment:
    """Align a stack section by section with ``method``.

    Parameters
    ----------
    stack : ndarray or array-like, shape (Z, H, W)
        An ndarray, or a lazy stack read one section at a time (see the module docstring):
        :class:`hybridreg.io.LazySections`, a :class:`hybridreg.io.Stack` (its ``data``),
        a zarr array.
    method : Method
        Any object with ``register(fixed, moving, references=..., spacing_xy=...,
        origin_xy=...)`` (see :mod:`hybridreg.methods`).
    spacing_xy, origin_xy : (float, float)
        The sections' grid; fields are in its physical units.
    mode : {"joint", "sequential"}
        See the module docstring.
    neighbours : int
        Joint mode: register each section to this many following sections.
    prior : float
        Joint mode: weight of the small-distortion prior (see :mod:`hybridreg.joint`).
    window : int
        Sequential mode: how many aligned sections the method sees (``window - 1`` older ones
        are passed as ``references``, oldest first).
    drift_window : int
        Sequential mode: 0 (default) for the classic chain; ``n > 1`` subtracts from every
        section's field the mean of the fields of the ``n`` sections centred on it (fewer at
        the ends) once the chain is done, a high-pass along z (see the module docstring).
    anchor : int, optional
        Joint mode: keep section ``anchor`` where it is (its field is the identity), e.g. a
        section known to be undistorted; the others are solved relative to it. Default: no
        anchor, the prior keeps the stack on average where the raw sections were. (The
        sequential mode always keeps section 0: ``None`` or ``0`` only.)
    work_dir : path, optional
        Checkpoint folder for resuming.
    order : int
        Interpolation order of the aligned sections (1 = linear).
    progress : bool
        Show a progress bar (tqdm) on stderr.
    client : dask.distributed.Client, optional
        Joint mode: run the pair registrations on this client's workers.
    stride : int
        Pixels between the nodes of the coarse maps that hold every transform (default
        :data:`hybridreg.fields.DEFAULT_STRIDE`; 1 keeps dense fields, ``Z * 8`` bytes a
        pixel in memory). See :mod:`hybridreg.fields`.
    masks : ndarray or array-like, shape (Z, H, W), optional
        Defect masks in elastix's convention (nonzero = tissue to use, zero = excluded),
        read a section at a time. Each pair's registration gets its two sections' masks
        (sequential mode: the fixed section's aligned mask, warped with its transform),
        and its map no trust near their defects (:func:`register_map`). A section whose
        mask keeps less than :data:`hybridreg.methods.base.MOSTLY_EXCLUDED` of it (a
        damaged or lost section, a fully masked one) is skipped: its neighbours register
        across it, its transform is interpolated along z between the nearest sections
        kept, and it is flagged.
    max_skip : int
        With ``masks``: at most this many skipped sections in a row are bridged by pairs
        across them (default 3); the parts of the stack either side of a longer gap are
        solved apart (each kept near its raw position by the prior; sequential mode: the
        chain starts again from the identity), with a warning.
    node_weights : bool
        Joint mode: weight each pair's map per node in the solve by its match confidence
        there (local NCC after registration, :func:`node_confidence`; ``node_weights`` of
        :func:`hybridreg.joint.solve_joint`). Off by default: on the defect benchmark it
        did not lower the error (-0.6% to +2.2%; benchmarks/RESULTS.md, "Per-node weights
        in the joint solve").

    Returns
    -------
    StackAlignment
        ``aligned`` is an ndarray for an ndarray input, an :class:`AlignedSections` for a
        lazy one.
    """
    if hasattr(stack, "data") and hasattr(stack, "spacing_xyz"):  # a hybridreg.io.Stack
        stack = stack.data
    lazy = _is_lazy(stack)
    if not lazy:
        stack = np.asarray(stack)
    shape = tuple(stack.shape)
    if len(shape) != 3:
        raise ValueError(f"stack must have shape (Z, H, W), got {shape}")
    if shape[0] < 1 or min(shape[1:]) < 2:
        raise ValueError(f"stack {shape} has no section to align")
    if np.issubdtype(stack.dtype, np.floating):
        if lazy:
            bad = [k for k in range(shape[0]) if not _finite(stack, k)]
        else:
            bad = np.flatnonzero(~np.isfinite(stack).all(axis=(1, 2)))
        if len(bad):
            raise ValueError(f"section {int(bad[0])} of the stack contains NaN or infinite "
                             f"values ({len(bad)} section(s) in all); fill or mask them first")
    if mode not in ("joint", "sequential"):
        raise ValueError(f"mode must be 'joint' or 'sequential', got {mode!r}")
    if client is not None and mode != "joint":
        raise ValueError("parallel workers need mode='joint': sequential alignment registers "
                         "each section to the result of the one before it")
    if window < 1 or neighbours < 1:
        raise ValueError(f"window and neighbours must be >= 1, got {window} and {neighbours}")
    drift_window = int(drift_window)
    if drift_window < 0 or drift_window == 1:
        raise ValueError(f"drift_window must be 0 (off) or >= 2, got {drift_window}")
    if drift_window and mode != "sequential":
        raise ValueError("drift_window is for mode='sequential' (the joint solve corrects "
                         "drift by itself)")
    if anchor is not None:
        if isinstance(anchor, bool) or not isinstance(anchor, (int, np.integer)):
            raise ValueError(f"anchor must be a section index, got {anchor!r}")
        anchor = int(anchor) + (shape[0] if anchor < 0 else 0)
        check_anchor(shape[0], anchor)
        if mode == "sequential" and anchor != 0:
            raise ValueError("the sequential mode keeps section 0; anchor another section "
                             "with mode='joint'")
    if mode == "joint":
        check_prior(prior, anchor)
    if node_weights and mode != "joint":
        raise ValueError("node_weights is for mode='joint' (the sequential chain has no "
                         "solve to weight)")
    if masks is not None:
        if int(max_skip) != max_skip or max_skip < 0:
            raise ValueError(f"max_skip must be an integer >= 0, got {max_skip!r}")
        masks = _checked_masks(masks, shape, method)
    if shape[0] == 1:
        log.warning("the stack holds one section: there is nothing to align it to, so it "
                    "keeps its place (the identity transform)")
    if min(shape[1:]) < MIN_USEFUL_PX:
        log.warning("sections of %dx%d px are too small to register reliably (every "
                    "method needs at least %d px a side: a network's receptive field, "
                    "elastix's pyramid); expect flagged pairs and little or no alignment",
                    shape[1], shape[2], MIN_USEFUL_PX)
    spacing_xy = tuple(float(s) for s in spacing_xy)
    origin_xy = tuple(float(o) for o in origin_xy)
    grid = MapGrid(shape[1:], stride=stride, spacing_xy=spacing_xy, origin_xy=origin_xy)
    skipped, split = _surveyed(masks, grid) if masks is not None else ({}, {})
    settings = {"mode": mode, "spacing_xy": spacing_xy, "origin_xy": origin_xy,
                "stride": grid.stride}
    settings.update({"neighbours": neighbours} if mode == "joint" else {"window": window})
    if node_weights:  # (their checkpoints hold the pairs' node weights)
        settings["node_weights"] = True
    work = None
    if work_dir is not None:
        if masks is not None:  # a run's checkpoints belong to its masks too
            settings["masks"] = _fingerprint(masks, method, {})["stack"]
        work = _WorkDir(work_dir, _fingerprint(stack, method, settings), grid)
    if lazy:
        raw = _SectionCache(stack, (neighbours if mode == "joint" else window) + 2)
    else:
        raw = stack.astype(np.float32, copy=False)
    run = _align_joint if mode == "joint" else _align_sequential
    kw = ({"neighbours": neighbours, "prior": prior, "anchor": anchor, "client": client,
           "masks": masks, "skipped": skipped, "split": split, "max_skip": int(max_skip),
           "node_weights": bool(node_weights)}
          if mode == "joint"
          else {"window": window, "drift_window": drift_window, "masks": masks,
                "skipped": skipped, "max_skip": int(max_skip)})
    result = run(raw, method, grid=grid, work=work, order=order, progress=progress, **kw)
    if lazy:
        from dataclasses import replace

        result = replace(result, aligned=AlignedSections(stack, result.maps, result.grid,
                                                         order=order))
    return result


def _checked_masks(masks, shape, method):
    """``masks`` checked before any work: its shape, the method."""
    from .methods.base import takes_masks

    if hasattr(masks, "data") and hasattr(masks, "spacing_xyz"):  # a hybridreg.io.Stack
        masks = masks.data
    if not _is_lazy(masks):
        masks = np.asarray(masks)
    if tuple(masks.shape) != tuple(shape):
        raise ValueError(f"the masks have shape {tuple(masks.shape)}, the stack {tuple(shape)} "
                         f"(sections, rows, columns): one mask per section, the same size")
    if not takes_masks(method):
        raise ValueError(f"the {method.name} method does not take masks (every built-in "
                         f"method does)")
    return masks


def _surveyed(masks, grid) -> tuple[dict, dict]:
    """Each section's mask read once, before any registration: ``(skipped, split)``, the
    sections whose mask keeps under :data:`hybridreg.methods.base.MOSTLY_EXCLUDED` of them
    (``{k: kept fraction}``, warned about, and as inverted masks when most are) and the
    others that a defect splits into parts (``{k: part labels}``,
    :func:`hybridreg.defects.node_parts`)."""
    from .defects import mask_fraction, node_parts
    from .methods.base import MOSTLY_EXCLUDED

    z = masks.shape[0]
    skipped, split = {}, {}
    for k in range(z):
        m = section_of(masks, k)
        kept = mask_fraction(m)
        if kept < MOSTLY_EXCLUDED:
            skipped[k] = kept
            continue
        labels, n = node_parts(m, grid)
        if n > 1:
            split[k] = labels
    if len(skipped) > z // 2:
        log.warning("the masks of %d of %d sections keep under a quarter of the section: "
                    "elastix's convention is nonzero = tissue to use, zero = excluded; "
                    "inverted?", len(skipped), z)
    if skipped:
        log.warning("sections %s are mostly masked (kept: %s): skipped, their transforms "
                    "interpolated from their neighbours", sorted(skipped),
                    ", ".join(f"{100 * f:.0f}%" for f in skipped.values()))
    if split:
        log.info("sections %s are split by defects (the joint mode keeps their parts' "
                 "offsets)",
                 sorted(split))
    return skipped, split


def bridged_pairs(z: int, *, neighbours: int, skipped=(), max_skip: int = 3) -> list:
    """The pairs of :func:`hybridreg.joint.pair_list` among the sections not ``skipped``:
    each kept section with its ``neighbours`` next kept ones, across at most ``max_skip``
    skipped sections."""
    if not skipped:
        return pair_list(z, neighbours=neighbours)
    kept = [k for k in range(z) if k not in skipped]
    return [(i, j) for a, i in enumerate(kept) for j in kept[a + 1:a + 1 + neighbours]
            if j - i - 1 <= max_skip]


#: The joint solve's prior on a section that a defect splits into parts, as a fraction of
#: the others': a fold's or a crack's jump is a large motion of that section alone, which the
#: small-distortion prior would shrink and spread over its neighbours (with exact pairs on
#: ISBI 2012 the error away from the defects falls from 6.61 to 5.41 px at 0.3). Chosen on
#: ISBI 2012's stacks, with the learned and elastix methods, among 1, 0.3, 0.1 and 0
#: (benchmarks/RESULTS.md, "Defects and masks").
SPLIT_PRIOR = 0.3


def _keep_jumps(fields, split, pair_fields, solution, grid) -> None:
    """Give each section that a defect splits into parts its jump back, in place
    (:func:`hybridreg.joint.part_offsets`)."""
    from .joint import part_offsets

    for k, labels in split.items():
        fields[k] = np.asarray(fields[k]) + part_offsets(
            k, fields, pair_fields, solution.pair_weight, labels,
            spacing_xy=grid.node_spacing_xy)


def _long_gaps(kept, max_skip: int, then: str) -> list:
    """The pairs ``(i, j)`` of consecutive kept sections with more than ``max_skip``
    skipped sections between them, warned about (``then``: what the mode does there)."""
    gaps = [(i, j) for i, j in zip(kept, kept[1:]) if j - i - 1 > max_skip]
    if gaps:
        log.warning("more than max_skip=%d skipped sections in a row between sections %s: %s",
                    max_skip, ", ".join(f"{i} and {j}" for i, j in gaps), then)
    return gaps


def _interpolated(fields, z: int, skipped, grid) -> dict:
    """Fill the maps of the ``skipped`` sections (in place) by linear interpolation along z
    between the nearest kept sections (the one kept section at an end); returns
    ``{k: (below, above)}``, the sections each came from."""
    kept = [k for k in range(z) if k not in skipped]
    came = {}
    for k in sorted(skipped):
        below = max((i for i in kept if i < k), default=None)
        above = min((i for i in kept if i > k), default=None)
        if below is None and above is None:
            fields[k] = grid.zeros()
        elif below is None or above is None:
            fields[k] = np.asarray(fields[above if below is None else below])
        else:
            t = (k - below) / (above - below)
            fields[k] = ((1 - t) * np.asarray(fields[below], np.float32)
                         + t * np.asarray(fields[above], np.float32))
        came[k] = (below, above)
    return came


def _depth(raw) -> int:
    return int((raw.stack if isinstance(raw, _SectionCache) else raw).shape[0])


def _finite(stack, k: int) -> bool:
    try:
        return all(np.isfinite(strip).all() for strip in strips(section_of(stack, k)))
    except ValueError:  # hybridreg.io.StackError: LazySections checks on reading
        return False


def _bar(iterable, *, desc, progress, total=None, unit="pair"):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not progress)


_LIBC = None


def release_memory(done: int, every: int = 16) -> None:
    """Every ``every`` items of a long loop, hand freed heap memory back to the system
    (glibc's ``malloc_trim``; nothing elsewhere).

    A long run frees and allocates sections, fields and tiles over and over; glibc keeps the
    freed pieces, and the peak resident memory then grew with the number of sections (1000
    sections of 512^2 took 23% more than 50). Trimming keeps it to what one item needs.
    """
    global _LIBC
    if done % every:
        return
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def show_rate(bar, done: int, px_per_item: int) -> None:
    """Put the throughput in Mpx/s (pixels of the items done) after a progress bar's rate."""
    elapsed = bar.format_dict.get("elapsed") or 0.0
    if not bar.disable and elapsed > 0:
        bar.set_postfix_str(f"{done * px_per_item / elapsed / 1e6:.2f} Mpx/s")


def drift_corrected(fields: np.ndarray, window: int, out=None) -> np.ndarray:
    """Fields minus their centred moving mean along z (``window`` sections, fewer at the ends).

    In a sequential chain every pair's error stays in all later sections: the error is a
    random walk along z, smooth from section to section, while each section's own
    distortion is independent of its neighbours'. Removing the moving mean (a high-pass
    along z) removes the walk and keeps the distortions (whose mean is about zero). To
    first order in the fields' gradients; exact for drifts that are translations.

    Parameters
    ----------
    fields : ndarray or MapStack, shape (Z, 2, H, W)
    window : int
        Sections in the mean (>= 2).
    out : ndarray or MapStack, optional
        Where to write the result (may be ``fields``): computed a block of rows at a time.

    Returns
    -------
    ``out``, or a new ndarray (Z, 2, H, W), float32
    """
    z, _, h, w = fields.shape
    half_lo, half_hi = (window - 1) // 2, window // 2
    if out is None:
        out = np.empty((z, 2, h, w), np.float32)
    # a sweep along z holding the window's sections, over blocks of rows (about 64 MB of
    # float64): each field read and written once, at any size and number of sections, on
    # disk too; in place, since a section is written only after the window has read it
    rows = max(1, (64 << 20) // max(1, (window + 2) * 2 * w * 8))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        held, total, read = {}, np.zeros((2, r1 - r0, w)), 0
        for k in range(z):
            a, b = max(0, k - half_lo), min(z, k + half_hi + 1)
            for n in range(read, b):
                held[n] = np.asarray(fields[n, :, r0:r1], np.float64)
                total += held[n]
            read = b
            for n in [n for n in held if n < a]:
                total -= held.pop(n)
            out[k, :, r0:r1] = (held[k] - total / (b - a)).astype(np.float32)
    return out


def _align_sequential(raw, method, *, grid, work, order, progress, window, drift_window=0,
                      masks=None, skipped=(), max_skip=3):
    """Each kept section registered to the aligned one before it (and ``window - 1`` more as
    references). With ``masks``: the fixed section's mask is its aligned mask (warped with
    its transform, nearest neighbour), the moving one's its raw mask; a ``skipped`` section
    is registered across (its transform interpolated along z afterwards), and after more
    than ``max_skip`` skipped sections in a row the chain starts again from the identity."""
    z, (h, w) = _depth(raw), grid.shape_yx
    fields = _map_storage(z, grid, folder=None if work is None else work.path)
    # the last `window` aligned sections, the rest only when the input is an ndarray
    keep_all = isinstance(raw, np.ndarray)
    aligned = np.empty((z, h, w), np.float32) if keep_all else {}
    aligned_masks = {}  # the aligned masks of the last `window` kept sections
    kept = [k for k in range(z) if k not in skipped]
    position = {k: n for n, k in enumerate(kept)}
    restart = {j for _, j in _long_gaps(kept, max_skip, "the chain starts again after them")}
    table = []
    bar = _bar(range(z), desc=f"align ({method.name}, sequential)", progress=progress,
               unit="section")
    for k in bar:
        if k in skipped:
            table.append({"section": k, "metric": None, "seconds": 0.0, "flagged": True,
                          "warnings": ""})  # its warning once its transform is interpolated
            continue
        before = [] if k in restart else kept[max(0, position[k] - window):position[k]]
        warped = None
        if not before:  # the first kept section, or a new chain after a long gap
            fields[k] = grid.zeros()
            table.append({"section": k, "metric": None, "seconds": 0.0,
                          "flagged": k in restart,
                          "warnings": (f"a new chain: more than max_skip={max_skip} skipped "
                                       f"sections before it" if k in restart else "")})
        else:
            prev = before[-1]
            name = f"section_{k:04d}"
            loaded = work.load(name) if work is not None else None
            if loaded is not None:
                fields[k], row = loaded
            else:
                refs = [aligned[j] for j in before[:-1]]
                pair_masks = (None if masks is None
                              else (aligned_masks[prev], section_of(masks, k)))
                u, row = _register(method, aligned[prev], raw[k], refs, grid=grid,
                                   what=f"section {k}", pair_ncc=False, keep_warped=True,
                                   masks=pair_masks)
                # a failed section keeps the transform of the one before it
                fields[k] = fields[prev] if u is None else grid.quantize(u)
                warped = row["warped"]
                row = {"section": k, "metric": row["metric"], "seconds": row["seconds"],
                       "flagged": bool(row["warnings"]), "warnings": row["warnings"]}
                if work is not None:
                    work.save(name, fields[k], row)
            table.append(row)
        show_rate(bar, k, h * w)
        release_memory(k)
        if not before:  # the identity
            aligned[k] = np.asarray(raw[k], np.float32)
        elif (warped is not None and getattr(method, "warped_order", None) == order
                and np.shape(warped) == (h, w)):
            # the method resampled the section as this chain would: reuse it
            aligned[k] = warped
        else:
            aligned[k] = render(raw[k], fields[k], grid, order=order)
        if masks is not None:
            aligned_masks[k] = render(section_of(masks, k), fields[k], grid, order=0,
                                      dtype=np.uint8)
        # hold the last `window` kept sections (and their masks) only
        recent = set(kept[max(0, position[k] - window + 1):position[k] + 1])
        for held in [aligned_masks] + ([] if keep_all else [aligned]):
            for j in [j for j in held if j not in recent]:
                del held[j]
    came = _interpolated(fields, z, skipped, grid) if skipped else {}
    for k, ends in came.items():
        table[k]["warnings"] = _skipped_warning(skipped[k], ends)
    if drift_window:
        fields = drift_corrected(fields, drift_window, out=fields)
    if drift_window or came:
        for k in range(z):
            fields[k] = grid.quantize(fields[k])
        if keep_all:
            for k in (range(z) if drift_window else came):
                aligned[k] = render(raw[k], fields[k], grid, order=order)
    if not keep_all:
        aligned = None  # align_stack makes the lazy AlignedSections
    return StackAlignment(aligned=aligned, maps=fields, table=table, pairs=[],
                          spacing_xy=grid.spacing_xy, origin_xy=grid.origin_xy, order=order,
                          grid=grid)


def _skipped_warning(kept_fraction: float, ends) -> str:
    """The table's warning of a skipped section: its mask, where its transform came from."""
    ends = " and ".join(str(e) for e in ends if e is not None)
    return (f"skipped: its mask keeps {100 * kept_fraction:.0f}% of it; "
            + (f"transform interpolated from section(s) {ends}" if ends
               else "no section kept: the identity"))


def _align_joint(raw, method, *, grid, work, order, progress, neighbours, prior, anchor=None,
                 client=None, masks=None, skipped=(), split=(), max_skip=3,
                 node_weights=False):
    z, (h, w) = _depth(raw), grid.shape_yx
    all_pairs = bridged_pairs(z, neighbours=neighbours, skipped=skipped, max_skip=max_skip)
    _long_gaps([k for k in range(z) if k not in skipped], max_skip,
               "the parts either side are solved apart")
    scratch = None if work is None else work.path
    # every pair's map in memory, or (many, or large) in one array on disk
    store = _map_storage(len(all_pairs), grid, others=z, folder=scratch, name="pairs.zarr")
    # and every pair's node weights (:func:`node_confidence`), alike
    conf_store = _map_storage(len(all_pairs), grid, others=z + len(all_pairs), folder=scratch,
                              name="confidence.zarr", channels=1) if node_weights else None
    index = {p: n for n, p in enumerate(all_pairs)}
    pair_fields: dict = {}
    pair_conf: dict = {}
    pair_rows: dict = {}

    def keep(pair, u, conf):
        n = index[pair]
        if isinstance(store, MapStack):
            store[n] = u
            pair_fields[pair] = _PairMap(store, n)
        else:
            pair_fields[pair] = u
        if conf is not None and conf_store is not None:
            conf_store[n, 0] = conf
            pair_conf[pair] = _PairMap(conf_store, n, channel=0) if isinstance(
                conf_store, MapStack) else conf_store[n, 0]

    todo = []
    for (i, j) in all_pairs:
        loaded = work.load(f"pair_{i:04d}_{j:04d}") if work is not None else None
        if loaded is None:
            todo.append((i, j))
        else:
            keep((i, j), loaded[0], loaded[1].pop("confidence", None))
            pair_rows[(i, j)] = loaded[1]
    if len(todo) < len(all_pairs):
        log.info("resumed %d finished pairs", len(all_pairs) - len(todo))
    kwargs = {"grid": grid, "node_weights": node_weights}

    def finished(pair, u, row):
        if work is not None and u is not None:
            work.save(f"pair_{pair[0]:04d}_{pair[1]:04d}", u, row)
        conf = row.pop("confidence", None)
        if u is not None:
            keep(pair, u, conf)
        pair_rows[pair] = row

    desc = f"align ({method.name}, {neighbours} neighbour(s))"
    if client is None:
        bar = _bar(todo, desc=desc, progress=progress)
        for n, (i, j) in enumerate(bar, 1):
            finished((i, j), *_register(method, raw[i], raw[j], [], what=f"pair {i}-{j}",
                                        masks=_pair_masks(masks, i, j), **kwargs))
            show_rate(bar, n, h * w)
            release_memory(n)
    else:
        _run_on_client(client, method, raw, todo, kwargs, finished, masks=masks,
                       bar=_bar(None, desc=desc, progress=progress, total=len(todo)))
    pair_rows = dict(sorted(pair_rows.items()))
    came = {}
    if z == 1:
        fields = grid.zeros()[None]
        solution = None
    elif not pair_fields and pair_rows:
        raise RuntimeError(f"every registration of the {z}-section stack failed; "
                           f"first error: {next(iter(pair_rows.values()))['warnings']}")
    elif not pair_fields:  # no two sections kept: each stays where it is
        fields = _map_storage(z, grid, folder=scratch)
        came = _interpolated(fields, z, skipped, grid)
        solution = None
    else:
        from .metrics import interior_mask

        # residuals are measured away from the edges: 1/16 of the section, in nodes
        margin = -(-max(1, min(h, w) // 16) // grid.stride)
        margin = min(margin, (min(grid.node_shape) - 1) // 2)
        similarity = _similarity_weights({p: r for p, r in pair_rows.items()
                                          if p in pair_fields})
        solution = solve_joint(pair_fields, z, prior=prior, anchor=anchor,
                               section_prior=[SPLIT_PRIOR if k in split else 1.0
                                              for k in range(z)],
                               spacing_xy=grid.node_spacing_xy,
                               mask=interior_mask(grid.node_shape, margin_px=margin),
                               pair_weights=similarity, stride=grid.stride,
                               node_weights=pair_conf or None,
                               out=_map_storage(z, grid, others=len(pair_fields),
                                                folder=scratch),
                               progress=progress)
        fields = solution.fields
        if split:
            _keep_jumps(fields, split, pair_fields, solution, grid)
        came = _interpolated(fields, z, skipped, grid)
        for k in range(z):
            fields[k] = grid.quantize(fields[k])
    pairs = []
    for (i, j), row in pair_rows.items():
        ok = solution is not None and (i, j) in solution.pair_weight
        pairs.append({"fixed": i, "moving": j, "metric": row["metric"],
                      "ncc": row.get("ncc"), "seconds": row["seconds"],
                      "residual_px": solution.pair_residual_px[(i, j)] if ok else None,
                      "weight": solution.pair_weight[(i, j)] if ok else 0.0,
                      "warnings": row["warnings"]})
    table = []
    for k in range(z):
        touching = [p for p in pairs if k in (p["fixed"], p["moving"])]
        weights = [p["weight"] for p in touching]
        own = [p for p in touching if p["moving"] == k]
        warnings = [f"pair {p['fixed']}-{p['moving']}: {p['warnings']}"
                    for p in touching if p["warnings"]]
        # clean pairs end at weights of 0.45-1 (a pair two sections apart, a little less alike
        # and with a larger residual, at about 0.46 on a small phantom stack); pairs that
        # registered noise, a blank section or failed end below 0.1: flag below 0.2
        low = [f"pair {p['fixed']}-{p['moving']} down-weighted to {p['weight']:.2f}"
               for p in touching
               if p["weight"] < LOW_PAIR_WEIGHT and p["residual_px"] is not None]
        if k in came:
            warnings.append(_skipped_warning(skipped[k], came[k]))
        elif z > 1 and not any(weights):
            warnings.append("no usable pair: the section stays where the prior puts it "
                            "(near its raw position)")
        table.append({
            "section": k,
            "metric": own[0]["metric"] if own else None,
            "seconds": round(sum(p["seconds"] for p in own), 4),
            "pairs": len(touching),
            "min_pair_weight": min(weights) if weights else None,
            "flagged": bool(warnings or low),
            "warnings": "; ".join(warnings + low),
        })
    aligned = None  # a lazy input: align_stack makes the lazy AlignedSections
    if isinstance(raw, np.ndarray):
        aligned = np.stack([render(raw[k], fields[k], grid, order=order)
                            for k in range(z)]).astype(np.float32)
    return StackAlignment(aligned=aligned, maps=fields, table=table, pairs=pairs,
                          spacing_xy=grid.spacing_xy, origin_xy=grid.origin_xy, order=order,
                          grid=grid)


def _run_on_client(client, method, raw, todo, kwargs, finished, *, bar, masks=None) -> None:
    """Register the pairs ``todo`` on a Dask client's workers, at most a few per worker in
    flight; ``finished(pair, u, row)`` is called here as each completes, in any order.

    A :class:`hybridreg.io.LazySections` stack is sent as its path: each worker reads its
    own sections. Otherwise the two sections of a pair are read here and sent with it. A
    task whose worker dies is rescheduled by Dask on another worker.
    """
    from dask.distributed import as_completed

    from .io import LazySections

    stack = raw.stack if isinstance(raw, _SectionCache) else raw
    # a LazySections pickles to its path (a few hundred bytes): sent with every task, so that
    # no worker's death can lose it
    by_path = isinstance(stack, LazySections)

    def limit() -> int:
        # enough queued to keep every worker thread busy (workers may come and go), but not
        # the whole stack at once
        return max(4, 2 * sum(client.nthreads().values()))

    pending = iter(todo)
    futures: dict = {}

    def submit(pair) -> None:
        i, j = pair
        what = f"pair {i}-{j}"
        if by_path and (masks is None or isinstance(masks, LazySections)):
            fut = client.submit(_register_sections, method, stack, i, j, what=what,
                                pure=False, mask_stack=masks, **kwargs)
        else:
            fut = client.submit(_register, method, raw[i], raw[j], [], what=what, pure=False,
                                masks=_pair_masks(masks, i, j), **kwargs)
        futures[fut] = pair

    for pair in pending:
        submit(pair)
        if len(futures) >= limit():
            break
    done = as_completed(list(futures))
    for fut in done:
        finished(futures.pop(fut), *fut.result())
        bar.update(1)
        release_memory(bar.n)
        show_rate(bar, bar.n, int(np.prod(raw.stack.shape[1:] if isinstance(raw, _SectionCache)
                                          else raw.shape[1:])))
        room = limit() - len(futures)
        for pair in pending:
            submit(pair)
            done.add(list(futures)[-1])
            room -= 1
            if room <= 0:
                break
    bar.close()
