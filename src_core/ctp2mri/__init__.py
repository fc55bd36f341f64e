"""ctp2mri: Qt-free core of napari-ctp2mri.

Synthesises diffusion MRI (DWI, ADC) from CT perfusion with a conditional latent
diffusion model and lesion-aware post-training (Lee et al., MICCAI 2025).
"""

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

__all__ = ["InputError", "Volume", "__version__"]
__version__ = "0.1.0"
