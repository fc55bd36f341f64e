"""Cohorts: ``ctp2mri synthesize`` and ``ctp2mri perfusion`` over ten phantom cases, one of them
damaged, through the command line — nine results, a summary CSV, one clear line about the bad
case, a rerun that skips the nine — and how the inputs become cases."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

from ctp2mri.casefolder import Case, write_case
from ctp2mri.cli import main
from ctp2mri.synthesis.cohort import collect_cases, is_cohort
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")

N_CASES, BAD = 10, "case_005"


@pytest.fixture(scope="module")
def cohort(held_out_case, tmp_path_factory) -> Path:
    """Ten phantom case folders (six slices of one held-out case, as test_perfusion's small CTP),
    the sixth with its CTP file cut in half."""
    root = tmp_path_factory.mktemp("cohort") / "cases"
    case = held_out_case
    affine = case.ctp.affine.copy()
    affine[:3, 3] += affine[:3, 2] * 14  # slices 14–19 where they lie

    def cut(volume):
        return Volume(volume.array[:, :, 14:20].copy(), affine, frame_times=volume.frame_times)

    first = write_case(Case(ctp=cut(case.ctp), lesion=cut(case.lesion), mask=cut(case.mask)), root / "case_000")
    for i in range(1, N_CASES):
        shutil.copytree(first, root / f"case_{i:03d}")
    damaged = root / BAD / "ctp.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    (root / "notes").mkdir()  # not a case folder: left out with a note
    return root


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if " failed: " in line]  # the rest is the progress bar


def _check_first_run(out: Path, rows: list[dict[str, str]], err: str) -> None:
    assert [r["case"] for r in rows] == [f"case_{i:03d}" for i in range(N_CASES)]
    assert [r["case"] for r in rows if r["status"] == "ok"] == [f"case_{i:03d}" for i in range(N_CASES) if i != 5]
    bad = next(r for r in rows if r["case"] == BAD)
    assert bad["status"] == "failed" and "ctp.nii.gz" in bad["message"] and "\n" not in bad["message"]
    assert bad["output"] == "" and not (out / BAD).exists()
    done = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(done) == N_CASES - 1 and all((out / name / "report.json").is_file() for name in done)
    lines = _errors(err)
    assert len(lines) == 1 and BAD in lines[0] and bad["message"] in lines[0] and "Traceback" not in err


def test_synthesize_cohort_folder_of_cases(cohort, tiny_cldm, tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["synthesize", str(cohort), "--model", str(tiny_cldm), "--out", str(out), "--device", "cpu",
            "--steps", "2", "--batch-size", "8"]
    started = time.perf_counter()
    assert main(argv) == 1  # a case failed
    first_s = time.perf_counter() - started
    captured = capsys.readouterr()
    rows = _summary(out)
    _check_first_run(out, rows, captured.err)
    assert "left out 1 subfolder(s)" in captured.out and "9 ok, 0 skipped" in captured.out
    ok = next(r for r in rows if r["case"] == "case_000")
    report = json.loads((out / "case_000" / "report.json").read_text())
    assert float(ok["core_ml"]) == pytest.approx(report["core_volume_ml"], abs=1e-3)
    assert ok["core_dice"] != "" and float(ok["seconds"]) > 0  # the case folder's lesion scored the core
    assert report["brain_mask"]["origin"] == "given"  # the case folder's mask.nii.gz
    assert report["input"]["path"] == str(cohort / "case_000" / "ctp.nii.gz")

    stamp = (out / "case_000" / "report.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert main(argv) == 1  # the damaged case fails again; the nine are kept, not redone
    again_s = time.perf_counter() - started
    captured = capsys.readouterr()
    rows = _summary(out)
    assert [r["status"] for r in rows].count("skipped") == N_CASES - 1
    assert "0 ok, 9 skipped" in captured.out and len(_errors(captured.err)) == 1
    assert (out / "case_000" / "report.json").stat().st_mtime_ns == stamp
    assert rows[0]["core_ml"] == ok["core_ml"]  # figures of skipped cases come from their reports
    with capsys.disabled():
        print(f"\nsynthesize cohort of {N_CASES}: first run {first_s:.1f} s, rerun {again_s:.1f} s")

    # other settings into the same folder are refused before any case runs
    assert main([*argv[:-4], "--steps", "3", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps 2 → 3" in err and "--overwrite" in err


def test_perfusion_cohort_from_a_csv_list(cohort, tmp_path, capsys):
    listing = tmp_path / "cases.csv"
    rows = [f"p{i:02d},{Path('..') / cohort.name / f'case_{i:03d}'}" for i in range(N_CASES)]
    listing.write_text("case,ctp\n" + "\n".join(rows) + "\n")
    (tmp_path / cohort.name).symlink_to(cohort)  # the CSV's relative paths are read from its folder
    (tmp_path / "lists").mkdir()
    listing = listing.rename(tmp_path / "lists" / "cases.csv")
    out = tmp_path / "perf"
    argv = ["perfusion", str(listing), "--out", str(out), "--no-figure", "--min-island-ml", "0.2"]
    started = time.perf_counter()
    assert main(argv) == 1
    first_s = time.perf_counter() - started
    captured = capsys.readouterr()
    summary = _summary(out)
    assert [r["case"] for r in summary] == [f"p{i:02d}" for i in range(N_CASES)]
    assert [r["status"] for r in summary].count("ok") == N_CASES - 1
    bad = summary[5]
    assert bad["status"] == "failed" and BAD in bad["message"]
    lines = _errors(captured.err)
    assert len(lines) == 1 and "p05 failed:" in lines[0]
    report = json.loads((out / "p00" / "report.json").read_text())
    assert float(summary[0]["core_ml"]) == pytest.approx(report["core_ml"], abs=1e-3)
    assert int(summary[0]["aif_voxels"]) == report["aif"]["n_voxels"]

    started = time.perf_counter()
    assert main(argv) == 1
    again_s = time.perf_counter() - started
    assert "0 ok, 9 skipped" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nperfusion cohort of {N_CASES}: first run {first_s:.1f} s, rerun {again_s:.1f} s")


def test_all_good_cases_exit_zero_and_overwrite_redoes_them(cohort, tmp_path, capsys):
    out = tmp_path / "two"
    argv = ["perfusion", str(cohort / "case_000"), str(cohort / "case_001" / "ctp.nii.gz"), "--out", str(out),
            "--no-figure"]
    assert main(argv) == 0
    assert [r["case"] for r in _summary(out)] == ["case_000", "case_001"]  # a ctp.nii.gz is named by its folder
    stamp = (out / "case_000" / "report.json").stat().st_mtime_ns
    assert main([*argv, "--overwrite"]) == 0
    assert [r["status"] for r in _summary(out)] == ["ok", "ok"]
    assert (out / "case_000" / "report.json").stat().st_mtime_ns != stamp
    capsys.readouterr()


def test_inputs_become_cases(cohort, tmp_path):
    # one file, one DICOM folder, one case folder: the single command, as before
    assert not is_cohort([cohort / "case_000" / "ctp.nii.gz"]) and not is_cohort([cohort / "case_000"])
    assert not is_cohort([tmp_path]) and not is_cohort([tmp_path / "missing.nii.gz"])
    assert is_cohort([cohort]) and is_cohort([tmp_path / "list.csv"]) and is_cohort([tmp_path / "a", tmp_path / "b"])

    plain = tmp_path / "plain.csv"  # one unnamed column: a list of paths
    plain.write_text(f"{cohort / 'case_001'}\n{cohort / 'case_002' / 'ctp.nii.gz'}\n\n")
    cases, notes = collect_cases([plain, cohort / "case_001", tmp_path / "x" / "scan.nii.gz"])
    assert [c.name for c in cases] == ["case_001", "case_002", "scan"]
    assert cases[0].mask == cohort / "case_001" / "mask.nii.gz" and cases[1].mask is None
    assert len(notes) == 1 and "listed twice" in notes[0]

    holes = tmp_path / "holes.csv"
    holes.write_text("case,path,mask\nA,,\n.hidden/x,x.nii.gz,m.nii.gz\n")
    cases, _ = collect_cases([holes])
    assert cases[0].problem and "row 2" in cases[0].problem
    assert cases[1].name == "hidden_x" and cases[1].mask == tmp_path / "m.nii.gz"

    same = [tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz", tmp_path / "c" / "a" / "scan.nii.gz"]
    assert [c.name for c in collect_cases(same)[0]] == ["a_scan", "b_scan", "a_scan_2"]  # clashing names

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,scan\n1,a.nii.gz\n")
    with pytest.raises(InputError, match="no column of CTP paths"):
        collect_cases([wrong])


def test_cohort_errors_before_the_first_case_are_one_line(cohort, tiny_cldm, tmp_path, capsys):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,scan\n1,a.nii.gz\n")
    for argv in (["perfusion", str(wrong), "--out", str(tmp_path / "o1")],
                 ["perfusion", str(cohort), "--out", str(tmp_path / "o2"), "--mask", str(wrong)],
                 ["synthesize", str(cohort), "--model", str(tiny_cldm), "--out", str(tmp_path / "o3"),
                  "--device", "cpu", "--sampler", "dpm++2m", "--eta", "0.5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1 and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
