"""Random number generators of a training run: seeding, the run's noise generator, and the
states a checkpoint saves so that a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ctp2mri.errors import InputError
from ctp2mri.training.distributed import DistInfo

__all__ = ["capture_rng_state", "noise_generator", "portable", "restore_rng_state", "rng_restore", "rng_snapshot",
           "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (network initialisation draws from torch's global RNG)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def noise_generator(seed: int, info: DistInfo) -> torch.Generator:
    """The run's generator for diffusion timesteps and noise; each rank draws its own stream."""
    gen = torch.Generator(device=info.device)
    gen.manual_seed(int(np.random.SeedSequence([seed, info.rank, 7]).generate_state(1)[0]))
    return gen


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states, for exact resume."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only when CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in state["cuda"]])


def rng_snapshot(generator: torch.Generator) -> dict[str, Any]:
    """This rank's RNGs: Python, NumPy, torch (global, CUDA) and the run's noise generator."""
    return {"global": capture_rng_state(), "generator": generator.get_state()}


def rng_restore(states: Sequence[Mapping[str, Any]], info: DistInfo, generator: torch.Generator) -> None:
    """Restore this rank's `rng_snapshot` from every rank's, as a checkpoint stores them."""
    if len(states) != info.world_size:
        raise InputError(f"the checkpoint was written by {len(states)} training process(es) but this run has "
                         f"{info.world_size}; resume with the same number of processes")
    mine = states[info.rank]
    restore_rng_state(mine["global"])
    generator.set_state(mine["generator"].to(torch.uint8).cpu())


def portable(state: Any) -> Any:
    """RNG states as CPU tensors / plain values (they travel between ranks, then into safetensors)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: portable(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(portable(v) for v in state)
    return state
