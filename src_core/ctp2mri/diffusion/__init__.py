"""Diffusion maths of the conditional LDM: noise schedule (Eq. 1–2, 5), DDIM and DPM-Solver++.

Knows nothing of the networks: a sampler takes any ``eps_model(z_t, t, cond)`` callable.
"""

from ctp2mri.diffusion.ddim import EpsModel, ddim_sample
from ctp2mri.diffusion.dpm_solver import dpm_solver_sample
from ctp2mri.diffusion.schedule import NoiseSchedule

__all__ = ["EpsModel", "NoiseSchedule", "ddim_sample", "dpm_solver_sample"]
