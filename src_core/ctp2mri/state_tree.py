"""A pickle-free codec for trees of training state (optimiser state, RNG states, log, …): JSON
for the structure and scalars, safetensors for the tensors.

Dicts with non-string keys (optimizer state is keyed by parameter index) and tuples (Adam's
betas, RNG states) are tagged so they come back as they went in. `ctp2mri.checkpoints` stores a
checkpoint's training state with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["decode_tree", "encode_tree"]


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """``obj`` as JSON-able structure; its tensors and arrays go into ``tensors`` (the keys the
    structure refers to, from ``where``, the path in the tree). `decode_tree` inverts it."""
    if isinstance(obj, torch.Tensor):
        key = where or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = where or "array"
        while key in tensors:
            key += "_"
        # safetensors has no unsigned 32/64-bit torch dtypes to round-trip; widen and record.
        arr = obj.astype(np.int64) if obj.dtype in (np.uint32, np.uint64) else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{where}.{k}".lstrip(".")) for k, v in obj.items()}
        items = [
            [encode_tree(k, tensors, f"{where}.key{i}"), encode_tree(v, tensors, f"{where}.{k}")]
            for i, (k, v) in enumerate(obj.items())
        ]
        return {"__items__": items}
    raise TypeError(
        f"training state at {where or '<root>'!r} is a {type(obj).__name__}, which cannot be "
        "stored without pickle; convert it to tensors, numbers, strings, lists or dicts"
    )


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The tree `encode_tree` encoded as ``obj``, with its tensors from ``tensors``."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}
