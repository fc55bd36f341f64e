"""Phantom datasets: numbered cases from one seed, and their train/val/test split.

Case ``i`` of a dataset has its own seed (`case_seed`), so the first cases of a larger dataset
equal a smaller one's; ``splits.json``, written last, marks a finished dataset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ctp2mri.casefolder import CASE_INFO, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.phantom.generate import PHANTOM_VERSION, check_seed, frame_times, generate_case
from ctp2mri.profiles import get_profile
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["SPLITS_FILE", "SPLIT_FRACTIONS", "case_seed", "generate_dataset", "split_cases"]

SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}
SPLITS_FILE = "splits.json"


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset: independent of how many cases are generated."""
    sequence = np.random.SeedSequence(check_seed(seed), spawn_key=(0, int(index)))
    return int(sequence.generate_state(1, np.uint32)[0])


def split_cases(names: list[str], seed: int) -> dict[str, list[str]]:
    """Deterministic ~70/15/15 train/val/test split; at least one test case from three cases on."""
    n = len(names)
    rng = np.random.default_rng(np.random.SeedSequence(check_seed(seed), spawn_key=(1,)))
    order = rng.permutation(n)

    def share(fraction: float, minimum_n: int) -> int:
        return max(1, int(np.floor(fraction * n + 0.5))) if n >= minimum_n else 0

    n_test = share(SPLIT_FRACTIONS["test"], 3)
    n_val = share(SPLIT_FRACTIONS["val"], 4)
    picked = [names[i] for i in order]
    return {
        "train": sorted(picked[n_test + n_val:]),
        "val": sorted(picked[n_test:n_test + n_val]),
        "test": sorted(picked[:n_test]),
    }


_CASE_NAME = re.compile(r"case_\d+$")


def _is_phantom_case(folder: Path) -> bool:
    try:
        return json.loads((folder / CASE_INFO).read_text()).get("generator") == "ctp2mri.phantom"
    except (OSError, ValueError, AttributeError):
        return False


def _write_phantom_case(case_seed_: int, profile: str, n_frames: int, name: str, dataset_seed: int, index: int,
                        folder: Path, overwrite: bool) -> tuple[str, float]:
    case = generate_case(case_seed_, profile, n_frames)
    case.info.update(case=name, dataset_seed=dataset_seed, index=index)
    write_case(case, folder, overwrite=overwrite)
    return name, float(case.info["lesion_ml"])


def _write_in_processes(jobs: list[tuple], workers: int, progress: ProgressCallback | None,
                        cancel: CancelToken | None) -> None:
    # spawn, not fork: the parent may hold torch's thread pools, which a forked child inherits broken
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_write_phantom_case, *job) for job in jobs}
        done = 0
        try:
            while pending:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    name, lesion_ml = future.result()
                    done += 1
                    if progress is not None:
                        progress(done, len(jobs), {"case": name, "lesion_ml": lesion_ml})
        except BaseException:
            for future in pending:  # cases already being written finish (atomic folders)
                future.cancel()
            raise


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    profile: str = "demo",
    n_frames: int = 15,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    workers: int = 1,
) -> Path:
    """Write ``n_cases`` phantom cases and a ``splits.json`` into ``out_dir``.

    Case ``i`` is ``out_dir/case_{i:03d}`` (atomic case folders, see `write_case`), generated
    from ``case_seed(seed, i)``, so the first cases of a larger dataset equal a smaller one's.
    ``splits.json`` is written last: a folder without it is an interrupted (or cancelled) run
    whose finished cases are complete but not yet a dataset.

    Parameters
    ----------
    out_dir
        Target folder; must be empty or absent unless ``overwrite``.
    n_cases
        Number of cases (≥ 1).
    seed
        Dataset seed.
    profile, n_frames
        Grid profile and CT-perfusion frame count of every case.
    overwrite
        Replace the phantom cases and ``splits.json`` already in ``out_dir``; case folders of
        an earlier, larger phantom dataset there are removed, anything else is left alone.
    progress, cancel
        Called after every case / checked before every case.
    workers
        Processes that generate cases side by side (each case has its own seed, so the
        dataset is the same for any number; progress then comes in the order cases finish).

    Returns
    -------
    Path
        The ``splits.json`` written.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise InputError(f"n_cases must be a positive integer, got {n_cases!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    seed = check_seed(seed)
    prof = get_profile(profile)
    times = frame_times(n_frames)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {out} is not empty; choose a new or empty folder, or overwrite "
            "(--overwrite) to replace the phantom dataset in it"
        )
    ensure_writable_dir(out)
    # splits.json marks a finished dataset; an overwrite in progress is not one.
    (out / SPLITS_FILE).unlink(missing_ok=True)

    width = max(3, len(str(n_cases - 1)))
    names = [f"case_{i:0{width}d}" for i in range(n_cases)]
    seeds = {name: case_seed(seed, i) for i, name in enumerate(names)}
    jobs = [(seeds[name], prof.name, n_frames, name, seed, i, out / name, overwrite) for i, name in enumerate(names)]
    if workers == 1 or n_cases == 1:
        for done, job in enumerate(jobs, start=1):
            if cancel is not None:
                cancel.raise_if_cancelled()
            name, lesion_ml = _write_phantom_case(*job)
            if progress is not None:
                progress(done, n_cases, {"case": name, "lesion_ml": lesion_ml})
    else:
        _write_in_processes(jobs, min(int(workers), n_cases), progress, cancel)

    if overwrite:  # an earlier, larger phantom run would otherwise leave extra cases behind
        for stale in out.iterdir():
            ours = stale.is_dir() and _CASE_NAME.match(stale.name) and _is_phantom_case(stale)
            if ours and stale.name not in seeds:
                shutil.rmtree(stale)

    splits = {
        **split_cases(names, seed),
        "seed": seed,
        "profile": prof.name,
        "n_frames": int(n_frames),
        "frame_times": times.tolist(),
        "phantom_version": PHANTOM_VERSION,
        "case_seeds": seeds,
    }
    path = out / SPLITS_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2))
    return path
