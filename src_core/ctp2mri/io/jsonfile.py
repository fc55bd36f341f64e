"""Strict JSON for the files ctp2mri writes (report.json, case.json, metrics).

Python's `json` writes NaN and Infinity as bare ``NaN``/``Infinity`` tokens, which are not
JSON: other readers (jq, JavaScript, R) refuse the whole file. Non-finite numbers become
``null`` here, and ``allow_nan=False`` guarantees none slipped through.
"""

from __future__ import annotations

import math
import os
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["json_ready", "strict_json"]


def json_ready(value: Any) -> Any:
    """``value`` with NaN/±inf as None, numpy scalars/arrays as Python ones, tuples as lists,
    paths as strings and dict keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (PurePath, os.PathLike)):
        return os.fspath(value)
    return value


def strict_json(data: Any, indent: int | None = 2) -> str:
    """JSON text of ``data`` (see `json_ready`), ending in a newline."""
    import json

    return json.dumps(json_ready(data), indent=indent, allow_nan=False) + "\n"
