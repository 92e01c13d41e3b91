"""Resume bookkeeping of section-by-section writing: the ``.NAME.progress`` folder.

A store written one section at a time (:class:`SectionWriter`, made by
:func:`hybridreg.io.open_section_writer`) is written in place, not atomically. While it is
incomplete, a folder ``.NAME.progress`` next to it holds ``manifest.json`` (the shape,
dtype, spacing and unit the store was started with) and an empty marker file
``section_kkkkkk`` per section written. Readers refuse a store with such a folder; a resumed
run whose manifest matches writes only the sections without a marker; closing the writer
removes the folder.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .atomic import atomic_output, remove
from .base import StackError, cast_to_dtype, is_array_like

log = logging.getLogger(__name__)

__all__ = ["SectionWriter"]


def progress_dir(store: Path) -> Path:
    """The folder of :class:`SectionWriter`'s completion markers, next to the store."""
    return store.with_name(f".{store.name}.progress")


def read_manifest(progress: Path) -> dict:
    """The manifest a store's progress folder was started with (raises if unreadable)."""
    return json.loads((progress / "manifest.json").read_text())


def start_progress(progress: Path, manifest: dict) -> None:
    """Start a progress folder afresh (no markers) with ``manifest`` (JSON-serialisable)."""
    remove(progress)
    progress.mkdir(parents=True)
    with atomic_output(progress / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest))


class SectionWriter:
    """Writes a stack into an OME-Zarr image one section at a time, resumably.

    Made by :func:`hybridreg.io.open_section_writer`. Section ``k`` fills its own chunks (one
    section per chunk along z; zarr writes every chunk file atomically); once they are all
    written, an empty marker file ``section_kkkkkk`` is added to the folder
    ``.NAME.progress`` next to the store. While that folder exists the store is incomplete:
    :func:`hybridreg.io.read_stack` refuses it, and ``open_section_writer(...,
    resume=True)`` continues it, so only sections without a marker need writing
    (:meth:`missing`). :meth:`close` checks that every section was written and removes the
    folder. Used as a context manager, it closes on success and leaves the store resumable
    when the block raises.

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
        """Write section ``k``: ndarray (H, W), or a :class:`hybridreg.io.SectionPlane`
        (computed and written a few chunks at a time), cast to the store's dtype (integers
        rounded and clipped, see :func:`hybridreg.io.cast_to_dtype`)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) \
                or not 0 <= k < self.shape[0]:
            raise IndexError(f"'{self.path}': section index {k!r} out of range for "
                             f"{self.shape[0]} sections")
        if tuple(section.shape) != tuple(self.shape[1:]):
            raise StackError(f"'{self.path}': section {k} has shape {tuple(section.shape)}, "
                             f"the store holds sections of {tuple(self.shape[1:])} (H, W)")
        if not is_array_like(section):
            self._write_block(k, np.asarray(section), 0, 0)
        else:  # a SectionPlane: computed and written a few chunks at a time
            _, ch, cw = self._array.chunks
            h, w = self.shape[1:]
            cols = cw * max(1, (1 << 22) // (ch * cw))  # blocks of about 4 Mpx
            for y0 in range(0, h, ch):
                for x0 in range(0, w, cols):
                    block = np.asarray(section[y0:min(h, y0 + ch), x0:min(w, x0 + cols)])
                    self._write_block(k, block, y0, x0)
        self._marker(int(k)).touch()

    def _write_block(self, k: int, arr: np.ndarray, y0: int, x0: int) -> None:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise StackError(f"'{self.path}': section {k} to write contains NaN or infinite "
                             f"values")
        if arr.dtype != self.dtype:
            arr = cast_to_dtype(arr, self.dtype)
        self._array[int(k), y0:y0 + arr.shape[0], x0:x0 + arr.shape[1]] = arr

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
