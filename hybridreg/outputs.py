"""The one place that writes a run's outputs.

An alignment (:func:`save_alignment`): the aligned stack, one field per section (the
contract's on-disk form, :mod:`hybridreg.fields`), its ITK ``.h5`` transform and transformix
chain, ``sections.csv`` and ``pairs.csv``. A single registration (:func:`write_registration`).
A comparison (:func:`write_comparison`): tables, JSON, the HTML report, optionally each
method's alignment. Tables and JSON (:func:`write_table_csv`, :func:`write_json`).

Every file is written atomically (:func:`hybridreg.io.atomic_output`): nothing is overwritten
without ``overwrite``, paths given as ``inputs`` never, and a failed write leaves no
half-written file under the final name. The one exception is an OME-Zarr stack, written in
place one section at a time and resumably (:func:`hybridreg.io.open_section_writer`).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import io

log = logging.getLogger(__name__)

__all__ = ["jsonable", "write_table_csv", "write_json", "write_stack_sections",
           "write_transforms", "save_alignment", "write_registration", "planned_outputs",
           "check_outputs", "write_comparison"]

#: Name of the baseline run (no registration) of a comparison.
BASELINE = "none"


# --- tables -----------------------------------------------------------------------------------

def jsonable(x):
    """``x`` as JSON-ready values: mappings, sequences, dataclasses and numpy scalars
    converted, paths as strings, NaN and inf as None, other objects as their ``repr``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__") and not isinstance(x, type):
        return jsonable(asdict(x))
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return repr(x)


def write_table_csv(rows: Sequence[dict], path, *, overwrite: bool = True) -> None:
    """Write per-section rows as CSV (columns: every key, in order of first appearance)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with io.atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def write_json(obj, path, *, overwrite: bool = True) -> None:
    """Write ``jsonable(obj)`` as indented JSON (NaN and inf as null)."""
    with io.atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w") as f:
            json.dump(jsonable(obj), f, indent=2)


# --- stacks and transforms --------------------------------------------------------------------

def _write_one(writer, sections, k: int) -> int:
    """Compute section ``k`` and write it (a task on a Dask worker: the worker that made the
    section writes its chunks)."""
    writer.write(k, io.section_of(sections, k, itemsize=4))
    return k


def write_stack_sections(out, sections, *, shape_zyx, dtype=None, spacing_xyz=None,
                         unit: str | None = None, overwrite: bool = False, resume: bool = False,
                         inputs=(), progress: bool = False, client=None) -> None:
    """Write a stack whose sections are computed on demand (``sections[k]``, float).

    A bare ``store.zarr`` is written as an OME-Zarr image one section at a time, resumably
    (a lazy ``sections`` is never held whole); with a Dask ``client`` each section is a task:
    the worker that computes it writes its chunks into the store (a shared filesystem), and
    a killed worker's section is computed and written again by another. A TIFF target is
    written page by page; any other target at once, cast to ``dtype`` (rounded and clipped)
    when given.
    """
    if io.is_ome_zarr_target(out):
        from tqdm.auto import tqdm

        z = int(shape_zyx[0])
        writer = io.open_section_writer(
            out, shape_zyx=tuple(shape_zyx), dtype=np.float32 if dtype is None else dtype,
            spacing_xyz=spacing_xyz, unit=unit, overwrite=overwrite, resume=resume,
            inputs=inputs)
        missing = writer.missing()
        if len(missing) < z:
            log.info("%s: %d of %d sections already written", out, z - len(missing), z)
        from .stack import release_memory, show_rate

        px = int(shape_zyx[1]) * int(shape_zyx[2])
        if client is not None and missing:
            from dask.distributed import as_completed

            bar = tqdm(total=len(missing), desc="write", unit="section",
                       disable=not progress)
            futures = [client.submit(_write_one, writer, sections, k, pure=False)
                       for k in missing]
            for fut in as_completed(futures):
                fut.result()
                bar.update(1)
                show_rate(bar, bar.n, px)
            bar.close()
        else:
            bar = tqdm(missing, desc="write", unit="section", disable=not progress)
            for n, k in enumerate(bar, 1):
                writer.write(k, io.section_of(sections, k, itemsize=4))
                show_rate(bar, n, px)
                release_memory(n)
        writer.close()
        return
    from .io.tiff import TIFF_SUFFIXES

    tiff = Path(str(out)).suffix.lower() in TIFF_SUFFIXES
    if tiff and not isinstance(sections, np.ndarray):  # page by page
        data = _CastSections(sections, shape_zyx, dtype)
    else:
        data = np.asarray(sections)
        if dtype is not None:
            data = io.cast_to_dtype(data, dtype)
    io.write_stack(out, data, spacing_xyz=spacing_xyz, unit=unit,
                   overwrite=overwrite or resume, inputs=inputs)


class _CastSections:
    """A lazy stack's sections cast to ``dtype`` (rounded and clipped) one at a time."""

    def __init__(self, sections, shape_zyx, dtype):
        self.sections, self.shape = sections, tuple(int(n) for n in shape_zyx)
        self.dtype = np.dtype(sections.dtype if dtype is None else dtype)

    def __getitem__(self, k):
        from .stack import release_memory

        release_memory(int(k) + 1)
        return io.cast_to_dtype(np.asarray(self.sections[k]), self.dtype)

    def plane(self, k):
        """Section ``k`` region by region, cast (what large TIFF pages are written from)."""
        from .stack import release_memory

        release_memory(int(k) + 1)
        plane = io.section_of(self.sections, k, itemsize=4)

        def region(ys, xs):
            return io.cast_to_dtype(np.asarray(plane[ys, xs]), self.dtype)

        return io.SectionPlane(region, self.shape[1:], self.dtype, f"section {k}")


