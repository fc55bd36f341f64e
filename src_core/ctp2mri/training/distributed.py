"""DistributedDataParallel under ``torchrun``: process group from the environment, rank-0 I/O.

``torchrun --nproc_per_node N python -m ctp2mri.cli train-ldm ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; a plain ``python`` run has none
of them and trains in one process with the same code path (world size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ctp2mri.devices import resolve_device_with_notice
from ctp2mri.errors import InputError

__all__ = ["DistInfo", "all_gather_objects", "barrier", "init_distributed", "mean_over_ranks", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    notice: str | None = None  # from ``--device auto`` falling back to the CPU
    owns_group: bool = False  # this call created the process group (and shuts it down)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process writing checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the ``torchrun`` process group when there is one and pick this rank's device.

    gloo on the CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). Without torchrun's
    variables (or with ``WORLD_SIZE=1``) nothing is initialised. A group the caller already
    initialised is used as it is (and left alone by `shutdown`); run several trainings in one
    torchrun job that way, since re-creating the default group there can meet the previous
    group's keys in torchrun's store.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev, notice = resolve_device_with_notice(device)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, notice)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"torchrun started {world} processes on this node but it has only "
                             f"{torch.cuda.device_count()} CUDA GPU(s); lower --nproc_per_node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type == "mps":
        raise InputError("multi-process training (torchrun) is not supported on Apple MPS; "
                         "run one process, or use --device cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, notice, owns)


def shutdown(info: DistInfo) -> None:
    """Leave the process group this module created (no-op otherwise)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean of each logged number over all ranks (what the whole global batch saw)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` in one process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
