"""What every training loop shares: learning rate, precision, the run folder, logging,
checkpoints and resume.

A training run owns one output folder, which *is* its checkpoint (``config.json`` +
safetensors, `ctp2mri.checkpoints`) plus ``log.csv``. The folder is replaced atomically at
every checkpoint, so it always holds the last complete one; ``log.csv`` is then rewritten
from the loss history stored in the checkpoint's training state and appended to between
checkpoints. A resumed run restarts from the checkpoint's step with the model, optimiser(s),
EMA, data position (`ctp2mri.training.batches`) and every RNG (`ctp2mri.training.rng`) as they
were, so it retraces an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctp2mri.checkpoints import checkpoint_dir, load_training_state, read_config, save_checkpoint
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.provenance import provenance
from ctp2mri.settings import PRECISIONS
from ctp2mri.training.distributed import DistInfo, all_gather_objects, barrier, mean_over_ranks
from ctp2mri.training.rng import portable

__all__ = [
    "LOG_FILE", "Run", "RunLog", "autocast", "base_config", "check_precision", "check_resume_config",
    "check_run_numbers", "command_line", "effective_lr", "make_grad_scaler", "prepare_out_dir", "resume_state",
]

LOG_FILE = "log.csv"
# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {"steps", "num_workers", "device", "checkpoint_every", "log_every"}


def command_line() -> str:
    """The command that started this process, for provenance."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


def effective_lr(base_lr: float, batch_size: int, world_size: int, accumulate: int = 1,
                 scale_lr: bool = True, lr: float | None = None) -> float:
    """The learning rate used: ``lr`` if given, else CompVis/taming's ``scale_lr`` rule.

    ``accumulate · world_size · batch_size · base_lr`` (main.py of CompVis LDM and taming),
    or ``base_lr`` unscaled with ``scale_lr=False``.
    """
    if lr is not None:
        value = float(lr)
    else:
        value = float(base_lr) * (accumulate * world_size * batch_size if scale_lr else 1)
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"the learning rate must be a positive number, got {value}")
    return value


# precision -------------------------------------------------------------------------------------
def check_precision(precision: str, device: torch.device) -> str:
    """A valid autocast precision for ``device``; ``"auto"`` is bf16 on CUDA, fp32 elsewhere."""
    precision = str(precision).lower()
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise InputError(f"--precision {precision} (mixed-precision autocast) needs a CUDA GPU, but training "
                         f"runs on {device}; use --precision fp32 on the CPU")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


def check_run_numbers(*, steps: Any, batch_size: Any, seed: Any, num_workers: Any, checkpoint_every: Any,
                      log_every: Any, lr: Any = None, grad_accum: Any = 1, ema_decay: Any = None,
                      weight_decay: Any = 0.0, grad_clip: Any = None) -> None:
    """Refuse a non-finite or out-of-range training setting before anything is loaded.

    NaN slips through ``< 0``-style checks and would train a network into NaN weights (or, as
    an EMA decay, stop the run at its first step with a bare ValueError)."""
    from ctp2mri.checks import number, optional_number, whole

    for value, name in ((steps, "steps"), (batch_size, "batch size"), (checkpoint_every, "checkpoint interval"),
                        (log_every, "log interval"), (grad_accum, "gradient accumulation")):
        whole(value, name, minimum=1)
    whole(seed, "seed", minimum=0, maximum=2**63 - 1)
    whole(num_workers, "num_workers", minimum=0)
    optional_number(lr, "learning rate", above=0.0)
    optional_number(ema_decay, "EMA decay", minimum=0.0, maximum=1.0)
    number(weight_decay, "weight decay", minimum=0.0)
    optional_number(grad_clip, "gradient clipping norm", above=0.0)


