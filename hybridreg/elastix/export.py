"""Transform export: transformix-runnable parameter-file chains and ITK transform files.

:func:`export_transformix_chain` writes an :class:`~hybridreg.elastix.ElastixResult`'s
transform as ``TransformParameters.<i>.txt`` files for the ``transformix`` program;
:func:`export_field_chain` does the same for any pull field (a ``DeformationFieldTransform``
on a ``.mha`` file); :func:`write_itk_transform` writes an ITK transform (``.h5``).

After an external initial transform the parameter files elastix writes reference an ITK
``.tfm`` file that elastix 5.0's ``transformix`` cannot read: the chains written here stand
in for them and reproduce the result on their own.

Transformix 5.0.1 (the Debian program) resolves relative paths in
``InitialTransformParametersFileName`` and ``DeformationFieldFileName`` against its current
working directory, not against the parameter file's folder: the chains link by absolute
paths unless asked for bare file names.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from ..checks import as_xy
from .loading import load_itk_core
from .params import format_parameter_file
from .run import ElastixResult

log = logging.getLogger(__name__)


def _grid_entries(shape_yx, spacing_xy, origin_xy) -> dict[str, list[str]]:
    h, w = shape_yx
    return {
        "FixedImageDimension": ["2"],
        "MovingImageDimension": ["2"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Size": [str(int(w)), str(int(h))],
        "Index": ["0", "0"],
        "Spacing": [repr(float(s)) for s in spacing_xy],
        "Origin": [repr(float(o)) for o in origin_xy],
        "Direction": ["1", "0", "0", "1"],
        "UseDirectionCosines": ["true"],
    }


def _write_field_mha(path: Path, u, *, spacing_xy, origin_xy) -> None:
    from ..io import write_field

    write_field(path, u, spacing_xy=spacing_xy, origin_xy=origin_xy, overwrite=True)


def _edge_padded(result, u0):
    """``(u0 padded, its origin)``: the start field extended by its edge values as far as the
    refinement reaches past the section, so that transformix evaluates the chain (the
    refinement ``b``, then ``u0``) as hybridreg composes it (``fields.compose`` extends
    ``u0`` by its edge values; ITK's displacement field has no displacement past its grid,
    which would blank a border strip wherever ``b`` points outward)."""
    from ..fields import to_pixels

    # |b| <= |total| + |u0|: b(p) = total(p) - u0(p + b(p))
    reach = (np.abs(to_pixels(result.field, result.spacing_xy)).max()
             + np.abs(to_pixels(u0, result.spacing_xy)).max())
    pad = int(np.ceil(reach)) + 2
    sx, sy = result.spacing_xy
    ox, oy = result.origin_xy
    padded = np.pad(np.asarray(u0, np.float32), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    return padded, (ox - pad * sx, oy - pad * sy)


def _deformation_field_map(grid: Mapping[str, list[str]], field_link: str) -> dict:
    """A transformix map applying a displacement-field file (linear field interpolation)."""
    entry = dict(grid)
    entry.update({
        "Transform": ["DeformationFieldTransform"],
        "DeformationFieldFileName": [field_link],
        # elastix's default order 0 (nearest neighbour) would make the field piecewise constant
        "DeformationFieldInterpolationOrder": ["1"],
        "NumberOfParameters": ["0"],
        "HowToCombineTransforms": ["Compose"],
    })
    return entry


def _linker(directory: Path, absolute_paths: bool):
    base = directory.resolve()

    def link(name: str) -> str:
        return str(base / name) if absolute_paths else name

    return link


def _write_chain(chain, directory: Path, link, *, order: list[str],
                 default_pixel: list[str]) -> Path:
    """Write ``TransformParameters.<i>.txt`` files linked in order; return the last path."""
    paths = []
    for i, m in enumerate(chain):
        m = dict(m)
        m.pop("TransformAddress", None)
        previous = ["NoInitialTransform"] if i == 0 else [link(f"TransformParameters.{i - 1}.txt")]
        # elastix 5.0 reads the plural name, elastix >= 5.1 writes (and reads) the singular.
        m["InitialTransformParametersFileName"] = previous
        m["InitialTransformParameterFileName"] = list(previous)
        m.setdefault("HowToCombineTransforms", ["Compose"])
        m["ResampleInterpolator"] = ["FinalBSplineInterpolator"]
        m["FinalBSplineInterpolationOrder"] = list(order)
        m["Resampler"] = ["DefaultResampler"]
        m["DefaultPixelValue"] = list(default_pixel)
        m["ResultImagePixelType"] = ["float"]
        m["ResultImageFormat"] = ["mha"]
        m["CompressResultImage"] = ["false"]
        m["WriteResultImage"] = ["true"]
        path = directory / f"TransformParameters.{i}.txt"
        path.write_text(f"// hybridreg transformix chain, file {i} of {len(chain)}\n"
                        + format_parameter_file(m))
        paths.append(path)
    log.info("wrote a transformix chain of %d file(s) to %s", len(paths), directory)
    return paths[-1]


def _check_order(order) -> list[str]:
    if int(order) not in range(6):
        raise ValueError(f"interpolation order must be 0..5, got {order!r}")
    return [str(int(order))]


def export_transformix_chain(result: ElastixResult, directory, *, absolute_paths: bool = True,
                             final_interpolation_order: int | None = None,
                             field_name: str = "initial_field.mha") -> Path:
    """Write ``result``'s transform as a chain of parameter files for ``transformix``.

    Writes ``TransformParameters.0.txt ... TransformParameters.N.txt`` into ``directory``,
    each linked to the previous one by ``InitialTransformParametersFileName`` (the name
    elastix 5.0 reads; the singular ``InitialTransformParameterFileName`` of elastix >= 5.1
    is written too), such that
    ``transformix -in moving.mha -out OUT -tp DIRECTORY/TransformParameters.N.txt``
    reproduces ``result.warped`` (elastix 5.0.1's ``transformix`` and later). With an
    initial field, the chain starts with a ``DeformationFieldTransform`` file pointing at
    the initial field, written as ``field_name`` (a 2-component float32 ``.mha`` in physical
    units, linearly interpolated: ``DeformationFieldInterpolationOrder 1``), followed by the
    maps elastix found; after ``initial_mode="resample"`` the maps elastix found come first
    and the initial field's file last (transformix applies the file a chain starts with
    first to the fixed points, and the initial field acted after those maps).

    The files ask for a ``float`` result image in ``.mha`` format.

    Parameters
    ----------
    result : ElastixResult
    directory : str or os.PathLike
        Created if missing; existing ``TransformParameters.*.txt`` files are overwritten.
    absolute_paths : bool
        Link files by absolute paths (default). transformix 5.0.1 resolves relative paths
        against its *working directory*, not the parameter file's folder: with
        ``absolute_paths=False`` the links are bare file names, and transformix must be run
        from inside ``directory``.
    final_interpolation_order : int, optional
        Override ``FinalBSplineInterpolationOrder`` (0-5) of the chain's resampling; by
        default the order elastix used is kept, so the result matches ``result.warped``.
    field_name : str
        File name of the initial field inside ``directory``.

    Returns
    -------
    Path
        The last file of the chain (the one to give to ``transformix -tp``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    link = _linker(directory, absolute_paths)
    grid = _grid_entries(result.shape_yx, result.spacing_xy, result.origin_xy)
    chain: list[dict[str, list[str]]] = []
    for m in result.transform_parameter_maps:
        kind = m.get("Transform", [""])[0]
        if kind == "ExternalTransform":
            if result.initial_field is None:
                raise ValueError("the result has an ExternalTransform map but no initial_field "
                                 "to export")
            chain.append(_deformation_field_map(grid, link(field_name)))
        elif kind == "File":
            raise ValueError("the result's transform parameters reference an ITK transform "
                             "file (Transform \"File\"); this cannot be exported for "
                             "transformix 5.0")
        else:
            chain.append(dict(m))
    if result.initial_field is not None:
        if result.initial_mode == "resample":
            chain.append(_deformation_field_map(grid, link(field_name)))
        elif not any(m.get("Transform", [""])[0] == "DeformationFieldTransform" for m in chain):
            # itk-elastix that does not report the external transform: put it in front.
            chain.insert(0, _deformation_field_map(grid, link(field_name)))
        u0, origin = result.initial_field, result.origin_xy
        if result.initial_mode == "resample":
            u0, origin = _edge_padded(result, u0)
        _write_field_mha(directory / field_name, u0, spacing_xy=result.spacing_xy,
                         origin_xy=origin)
    if not chain:
        raise ValueError("the result holds no transform parameter maps")

    # Resampling settings of the last map decide the output; copy them to every file.
    last = result.transform_parameter_maps[-1]
    order = last.get("FinalBSplineInterpolationOrder", ["3"])
    if final_interpolation_order is not None:
        order = _check_order(final_interpolation_order)
    return _write_chain(chain, directory, link, order=order,
                        default_pixel=last.get("DefaultPixelValue", ["0"]))


def export_field_chain(u: np.ndarray, directory, *, spacing_xy=(1.0, 1.0),
                       origin_xy=(0.0, 0.0), interpolation_order: int = 1,
                       absolute_paths: bool = True, field_name: str = "field.mha",
                       field_file=None, grid=None) -> Path:
    """Write any field as a one-file transformix chain (a ``DeformationFieldTransform``).

    ``transformix -in moving.mha -out OUT -tp <returned file>`` then gives
    ``hybridreg.warp.warp(moving, u, order=interpolation_order)``: this is how a section's final
    transform is exported when it is not an elastix transform (a learned field, a
    drift-corrected composition).

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Pull field, physical units (written as ``directory/field_name``).
    directory : str or os.PathLike
    spacing_xy, origin_xy : (float, float)
    interpolation_order : int
        Image interpolation of the resampling (``FinalBSplineInterpolationOrder``, 0-5).
    absolute_paths : bool
        See :func:`export_transformix_chain`.
    field_file : path, optional
        An existing ``.mha`` holding ``u`` (e.g. written by :func:`hybridreg.io.write_field`):
        the chain links to it (by absolute path) instead of writing a copy.
    grid : hybridreg.fields.MapGrid, optional
        ``u`` is a coarse map on ``grid``'s nodes (``spacing_xy`` and ``origin_xy`` are then
        ignored): the field file holds the nodes with their spacing and origin, the chain's
        output grid is the section's, and transformix interpolates the map linearly, as
        :meth:`~hybridreg.fields.MapGrid.dense` does.

    Returns
    -------
    Path
        ``directory/TransformParameters.0.txt``.
    """
    from ..fields import validate_field

    u = validate_field(u)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    link = _linker(directory, absolute_paths)
    sp, org = as_xy(spacing_xy, "spacing_xy"), as_xy(origin_xy, "origin_xy")
    out_shape, out_sp = u.shape[1:], sp
    if grid is not None:
        grid.validate(u)
        sp, org, out_shape, out_sp = (grid.node_spacing_xy, grid.origin_xy, grid.shape_yx,
                                      grid.spacing_xy)
    if field_file is None:
        _write_field_mha(directory / field_name, u, spacing_xy=sp, origin_xy=org)
        target = link(field_name)
    else:
        target = str(Path(field_file).resolve())
    entry = _deformation_field_map(_grid_entries(out_shape, out_sp, org), target)
    return _write_chain([entry], directory, link, order=_check_order(interpolation_order),
                        default_pixel=["0"])


def write_itk_transform(path, transform) -> Path:
    """Write an ITK transform (e.g. ``ElastixResult.transform``) with ``itk.transformwrite``.

    Parameters
    ----------
    path : str or os.PathLike
        ``.h5`` (HDF5; holds displacement-field transforms) or ``.tfm``/``.txt``.
    transform : itk.Transform

    Returns
    -------
    Path
    """
    itk = load_itk_core()  # ITK alone: writing a file needs no elastix
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if type(transform).__name__.endswith("F2"):  # single precision: keep it on disk
        writer = itk.TransformFileWriterTemplate[itk.F].New()
        writer.SetFileName(str(path))
        writer.SetInput(transform)
        writer.SetUseCompression(True)
        writer.Update()
    else:
        itk.transformwrite([transform], str(path), compression=True)
    return path


def write_field_transform(path, u: np.ndarray, *, spacing_xy=(1.0, 1.0),
                          origin_xy=(0.0, 0.0)) -> Path:
    """Write a displacement field as an ITK ``.h5`` transform file, without ITK.

    The file is ITK's own HDF5 transform layout (``/TransformGroup/0``: type
    ``DisplacementFieldTransform_float_2_2``, fixed parameters size, origin, spacing and
    direction, the field's (u_x, u_y) per pixel as float32), written with h5py, compressed
    (byte shuffle + gzip). ``itk.transformread`` reads it as a
    ``DisplacementFieldTransform[itk.D, 2]`` with the same values. Writing it through ITK
    instead costs loading ITK's transform modules (seconds per process) and leaked about
    0.2 MB per file (itk 5.4.7), which grew with the number of sections.

    Parameters
    ----------
    path : str or os.PathLike
        ``.h5`` target (written atomically, replaced if it exists).
    u : ndarray, shape (2, H, W)
        Physical units (a coarse map: its nodes' spacing and origin).
    spacing_xy, origin_xy : (float, float)
    """
    import h5py

    from ..fields import validate_field
    from ..io import atomic_output

    u = validate_field(u)
    h, w = u.shape[1:]
    sp, org = as_xy(spacing_xy, "spacing_xy"), as_xy(origin_xy, "origin_xy")
    try:
        from importlib.metadata import version

        itk_version = version("itk")
    except Exception:  # pragma: no cover - itk is a requirement
        itk_version = "unknown"
    text = h5py.string_dtype("ascii")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:  # HDF5 >= 1.10 reads it
            for key, value in (("HDFVersion", f"HDF5 library version: "
                                              f"{h5py.version.hdf5_version}"),
                               ("ITKVersion", itk_version), ("OSName", "hybridreg"),
                               ("OSVersion", "")):
                f.create_dataset(key, data=np.array([value], dtype=object), dtype=text)
            group = f.create_group("TransformGroup/0")
            group.create_dataset("TransformType", dtype=text, data=np.array(
                ["DisplacementFieldTransform_float_2_2"], dtype=object))
            group.create_dataset("TransformFixedParameters", data=np.array(
                [w, h, *org, *sp, 1.0, 0.0, 0.0, 1.0], np.float64))
            group.create_dataset("TransformParameters",
                                 data=np.moveaxis(u, 0, -1).reshape(-1).astype(np.float32),
                                 compression="gzip", compression_opts=9, shuffle=True)
    return path
