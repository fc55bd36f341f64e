"""Diffusion maths of the conditional LDM: noise schedule (Eq. 1–2, 5), DDIM and DPM-Solver++;
and of the Brownian-bridge baseline (BBDM): bridge schedule, objective and sampler.

Knows nothing of the networks: a sampler takes any ``eps_model(z_t, t, cond)`` callable.
"""

from ctp2mri.diffusion.bridge import BrownianBridge, bridge_loss, bridge_sample, bridge_step
from ctp2mri.diffusion.ddim import EpsModel, ddim_sample
from ctp2mri.diffusion.dpm_solver import dpm_solver_sample
from ctp2mri.diffusion.noise import NoiseSource
from ctp2mri.diffusion.schedule import NoiseSchedule

__all__ = ["BrownianBridge", "EpsModel", "NoiseSchedule", "NoiseSource", "bridge_loss", "bridge_sample", "bridge_step",
           "ddim_sample", "dpm_solver_sample"]
