"""The displacement-field contract of hybridreg, and field algebra.

Every module of hybridreg holds to this contract; so must code that hands fields to it.

Direction (pull)
    A field ``u`` lives on the *fixed* (output) grid. The fixed physical point ``p`` maps to
    the moving point ``p + u(p)``, and the warped image is ``warped(p) = moving(p + u(p))``.
    This is what ITK's ``DisplacementFieldTransform`` and the deformation fields of
    elastix/transformix mean, so a hybridreg field *is* an ITK/elastix field.

Layout
    numpy ``(2, H, W)`` float32; torch ``(B, 2, H, W)``. Channel 0 is ``u_x`` (along W,
    the columns), channel 1 is ``u_y`` (along H, the rows). Spatial axes stay in memory order
    (y, x). Stacks of fields are ``(Z, 2, H, W)``.

Units
    Physical units (the grid's spacing units, e.g. nm) in every public function and on disk,
    always together with the grid: ``spacing_xy`` and ``origin_xy``. With the default spacing
    of 1, physical units are pixels. Pixel displacements (``disp_px``, ``u_px``) appear only
    inside ``hybridreg.models``; :func:`to_pixels` and :func:`to_physical` are the one place
    that converts. Direction cosines are always the identity.

Grid
    Pixel ``(i, j)`` (row, column) is centred at physical point
    ``(x, y) = (origin_x + j * spacing_x, origin_y + i * spacing_y)``, as in ITK. Fixed and
    moving sections of one stack share a grid.

To ITK
    :func:`to_itk` builds ``itk.Image[itk.Vector[itk.D, 2], 2]`` with
    ``itk.image_from_array(np.moveaxis(u, 0, -1).astype(np.float64), is_vector=True)``, then
    sets origin, spacing and direction explicitly (``CopyInformation`` from a scalar image
    would reset the vector length). :func:`to_itk_transform` wraps it in a
    ``DisplacementFieldTransform[itk.D, 2]``. :func:`from_itk_transform` samples any ITK
    transform (an elastix result, a composite chain) back into a field.

To torch
    ``grid_sample`` is always called with an explicit ``align_corners``; the mapping from
    pixel displacements to normalised sampling coordinates is :func:`sampling_grid`, and
    nowhere else.

Coarse maps
    A stack's transforms are coarse maps: a field on nodes every ``S`` pixels of the section
    grid (:class:`MapGrid`: spacing ``S * spacing_xy``, origin the section's origin, enough
    nodes to cover the last pixel), bilinear between nodes. That is how ITK's
    ``DisplacementFieldTransform`` and transformix's ``DeformationFieldTransform`` (order 1)
    interpolate a displacement image, so a map is itself an ITK/elastix field: written with
    its own spacing and origin, it warps exactly as its dense upsampling. Methods register a
    pair (or a tile) densely; the dense field is projected on the nodes (least squares,
    :meth:`MapGrid.project`, or tile by tile with :meth:`MapGrid.rhs`) and exists only while
    its tile is used. The joint solve, composition along the stack, rendering (chunk by chunk,
    :meth:`MapGrid.dense` of a window) and export work on maps. The default stride is
    :data:`DEFAULT_STRIDE` = 32 px (chosen by measurement, benchmarks/RESULTS.md "Coarse maps:
    the stride": within 0.05 px of the dense fields' accuracy for every method, and with
    maps kept to 1/256 px the files of a section under 1% of its uint8 bytes); ``S = 1``
    is the dense field.

On disk
    One ITK vector image per section (``DIR/section_0000.mha``) in physical units carrying its
    grid's spacing and origin (a map's nodes, or a dense field's pixels; see
    :mod:`hybridreg.io`), plus, where there is one, the section's ITK transform (``.h5``).

Composition
    ``compose(first, second)`` is the field of the point map ``p -> q = p + first(p) ->
    q + second(q)``, so ``warp(moving, compose(first, second)) == warp(warp(moving, second),
    first)`` up to interpolation. Aligning section k to the aligned section k-1 with a pairwise
    field ``v_k`` (raw k-1 grid to raw k) gives ``U_k = compose(U_{k-1}, v_k)``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from .checks import as_spacing_xy, as_xy

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "identity",
    "validate_field",
    "to_pixels",
    "to_physical",
    "physical_grid",
    "sample_field",
    "compose",
    "invert",
    "resample",
    "jacobian_determinant",
    "folding_fraction",
    "to_itk",
    "from_itk",
    "to_itk_transform",
    "from_itk_transform",
    "sampling_grid",
    "normalized_coords",
    "MapGrid",
    "DEFAULT_STRIDE",
]


def identity(shape_yx: Sequence[int], *, dtype=np.float32) -> np.ndarray:
    """Return the identity field, all zeros.

    Parameters
    ----------
    shape_yx : (int, int)
        Grid shape ``(H, W)``.

    Returns
    -------
    u : ndarray, shape (2, H, W)
    """
    h, w = (int(s) for s in shape_yx)
    return np.zeros((2, h, w), dtype=dtype)


def validate_field(u, *, name: str = "u", shape_yx: Sequence[int] | None = None) -> np.ndarray:
    """Check that ``u`` is a finite ``(2, H, W)`` field and return it as float32.

    Raises
    ------
    ValueError
        With a message naming ``name``, the expected layout and what was found.
    """
    arr = np.asarray(u)
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise ValueError(
            f"{name} must be a displacement field of shape (2, H, W) (channel 0 = u_x, "
            f"channel 1 = u_y), got shape {arr.shape}"
        )
    if arr.shape[1] < 2 or arr.shape[2] < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got {arr.shape[1:]}")
    if shape_yx is not None and tuple(arr.shape[1:]) != tuple(int(s) for s in shape_yx):
        raise ValueError(
            f"{name} has grid shape {tuple(arr.shape[1:])}, expected {tuple(shape_yx)}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def to_pixels(u: np.ndarray, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Physical displacement ``(2, ...)`` to pixels: divide u_x by spacing_x, u_y by spacing_y."""
    sx, sy = as_spacing_xy(spacing_xy)
    scale = np.array([sx, sy], dtype=np.float64).reshape((2,) + (1,) * (np.ndim(u) - 1))
    return (np.asarray(u) / scale).astype(np.float32)


