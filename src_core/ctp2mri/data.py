"""Slice dataset over case folders: normalised axial slices, cached once, with their masks.

A sample is one axial slice of a case on the model grid, laid out channel-first with
``(H, W) = (X, Y)``: rows run along the array's first axis (left → right in RAS, so a
left-right flip is a flip of H) and columns along the second (posterior → anterior). That is
96 × 112 for the ``demo`` profile and 192 × 224 for ``paper`` (`ctp2mri.profiles`):

==========  ===========  =======================================================================
key         shape        content
==========  ===========  =======================================================================
``target``  (2, H, W)    DWI clipped to the case's 0.5–99.5 % brain quantiles (or its DWI
                         anchor), ADC to the fixed window, → [−1, 1], × brain (normalisation
                         contract, docs/contracts.md), float32
``cond``    (T, H, W)    the T = 15 CTP frames: [0, 200] HU → [−1, 1], × brain, float32
``brain``   (1, H, W)    brain mask, float32 in {0, 1}
``lesion``  (1, H, W)    lesion (infarct core) mask inside the brain, float32 in {0, 1}
``case``    str          case name (folder name, or ``case.info["case"]`` for in-memory cases)
``slice``   int          z index of the slice in the case volume
==========  ===========  =======================================================================

Only slices holding brain are kept (``min_brain_fraction`` of the slice area), like the
paper's brain-masked slices. Every case is read and normalised once, at construction, into
contiguous tensors; nothing is re-read from NIfTI afterwards. Training augmentation
(`ctp2mri.augmentation`: a left-right flip and a small affine, images bilinear, masks nearest
neighbour) is a pure function of ``(seed, epoch, index)``, so it is reproducible whatever the DataLoader's
worker count or sample order, and a resumed run sees the same augmented slices.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ctp2mri.augmentation import Augmentation
from ctp2mri.case_slices import (
    PURPOSE,
    TARGETS,
    TRAINING_NEEDS,
    CaseSlices,
    case_name,
    check_adc_window,
    check_dwi_hi_median,
    lesion_volume,
    normalise_case,
)
from ctp2mri.casefolder import CASE_FILES, Case, is_case_folder, read_case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import CTP_HU_RANGE, MRI_QUANTILES
from ctp2mri.profiles import Profile, get_profile
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import ADC_WINDOW
from ctp2mri.slice_cache import DATA_VERSION, cache_key, read_cache, write_cache

__all__ = ["TARGETS", "CaseSlices", "SliceDataset", "normalise_case", "resolve_cases"]

SPLITS_FILE = "splits.json"

CaseSource = Union[str, os.PathLike, Case]


# which cases -----------------------------------------------------------------------------------
def resolve_cases(cases: CaseSource | Iterable[CaseSource], split: str | None = None) -> list[Path | Case]:
    """The case folders (or in-memory cases) a dataset is built from.

    ``cases`` is a data folder (with ``split``: the names listed under that key of its
    ``splits.json``; without: every case folder in it), one case folder, one `Case`, or a
    list of case folders and `Case` objects.
    """
    if isinstance(cases, Case):
        items: list[Path | Case] = [cases]
    elif isinstance(cases, (str, os.PathLike)):
        root = Path(cases)
        if not root.is_dir():
            raise InputError(f"data folder {root} does not exist")
        if split is not None:
            return _split_cases(root, split)
        if is_case_folder(root):
            return [root]
        items = sorted(p for p in root.iterdir() if is_case_folder(p))
        if not items:
            raise InputError(f"no case folders (sub-folders with {CASE_FILES['ctp']}) found in {root}; "
                             "make some with `ctp2mri phantom` or `ctp2mri preprocess`")
        return items
    else:
        items = []
        for item in cases:
            if isinstance(item, Case):
                items.append(item)
            elif not is_case_folder(item):
                raise InputError(f"{item} is not a case folder (it holds no {CASE_FILES['ctp']})")
            else:
                items.append(Path(item))
    if split is not None:
        raise InputError("split selects cases from a data folder's splits.json; give the data folder, "
                         "not a list of cases, or leave split out")
    if not items:
        raise InputError("no cases given; pass a data folder, case folders or cases")
    return items


def _split_cases(root: Path, split: str) -> list[Path | Case]:
    path = root / SPLITS_FILE
    if not path.is_file():
        raise InputError(f"{root} has no {SPLITS_FILE}, so split {split!r} is undefined; write one "
                         '({"train": [case names], "val": [...], "test": [...]}) or pass case folders')
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    names = splits.get(split) if isinstance(splits, dict) else None
    available = sorted(k for k, v in splits.items() if isinstance(v, list)) if isinstance(splits, dict) else []
    if names is None or not isinstance(names, list):
        raise InputError(f"{path} has no split {split!r}; it lists {available}")
    if not names:
        raise InputError(f"split {split!r} in {path} is empty; there is no case to use")
    folders = [root / str(n) for n in names]
    for folder in folders:
        if not is_case_folder(folder):
            raise InputError(f"case {folder.name} of split {split!r} has no folder with "
                             f"{CASE_FILES['ctp']} in {root}; regenerate the data or fix {SPLITS_FILE}")
    return folders


# the dataset -----------------------------------------------------------------------------------
class SliceDataset(Dataset):
    """Normalised axial slices of a set of cases, held in memory (see the module docstring).

    Parameters
    ----------
    cases
        A data folder (with ``split``: the cases its ``splits.json`` lists under that key;
        without: all case folders in it), a case folder, a `Case`, or a list of case folders
        and `Case` objects (e.g. cases open in napari with a lesion the user painted).
    split
        ``"train"``, ``"val"``, ``"test"`` (or any list-valued key of ``splits.json``).
    profile
        Model grid every case must be on (name or `Profile`); None detects it from the first
        case. All cases must share one slice shape.
    min_brain_fraction
        Keep slices whose brain mask covers at least this fraction of the slice (≥ 1 voxel).
    augment
        True (default `Augmentation`), an `Augmentation`, or False; None turns it on for the
        ``"train"`` split only.
    seed
        Seed of the augmentation; None draws one from torch's global generator, so
        ``monai.utils.set_determinism`` / ``torch.manual_seed`` make it reproducible.
    require_lesion
        Refuse cases without lesion mask (lesion-aware post-training needs them); otherwise
        they get an all-zero lesion and are listed in ``cases_without_lesion``.
    lesions
        Lesion masks that replace the cases' own, by case name (a `Volume` or an array on the
        case's grid; any non-zero voxel is lesion), e.g. a mask painted in napari.
    cache_dtype
        Storage type of the image tensors: float16 (default, half the memory; absolute error
        ≤ 2.5e-4 on [−1, 1]) or float32 (exact). Samples are always float32.
    cache_dir
        Optional folder for an on-disk cache of each case folder's normalised slices
        (``<case>-<key>.safetensors``); the key hashes the case files' paths, sizes and
        modification times, the settings and `DATA_VERSION`, so a changed case is re-read
        (`ctp2mri.slice_cache`).
    progress, cancel
        Called after / checked before each case.
    adc_window, dwi_hi_median
        The normalisation (`ctp2mri.case_slices.normalise_case`); a checkpoint's are
        ``ctp2mri.case_slices.normalisation_of(config["normalisation"])``.

    Notes
    -----
    Memory: per slice H·W·(17·b + 2) bytes with b = 2 (float16) or 4 (float32): demo
    (96 × 112) 0.39 MB / 0.75 MB, paper (192 × 224) 1.5 MB / 3.0 MB. E.g. 30 demo cases of
    ~30 slices take ~0.35 GB in float16; the paper's 14 083 training slices ~22 GB. While
    building, the per-case arrays and the concatenated tensors coexist (peak ≈ 2×).
    """

    def __init__(self, cases: CaseSource | Iterable[CaseSource], split: str | None = None,
                 profile: str | Profile | None = None, *, min_brain_fraction: float = 0.01,
                 augment: bool | Augmentation | None = None, seed: int | None = None,
                 require_lesion: bool = False, lesions: Mapping[str, Volume | np.ndarray] | None = None,
                 cache_dtype: torch.dtype | str = torch.float16, cache_dir: str | os.PathLike | None = None,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 adc_window: tuple[float, float] | None = ADC_WINDOW,
                 dwi_hi_median: float | None = None) -> None:
        if isinstance(cache_dtype, str):  # "float16" / "float32" from a command line or config
            cache_dtype = getattr(torch, cache_dtype, cache_dtype)
        if cache_dtype not in (torch.float16, torch.float32):
            raise InputError(f"cache_dtype must be torch.float16 or torch.float32, got {cache_dtype}")
        if not 0.0 <= float(min_brain_fraction) <= 1.0:
            raise InputError(f"min_brain_fraction must lie in [0, 1], got {min_brain_fraction}")
        self.split = split
        self.adc_window = check_adc_window(adc_window)
        self.dwi_hi_median = check_dwi_hi_median(dwi_hi_median)
        self.min_brain_fraction = float(min_brain_fraction)
        self.cache_dtype = cache_dtype
        requested = get_profile(profile) if isinstance(profile, str) else profile
        sources = resolve_cases(cases, split)
        names = _unique_names(sources)
        lesions = dict(lesions or {})
        unknown = sorted(set(lesions) - set(names))
        if unknown:
            raise InputError(f"lesion masks were given for {unknown}, which are not among the cases {names}")
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            from ctp2mri.io.atomic import ensure_writable_dir

            ensure_writable_dir(cache)

        parts: list[CaseSlices] = []
        for i, (source, name) in enumerate(zip(sources, names)):
            if cancel is not None:
                cancel.raise_if_cancelled()
            part, from_cache = self._load_case(source, name, requested, require_lesion, lesions.get(name), cache)
            if parts and part.profile != parts[0].profile:  # only possible when the profile is detected
                first = parts[0]
                raise InputError(
                    f"case {name} has {'×'.join(map(str, part.target.shape[2:]))} axial slices ({part.profile} "
                    f"grid) but case {first.name} has {'×'.join(map(str, first.target.shape[2:]))} "
                    f"({first.profile} grid); all cases must share one model grid: run `ctp2mri preprocess` "
                    "with one --profile on every case")
            parts.append(part)
            if progress is not None:
                progress(i + 1, len(sources), {"case": name, "slices": int(part.slices.size), "cached": from_cache})
        self.profile: Profile = requested or get_profile(parts[0].profile)
        self.case_names: list[str] = names
        self.cases_without_lesion: list[str] = [p.name for p in parts if not p.has_lesion_mask]
        self._ranges = {p.name: {k: tuple(v) for k, v in p.ranges.items()} for p in parts}

        self.case_index = torch.cat([torch.full((p.slices.size,), i, dtype=torch.int64) for i, p in enumerate(parts)])
        self.target = _stack(parts, "target")
        self.cond = _stack(parts, "cond")
        self.brain = _stack(parts, "brain")
        self.lesion = _stack(parts, "lesion")
        self.slice_index = _stack(parts, "slices")
        self.has_lesion = self.lesion.flatten(1).amax(dim=1) > 0  # bool (N,)

        if augment is None:
            augment = split == "train"
        self.augmentation: Augmentation | None = (Augmentation() if augment is True else augment) or None
        self.seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
        self.epoch = 0

    # loading -------------------------------------------------------------------------------------
    def _load_case(self, source: Path | Case, name: str, prof: Profile | None, require_lesion: bool,
                   lesion: Volume | np.ndarray | None, cache: Path | None) -> tuple[CaseSlices, bool]:
        cache_file = None
        if cache is not None and isinstance(source, Path) and lesion is None:
            key = cache_key(source, prof, self.min_brain_fraction, self.cache_dtype, self.adc_window,
                            self.dwi_hi_median)
            cache_file = cache / f"{name}-{key}.safetensors"
            if cache_file.is_file():
                part = read_cache(cache_file, name)
                if part is not None:
                    if require_lesion and not part.has_lesion_mask:
                        raise InputError(f"case {name} has no {CASE_FILES['lesion']} ({PURPOSE['lesion']}); "
                                         "it is required here")
                    return part, True
        if isinstance(source, Path):
            needs = TRAINING_NEEDS + (("lesion",) if require_lesion and lesion is None else ())
            case = read_case(source, require=needs)
        else:
            case = source
        if lesion is not None:
            case = replace(case, lesion=lesion_volume(lesion, case, name))
        part = normalise_case(case, name, prof, self.min_brain_fraction, require_lesion, adc_window=self.adc_window,
                              dwi_hi_median=self.dwi_hi_median)
        # Held in the storage type from here on: the build's peak stays near 2× the final size.
        dtype = np.float16 if self.cache_dtype == torch.float16 else np.float32
        part.target, part.cond = part.target.astype(dtype, copy=False), part.cond.astype(dtype, copy=False)
        if cache_file is not None:
            write_cache(cache_file, part)
        return part, False

    # the Dataset protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.target.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index} out of range for a dataset of {len(self)} slices")
        images = torch.cat([self.target[index], self.cond[index]]).to(torch.float32)
        masks = torch.cat([self.brain[index], self.lesion[index]]).to(torch.float32)
        if self.augmentation is not None:
            images, masks = self._augment(images, masks, index)
        return {
            "target": images[:2], "cond": images[2:], "brain": masks[:1], "lesion": masks[1:],
            "case": self.case_names[int(self.case_index[index])], "slice": int(self.slice_index[index]),
        }

    def _augment(self, images: torch.Tensor, masks: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A generator seeded from (seed, epoch, index): the result does not depend on worker
        # processes, threads or the order samples are drawn in.
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        images, masks = self.augmentation.apply(images, masks, rng)
        brain = masks[:1]
        return (images * brain).contiguous(), torch.cat([brain, masks[1:] * brain])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call it at the start of every epoch)."""
        self.epoch = int(epoch)

    # what the trainer and the checkpoint need --------------------------------------------------
    def case_ranges(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Per case, the DWI and ADC intensities mapped to −1 and 1 (lo, hi)."""
        return {name: dict(r) for name, r in self._ranges.items()}

    def intensity_ranges(self) -> dict[str, Any]:
        """The typical (median over the dataset's cases) DWI and ADC ranges, for a checkpoint.

        ``denormalise_mri(x, lo, hi)`` with these maps model output back to DWI scanner units
        and ADC in 10⁻⁶ mm²/s. Build it from the training split.
        """
        out: dict[str, Any] = {"statistic": "median over cases", "n_cases": len(self._ranges),
                               "quantiles": list(MRI_QUANTILES), "ctp_hu_range": list(CTP_HU_RANGE),
                               "units": {"dwi": "scanner units (b = 1000 s/mm²)", "adc": "1e-6 mm²/s"}}
        for what in TARGETS:
            values = np.array([r[what] for r in self._ranges.values()], dtype=np.float64)
            out[what] = {"lo": float(np.median(values[:, 0])), "hi": float(np.median(values[:, 1]))}
        # read back by `adc_window_of`: absent, the ADC was normalised with per-case quantiles
        out["adc_window"] = list(self.adc_window) if self.adc_window is not None else None
        # read back by `dwi_hi_median_of`: None or absent, DWI's upper bound is the 99.5 % quantile
        out["dwi_hi_median"] = self.dwi_hi_median
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and settings, for logs and a checkpoint's provenance."""
        n_lesion = int(self.has_lesion.sum())
        return {
            "split": self.split, "profile": self.profile.name, "n_cases": len(self.case_names),
            "n_slices": len(self), "n_lesion_slices": n_lesion,
            "lesion_slice_fraction": n_lesion / max(len(self), 1),
            "cases_without_lesion": list(self.cases_without_lesion),
            "slice_shape": list(self.target.shape[2:]), "min_brain_fraction": self.min_brain_fraction,
            "augmentation": asdict(self.augmentation) if self.augmentation else None, "seed": self.seed,
            "cache_dtype": str(self.cache_dtype).removeprefix("torch."), "cache_bytes": self.nbytes,
            "data_version": DATA_VERSION,
        }

    @property
    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in (self.target, self.cond, self.brain, self.lesion))

    def __repr__(self) -> str:
        return (f"SliceDataset({len(self.case_names)} cases, {len(self)} slices of "
                f"{tuple(self.target.shape[2:])}, {int(self.has_lesion.sum())} with lesion, "
                f"profile={self.profile.name!r}, augment={self.augmentation is not None})")


def _stack(parts: list[CaseSlices], attr: str) -> torch.Tensor:
    """One contiguous tensor of every case's ``attr``, freeing each case's array once copied."""
    arrays = [getattr(p, attr) for p in parts]
    out = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), dtype=torch.from_numpy(arrays[0][:0]).dtype)
    start = 0
    for part, array in zip(parts, arrays):
        out[start:start + len(array)] = torch.from_numpy(array)
        start += len(array)
        setattr(part, attr, None)
    del arrays
    return out


def _unique_names(sources: Sequence[Path | Case]) -> list[str]:
    """Case names; a name used twice (two datasets' case_000) gets its parent folder prefixed."""
    names = [case_name(s, i) if isinstance(s, Case) else s.name for i, s in enumerate(sources)]
    for i, (source, name) in enumerate(zip(sources, names)):
        if names.count(name) > 1:
            path = source.path if isinstance(source, Case) else source
            names[i] = f"{Path(path).parent.name}/{name}" if path is not None else f"{name}#{i}"
    if len(set(names)) != len(names):
        raise InputError(f"case names are not unique: {names}; give each case its own name")
    return names
