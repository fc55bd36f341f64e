"""Which noise a slice gets: one generator per (slice, sample) row, seeded from (seed, id, k).

Slice ``i`` of a run starts from z_T drawn by its own generator, seeded from ``(seed, ids[i])``
on the CPU; with DDIM η > 0 the same generator goes on to draw that slice's step noise. A
slice's result therefore depends neither on the batch it was sampled in nor on the device (up
to floating-point summation order), so a batch size is purely a speed/memory setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["initial_noise", "row_generators", "row_seed", "slice_seed"]


def slice_seed(seed: int, slice_id: int) -> int:
    """The 63-bit generator seed of one slice, mixed from (seed, slice_id) by SeedSequence.

    Neighbouring ids give unrelated streams (a plain ``seed + id`` would make runs with
    seeds 0 and 1 share all but one slice's noise).
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                    int(slice_id) & 0xFFFFFFFFFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def row_seed(seed: int, slice_id: int, sample: int = 0) -> int:
    """Generator seed of sample ``sample`` of one slice; sample 0 is `slice_seed` itself.

    Sample 0 of a K-sample run therefore equals the single-sample run, and the other samples
    draw unrelated streams.
    """
    if int(sample) == 0:
        return slice_seed(seed, slice_id)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                    int(slice_id) & 0xFFFFFFFFFFFFFFFF,
                                    int(sample) & 0xFFFFFFFFFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def row_generators(rows: Sequence[tuple[int, int]], seed: int) -> list[torch.Generator]:
    """One CPU generator per (slice id, sample) row, seeded by `row_seed`: the CPU stream is
    the same on every device, and a row never draws from another row's stream."""
    return [torch.Generator(device="cpu").manual_seed(row_seed(seed, slice_id, sample))
            for slice_id, sample in rows]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """z_T of each row, the first draw of its own generator (device- and batch-independent)."""
    out = torch.empty((len(generators), *shape), dtype=torch.float32)
    for r, gen in enumerate(generators):
        out[r] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out