def to_physical(u_px: np.ndarray, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Pixel displacement ``(2, ...)`` to physical units: the inverse of :func:`to_pixels`."""
    sx, sy = as_spacing_xy(spacing_xy)
    scale = np.array([sx, sy], dtype=np.float64).reshape((2,) + (1,) * (np.ndim(u_px) - 1))
    return (np.asarray(u_px) * scale).astype(np.float32)


def physical_grid(shape_yx, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)) -> np.ndarray:
    """Physical coordinates of the pixel centres.

    Returns
    -------
    p : ndarray, shape (2, H, W), float64
        ``p[0]`` is x, ``p[1]`` is y.
    """
    sx, sy = as_spacing_xy(spacing_xy)
    ox, oy = as_xy(origin_xy, "origin_xy")
    h, w = (int(s) for s in shape_yx)
    y, x = np.meshgrid(np.arange(h) * sy + oy, np.arange(w) * sx + ox, indexing="ij")
    return np.stack([x, y])


def sample_field(u: np.ndarray, points_px: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Sample a field at continuous pixel positions, extending it constantly past its edges.

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
    points_px : ndarray, shape (2, ...)
        Positions as (x, y) in pixel units of ``u``'s grid.
    order : int
        Spline order (1 = bilinear).

    Returns
    -------
    ndarray, shape (2, ...)
    """
    coords = np.stack([points_px[1], points_px[0]])  # (row, col) for scipy
    return np.stack(
        [ndimage.map_coordinates(c, coords, order=order, mode="nearest") for c in u]
    ).astype(np.float32)


def index_grid(shape_yx) -> np.ndarray:
    """Pixel coordinates ``(2, H, W)`` float64: channel 0 the column x, channel 1 the row y."""
    h, w = shape_yx
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
    return np.stack([x, y])


def compose(first: np.ndarray, second: np.ndarray, *, spacing_xy=(1.0, 1.0),
            order: int = 1) -> np.ndarray:
    """Compose two pull fields on one grid: ``c(p) = first(p) + second(p + first(p))``.

    ``warp(moving, c)`` equals ``warp(warp(moving, second), first)`` up to interpolation:
    ``second`` is applied to the moving image first, then ``first``. ``second`` is extended
    constantly beyond its grid.

    Parameters
    ----------
    first, second : ndarray, shape (2, H, W)
        Physical units.
    spacing_xy : (float, float)

    Returns
    -------
    c : ndarray, shape (2, H, W), float32
    """
    first = validate_field(first, name="first")
    second = validate_field(second, name="second", shape_yx=first.shape[1:])
    pts = index_grid(first.shape[1:]) + to_pixels(first, spacing_xy)
    return (first + sample_field(second, pts, order=order)).astype(np.float32)


def invert(u: np.ndarray, *, spacing_xy=(1.0, 1.0), iterations: int = 100,
           tol_px: float = 1e-4) -> np.ndarray:
    """Numerically invert a pull field by fixed-point iteration.

    Returns ``v`` with ``v(p) = -u(p + v(p))``, so that ``compose(u, v)`` and
    ``compose(v, u)`` are close to zero where both are defined. Converges when the field's
    gradient stays below 1 (no folding).

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Physical units.
    iterations : int
        Maximum number of iterations.
    tol_px : float
        Stop when the largest update is below this many pixels.

    Returns
    -------
    v : ndarray, shape (2, H, W), float32
    """
    u = validate_field(u)
    u_px = to_pixels(u, spacing_xy).astype(np.float64)
    grid = index_grid(u.shape[1:])
    v_px = -u_px
    for it in range(iterations):
        new = -sample_field(u_px, grid + v_px).astype(np.float64)
        step = float(np.abs(new - v_px).max())
        v_px = new
        if step < tol_px:
            break
    else:
        log.warning("invert: no convergence after %d iterations (last step %.3g px)",
                    iterations, step)
    return to_physical(v_px, spacing_xy)


def resample(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0),
             to_shape_yx, to_spacing_xy, to_origin_xy=(0.0, 0.0),
             order: int = 1) -> np.ndarray:
    """Resample a field onto another grid (e.g. a coarse field onto the full-resolution one).

    Values are physical displacements and are not rescaled; the field is extended constantly
    past its edges.

    Returns
    -------
    ndarray, shape (2, *to_shape_yx), float32
    """
    u = validate_field(u)
    sx, sy = as_spacing_xy(spacing_xy)
    ox, oy = as_xy(origin_xy, "origin_xy")
    p = physical_grid(to_shape_yx, spacing_xy=to_spacing_xy, origin_xy=to_origin_xy)
    pts = np.stack([(p[0] - ox) / sx, (p[1] - oy) / sy])
    return sample_field(u, pts, order=order)


