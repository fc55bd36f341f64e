"""Malformed inputs through ``ctp2mri synthesize``, ``preprocess`` and ``perfusion``, in process.

Every case must end with exit status 2, exactly one line on stderr (no traceback) and nothing
written: neither the output folder nor a temporary or lock file beside it, nor anything beside
the inputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_reliability import (
    brain_of,
    listing,
    mri_like,
    save,
    save_raw,
    tiny_head,
)

from ctp2mri import progress
from ctp2mri.cli import main
from ctp2mri.io.volume import Volume


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_small(monkeypatch_module):
    # progress bars go to stderr too; the contract under test is the error line
    monkeypatch_module.setattr(progress, "tqdm_progress", lambda *a, **k: (progress.noop_progress, lambda: None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input file the cases refer to, by name."""
    d = tmp_path_factory.mktemp("inputs")
    ctp = tiny_head()
    save(ctp, d / "ctp.nii.gz")
    good = (d / "ctp.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "text.nii.gz").write_text("this is not an image\n")
    (d / "garbage.nii").write_bytes(bytes(range(256)) * 4)
    (d / "notes.txt").write_text("CTP notes")
    (d / "foreign.mha").write_text(json.dumps({"an": "image?"}))
    (d / "truncated.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n\n\x00\x01")
    (d / "emptydir").mkdir()
    (d / "junkdir").mkdir()
    (d / "junkdir" / "readme.txt").write_text("no DICOM here")
    (d / "pickle.ckpt").write_bytes(b"\x80\x04K\x01.")
    (d / "baddicom").mkdir()
    (d / "baddicom" / "IM0001.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00")
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text("{ not json")

    save(Volume(ctp.array[..., 0], ctp.affine), d / "ctp3d.nii.gz")
    save(Volume(ctp.array[..., :1], ctp.affine), d / "ctp1frame.nii.gz")
    nan = ctp.array.astype(np.float32)
    nan[20, 20, 8, 3] = np.nan
    save(Volume(nan, ctp.affine, frame_times=ctp.frame_times), d / "nan.nii.gz")
    inf = ctp.array.astype(np.float32)
    inf[10, 10, 4, 0] = np.inf
    save(Volume(inf, ctp.affine, frame_times=ctp.frame_times), d / "inf.nii.gz")
    save(Volume(np.zeros_like(ctp.array), ctp.affine, frame_times=ctp.frame_times), d / "zeros.nii.gz")
    save(Volume(np.full(ctp.array.shape, -1000, np.int16), ctp.affine), d / "air.nii.gz")
    save_raw(ctp.array[:4, :4, :4, :3].astype(np.complex64), d / "complex.nii")
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    save_raw(rgb, d / "rgb.nii")
    save_raw(np.zeros((8, 8, 4, 3, 2), np.int16), d / "5d.nii")
    save_raw(np.zeros((1, 1, 1, 15), np.int16), d / "onevoxel.nii")
    small = ctp.array[::4, ::4, ::4]
    save_raw(small, d / "zero_affine.nii", np.zeros((4, 4)))
    save_raw(small, d / "nan_affine.nii", np.full((4, 4), np.nan))
    save_raw(small, d / "singular_affine.nii", np.diag([4.0, 4.0, 0.0, 1.0]))
    collinear = np.eye(4)
    collinear[:3, :3] = [[4, 4, 0], [0, 0, 0], [0, 0, 8]]
    save_raw(small, d / "collinear_affine.nii", collinear)
    micro = ctp.affine.copy()
    micro[:3, :3] *= 1e-3  # a header in metres read as millimetres
    save_raw(ctp.array, d / "micrometre_voxels.nii", micro)
    giant = ctp.affine.copy()
    giant[:3, :3] *= 1e4
    save_raw(ctp.array, d / "giant_voxels.nii", giant)
    save(Volume(ctp.array[20:21], ctp.affine, frame_times=ctp.frame_times), d / "one_sagittal_slice.nii.gz")
    save(Volume((ctp.array > 0).astype(np.uint8), ctp.affine, frame_times=ctp.frame_times), d / "binary.nii.gz")
    huge = ctp.array.astype(np.float64)
    huge[5, 5, 5, 2] = 1e300
    save_raw(huge, d / "beyond_float32.nii", ctp.affine)  # float64 kept: save_nifti writes float32

    brain = brain_of(ctp)
    save(brain, d / "mask.nii.gz")
    save(Volume(brain.array, ctp.affine @ np.diag([2.0, 2.0, 1.0, 1.0])), d / "mask_other_grid.nii.gz")
    save(Volume(np.zeros_like(brain.array), ctp.affine), d / "mask_zero.nii.gz")
    save(Volume(np.repeat(brain.array[..., None], 2, -1), ctp.affine), d / "mask_4d.nii.gz")
    nan_mask = brain.array.astype(np.float32)
    nan_mask[0, 0, 0] = np.nan
    save(Volume(nan_mask, ctp.affine), d / "mask_nan.nii.gz")
    save(mri_like(ctp, shift=(500.0, 0.0, 0.0)), d / "dwi_far.nii.gz")
    save(Volume(np.repeat(mri_like(ctp).array[..., None], 2, -1), ctp.affine), d / "dwi_4d.nii.gz")
    dwi_nan = mri_like(ctp).array.copy()
    dwi_nan[24, 28, 8] = np.nan
    save(Volume(dwi_nan, ctp.affine), d / "dwi_nan.nii.gz")
    save(mri_like(ctp), d / "dwi.nii.gz")
    save(Volume(mri_like(ctp).array[:-2], ctp.affine), d / "adc_other_grid.nii.gz")
    aif = np.zeros(ctp.spatial_shape, np.uint8)
    save(Volume(aif, ctp.affine), d / "aif_empty.nii.gz")
    aif[20:24, 26:30, 6:8] = 1
    save(Volume(aif[:-4], ctp.affine), d / "aif_other_grid.nii.gz")
    (d / "out_file").write_text("a file where the output folder should go")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("the user's earlier results")
    return d


SYN = ["synthesize", "{in}/ctp.nii.gz", "--model", "demo", "--out", "{out}", "--device", "cpu", "--steps", "2"]
PRE = ["preprocess", "{in}/ctp.nii.gz", "--out", "{out}", "--profile", "demo"]
PERF = ["perfusion", "{in}/ctp.nii.gz", "--out", "{out}", "--no-figure"]


def _with_ctp(argv: list[str], ctp: str) -> list[str]:
    return [argv[0], ctp, *argv[2:]]


#: (id, argv): every argv must fail with exit status 2 and write nothing.
CASES: list[tuple[str, list[str]]] = []
for command, base in (("syn", SYN), ("pre", PRE), ("perf", PERF)):
    for name, ctp in (("missing", "{in}/missing.nii.gz"), ("empty-file", "{in}/empty.nii.gz"),
                      ("truncated-gz", "{in}/truncated.nii.gz"), ("text-as-nifti", "{in}/text.nii.gz"),
                      ("garbage-nii", "{in}/garbage.nii"), ("unknown-extension", "{in}/notes.txt"),
                      ("truncated-nrrd", "{in}/truncated.nrrd"), ("json-as-mha", "{in}/foreign.mha"),
                      ("empty-folder", "{in}/emptydir"), ("folder-without-dicom", "{in}/junkdir"),
                      ("3d-ctp", "{in}/ctp3d.nii.gz"), ("one-frame", "{in}/ctp1frame.nii.gz"),
                      ("nan-voxel", "{in}/nan.nii.gz"), ("inf-voxel", "{in}/inf.nii.gz"),
                      ("all-zero", "{in}/zeros.nii.gz"), ("all-air", "{in}/air.nii.gz"),
                      ("complex-dtype", "{in}/complex.nii"), ("rgb-dtype", "{in}/rgb.nii"),
                      ("5d", "{in}/5d.nii"), ("one-voxel", "{in}/onevoxel.nii"),
                      ("zero-affine", "{in}/zero_affine.nii"), ("nan-affine", "{in}/nan_affine.nii"),
                      ("singular-affine", "{in}/singular_affine.nii"),
                      ("collinear-affine", "{in}/collinear_affine.nii"),
                      ("micrometre-voxels", "{in}/micrometre_voxels.nii"),
                      ("giant-voxels", "{in}/giant_voxels.nii"),
                      ("one-sagittal-slice", "{in}/one_sagittal_slice.nii.gz"),
                      ("binary-values", "{in}/binary.nii.gz"),
                      ("value-beyond-float32", "{in}/beyond_float32.nii"),
                      ("damaged-dicom-file", "{in}/baddicom")):
        CASES.append((f"{command}-{name}", _with_ctp(base, ctp)))
    for name, extra in (("mask-other-grid", ["--mask", "{in}/mask_other_grid.nii.gz"]),
                        ("mask-all-zero", ["--mask", "{in}/mask_zero.nii.gz"]),
                        ("mask-4d", ["--mask", "{in}/mask_4d.nii.gz"]),
                        ("mask-missing", ["--mask", "{in}/nope.nii.gz"]),
                        ("out-is-a-file", ["--out", "{in}/out_file"]),
                        ("out-under-a-file", ["--out", "{in}/out_file/sub"]),
                        ("out-not-empty", ["--out", "{in}/full"])):
        CASES.append((f"{command}-{name}", [*base, *extra]))
CASES += [
    ("syn-eta-nan", [*SYN, "--sampler", "ddim", "--eta", "nan"]),
    ("syn-eta-negative", [*SYN, "--sampler", "ddim", "--eta", "-0.5"]),
    ("syn-eta-with-dpm", [*SYN, "--sampler", "dpm++2m", "--eta", "0.5"]),
    ("syn-steps-zero", [*SYN, "--steps", "0"]),
    ("syn-steps-fraction", [*SYN, "--steps", "2.5"]),
    ("syn-steps-beyond-schedule", [*SYN, "--sampler", "ddim", "--steps", "100000"]),
    ("syn-samples-zero", [*SYN, "--samples", "0"]),
    ("syn-seed-negative", [*SYN, "--seed", "-1"]),
    ("syn-batch-zero", [*SYN, "--batch-size", "0"]),
    ("syn-core-threshold-nan", [*SYN, "--core-threshold", "nan"]),
    ("syn-core-threshold-inf", [*SYN, "--core-threshold", "inf"]),
    ("syn-core-threshold-negative", [*SYN, "--core-threshold", "-5"]),
    ("syn-precision-unknown", [*SYN, "--precision", "fp64"]),
    ("syn-sampler-unknown", [*SYN, "--sampler", "euler"]),
    ("syn-device-unknown", [*SYN, "--device", "tpu"]),
    ("syn-model-missing", [*SYN, "--model", "{in}/no_model"]),
    ("syn-model-pickle", [*SYN, "--model", "{in}/pickle.ckpt"]),
    ("syn-model-damaged-config", [*SYN, "--model", "{in}/badmodel"]),
    ("syn-model-is-an-image", [*SYN, "--model", "{in}/ctp.nii.gz"]),
    ("syn-ground-truth-other-grid", [*SYN, "--ground-truth", "{in}/mask_other_grid.nii.gz"]),
    ("syn-mask-nan", [*SYN, "--mask", "{in}/mask_nan.nii.gz"]),
    ("pre-frames-one", [*PRE, "--frames", "1"]),
    ("pre-frames-nan", [*PRE, "--frames", "nan"]),
    ("pre-profile-unknown", [*PRE, "--profile", "huge"]),
    ("pre-register-without-dwi", [*PRE, "--register", "rigid"]),
    ("pre-dwi-500mm-away", [*PRE, "--dwi", "{in}/dwi_far.nii.gz"]),
    ("pre-dwi-4d", [*PRE, "--dwi", "{in}/dwi_4d.nii.gz"]),
    ("pre-dwi-nan", [*PRE, "--dwi", "{in}/dwi_nan.nii.gz"]),
    ("pre-dwi-truncated", [*PRE, "--dwi", "{in}/truncated.nii.gz"]),
    ("pre-adc-other-grid", [*PRE, "--dwi", "{in}/dwi.nii.gz", "--adc", "{in}/adc_other_grid.nii.gz"]),
    ("pre-dwi-zero-affine", [*PRE, "--dwi", "{in}/zero_affine.nii"]),
    ("perf-core-rcbf-nan", [*PERF, "--core-rcbf", "nan"]),
    ("perf-core-rcbf-above-one", [*PERF, "--core-rcbf", "5"]),
    ("perf-core-rcbf-negative", [*PERF, "--core-rcbf", "-0.3"]),
    ("perf-tmax-negative", [*PERF, "--tmax-threshold", "-1"]),
    ("perf-tmax-inf", [*PERF, "--tmax-threshold", "inf"]),
    ("perf-min-island-inf", [*PERF, "--min-island-ml", "inf"]),
    ("perf-min-island-negative", [*PERF, "--min-island-ml", "-1"]),
    ("perf-smoothing-nan", [*PERF, "--smoothing-mm", "nan"]),
    ("perf-smoothing-negative", [*PERF, "--smoothing-mm", "-3"]),
    ("perf-method-unknown", [*PERF, "--method", "fft"]),
    ("perf-aif-mask-empty", [*PERF, "--aif-mask", "{in}/aif_empty.nii.gz"]),
    ("perf-aif-mask-other-grid", [*PERF, "--aif-mask", "{in}/aif_other_grid.nii.gz"]),
    ("perf-aif-mask-missing", [*PERF, "--aif-mask", "{in}/nope.nii.gz"]),
]


#: Cases that still fail, outside this module's reach (reported; strict: they flag when fixed).
KNOWN: dict[str, pytest.MarkDecorator] = {}


@pytest.mark.parametrize("argv", [pytest.param(argv, id=cid, marks=KNOWN.get(cid, ())) for cid, argv in CASES])
def test_malformed_input_fails_with_one_line_and_writes_nothing(argv, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    before = listing(inputs)
    args = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]
    with warnings.catch_warnings(record=True) as warned:  # pytest would hide them; a user sees them
        warnings.simplefilter("always")
        code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip("\n").splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"ctp2mri {args[0]}: error: "), lines[0]
    assert not warned, [str(w.message) for w in warned]  # each would be two more lines on stderr
    assert not out.exists() and listing(tmp_path) == []
    assert listing(inputs) == before  # no partial, lock or output file next to the inputs either


def test_there_are_at_least_forty_cases_per_command_family():
    assert len(CASES) >= 40
    assert {c[0].split("-")[0] for c in CASES} == {"syn", "pre", "perf"}
