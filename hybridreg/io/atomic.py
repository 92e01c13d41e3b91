"""Atomic output: nothing is half-written, overwritten by accident, or written onto an input.

Every write goes to a temporary name next to the target (``.NAME.<token>.tmp<suffix>``) and
is moved into place only when it has succeeded, so an interrupted or failing write never
leaves a half-written file under the final name. Nothing is overwritten unless
``overwrite=True``, and paths given as ``inputs`` are never overwritten at all.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .base import Stack, StackError, split_spec

log = logging.getLogger(__name__)

__all__ = ["atomic_output"]


def remove(path: Path) -> None:
    """Delete a file or folder if it exists; best effort (a failure is logged)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as exc:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary output %s: %s", path, exc)


def _temp_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in (".gz", ".bz2", ".xz"):
        return "".join(suffixes[-2:])
    return path.suffix


def existing(path: Path) -> str | None:
    """``None`` (absent), ``'empty-dir'``, ``'dir'`` or ``'file'``."""
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return "dir" if any(path.iterdir()) else "empty-dir"
    return "file"


def _paths_overlap(a: Path, b: Path) -> bool:
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def _inner_overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    pa, pb = a.split("/"), b.split("/")
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


def refuse_inputs(target: Path, inner: str | None, inputs, shown: str) -> None:
    """Raise StackError if writing ``target`` (member ``inner``) would overwrite, contain or
    lie inside one of ``inputs``; ``shown`` is the target as the message names it."""
    for spec in inputs:
        ifile, iinner = split_spec(spec)
        if not _paths_overlap(target, ifile):
            continue
        same_file = os.path.realpath(target) == os.path.realpath(ifile)
        if same_file and not _inner_overlap(inner, iinner):
            continue
        name = spec.path if isinstance(spec, Stack) else os.fspath(spec)
        raise StackError(f"refusing to write '{shown}': it would overwrite the input "
                         f"'{name}' (inputs are never overwritten, even with overwrite=True)")


@contextlib.contextmanager
def atomic_output(path, *, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Write to a temporary path next to ``path`` and move it into place on success.

    Yields a path that does not exist yet, in the same folder as ``path`` and with the same
    suffix (so that writers that choose the format by suffix work). The block creates a file
    or a folder there. When the block succeeds, the result is moved onto ``path`` with
    ``os.replace`` (a folder replaces an existing folder via a rename to a backup name); when
    it raises, the temporary output is deleted and nothing under ``path`` changes.

    Parameters
    ----------
    path : str or os.PathLike
        Final file or folder. Missing parent folders are created.
    overwrite : bool
        Replace an existing ``path``. An existing empty folder is replaced without it.
    inputs : iterable of str, os.PathLike or Stack
        Paths that must never be overwritten, even with ``overwrite=True``: ``path`` may not
        be, contain or lie inside any of them. ``file.h5:/dataset`` forms are accepted.

    Raises
    ------
    StackError
        If ``path`` exists and ``overwrite`` is false, if ``path`` would overwrite an input,
        or if the block wrote nothing.

    Examples
    --------
    >>> with atomic_output("out/result.tif") as tmp:   # doctest: +SKIP
    ...     tifffile.imwrite(tmp, data)
    """
    final = Path(os.fspath(path))
    if final.name in ("", ".", ".."):
        raise StackError(f"'{path}': not a valid output path")
    refuse_inputs(final, None, inputs, str(final))
    if existing(final) in ("file", "dir") and not overwrite:
        raise StackError(f"'{final}' already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = final.with_name(f".{final.name}.{token}.tmp{_temp_suffix(final)}")
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise StackError(f"'{final}': nothing was written to the temporary output {tmp}")
        _move_into_place(tmp, final, overwrite=overwrite, token=token)
    except BaseException:
        remove(tmp)
        raise
    log.debug("wrote %s", final)


def _umask_mode(path: Path) -> None:
    """Give a written file the mode the user's umask allows (``0o666 & ~umask``), as any
    newly created file has: some writers (safetensors) create theirs ``0o600``."""
    umask = os.umask(0o022)
    os.umask(umask)
    mode = 0o666 & ~umask
    if not os.path.islink(path) and (os.stat(path).st_mode & 0o777) != mode:
        os.chmod(path, mode)


def _move_into_place(tmp: Path, final: Path, *, overwrite: bool, token: str) -> None:
    state = existing(final)
    if state in ("file", "dir") and not overwrite:
        raise StackError(f"'{final}' appeared while it was being written; pass overwrite=True "
                         f"to replace it")
    tmp_is_dir = tmp.is_dir()
    if state is not None and (state != "file") != tmp_is_dir:
        have = "a file" if state == "file" else "a folder"
        new = "a folder" if tmp_is_dir else "a file"
        raise StackError(f"'{final}' is {have}; refusing to replace it with {new}")
    if not tmp_is_dir:
        _umask_mode(tmp)
        os.replace(tmp, final)
        return
    if state == "empty-dir":
        os.rmdir(final)
        state = None
    if state is None:
        os.replace(tmp, final)
        return
    backup = final.with_name(f".{final.name}.{token}.old")
    os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(backup, final)
        raise
    shutil.rmtree(backup, ignore_errors=True)