def jacobian_determinant(u: np.ndarray, *, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """Jacobian determinant of the point map ``p -> p + u(p)``.

    Central differences in physical units; 1 means no local area change, values <= 0 mean
    folding.

    Returns
    -------
    det : ndarray, shape (H, W), float32
    """
    u = validate_field(u).astype(np.float64)
    sx, sy = as_spacing_xy(spacing_xy)
    dux_dy, dux_dx = np.gradient(u[0], sy, sx)
    duy_dy, duy_dx = np.gradient(u[1], sy, sx)
    return ((1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx).astype(np.float32)


def folding_fraction(u: np.ndarray, *, spacing_xy=(1.0, 1.0), mask=None) -> float:
    """Fraction of pixels (within ``mask``, if given) whose Jacobian determinant is <= 0."""
    det = jacobian_determinant(u, spacing_xy=spacing_xy)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != det.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {det.shape}")
        det = det[mask]
    if det.size == 0:
        return 0.0
    return float(np.mean(det <= 0))


# --- ITK -------------------------------------------------------------------------------------

def to_itk(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)):
    """Field to ``itk.Image[itk.Vector[itk.D, 2], 2]`` with spacing, origin and direction set.

    Parameters
    ----------
    u : ndarray, shape (2, H, W)
        Physical units.
    """
    from .itkimage import to_itk as image_to_itk

    u = validate_field(u)
    return image_to_itk(np.moveaxis(u, 0, -1).astype(np.float64),
                        spacing=as_spacing_xy(spacing_xy), origin=as_xy(origin_xy, "origin_xy"),
                        is_vector=True)


def from_itk(image) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """ITK 2D vector image (a displacement field) to ``(u, spacing_xy, origin_xy)``.

    Returns
    -------
    u : ndarray, shape (2, H, W), float32, physical units
    spacing_xy, origin_xy : (float, float)
    """
    from .itkimage import from_itk as image_from_itk

    if image.GetImageDimension() != 2:
        raise ValueError(f"expected a 2D vector image, got dimension {image.GetImageDimension()}")
    arr, spacing, origin = image_from_itk(image, what="displacement-field image", dimension=2)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise ValueError(f"expected a 2-component vector image, got array shape {arr.shape}")
    return np.moveaxis(arr, -1, 0).astype(np.float32), spacing, origin


def to_itk_transform(u: np.ndarray, *, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0),
                     single: bool = False):
    """Field to ``itk.DisplacementFieldTransform[itk.D, 2]`` (linear interpolation of the field).

    ``single=True`` gives ``DisplacementFieldTransform[itk.F, 2]`` (float32, as fields are
    kept): written to ``.h5`` it takes half the bytes, and ``itk.transformread`` reads it
    back as a double transform with the same values.
    """
    import itk  # lazy: importing hybridreg must not import itk

    if single:
        from .itkimage import to_itk as image_to_itk

        u = validate_field(u)
        image = image_to_itk(np.moveaxis(u, 0, -1).astype(np.float32),
                             spacing=as_spacing_xy(spacing_xy),
                             origin=as_xy(origin_xy, "origin_xy"), is_vector=True)
        transform = itk.DisplacementFieldTransform[itk.F, 2].New()
        transform.SetDisplacementField(image)
        return transform
    transform = itk.DisplacementFieldTransform[itk.D, 2].New()
    transform.SetDisplacementField(to_itk(u, spacing_xy=spacing_xy, origin_xy=origin_xy))
    return transform


