"""The itk-elastix boundary: parameter maps, pair registration, transform export.

Everything hybridreg does with elastix goes through this package. It holds fields to the
contract of :mod:`hybridreg.fields` (pull fields ``(2, H, W)``, channel 0 = u_x, physical
units with ``spacing_xy`` / ``origin_xy``). Importing it imports neither itk nor elastix.

- :mod:`~hybridreg.elastix.loading`: :func:`load_itk`, itk with the Pool threader, once per
  process;
- :mod:`~hybridreg.elastix.params`: parameter maps and files (shipped, read, built, checked,
  written);
- :mod:`~hybridreg.elastix.run`: :func:`register_pair`, :class:`ElastixResult`, the elastix
  log, the total field;
- :mod:`~hybridreg.elastix.export`: transformix chains and ITK transform files.
"""
# export_field_chain, ITK_DEFAULT_MAPS and TRANSFORM_PENALTIES are public but not in __all__
from .export import export_field_chain, export_transformix_chain, write_itk_transform  # noqa: F401
from .loading import load_itk
from .params import (ITK_DEFAULT_MAPS, TRANSFORM_PENALTIES, adapt_refinement_map,  # noqa: F401
                     parameter_maps, parameter_object, params_dir, refinement_map,
                     shipped_parameter_files, write_parameter_file)
from .run import (ElastixConfigError, ElastixError, ElastixResult, bspline_map_field,
                  parse_final_metric, register_pair)

__all__ = [
    "adapt_refinement_map",
    "write_parameter_file",
    "ElastixError",
    "ElastixConfigError",
    "ElastixResult",
    "load_itk",
    "params_dir",
    "shipped_parameter_files",
    "parameter_object",
    "parameter_maps",
    "refinement_map",
    "parse_final_metric",
    "register_pair",
    "bspline_map_field",
    "export_transformix_chain",
    "write_itk_transform",
]
