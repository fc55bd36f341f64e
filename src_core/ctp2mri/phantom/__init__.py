"""Digital stroke phantom: paired CT perfusion and diffusion MRI with known ground truth.

No public CTP/DWI pairs can be downloaded, so the project makes its own from physics
(docs/phantom.md): MNI152 anatomy warped per case (`anatomy`), an infarct core in a
larger penumbra within a vascular territory (`lesions`), indicator-dilution CT perfusion
(`perfusion`) and b0/DWI/ADC with Rician noise (`diffusion`), assembled into a case by
`generate` and into a dataset by `dataset`.
"""

from ctp2mri.phantom.dataset import case_seed, generate_dataset, split_cases
from ctp2mri.phantom.generate import (
    PHANTOM_VERSION,
    PhantomCase,
    diffusion_truth,
    frame_times,
    generate_case,
    lesion_truth,
    phantom_maps,
    simulate_case,
)

__all__ = [
    "PHANTOM_VERSION",
    "PhantomCase",
    "case_seed",
    "diffusion_truth",
    "frame_times",
    "generate_case",
    "generate_dataset",
    "lesion_truth",
    "phantom_maps",
    "simulate_case",
    "split_cases",
]
