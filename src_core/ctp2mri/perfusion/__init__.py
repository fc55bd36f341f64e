"""Perfusion analysis of a CT perfusion series (Qt-free): CBF, CBV, MTT, Tmax, TTP maps, the
arterial input and venous output functions, and the clinical core / hypoperfusion / mismatch.

`analyse_perfusion` is the one entry point (`ctp2mri perfusion` and the napari widget call
it); `write_perfusion` writes its result as NIfTI maps on the CT's own grid with a report.
"""

from ctp2mri.perfusion.aif import InputFunction, gamma_variate, partial_volume_scale, select_aif, select_vof
from ctp2mri.perfusion.analysis import (
    MAP_NAMES,
    MAP_UNITS,
    PerfusionResult,
    PerfusionSettings,
    analyse_perfusion,
)
from ctp2mri.perfusion.deconvolution import Deconvolver, oscillation_index
from ctp2mri.perfusion.regions import RegionSettings, Regions, hemispheres, ischaemic_regions, remove_islands

__all__ = [
    "MAP_NAMES", "MAP_UNITS", "Deconvolver", "InputFunction", "PerfusionResult", "PerfusionSettings",
    "RegionSettings", "Regions", "analyse_perfusion", "gamma_variate", "hemispheres", "ischaemic_regions",
    "oscillation_index", "partial_volume_scale", "remove_islands", "select_aif", "select_vof",
]
