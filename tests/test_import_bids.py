"""``ctp2mri import-isles24``: ISLES'24-shaped BIDS trees → case folders aligned with the CTP.

The tree (written from one phantom case, `_helpers_bids`): sub-stroke0001 as ISLES'24 ships it
(raw_data/ + derivatives/ in space-ncct, ses-01/ses-02); sub-strokecase0002 in the other naming
(rawdata/, ses-0001/ses-0002, ct/ and dwi/ subfolders, uncompressed .nii) with only native scans,
its DWI/ADC on another grid in a world rotated by 4° and shifted 5.6 mm, its lesion mask on that
grid; sub-stroke0003 without an ADC; sub-stroke0004 with a truncated DWI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time

import numpy as np
import pytest
from _helpers_bids import CT_SCANNER_SHIFT_MM, rigid, write_subject

from ctp2mri import progress
from ctp2mri.casefolder import read_case
from ctp2mri.cli import main
from ctp2mri.io.bids import acquisition_time, find_subjects, parse_name, role_of, subject_files, trace_and_adc
from ctp2mri.io.volume import Volume
from ctp2mri.phantom import generate_case
from ctp2mri.preprocessing.resample import resample_like

GOOD = ("sub-stroke0001", "sub-strokecase0002")
BAD = ("sub-stroke0003", "sub-stroke0004")
VOXEL_MM = 2.0  # the CTP's (and the demo grid's) in-plane voxel


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bars():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "tqdm_progress", lambda *a, **k: (progress.noop_progress, lambda: None))
        yield


@pytest.fixture(scope="module")
def case():
    return generate_case(5, "demo", n_frames=8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, case):
    root = tmp_path_factory.mktemp("isles24")
    write_subject(root, case, "sub-stroke0001")
    write_subject(root, case, "sub-strokecase0002", ses=("ses-0001", "ses-0002"), raw="rawdata", ext=".nii",
                  subdirs=True, mri_to_ct=rigid(), ncct_files=False)
    write_subject(root, case, "sub-stroke0003", adc=False)
    write_subject(root, case, "sub-stroke0004", truncate="dwi")
    return root


def _run(argv, capsys):
    start = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    return rc, out, err, seconds


@pytest.fixture(scope="module")
def first_run(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("cases") / "cases"
    stdout, stderr = io.StringIO(), io.StringIO()  # a module fixture cannot take capsys
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["import-isles24", str(tree), "--out", str(out), "--profile", "demo"])
    print(f"first import: {time.perf_counter() - start:.1f} s\n{stdout.getvalue()}")
    return out, rc, stdout.getvalue(), stderr.getvalue()


def _shift(mm) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = mm
    return m


def _placed(volume, ct_world_shift):
    """A phantom volume in the world of the CTP a case was made from."""
    return dataclasses.replace(volume, affine=_shift(ct_world_shift) @ volume.affine)


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _brain_points(case):
    ijk = np.argwhere(case.mask.array > 0)
    return case.mask.affine @ np.vstack([ijk.T, np.ones((1, len(ijk)))])


def test_bids_names_of_both_releases_are_understood():
    roles = {"sub-stroke0001_ses-01_ctp.nii.gz": "ctp", "sub-strokecase0001_ses-0002_dwi.nii": "dwi",
             "sub-stroke0001_ses-01_space-ncct_ctp.nii.gz": "ctp", "SUB-STROKE0001_SES-02_ADC.NII.GZ": "adc",
             "sub-stroke0001_ses-02_space-ncct_lesion-msk.nii.gz": "lesion",
             "sub-strokecase0001_ses-0001_msk.nii.gz": "lesion", "sub-01_label-lesion_mask.nii.gz": "lesion",
             "sub-01_desc-brain_mask.nii.gz": "labels", "sub-stroke0001_ses-01_space-ncct_lvo-msk.nii.gz": "labels",
             "sub-stroke0001_ses-01_space-ncct_tmax.nii.gz": "tmax", "sub-01_ses-01_ncct.nii.gz": "ncct"}
    for name, role in roles.items():
        assert role_of(parse_name(name)) == role, name
    assert parse_name("sub-01_ses-01_ctp.json") is None
    assert parse_name("sub-stroke0001_ses-01_space-ncct_ctp.nii.gz").entities["space"] == "ncct"


def test_scan_times_from_sessions_tsv_and_an_adc_from_a_diffusion_series(tmp_path):
    sub = tmp_path / "sub-01"
    (sub / "ses-02" / "dwi").mkdir(parents=True)
    (sub / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-01\t2023-05-02T08:00:00\n"
                                             "ses-02\t2023-05-06T20:00:00\n")
    b0, adc = 1000.0, 800e-6  # a 4-D series: two b = 0 and three b = 1000 volumes
    series = np.stack([np.full((4, 4, 3), b0)] * 2 + [np.full((4, 4, 3), b0 * np.exp(-1000 * adc))] * 3, axis=-1)
    path = sub / "ses-02" / "dwi" / "sub-01_ses-02_dwi.nii.gz"
    path.write_bytes(b"")  # only its name and the .bval beside it are read here
    path.with_name("sub-01_ses-02_dwi.bval").write_text("0 0 1000 1000 1000\n")
    [item] = subject_files(sub)
    when, source = acquisition_time(item)
    assert when.isoformat() == "2023-05-06T20:00:00" and source == "sub-01_sessions.tsv"
    trace, computed = trace_and_adc(Volume(series.astype(np.float32), np.eye(4)), path)
    assert trace.array.shape == (4, 4, 3) and np.allclose(computed.array, 800.0, rtol=1e-3)


def test_every_subject_of_both_namings_is_found(tree):
    found = find_subjects(tree)
    assert list(found) == sorted(GOOD + BAD)
    b = {f.role: f for f in found["sub-strokecase0002"]}
    assert b["ctp"].session == "ses-0001" and b["dwi"].session == "ses-0002" and b["lesion"].derivative


def test_good_subjects_become_case_folders_aligned_with_their_ctp(first_run, case):
    out, rc, stdout, stderr = first_run
    assert rc == 2  # two subjects failed; the others were imported
    for name in GOOD:
        imported = read_case(out / name, require=("ctp", "dwi", "adc", "lesion", "mask"))
        info = imported.info["import"]
        assert "FINAL infarct" in info["lesion_meaning"] and info["mri_timepoint"] == "follow-up"
        assert info["time_between_scans"]["days"] == pytest.approx(3.5)
        assert imported.ctp.n_frames == 15 and info["summary"]["frames"] == "8→15"
        assert imported.info["preprocess"]["profile"] == "demo"
        # the lesion and DWI of the case lie where the phantom's are in the CTP's world
        shift = CT_SCANNER_SHIFT_MM if info["sources"]["ctp"]["space"] == "native" else (0, 0, 0)
        truth = resample_like(_placed(case.lesion, shift), imported.lesion, "nearest")
        assert _dice(truth.array, imported.lesion.array) > 0.85, name
        dwi = resample_like(_placed(case.dwi, shift), imported.dwi, "linear").array
        brain = imported.mask.array > 0
        assert np.corrcoef(dwi[brain], imported.dwi.array[brain])[0, 1] > 0.8, name
    # the derivatives subject needed no registration; the rotated one was registered to < 1 voxel
    a = json.loads((out / GOOD[0] / "case.json").read_text())["import"]
    assert all(isinstance(v, str) and v.startswith("none") for v in a["registration"].values())
    b = json.loads((out / GOOD[1] / "case.json").read_text())["import"]
    [record] = b["registration"].values()
    assert record["error_estimate_mm"]["mean"] < VOXEL_MM
    matrix = np.asarray(record["matrix_ras_mri_to_ctp"])
    truth = _shift(CT_SCANNER_SHIFT_MM) @ rigid()  # MRI world → the raw CTP's world
    points = np.linalg.inv(rigid()) @ _brain_points(case)  # brain points in the MRI's world
    error = np.linalg.norm((matrix @ points - truth @ points)[:3], axis=0)
    print(f"rotated case: error against the applied transform {error.mean():.2f} mm (max {error.max():.2f}), "
          f"estimate {record['error_estimate_mm']}")
    assert error.mean() < VOXEL_MM and error.max() < 1.5 * VOXEL_MM
    assert b["sources"]["dwi"]["path"].endswith("dwi/sub-strokecase0002_ses-0002_dwi.nii")


def test_bad_subjects_are_named_with_their_reason_and_the_rest_go_on(first_run):
    out, rc, stdout, stderr = first_run
    lines = stderr.strip().splitlines()
    assert any(line.startswith("sub-stroke0003: failed: no ADC") for line in lines)
    assert any(line.startswith("sub-stroke0004: failed: cannot read") and "truncated" in line for line in lines)
    assert "2 of 4 subjects failed" in lines[-1] and "Traceback" not in stderr
    assert not (out / "sub-stroke0003").exists() and not (out / "sub-stroke0004").exists()
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(GOOD)
    csv_text = (out / "import_summary.csv").read_text()
    assert csv_text.splitlines()[0].startswith("case,status,lesion_ml,frames,frame_interval_s,spacing_mm")
    assert csv_text.count("imported") == 2 and csv_text.count("failed") == 2
    assert "lesion ml" in stdout and "FINAL infarct" in stdout


def test_a_rerun_skips_finished_subjects(first_run, tree, capsys):
    out = first_run[0]
    stamp = {name: (out / name / "ctp.nii.gz").stat().st_mtime_ns for name in GOOD}
    rc, stdout, stderr, seconds = _run(["import-isles24", str(tree), "--out", str(out), "--profile", "demo"], capsys)
    assert rc == 2 and seconds < 10
    assert all(f"{name}: done earlier" in stdout for name in GOOD)
    assert stamp == {name: (out / name / "ctp.nii.gz").stat().st_mtime_ns for name in GOOD}
    # another profile into the same folder is refused per subject, not silently mixed
    rc, stdout, stderr, _ = _run(["import-isles24", str(tree), "--out", str(out), "--subjects", "stroke0001"], capsys)
    assert rc == 2 and "imported with profile demo" in stderr


def test_raw_space_registers_the_native_mri_and_places_the_ncct_lesion(tree, tmp_path, case, capsys):
    out = tmp_path / "raw"
    rc, stdout, stderr, seconds = _run(["import-isles24", str(tree), "--out", str(out), "--profile", "demo",
                                        "--space", "raw", "--subjects", "sub-stroke0001"], capsys)
    assert rc == 0, stderr
    imported = read_case(out / "sub-stroke0001")
    info = imported.info["import"]
    assert info["sources"]["ctp"]["space"] == "native" and info["sources"]["lesion"]["space"] == "ncct"
    assert set(info["registration"]) == {"dwi+adc", "lesion"}  # the lesion went by the space-ncct DWI
    assert info["registration"]["lesion"]["reference"].endswith("space-ncct_dwi.nii.gz")
    truth = resample_like(_placed(case.lesion, CT_SCANNER_SHIFT_MM), imported.lesion, "nearest")
    assert _dice(truth.array, imported.lesion.array) > 0.85
    print(f"raw import of one subject: {seconds:.1f} s")


def test_help_says_the_lesion_is_the_final_infarct(capsys):
    rc, stdout, _, _ = _run(["import-bids", "--help"], capsys)
    assert rc == 0 and "FINAL INFARCT, NOT THE ACUTE CORE" in stdout and "*_lesion-msk" in stdout
