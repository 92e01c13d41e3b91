"""The iterative method: elastix (itk-elastix) driven by parameter files or maps."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import RegistrationResult, check_pair, content_mask

__all__ = ["ElastixMethod", "DEFAULT_PARAMS"]

#: The default chain: an EM affine followed by a coarse, regularised EM B-spline (params/).
DEFAULT_PARAMS = ("em_affine", "em_bspline")


class ElastixMethod:
    """Register pairs with elastix.

    Parameters
    ----------
    params : path, dict, name or list of these
        Anything :func:`hybridreg.elastix.parameter_maps` accepts: the user's own parameter
        files, shipped names (``"em_affine"``), itk's defaults (``"bspline"``), dicts, or a
        list as a chain. Default: ``("em_affine", "em_bspline")``.
    threads : int, optional
        elastix threads (Pool threader).
    mask_empty : bool
        Leave the empty, zero-filled space of the fixed section out of the similarity
        (:func:`hybridreg.methods.base.content_mask`); default True. The moving section is
        not masked: elastix then needs every sample to map strictly inside the moving mask,
        and fails ("Too many samples map outside moving image buffer") when it does not.

    Notes
    -----
    Older ``references`` are not used: elastix sees the nearest aligned section only.
    """

    name = "elastix"

    def __init__(self, params=DEFAULT_PARAMS, *, threads: int | None = None,
                 mask_empty: bool = True):
        from ..elastix import parameter_maps

        self.params = params
        self.threads = threads
        self.mask_empty = mask_empty
        # resolve now: a missing file or unknown name fails before a long run starts
        self.parameter_maps = parameter_maps(params)

    @property
    def config(self) -> dict:
        return {"method": self.name, "parameter_maps": self.parameter_maps,
                "threads": self.threads, "mask_empty": self.mask_empty}

    def register(self, fixed: np.ndarray, moving: np.ndarray, *,
                 references: Sequence[np.ndarray] = (), spacing_xy=(1.0, 1.0),
                 origin_xy=(0.0, 0.0)) -> RegistrationResult:
        from ..elastix import register_pair

        fixed, moving, _ = check_pair(fixed, moving, references)
        masks = {}
        if self.mask_empty:
            masks = {"fixed_mask": content_mask(fixed)}
        r = register_pair(fixed, moving, params=self.parameter_maps, spacing_xy=spacing_xy,
                          origin_xy=origin_xy, threads=self.threads, **masks)
        return RegistrationResult(
            field=r.field, warped=r.warped, spacing_xy=tuple(spacing_xy),
            origin_xy=tuple(origin_xy), metric=r.final_metric, seconds=r.seconds,
            info={"elastix": r, "parameter_maps": r.parameter_maps})
