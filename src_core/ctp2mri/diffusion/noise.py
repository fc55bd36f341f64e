"""Gaussian noise for the samplers, from one generator or from one generator per batch row.

A single generator fills the whole batch in one draw, so a row's noise depends on how many
rows precede it in its batch: the result of a slice would change with the batch size. With
one generator per row, each row draws only from its own stream, so a slice gets the same
z_T and step noise whichever batch it is sampled in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctp2mri.errors import InputError

#: Where a sampler's noise comes from: one generator for the whole batch, one per batch row
#: (batch-independent), or None for torch's global generator.
NoiseSource = torch.Generator | Sequence[torch.Generator] | None


def check_noise_source(generator: NoiseSource, rows: int) -> None:
    """Refuse a per-row generator list whose length is not the batch's row count: a
    shorter list would silently reuse or drop streams."""
    if isinstance(generator, (list, tuple)) and len(generator) != rows:
        raise InputError(f"{len(generator)} noise generators for {rows} rows")


def standard_normal(shape: Sequence[int], generator: NoiseSource, device: torch.device | str,
                    dtype: torch.dtype) -> torch.Tensor:
    """z ~ N(0, I) of ``shape`` (rows first) on ``device``.

    A generator list draws row ``r`` from ``generator[r]`` on that generator's own device
    and moves the stacked rows to ``device``; CPU generators thus also make the noise
    independent of the device the sampler runs on. A single generator (or None) keeps the
    one-draw path, so results seeded that way stay as they were.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        check_noise_source(generator, shape[0])
        if not generator:
            return torch.empty(shape, device=device, dtype=dtype)  # torch.stack refuses no rows
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