def from_itk_transform(transform, *, shape_yx, spacing_xy=(1.0, 1.0),
                       origin_xy=(0.0, 0.0)) -> np.ndarray:
    """Sample any 2D ITK transform on a grid into a field: ``u(p) = T(p) - p``.

    ITK transforms map fixed points to moving points, which is the pull direction of the
    contract, so this is exact up to float precision.

    Returns
    -------
    u : ndarray, shape (2, H, W), float32, physical units
    """
    import itk  # lazy: importing hybridreg must not import itk

    h, w = (int(s) for s in shape_yx)
    # wrapped for float vector images only; T(p) - p is computed in double, then stored as
    # float32, the contract's in-memory type
    field_type = itk.Image[itk.Vector[itk.F, 2], 2]
    filt = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New()
    filt.SetTransform(transform)
    filt.UseReferenceImageOff()
    filt.SetSize([w, h])
    filt.SetOutputSpacing([float(s) for s in as_spacing_xy(spacing_xy)])
    filt.SetOutputOrigin([float(o) for o in as_xy(origin_xy, "origin_xy")])
    filt.Update()
    return from_itk(filt.GetOutput())[0]


# --- torch -----------------------------------------------------------------------------------

def sampling_grid(u_px: "torch.Tensor", *, align_corners: bool) -> "torch.Tensor":
    """Pixel displacements to the normalised sampling grid of ``torch.nn.functional.grid_sample``.

    Normalised coordinates come from :func:`normalized_coords`, the one place they are
    computed.

    Parameters
    ----------
    u_px : Tensor, shape (B, 2, H, W)
        Pull displacement in pixels, channel 0 = x.
    align_corners : bool
        Must be passed to ``grid_sample`` with the same value. With ``True``, -1 and 1 are the
        centres of the corner pixels; with ``False``, their outer edges.

    Returns
    -------
    grid : Tensor, shape (B, H, W, 2), last axis (x, y)
    """
    import torch

    if u_px.ndim != 4 or u_px.shape[1] != 2:
        raise ValueError(f"u_px must have shape (B, 2, H, W), got {tuple(u_px.shape)}")
    _, _, h, w = u_px.shape
    if h < 2 or w < 2:
        raise ValueError(f"fields must be at least 2x2 pixels, got {h}x{w}")
    ys = torch.arange(h, dtype=u_px.dtype, device=u_px.device)
    xs = torch.arange(w, dtype=u_px.dtype, device=u_px.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    xn, yn = normalized_coords(gx + u_px[:, 0], gy + u_px[:, 1], (h, w),
                               align_corners=align_corners)
    return torch.stack([xn, yn], dim=-1)


def normalized_coords(x, y, shape_yx, *, align_corners: bool):
    """Pixel positions ``x`` (columns), ``y`` (rows) of an input of ``shape_yx`` in
    ``grid_sample``'s normalised coordinates (arrays or tensors): the one place they are
    computed (:func:`sampling_grid`, and the joint solve's sampling of pair maps)."""
    h, w = shape_yx
    if align_corners:
        return 2.0 * x / (w - 1) - 1.0, 2.0 * y / (h - 1) - 1.0
    return (2.0 * x + 1.0) / w - 1.0, (2.0 * y + 1.0) / h - 1.0


# --- coarse maps -----------------------------------------------------------------------------

#: Default stride of coarse maps, in pixels between nodes (chosen by measurement: see
#: benchmarks/RESULTS.md, "Coarse maps: the stride").
DEFAULT_STRIDE = 32

#: Maps are kept to 1/256 pixel (:meth:`MapGrid.quantize`): 0.002 px at most, and the
#: files compress to about half.
QUANTUM_PX = 2.0 ** -8


def _hat_matrix(start: int, stop: int, stride: int, n_nodes: int):
    """Sparse ``(stop - start, n_nodes)`` matrix of the linear ("hat") basis: row ``i`` holds
    the weights of the two nodes around pixel ``start + i`` (node ``n`` at pixel ``n * S``)."""
    return interp_matrix(np.arange(start, stop, dtype=np.float64) / stride, n_nodes)


def interp_matrix(t: np.ndarray, n: int):
    """Sparse ``(len(t), n)`` matrix of linear interpolation at positions ``t`` (in samples
    of a grid of ``n``), constant past both ends: ``interp_matrix(t, n) @ v`` interpolates
    ``v``. Along both axes it samples a field on a regular grid separably, at the cost of
    the samples (``A_y @ u @ A_x.T``), without a coordinate array."""
    from scipy import sparse

    t = np.clip(np.asarray(t, np.float64), 0.0, n - 1)
    i0 = np.minimum(np.floor(t).astype(np.int64), n - 1)
    f = t - i0
    i1 = np.minimum(i0 + 1, n - 1)
    rows = np.arange(len(t))
    return sparse.csr_matrix(
        (np.concatenate([1.0 - f, f]), (np.concatenate([rows, rows]),
                                        np.concatenate([i0, i1]))),
        shape=(len(t), n))


class MapGrid:
    """The grid of a coarse map: nodes every ``stride`` pixels of a section's grid.

    A coarse map ``m`` is a field ``(2, h, w)`` (physical units, pull direction) on the nodes
    ``(i * S, j * S)`` (pixel row, column) of a section of ``shape_yx``: its spacing is
    ``S * spacing_xy`` and its origin the section's ``origin_xy``; there are enough nodes to
    cover the last pixel (``h = ceil((H - 1) / S) + 1``). Between nodes the field is
    bilinear, as ITK's ``DisplacementFieldTransform`` and transformix's
    ``DeformationFieldTransform`` (order 1) interpolate it, so the map *is* an ITK
    displacement field with that spacing and origin, and it warps exactly as its dense
    upsampling (:meth:`dense`). ``stride=1`` is the dense field itself.

    Parameters
    ----------
    shape_yx : (int, int)
        The section's grid ``(H, W)``.
    stride : int
        Pixels between nodes (>= 1).
    spacing_xy, origin_xy : (float, float)
        The section's spacing and origin.
    """

    def __init__(self, shape_yx, *, stride: int = DEFAULT_STRIDE, spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)):
        h, w = (int(s) for s in shape_yx)
        if h < 2 or w < 2:
            raise ValueError(f"a section grid must be at least 2x2 pixels, got {h}x{w}")
        if isinstance(stride, bool) or int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be an integer >= 1 (pixels between nodes), got "
                             f"{stride!r}")
        self.shape_yx = (h, w)
        self.stride = int(stride)
        self.spacing_xy = as_spacing_xy(spacing_xy)
        self.origin_xy = tuple(float(o) for o in as_xy(origin_xy, "origin_xy"))
        s = self.stride
        self.node_shape = (-(-(h - 1) // s) + 1, -(-(w - 1) // s) + 1)

    def __repr__(self) -> str:
        return (f"MapGrid({self.shape_yx}, stride={self.stride}, spacing_xy={self.spacing_xy}, "
                f"origin_xy={self.origin_xy})")

    def __eq__(self, other) -> bool:
        return isinstance(other, MapGrid) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple:
        return (self.shape_yx, self.stride, self.spacing_xy, self.origin_xy)

    def to_dict(self) -> dict:
        """JSON-able description (``grid.json`` of a run's transforms)."""
        return {"shape_yx": list(self.shape_yx), "stride": self.stride,
                "spacing_xy": list(self.spacing_xy), "origin_xy": list(self.origin_xy)}

    @classmethod
    def from_dict(cls, d: dict) -> "MapGrid":
        return cls(d["shape_yx"], stride=d["stride"], spacing_xy=d["spacing_xy"],
                   origin_xy=d["origin_xy"])

    @property
    def node_spacing_xy(self) -> tuple[float, float]:
        """Physical distance between nodes: ``stride * spacing_xy``."""
        return (self.spacing_xy[0] * self.stride, self.spacing_xy[1] * self.stride)

    @property
    def node_origin_xy(self) -> tuple[float, float]:
        """Physical position of node (0, 0): the section's first pixel."""
        return self.origin_xy

    def zeros(self) -> np.ndarray:
        """The identity map, ``(2, h, w)`` float32 zeros."""
        return np.zeros((2,) + self.node_shape, np.float32)

    def validate(self, m, *, name: str = "map") -> np.ndarray:
        """Check that ``m`` is a finite map on these nodes; return it as float32."""
        return validate_field(m, name=name, shape_yx=self.node_shape)

    def _hats(self, y0, y1, x0, x1):
        h, w = self.shape_yx
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"window y {y0}:{y1}, x {x0}:{x1} is not inside the {h}x{w} grid")
        return (_hat_matrix(y0, y1, self.stride, self.node_shape[0]),
                _hat_matrix(x0, x1, self.stride, self.node_shape[1]))

    def dense(self, m: np.ndarray, y0: int = 0, y1: int | None = None, x0: int = 0,
              x1: int | None = None) -> np.ndarray:
        """The map's dense field on the pixels ``[y0:y1, x0:x1]`` (bilinear between nodes).

        Cost and memory are those of the window: a tile's dense field, never the section's
        unless asked for.

        Returns
        -------
        ndarray, shape (2, y1 - y0, x1 - x0), float32, physical units
        """
        h, w = self.shape_yx
        y1 = h if y1 is None else int(y1)
        x1 = w if x1 is None else int(x1)
        if self.stride == 1:
            return np.ascontiguousarray(np.asarray(m, np.float32)[:, y0:y1, x0:x1])
        hy, hx = self._hats(int(y0), y1, int(x0), x1)
        m = np.asarray(m, np.float64)
        return np.stack([(hy @ (hx @ c.T).T) for c in m]).astype(np.float32)

    def rhs(self, u: np.ndarray, y0: int = 0, x0: int = 0, weight=None) -> np.ndarray:
        """A dense window's contribution to :meth:`project`: ``H_y^T (w u) H_x`` on the nodes.

        ``u`` (2, th, tw) is the field on pixels ``[y0:y0+th, x0:x0+tw]``; ``weight``
        (th, tw), or a pair of 1-D weights ``(wy, wx)`` whose outer product it is, blends
        overlapping windows (their weights summing to one on every pixel). Sums of the
        contributions of windows covering the grid, given to :meth:`solve`, give the map.

        Returns
        -------
        ndarray, shape (2, h, w), float64
        """
        th, tw = u.shape[1:]
        hy, hx = self._hats(int(y0), int(y0) + th, int(x0), int(x0) + tw)
        if weight is not None:
            if isinstance(weight, tuple):
                weight = np.outer(weight[0], weight[1])
            u = u * weight
        return np.stack([np.asarray(hy.T @ (hx.T @ np.asarray(c, np.float64).T).T)
                         for c in u])

    def _gram(self, axis: int):
        """The 1-D Gram matrix of the hat basis over the section's pixels, banded (l=u=1)."""
        n_px, n = self.shape_yx[axis], self.node_shape[axis]
        hat = _hat_matrix(0, n_px, self.stride, n)
        g = (hat.T @ hat).tocsr()
        ab = np.zeros((3, n))
        ab[1] = g.diagonal()
        ab[0, 1:] = g.diagonal(1)
        ab[2, :-1] = g.diagonal(-1)
        return ab

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Nodes from summed :meth:`rhs` contributions: the least-squares (L2) fit."""
        from scipy.linalg import solve_banded

        gy, gx = self._gram(0), self._gram(1)
        out = np.empty(rhs.shape, np.float64)
        for c in range(rhs.shape[0]):
            t = solve_banded((1, 1), gx, rhs[c].T)        # along x, all node rows at once
            out[c] = solve_banded((1, 1), gy, t.T)        # along y
        return out.astype(np.float32)

    def project(self, u: np.ndarray) -> np.ndarray:
        """The map closest to a dense field (least squares over the section's pixels).

        Parameters
        ----------
        u : ndarray, shape (2, H, W)
            Dense field on the section grid, physical units.

        Returns
        -------
        ndarray, shape (2, h, w), float32
            ``dense(project(u))`` is the bilinear field nearest ``u`` (mean squared error);
            with ``stride=1`` it is ``u``.
        """
        u = validate_field(u, name="field", shape_yx=self.shape_yx)
        if self.stride == 1:
            return u.copy()
        return self.solve(self.rhs(u))

    def quantum(self) -> float:
        """The step maps are kept to: the largest power of two (physical units) at most
        :data:`QUANTUM_PX` of the smaller pixel spacing."""
        return float(2.0 ** np.floor(np.log2(min(self.spacing_xy) * QUANTUM_PX)))

    def quantize(self, m: np.ndarray) -> np.ndarray:
        """``m`` rounded to :meth:`quantum` (at most 0.002 px away): multiples of a power
        of two leave the low bits of the float32 values zero, and the map's files compress
        to about half (benchmarks/RESULTS.md, "Coarse maps: the stride"). Dense fields
        (``stride=1``) are kept as they are."""
        if self.stride == 1:
            return np.asarray(m, np.float32)
        q = self.quantum()
        return (np.round(np.asarray(m, np.float64) / q) * q).astype(np.float32)
