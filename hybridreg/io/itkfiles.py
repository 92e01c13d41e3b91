"""Stacks in ITK's image formats: MetaImage (``.mha``/``.mhd``), NRRD (``.nrrd``/``.nhdr``)
and NIfTI (``.nii``/``.nii.gz``), read with SimpleITK.

A 3D image is a stack (z = the third axis, one section per slice), a 2D image one section.
Spacing comes from the image (x, y, z). Vector images (a displacement field is one) and
images with a non-identity direction are refused with a clear message: hybridreg's grids
are axis-aligned. Read lazily, one slice is extracted per section (MetaImage and NRRD
stream it from the file; a compressed NIfTI is decompressed for each one).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import SectionSource, StackError, check_shape

ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")


def is_itk_image(file) -> bool:
    """Whether the path names one of :data:`ITK_SUFFIXES`."""
    name = str(file).lower()
    return name.endswith(ITK_SUFFIXES)


def _info(file: Path):
    """``(shape_zyx, dtype, spacing_xyz)`` from the header alone."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise StackError(f"cannot read '{file}': not a readable image (corrupt or "
                         f"truncated?): {exc}".splitlines()[0]) from exc
    dim = reader.GetDimension()
    n = reader.GetNumberOfComponents()
    if n != 1:
        raise StackError(f"'{file}': has {n} components per pixel (a vector or colour "
                         f"image, e.g. a displacement field); a stack has one")
    if dim not in (2, 3):
        raise StackError(f"'{file}': is a {dim}D image; a stack is 2D (one section) or 3D")
    if not np.allclose(reader.GetDirection(), np.eye(dim).ravel()):
        raise StackError(f"'{file}': non-identity direction {reader.GetDirection()}; "
                         f"hybridreg supports axis-aligned grids only (resample it first)")
    size = reader.GetSize()
    spacing = tuple(float(s) for s in reader.GetSpacing())
    if dim == 2:
        shape, spacing = (1, size[1], size[0]), spacing + (1.0,)
    else:
        shape = (size[2], size[1], size[0])
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * dim, reader.GetPixelID()))
                     .dtype)
    return check_shape(shape, f"'{file}'"), dtype, spacing


def read_itk_image(file: Path):
    """``(data (Z, H, W), spacing_xyz)`` of a whole image file."""
    import SimpleITK as sitk

    _info(file)  # the checks, with their messages
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
    spacing = _info(file)[2]
    return (arr[None] if arr.ndim == 2 else arr), spacing


class ITKImageSource(SectionSource):
    """Sections of an ITK image file: one slice extracted per read."""

    def __init__(self, file, shape, dtype):
        self.file, self.shape, self.dtype = os.path.abspath(file), shape, dtype
        self.where = f"'{file}'"

    @classmethod
    def open(cls, file: Path):
        shape, dtype, spacing = _info(file)
        return cls(file, shape, dtype), spacing

    def read(self, k):
        z, h, w = self.shape
        return self.read_region(k, slice(0, h), slice(0, w))

    def read_region(self, k, ys, xs):
        """ITK's extraction of the region (streamed by the formats that can, MetaImage)."""
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(self.file)
        reader.ReadImageInformation()
        size = [xs.stop - xs.start, ys.stop - ys.start]
        if reader.GetDimension() == 3:
            reader.SetExtractIndex([xs.start, ys.start, int(k)])
            reader.SetExtractSize(size + [0])  # 0: that axis is collapsed, a 2D slice
        else:
            reader.SetExtractIndex([xs.start, ys.start])
            reader.SetExtractSize(size)
        return sitk.GetArrayFromImage(reader.Execute())