# output folder, resume -------------------------------------------------------------------------
def prepare_out_dir(out: str | os.PathLike, resume: bool) -> Path:
    """The run's folder: new (absent or empty) unless resuming, then an existing checkpoint."""
    out = Path(out)
    if resume:
        if not (out / "config.json").is_file():
            raise InputError(f"cannot resume: {out} holds no checkpoint (config.json); start a new run "
                             "instead (without --resume; in napari, untick 'Continue the saved run')")
        checkpoint_dir(out)
        return out
    if out.exists() and out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise InputError(f"output folder {out} is not empty; continue the run saved there (--resume; in "
                         "napari, tick 'Continue the saved run') or choose a new folder")
    return ensure_writable_dir(out)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix: tree}


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume when a setting that changes the computation differs from the saved run.

    Compares the flattened ``saved`` and ``current`` settings (model configuration, training
    hyper-parameters, data identity), except `RESUMABLE_CHANGES`.
    """
    a, b = _flatten(saved), _flatten(current)
    differ = sorted(k for k in set(a) | set(b)
                    if k.split(".")[-1] not in RESUMABLE_CHANGES and a.get(k, "<absent>") != b.get(k, "<absent>"))
    if differ:
        shown = "; ".join(f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}" for k in differ[:10])
        more = f"; … and {len(differ) - 10} more" if len(differ) > 10 else ""
        raise InputError(f"cannot resume the run in {where} with different settings ({shown}{more}). Resume with "
                         "the original settings, or start a new run in another folder")


# log -------------------------------------------------------------------------------------------
@dataclass
class RunLog:
    """Per-step numbers of a run: kept in memory (and in the checkpoint), mirrored to log.csv."""

    columns: Sequence[str]
    rows: list[list[float]] = field(default_factory=list)
    _written: int = 0  # rows already in log.csv

    def add(self, values: Mapping[str, float]) -> None:
        self.rows.append([float(values.get(c, float("nan"))) for c in self.columns])

    def state(self) -> dict[str, Any]:
        rows = torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.rows), len(self.columns))
        return {"columns": list(self.columns), "rows": rows}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunLog:
        return cls(list(state["columns"]), state["rows"].tolist())

    def values(self, column: str) -> list[float]:
        i = list(self.columns).index(column)
        return [r[i] for r in self.rows]

    def _lines(self, rows: Sequence[Sequence[float]]) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for row in rows:
            writer.writerow(["" if math.isnan(v) else (int(v) if c in ("step", "epoch") else repr(v))
                             for c, v in zip(self.columns, row)])
        return buf.getvalue()

    def rewrite(self, out: Path) -> None:
        """Write log.csv afresh, atomically (after a checkpoint replaced the folder)."""
        with atomic_path(out / LOG_FILE) as tmp:
            tmp.write_text(",".join(self.columns) + "\n" + self._lines(self.rows))
        self._written = len(self.rows)

    def append(self, out: Path) -> None:
        """Append the rows not yet in log.csv (whole lines, flushed)."""
        if self._written == len(self.rows):
            return
        if not (out / LOG_FILE).is_file():
            self.rewrite(out)
            return
        with open(out / LOG_FILE, "a") as f:
            f.write(self._lines(self.rows[self._written:]))
        self._written = len(self.rows)


# the run ---------------------------------------------------------------------------------------
class Run:
    """Checkpointing, logging, progress and cancellation of one training run (all ranks).

    Parameters
    ----------
    out
        The run's folder.
    info
        Distributed context; only rank 0 writes and reports progress.
    total_steps
        Optimiser steps to reach.
    log, checkpoint_every, log_every
        Loss history and intervals (steps).
    progress, cancel
        Contract callback and token; a cancel on any rank stops all ranks at the same step.
    """

    def __init__(self, out: Path, info: DistInfo, total_steps: int, log: RunLog, checkpoint_every: int,
                 log_every: int, progress: ProgressCallback | None, cancel: CancelToken | None) -> None:
        if total_steps < 1:
            raise InputError(f"the number of training steps must be at least 1, got {total_steps}")
        if checkpoint_every < 1 or log_every < 1:
            raise InputError("checkpoint and log intervals must be at least 1 step")
        self.out, self.info, self.total_steps, self.log = out, info, int(total_steps), log
        self.checkpoint_every, self.log_every = int(checkpoint_every), int(log_every)
        self.progress, self.cancel = progress, cancel
        self.started = time.perf_counter()

    def end_step(self, step: int, values: dict[str, float]) -> bool:
        """Record a finished step (rank-averaged numbers); True when the run must stop (cancelled)."""
        flag = 1.0 if self.cancel is not None and self.cancel.cancelled else 0.0
        values = mean_over_ranks({**values, "_cancel": flag}, self.info)
        cancelled = values.pop("_cancel") > 0
        values.update(step=step, seconds=time.perf_counter() - self.started)
        self.log.add(values)
        if self.info.is_main:
            if step % self.log_every == 0:
                self.log.append(self.out)
            if self.progress is not None:
                self.progress(step, self.total_steps, {k: v for k, v in values.items() if k not in ("step",)})
        return cancelled

    def save(self, modules: Mapping[str, torch.nn.Module], config: Mapping[str, Any],
             training_state: dict[str, Any], rng_state: dict[str, Any]) -> None:
        """Checkpoint the run into its folder (rank 0), with every rank's RNG states."""
        rng_states = all_gather_objects(portable(rng_state), self.info)
        if self.info.is_main:
            state = {**training_state, "rng": rng_states, "log": self.log.state()}
            save_checkpoint(self.out, modules, config, state, overwrite=True)
            self.log.rewrite(self.out)
        barrier(self.info)

    def finish_step(self, step: int, cancelled: bool, save: Callable[[], None]) -> None:
        """Checkpoint when due (interval, last step, cancel); raise `Cancelled` after saving."""
        if cancelled or step % self.checkpoint_every == 0 or step >= self.total_steps:
            save()
        if cancelled:
            raise Cancelled(f"training cancelled at step {step}; the checkpoint in {self.out} resumes it "
                            "(run the same command with --resume)", checkpoint=self.out, step=step)


def resume_state(out: Path, current_settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved config and training state of ``out``, after checking the settings match."""
    config = read_config(out)
    check_resume_config(config.get("training", {}), current_settings, out)
    state = load_training_state(out)
    if state is None:
        raise InputError(f"{out} holds a finished model without training state; it cannot be resumed")
    return config, state


def base_config(kind: str, profile: str, settings: Mapping[str, Any], dataset: Any, step: int,
                data_source: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a training checkpoint (the trainer adds kind-specific blocks)."""
    return {
        "kind": kind, "profile": profile,
        "normalisation": dataset.intensity_ranges(),
        "training": dict(settings),
        "provenance": provenance(command=command_line(), data={"source": str(data_source), **dataset.summary()},
                                 steps=step),
        **(extra or {}),
    }