def write_transforms(fields_out, k: int, u: np.ndarray, *, spacing_xy=None, origin_xy=None,
                     order: int = 1, grid=None) -> None:
    """Section ``k``'s transform as an ITK ``.h5`` transform and a transformix chain.

    Next to its ``section_kkkk.mha`` (which must exist): ``section_kkkk.h5`` (a
    ``DisplacementFieldTransform`` of the map, compressed) and ``transformix/section_kkkk/``.
    ``u`` is a coarse map on ``grid`` (its nodes' spacing and origin go into both files), or
    without ``grid`` a dense field on ``spacing_xy``, ``origin_xy``.
    """
    from .elastix.export import export_field_chain, write_field_transform
    from .fields import MapGrid

    if grid is None:
        grid = MapGrid(u.shape[1:], stride=1, spacing_xy=spacing_xy, origin_xy=origin_xy)
    fields_out = Path(fields_out)
    field_file = io.field_path(fields_out, k)
    write_field_transform(field_file.with_suffix(".h5"), u, spacing_xy=grid.node_spacing_xy,
                          origin_xy=grid.origin_xy)
    export_field_chain(u, fields_out / "transformix" / field_file.stem, grid=grid,
                       interpolation_order=order, field_file=field_file)


#: The section grid of a run's maps, next to them (read by :func:`read_transforms`).
GRID_FILE = "grid.json"


def write_maps(fields_out, maps, grid, *, overwrite: bool = False) -> None:
    """A stack's maps as ``section_kkkk.mha`` (nodes, with their spacing and origin) and
    ``grid.json`` (the section grid and stride: what :func:`read_transforms` needs)."""
    fields_out = Path(fields_out)
    io.write_fields(fields_out, maps, spacing_xy=grid.node_spacing_xy,
                    origin_xy=grid.origin_xy, overwrite=overwrite)
    write_json(grid.to_dict(), fields_out / GRID_FILE, overwrite=True)


def read_transforms(fields_dir, *, shape_yx=None, spacing_xy=None):
    """A run's maps and their grid: ``(maps (Z, 2, h, w), MapGrid)``.

    A folder with ``grid.json`` holds coarse maps; one without it (older runs, or fields
    written by :func:`hybridreg.io.write_fields`) holds dense fields, whose grid is their
    own (stride 1). ``shape_yx`` (the sections the maps are for) is checked when given.
    """
    import json

    from .fields import MapGrid

    fields_dir = Path(fields_dir)
    maps, sp, org = io.read_fields(fields_dir)
    meta = fields_dir / GRID_FILE
    if meta.is_file():
        grid = MapGrid.from_dict(json.loads(meta.read_text()))
        if maps.shape[2:] != grid.node_shape:
            raise io.StackError(f"'{fields_dir}': the maps have {maps.shape[2]}x"
                                f"{maps.shape[3]} nodes but {GRID_FILE} says {grid}")
    else:
        grid = MapGrid(maps.shape[2:], stride=1, spacing_xy=sp, origin_xy=org)
    if shape_yx is not None and tuple(shape_yx) != grid.shape_yx:
        raise io.StackError(f"'{fields_dir}' holds transforms of {grid.shape_yx[0]}x"
                            f"{grid.shape_yx[1]} sections, not {shape_yx[0]}x{shape_yx[1]}")
    return maps, grid


