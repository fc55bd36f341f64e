"""Provenance of what ctp2mri writes: when, by which code (git commit, versions), from which
data and after how many steps. A checkpoint's config.json carries it (``provenance``).
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import Any

import torch

import ctp2mri

__all__ = ["git_commit", "provenance"]


def git_commit() -> str | None:
    """Commit of the source tree ctp2mri runs from (``+dirty`` if modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(
    command: str | None = None, data: Any = None, steps: int | None = None, **extra: Any
) -> dict[str, Any]:
    """Provenance block for config.json: when, by which code, from which data, how long."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "ctp2mri_version": ctp2mri.__version__,
        "torch_version": torch.__version__,
        "data": data,
        "steps": steps,
        **extra,
    }
