"""The training data of a run: its dataset, what identifies it, and the stream of batches.

`BatchStream` yields batches epoch after epoch and can start mid-epoch, so a resumed run sees
the batches the uninterrupted one would have seen from that point.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from ctp2mri.case_slices import check_adc_window, check_dwi_hi_median
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import ADC_WINDOW
from ctp2mri.training.distributed import DistInfo

if TYPE_CHECKING:
    from ctp2mri.data import SliceDataset

__all__ = ["BatchStream", "data_identity", "load_dataset"]


def load_dataset(data: Any, profile: str, seed: int, split: str = "train",
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 adc_window: tuple[float, float] | None = ADC_WINDOW,
                 dwi_hi_median: float | None = None) -> SliceDataset:
    """The training `SliceDataset` for ``data`` (a data folder, or a dataset built already),
    its ADC normalised with ``adc_window`` (None: per-case quantiles, for models made before
    the fixed window), DWI's upper bound ``dwi_hi_median`` × the brain median (None, the
    default: the 99.5 % quantile); `ctp2mri.case_slices.normalisation_of` reads both from a
    checkpoint."""
    from ctp2mri.data import SliceDataset

    if isinstance(data, SliceDataset):
        if data.profile.name != profile:
            raise InputError(f"the dataset is on the {data.profile.name} grid but the {profile} profile was asked for")
        if data.adc_window != check_adc_window(adc_window):
            raise InputError(f"the dataset's ADC is normalised with {_window_text(data.adc_window)} but the model "
                             f"needs {_window_text(adc_window)}; build the SliceDataset with adc_window={adc_window!r}")
        if data.dwi_hi_median != check_dwi_hi_median(dwi_hi_median):
            raise InputError(f"the dataset's DWI upper bound is {_dwi_text(data.dwi_hi_median)} but the model needs "
                             f"{_dwi_text(dwi_hi_median)}; build the SliceDataset with dwi_hi_median={dwi_hi_median!r}")
        return data
    return SliceDataset(data, split=split, profile=profile, seed=seed, progress=progress, cancel=cancel,
                        adc_window=adc_window, dwi_hi_median=dwi_hi_median)


def _window_text(window: tuple[float, float] | None) -> str:
    return "per-case quantiles" if window is None else f"the fixed window {tuple(window)}"


def _dwi_text(factor: float | None) -> str:
    return "the 99.5 % brain quantile" if factor is None else f"{factor:g} × the brain median"


def data_identity(dataset: SliceDataset) -> dict[str, Any]:
    """What identifies the training data for a resume check (not its path: folders move).

    The ADC window is part of it (a run started on per-case ADC quantiles must not continue on
    the window); it is left out for per-case quantiles, as runs from before the window saved it.
    """
    identity = {"split": dataset.split, "profile": dataset.profile.name, "cases": list(dataset.case_names),
                "n_slices": len(dataset), "augmentation": dataset.summary()["augmentation"]}
    if dataset.adc_window is not None:
        identity["adc_window"] = list(dataset.adc_window)
    if dataset.dwi_hi_median is not None:  # likewise left out for the default DWI scale
        identity["dwi_hi_median"] = dataset.dwi_hi_median
    return identity


class BatchStream:
    """An endless stream of batches, epoch after epoch, that can start mid-epoch.

    The order of epoch ``e`` is ``DistributedSampler(seed, epoch=e)`` (this rank's share of a
    seeded permutation; one process is world size 1), the augmentation that of
    ``dataset.set_epoch(e)``; both are pure functions of (seed, epoch), so a stream rebuilt at
    (epoch, batch) yields what the original stream would have from there. Only full batches
    are used. DataLoader workers get their own generator, so starting them never touches the
    global torch RNG. With per-slice ``weights`` (lesion over-sampling, `ctp2mri.training.sampling`) each
    epoch is instead a seeded weighted draw with replacement, equally reproducible.
    """

    def __init__(self, dataset: Dataset, batch_size: int, info: DistInfo, seed: int, num_workers: int = 0,
                 epoch: int = 0, batch_in_epoch: int = 0, weights: torch.Tensor | None = None) -> None:
        if batch_size < 1:
            raise InputError(f"the batch size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.info = info
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and self.weights.shape != (len(dataset),):
            raise InputError(f"{len(dataset)} slices but {tuple(self.weights.shape)} sampling weights")
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=self.seed, drop_last=True)
        self.batches_per_epoch = self.sampler.num_samples // self.batch_size
        if self.batches_per_epoch == 0:
            raise InputError(f"the training data has {len(dataset)} slices, fewer than one batch of "
                             f"{batch_size} per process × {info.world_size} process(es); lower --batch-size "
                             "or add cases")
        self.epoch = int(epoch)
        self.batch_in_epoch = int(batch_in_epoch)

    def position(self) -> dict[str, int]:
        """(epoch, batches of it consumed): where a resumed stream must start."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def _epoch_order(self) -> list[int]:
        """This rank's slice order for the current epoch: a seeded permutation, or, with
        ``weights``, draws with replacement by ``WeightedRandomSampler`` (the same epoch
        length; ranks take interleaved shares of one seeded draw)."""
        if self.weights is None:
            return list(self.sampler)
        world = self.info.world_size
        n = self.sampler.num_samples * world
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 11])
                                                .generate_state(1)[0]))
        drawn = list(WeightedRandomSampler(self.weights, n, replacement=True, generator=gen))
        return drawn[self.info.rank::world]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)  # before the workers copy the dataset
            indices = self._epoch_order()[self.batch_in_epoch * self.batch_size:
                                          self.batches_per_epoch * self.batch_size]
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True,
                                num_workers=self.num_workers, pin_memory=self.info.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.seed + self.epoch),
                                worker_init_fn=_leave_signals_to_the_main_process if self.num_workers else None)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: the terminal sends them to the whole process
    group, and a worker dying of one would abort the run before the main process could save its
    checkpoint (it stops cleanly after the step and then shuts the workers down)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