def write_dense_fields(fields_out, maps, grid, *, overwrite: bool = False) -> None:
    """The dense fields too, one section at a time: ``fields_out/dense/section_kkkk.mha``
    (``Z * 8`` bytes a pixel before compression: on request only)."""
    directory = Path(fields_out) / "dense"
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(len(maps)):
        io.write_field(io.field_path(directory, k), grid.dense(maps[k]),
                       spacing_xy=grid.spacing_xy, origin_xy=grid.origin_xy,
                       overwrite=overwrite)


def save_alignment(result, *, out=None, fields_out=None, transforms: bool = True,
                   overwrite: bool = False, inputs=(), dtype=None, spacing_xyz=None,
                   unit: str | None = None, resume: bool = False,
                   progress: bool = False, dense_fields: bool = False, client=None) -> None:
    """Write an alignment: the aligned stack, and the per-section transforms and tables.

    ``fields_out`` receives, for every section k:

    - ``section_kkkk.mha``: the section's coarse map (nodes with their spacing and origin;
      the contract's on-disk form, :mod:`hybridreg.fields`), and once ``grid.json`` (the
      section grid and stride);
    - ``section_kkkk.h5``: the same as an ITK ``DisplacementFieldTransform`` (``transforms``);
    - ``transformix/section_kkkk/TransformParameters.0.txt``: a transformix chain that
      reproduces the aligned section (``transformix -in raw_section.mha -tp ...``);
    - with ``dense_fields``, ``dense/section_kkkk.mha``: the dense field;

    plus ``sections.csv`` (per section) and, in joint mode, ``pairs.csv``.

    Parameters
    ----------
    result : hybridreg.stack.StackAlignment
    out : path, optional
        The aligned stack (any format :func:`hybridreg.io.write_stack` writes). A bare
        ``store.zarr`` is written as an OME-Zarr image one section at a time
        (:func:`hybridreg.io.open_section_writer`): a lazy ``result.aligned`` is never
        held whole in memory.
    dtype : numpy dtype, optional
        Cast the aligned stack to this (e.g. the input's uint8, rounded and clipped).
    spacing_xyz : (float, float, float), optional
        Spacing written with the aligned stack; default ``(*result.spacing_xy, 1.0)``.
    unit : str, optional
        Unit of the spacing (OME-Zarr axes).
    inputs : sequence of paths
        Paths never to overwrite.
    resume : bool
        Finish the outputs of an interrupted call with the same result: a zarr ``out``
        left incomplete keeps the sections it has and gets the missing ones; the other
        outputs are written again (as with ``overwrite``), giving the same files.
    progress : bool
        A progress bar (tqdm) while writing a zarr ``out``.
    """
    if spacing_xyz is None:
        spacing_xyz = tuple(result.spacing_xy) + (1.0,)
    if out is not None:
        z, (h, w) = len(result.maps), result.grid.shape_yx
        aligned = result.aligned
        if dtype is not None and hasattr(aligned, "maps") and hasattr(aligned, "stack"):
            # rendered straight into the output's dtype, a chunk at a time
            from .stack import AlignedSections

            aligned = AlignedSections(aligned.stack, aligned.maps, aligned.grid,
                                      order=aligned.order, dtype=dtype)
        write_stack_sections(out, aligned, shape_zyx=(z, h, w), dtype=dtype, client=client,
                             spacing_xyz=spacing_xyz, unit=unit, overwrite=overwrite,
                             resume=resume, inputs=inputs, progress=progress)
    overwrite = overwrite or resume
    if fields_out is None:
        return
    fields_out = Path(fields_out)
    write_maps(fields_out, result.maps, result.grid, overwrite=overwrite)
    if dense_fields:
        write_dense_fields(fields_out, result.maps, result.grid, overwrite=overwrite)
    write_table_csv(result.table, fields_out / "sections.csv", overwrite=True)
    if result.pairs:
        write_table_csv(result.pairs, fields_out / "pairs.csv", overwrite=True)
    if not transforms:
        return
    from .stack import release_memory

    for k, m in enumerate(result.maps):
        write_transforms(fields_out, k, m, grid=result.grid, order=result.order)
        release_memory(k + 1)


