"""Writing phantom datasets: case folders, splits.json, determinism, progress, cancel, overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctp2mri.casefolder import CASE_FILES, read_case
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.phantom import PHANTOM_VERSION, case_seed, generate_case, generate_dataset, split_cases
from ctp2mri.progress import CancelToken

ALL = tuple(CASE_FILES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ds"
    calls = []
    splits_path = generate_dataset(
        out, 4, seed=3, progress=lambda step, total, info: calls.append((step, total, info))
    )
    return out, splits_path, calls


def test_dataset_folders_and_splits(dataset):
    out, splits_path, calls = dataset
    assert splits_path == out / "splits.json"
    names = [f"case_{i:03d}" for i in range(4)]
    # Nothing else: no temporary folders left behind.
    assert sorted(p.name for p in out.iterdir()) == names + ["splits.json"]
    splits = json.loads(splits_path.read_text())
    parts = [splits[k] for k in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == names  # every case once
    assert len(splits["test"]) >= 1 and len(splits["val"]) >= 1 and len(splits["train"]) >= 2
    assert splits["seed"] == 3 and splits["profile"] == "demo"
    assert splits["phantom_version"] == PHANTOM_VERSION
    assert splits["case_seeds"] == {n: case_seed(3, i) for i, n in enumerate(names)}
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[0][2]["case"] == "case_000"


def test_written_case_round_trips(dataset):
    out, _, _ = dataset
    case = read_case(out / "case_001", require=ALL)
    fresh = generate_case(case_seed(3, 1))
    assert case.info["seed"] == case_seed(3, 1) and case.info["case"] == "case_001"
    np.testing.assert_array_equal(case.ctp.frame_times, np.arange(15) * 3.0)
    np.testing.assert_allclose(case.ctp.affine, fresh.ctp.affine)
    # CTP is stored as integer HU; everything else exactly.
    assert np.abs(case.ctp.array - fresh.ctp.array).max() <= 0.5 + 1e-4
    for name in ("dwi", "adc", "lesion", "mask"):
        written, expected = getattr(case, name).array, getattr(fresh, name).array
        np.testing.assert_array_equal(written, expected, err_msg=name)


def test_existing_folder_refused_then_overwritten(dataset, tmp_path):
    out, _, _ = dataset
    with pytest.raises(InputError, match="not empty"):
        generate_dataset(out, 2, seed=3)
    # A smaller run over a copy: the first cases are the same, stale phantom cases go.
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")
    lesion_before = read_case(copy / "case_001", require=ALL).lesion.array
    generate_dataset(copy, 2, seed=3, overwrite=True)
    expected = ["case_000", "case_001", "notes.txt", "splits.json"]
    assert sorted(p.name for p in copy.iterdir()) == expected
    np.testing.assert_array_equal(read_case(copy / "case_001").lesion.array, lesion_before)
    splits = json.loads((copy / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ["case_000", "case_001"]


def test_cancel_keeps_complete_cases_only(tmp_path):
    token = CancelToken()
    out = tmp_path / "ds"

    def cancel_after_first(step, total, info):
        token.cancel()

    with pytest.raises(Cancelled):
        generate_dataset(out, 3, seed=0, progress=cancel_after_first, cancel=token)
    assert sorted(p.name for p in out.iterdir()) == ["case_000"]  # no splits.json, nothing partial
    read_case(out / "case_000", require=ALL)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_cases=0), dict(n_cases=2, n_frames=1), dict(n_cases=2, profile="nope"),
     dict(n_cases=2, seed=-3)],
)
def test_bad_dataset_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        generate_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_output_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="file"):
        generate_dataset(target, 1)


def test_case_seeds_do_not_depend_on_dataset_size():
    assert [case_seed(5, i) for i in range(4)] == [case_seed(5, i) for i in range(40)][:4]
    assert len({case_seed(5, i) for i in range(40)}) == 40
    assert case_seed(5, 0) != case_seed(6, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 40, 571])
def test_splits_are_disjoint_deterministic_and_proportioned(n):
    names = [f"case_{i:03d}" for i in range(n)]
    splits = split_cases(names, seed=1)
    assert splits == split_cases(names, seed=1)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == names
    if n >= 3:
        assert len(splits["test"]) >= 1
    if n >= 40:
        for part in ("val", "test"):
            assert abs(len(splits[part]) / n - 0.15) < 0.02
    if n >= 10:
        assert split_cases(names, seed=2) != splits


def test_cases_generated_in_processes_equal_the_serial_ones(dataset, tmp_path):
    out, _, _ = dataset
    calls = []
    splits_path = generate_dataset(tmp_path / "ds", 4, seed=3, workers=2,
                                   progress=lambda step, total, info: calls.append((step, total, info["case"])))
    assert json.loads(splits_path.read_text()) == json.loads((out / "splits.json").read_text())
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(c[2] for c in calls) == [f"case_{i:03d}" for i in range(4)]
    for i in range(4):
        serial = read_case(out / f"case_{i:03d}", require=ALL)
        parallel = read_case(tmp_path / "ds" / f"case_{i:03d}", require=ALL)
        assert parallel.info == serial.info
        for name in ("ctp", "dwi", "adc", "lesion", "mask"):
            np.testing.assert_array_equal(getattr(parallel, name).array, getattr(serial, name).array, err_msg=name)
    with pytest.raises(InputError, match="workers must be a positive integer"):
        generate_dataset(tmp_path / "other", 2, workers=0)


def test_phantom_command_takes_workers(dataset, tmp_path, capsys):
    from ctp2mri.cli import main

    out, _, _ = dataset
    assert main(["phantom", "--out", str(tmp_path / "cli"), "--cases", "2", "--seed", "3", "--workers", "2",
                 "--no-figure"]) == 0
    assert "wrote 2 cases" in capsys.readouterr().out
    for i in range(2):  # a case's seed does not depend on the count, nor on the processes
        np.testing.assert_array_equal(read_case(tmp_path / "cli" / f"case_{i:03d}", require=ALL).adc.array,
                                      read_case(out / f"case_{i:03d}", require=ALL).adc.array)
    assert main(["phantom", "--out", str(tmp_path / "none"), "--workers", "0"]) != 0
    assert "--workers" in capsys.readouterr().err and not (tmp_path / "none").exists()
