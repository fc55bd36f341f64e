"""Arrays and masks as the metrics read them: numpy from numpy or torch, masks on the images' grid.

Shared by the image metrics (`ctp2mri.evaluation.metrics`) and the lesion and core metrics
(`ctp2mri.evaluation.lesion_metrics`), so both accept the same inputs and refuse a mask off the
images' grid with the same message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ctp2mri.errors import InputError

__all__ = ["ArrayLike", "as_mask", "as_numpy"]

ArrayLike = Any  # np.ndarray | torch.Tensor | nested sequences


def as_numpy(a: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    """A numpy array from an array or a tensor on any device, of any dtype (None keeps it)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()  # bf16 has no numpy dtype
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def as_mask(m: ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Boolean mask (non-zero = inside) broadcast to ``shape``; ``name`` says whose mask it is
    in the error."""
    m = as_numpy(m, dtype=None) > 0
    try:
        return np.broadcast_to(m, shape)
    except ValueError:
        raise InputError(f"the {name} mask has shape {m.shape} but the images have shape "
                         f"{shape}; give a mask on the images' grid") from None