def write_registration(result, *, out, moving, fields_out=None, spacing_xy=(1.0, 1.0),
                       overwrite: bool = False, inputs=()) -> Path | None:
    """Write one pair's registration: the warped moving section, and its transforms.

    Parameters
    ----------
    result : hybridreg.methods.RegistrationResult
    out : path
        The warped section (a one-section stack), in ``moving``'s dtype.
    moving : hybridreg.io.Stack
        The moving section as read (its dtype and spacing are kept).
    fields_out : path, optional
        ``section_0000.mha`` (the field), ``section_0000.h5`` (the ITK transform) and a
        transformix chain under ``transformix/``: elastix's own chain for an elastix result,
        else one deformation-field file.

    Returns
    -------
    Path or None
        The last file of the transformix chain (what ``transformix -tp`` takes).
    """
    io.write_stack(out, io.cast_to_dtype(result.warped, moving.data.dtype),
                   spacing_xyz=moving.spacing_xyz, overwrite=overwrite, inputs=inputs)
    if not fields_out:
        return None
    fields_out = Path(fields_out)
    io.write_field(io.field_path(fields_out, 0), result.field, spacing_xy=spacing_xy,
                   overwrite=overwrite)
    er = result.info.get("elastix")
    if er is not None:  # elastix's own chain, for the transformix program
        from .elastix import export_transformix_chain, write_itk_transform

        last = export_transformix_chain(er, fields_out / "transformix")
        write_itk_transform(fields_out / "section_0000.h5", er.transform)
        return last
    # any other field: its ITK .h5 and a one-file deformation-field chain, as for elastix
    from .elastix.export import export_field_chain, write_field_transform

    write_field_transform(fields_out / "section_0000.h5", result.field, spacing_xy=spacing_xy)
    return export_field_chain(result.field, fields_out / "transformix", spacing_xy=spacing_xy,
                              field_file=io.field_path(fields_out, 0))


# --- comparisons ------------------------------------------------------------------------------

def planned_outputs(out_dir, *, names: Sequence[str] = (), save_aligned: bool = False,
                    report: bool = True) -> list[Path]:
    """The paths :func:`write_comparison` writes into ``out_dir`` for methods ``names``."""
    out = Path(out_dir)
    paths = [out / "metrics.csv", out / "metrics.json"]
    if report:
        paths.append(out / "report.html")
    if save_aligned:
        for name in names:
            paths += [out / f"aligned_{name}.tif", out / f"fields_{name}"]
    return paths


def check_outputs(out_dir, *, names: Sequence[str] = (), save_aligned: bool = False,
                  report: bool = True, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``out_dir`` that already holds an output (without overwrite).

    Raises
    ------
    FileExistsError
        Naming the first existing output.
    """
    if overwrite:
        return
    for p in planned_outputs(out_dir, names=names, save_aligned=save_aligned, report=report):
        if p.exists():
            raise FileExistsError(f"{p} exists; pass overwrite (--overwrite) to replace the "
                                  f"outputs in {out_dir}")


def write_comparison(comparison, out_dir, *, overwrite: bool = False,
                     inputs: Sequence = (), save_aligned: bool = False, dtype=None,
                     report: bool = True) -> dict:
    """Write a comparison: tables, JSON, the HTML report and optionally the alignments.

    Files:

    - ``metrics.csv``: one row per method and section (``method``, ``section``, metrics);
    - ``metrics.json``: case, settings, each method's status and options, summaries and
      per-section rows (NaN as null);
    - ``report.html``: the self-contained report (:func:`hybridreg.report.write_report`);
    - with ``save_aligned``, per method that ran: ``aligned_<name>.tif`` and
      ``fields_<name>/`` (one ``.mha`` per section, :func:`save_alignment`).

    Parameters
    ----------
    comparison : hybridreg.compare.Comparison
    out_dir : path
        Created if missing.
    overwrite : bool
        Replace existing outputs; without it an existing output raises before anything is
        written.
    inputs : sequence of paths
        Paths never to overwrite.
    dtype : numpy dtype, optional
        Cast the saved aligned stacks to this (default: the case's stack dtype).

    Returns
    -------
    dict mapping ``"csv"``, ``"json"``, ``"report"`` (and ``"aligned_<name>"``) to paths.
    """
    out = Path(out_dir)
    names = [r.name for r in comparison.runs if r.name != BASELINE]
    check_outputs(out, names=names, save_aligned=save_aligned, report=report,
                  overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "metrics.csv", "json": out / "metrics.json"}
    write_table_csv(comparison.section_rows(), written["csv"], overwrite=overwrite)
    write_json(comparison.to_json(), written["json"], overwrite=overwrite)
    if save_aligned:
        dtype = comparison.case.stack.dtype if dtype is None else dtype
        for r in comparison.runs:
            if r.name == BASELINE or r.alignment is None:
                continue
            path = out / f"aligned_{r.name}.tif"
            save_alignment(r.alignment, out=path, fields_out=out / f"fields_{r.name}",
                           transforms=False, overwrite=overwrite, inputs=inputs, dtype=dtype)
            written[f"aligned_{r.name}"] = path
    if report:
        from .report import write_report

        written["report"] = write_report(comparison, out / "report.html", overwrite=overwrite,
                                         inputs=inputs)
    return written
