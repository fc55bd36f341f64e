"""The case context of every training case, and each batch row's (`ctp2mri.models.case_context`).

A batch holds slices of many cases, so the context cannot be read from the batch: it is read
once per case, from all of that case's slices in the dataset, by the network's frozen context
encoder, before the run starts, and looked up by case name for each row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ctp2mri.errors import InputError

__all__ = ["case_contexts", "with_context"]


def case_contexts(cldm: torch.nn.Module, dataset: Any, batch_size: int = 16) -> dict[str, float]:
    """Case name → context for every case of a `ctp2mri.data.SliceDataset` (its stored,
    unaugmented CTP slices), read by ``cldm.case_context_of``."""
    cldm = getattr(cldm, "module", cldm)
    if not getattr(cldm, "takes_context", False):
        raise InputError("this network does not take the case context")
    out: dict[str, float] = {}
    for i, name in enumerate(dataset.case_names):
        rows = torch.nonzero(dataset.case_index == i).flatten()
        out[name] = cldm.case_context_of(dataset.cond[rows].to(torch.float32), batch_size)
    return out


def with_context(batch: Mapping[str, Any], contexts: Mapping[str, float]) -> dict[str, Any]:
    """``batch`` with ``context`` (B,), its rows' case contexts looked up by ``batch["case"]``."""
    try:
        values = [contexts[name] for name in batch["case"]]
    except KeyError as exc:
        raise InputError(f"no case context for case {exc.args[0]!r}; it must come from the run's dataset") from None
    return {**batch, "context": torch.tensor(values, dtype=torch.float32)}
