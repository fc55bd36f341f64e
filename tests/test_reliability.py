"""Issue 19: no silent wrong output, no lost result, every interruption handled.

One section per numbered item of the issue: concurrent runs (1), non-overlapping MRI (2),
numeric options and strict JSON (3), Ctrl-C/SIGTERM in training (4), singular affines (5), a
full disk and refused writes (6), leftovers of killed writers and SIGTERM (7), the pickle
advice (8), Ctrl-C at start-up (9), and bundled bases, file modes, frame and brain notices (10).
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers_cldm import one_thread
from _helpers_reliability import head_affine, listing, mri_like, save, tiny_head

from ctp2mri import progress
from ctp2mri.cli import main
from ctp2mri.errors import InputError, OutputWriteError, user_message
from ctp2mri.io.atomic import atomic_dir, atomic_path, claim_output, clean_stale_partials
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.io.volume import Volume

# The module `main` runs in: main calls this module's build_parser, so patching the name the package
# re-exports would not reach it (and the package's attribute `main` is the function, not this module).
cli = importlib.import_module("ctp2mri.cli.main")
SRC = str(Path(__file__).resolve().parents[1] / "src_core")


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Progress bars share stderr with the one-line messages under test."""
    monkeypatch.setattr(progress, "tqdm_progress", lambda *a, **k: (progress.noop_progress, lambda: None))


@pytest.fixture(scope="module")
def ctp_file(tmp_path_factory) -> Path:
    return save(tiny_head(), tmp_path_factory.mktemp("ctp") / "ctp.nii.gz")


def _synth(ctp: Path, out: Path, *extra: str) -> list[str]:
    return ["synthesize", str(ctp), "--model", "demo", "--out", str(out), "--device", "cpu", "--steps", "1",
            *extra]


def _one_line(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _strict_load(path: Path):
    """json.loads that refuses NaN/Infinity tokens, as any non-Python reader does."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# 1. concurrent runs into one output ------------------------------------------------------------
def _holder(path: Path) -> subprocess.Popen:
    """Another process holding the claim on ``path`` until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from ctp2mri.io.atomic import claim_output
        with claim_output({str(path)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", [
    ["synthesize", "{ctp}", "--model", "demo"], ["preprocess", "{ctp}"], ["perfusion", "{ctp}"],
    ["phantom"], ["train-autoencoder", "--data", "{ctp}"], ["train-ldm", "--data", "{ctp}", "--autoencoder", "x"],
    ["post-train", "--data", "{ctp}", "--from", "demo-base"], ["train-pix2pix", "--data", "{ctp}"],
])
def test_a_second_run_into_a_claimed_output_is_refused_at_once(command, ctp_file, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        args = [a.replace("{ctp}", str(ctp_file)) for a in command] + ["--out", str(out)]
        assert main(args) == 2
        line = _one_line(capsys.readouterr().err)
        assert re.search(rf"{re.escape(str(out))} is being written by another ctp2mri run \(pid {holder.pid} on ",
                         line), line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock with its process: a run after a crash (SIGKILL) is not blocked
    with claim_output(out):
        pass
    assert listing(tmp_path) == []


def test_the_claim_reaches_every_atomic_folder_write_and_is_reentrant(tmp_path):
    out = tmp_path / "maps"
    holder = _holder(out)
    try:
        with pytest.raises(InputError, match="being written by another ctp2mri run"):
            with atomic_dir(out):  # what perfusion's write_perfusion and every case/checkpoint write use
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_output(out), claim_output(out), atomic_dir(out) as tmp:  # one run: nested claims are fine
        (tmp / "a").write_text("1")
    assert listing(tmp_path) == ["maps", "maps/a"]


def test_a_result_written_meanwhile_is_never_replaced(tmp_path):
    """Even without a lock (a file system without locks, an old version): the final rename is
    exclusive, so the second writer fails instead of silently swapping out the first result."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match="was written by another run while this one was working"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()
            (out / "theirs").write_text("first")  # the other run finished first
    assert listing(out) == ["theirs"] and listing(tmp_path) == ["out", "out/theirs"]


def test_two_synthesize_runs_into_one_folder_cannot_both_succeed(ctp_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_synth(ctp_file, out)) == 0
    first = (out / "dwi.nii.gz").read_bytes()
    assert main(_synth(ctp_file, out, "--seed", "7")) == 2
    assert "already exists and is not empty; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert (out / "dwi.nii.gz").read_bytes() == first


# 2. MRI that does not overlap the CTP ------------------------------------------------------------
def test_preprocess_refuses_a_dwi_that_does_not_overlap_and_registration_reports_the_overlap(tmp_path, capsys):
    ctp = save(tiny_head(), tmp_path / "ctp.nii.gz")
    far = save(mri_like(tiny_head(), shift=(500.0, 0.0, 0.0)), tmp_path / "dwi.nii.gz")
    base = ["preprocess", str(ctp), "--profile", "demo", "--dwi", str(far)]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "the DWI covers only 0 % of the CTP's brain" in line and "500 mm apart" in line and "--register" in line
    assert not (tmp_path / "plain").exists()

    assert main([*base, "--register", "rigid", "--out", str(tmp_path / "reg")]) == 0
    printed = capsys.readouterr().out
    assert "note: after registration the DWI covers 100 % of the CTP's brain" in printed
    info = _strict_load(tmp_path / "reg" / "case.json")["preprocess"]
    assert info["mask"]["mri_coverage"] == 1.0


# 3. numeric settings and strict JSON -------------------------------------------------------------
@pytest.mark.parametrize("setting", [{"eta": math.nan, "sampler": "ddim"}, {"eta": -0.1, "sampler": "ddim"},
                                     {"core_threshold": math.nan}, {"core_threshold": math.inf},
                                     {"steps": 2.5}, {"samples": 0}, {"seed": -1}, {"batch_size": 0},
                                     {"steps": True}, {"eta": "0.1", "sampler": "ddim"}])
def test_the_core_synthesize_refuses_non_finite_or_out_of_range_settings(setting):
    from ctp2mri.synthesis.synthesize import synthesize

    with pytest.raises(InputError, match="must be a (finite|whole) number"):
        synthesize(tiny_head(), "demo", device="cpu", **setting)  # refused before the model is loaded


@pytest.mark.parametrize("setting, name", [({"ema_decay": math.nan}, "EMA decay"), ({"lr": math.nan}, "learning rate"),
                                           ({"lr": -1.0}, "learning rate"), ({"steps": 0}, "steps"),
                                           ({"seed": -3}, "seed"), ({"grad_clip": math.inf}, "gradient clipping norm"),
                                           ({"checkpoint_every": 1.5}, "checkpoint interval")])
def test_the_core_trainers_refuse_non_finite_or_out_of_range_settings(setting, name, tmp_path):
    from ctp2mri.training import post_train, train_autoencoder, train_pix2pix

    with pytest.raises(InputError, match=f"{name} must be a (finite|whole) number"):
        post_train(tmp_path, "demo-base", tmp_path / "run", device="cpu", **setting)  # before anything is read
    if "ema_decay" not in setting:  # the GAN trainers have no EMA
        for train in (train_autoencoder, train_pix2pix):
            with pytest.raises(InputError, match=f"{name} must be a (finite|whole) number"):
                train(tmp_path, tmp_path / "run", device="cpu", **setting)
    assert listing(tmp_path) == []


def test_reports_are_strict_json(tmp_path):
    from ctp2mri.casefolder import Case, write_case
    from ctp2mri.synthesis.synthesize import SynthesisResult, write_outputs

    ctp = tiny_head(frames=2)
    blank = Volume(np.zeros(ctp.spatial_shape, np.float32), ctp.affine)
    result = SynthesisResult(dwi=blank, adc=blank, core=blank, uncertainty=None, brain=blank,
                             report={"core_volume_ml": math.nan, "eta": math.inf, "x": np.float32("nan")})
    report = _strict_load(write_outputs(result, tmp_path / "out") / "report.json")
    assert report["core_volume_ml"] is None and report["eta"] is None and report["x"] is None
    write_case(Case(ctp=ctp, info={"volume": math.nan, "ratio": -math.inf}), tmp_path / "case")
    assert _strict_load(tmp_path / "case" / "case.json") == {"volume": None, "ratio": None}
    assert strict_json({"a": (1, np.int64(2)), "p": tmp_path}) == json.dumps(
        {"a": [1, 2], "p": str(tmp_path)}, indent=2) + "\n"


# 4. Ctrl-C / SIGTERM during training --------------------------------------------------------------
@pytest.fixture(scope="module")
def training_inputs(phantom_data, tiny_cldm) -> tuple[Path, Path]:
    """(data, base) of the post-training runs."""
    return phantom_data, tiny_cldm


def _post_train_argv(data: Path, base: Path, out: Path, steps: int = 4) -> list[str]:
    return ["post-train", "--data", str(data), "--from", str(base), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--num-workers", "0", "--checkpoint-every",
            "100"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_saves_the_current_step_and_prints_the_resume_command(
        signum, training_inputs, tmp_path, monkeypatch, capsys):
    from ctp2mri.checkpoints import load_training_state
    from ctp2mri.training import loop

    data, base = training_inputs
    out = tmp_path / "run"
    real_end_step = loop.Run.end_step

    def signal_at_step_2(self, step, values):
        if step == 2:
            os.kill(os.getpid(), signum)  # as Ctrl-C or `kill` would, between two steps' work
        return real_end_step(self, step, values)

    monkeypatch.setattr(loop.Run, "end_step", signal_at_step_2)
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `cmd &`
    argv = _post_train_argv(data, base, out)
    with one_thread():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 128 + signum, err
    assert "stopping after the current step to save a checkpoint" in err and "Traceback" not in err
    assert load_training_state(out)["step"] == 2  # not the last interval's checkpoint: none was due
    resume = re.search(r"Continue with: (.*)$", err.strip().splitlines()[-1]).group(1)
    assert shlex.split(resume) == ["ctp2mri", *argv, "--resume"]
    assert f"the checkpoint in {out} (step 2) keeps the run" in err

    monkeypatch.setattr(loop.Run, "end_step", real_end_step)
    with one_thread():
        assert main(shlex.split(resume)[1:]) == 0
    assert load_training_state(out)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_still_saves_a_checkpoint(signum, training_inputs, tmp_path):
    """The real thing: the signal reaches every process of the group (a terminal's Ctrl-C; a job
    scheduler's SIGTERM) while a DataLoader worker runs; the run saves its step and exits with
    the resume line. A worker killed by the SIGTERM used to abort the main process."""
    from ctp2mri.checkpoints import load_training_state

    data, base = training_inputs
    out = tmp_path / "run"
    argv = _post_train_argv(data, base, out, steps=100000)
    argv[argv.index("--num-workers") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctp2mri.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "log.csv").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # log.csv appears after 10 steps: training is under way
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "exited unexpectedly" not in err
    step = load_training_state(out)["step"]
    assert step >= 10
    assert err.strip().splitlines()[-1].endswith(f"(step {step}) keeps the run. Continue with: "
                                                 f"{shlex.join(['ctp2mri', *argv, '--resume'])}")


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(
        training_inputs, tmp_path, monkeypatch, capsys):
    module = importlib.import_module("ctp2mri.training.post_train")  # the package exports the function

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, "_post_train", interrupted)
    data, base = training_inputs
    assert main(_post_train_argv(data, base, tmp_path / "run")) == 130
    line = _one_line(capsys.readouterr().err)
    assert "interrupted before the first checkpoint; nothing to resume" in line


def test_dataloader_workers_leave_ctrl_c_to_the_main_process():
    """A terminal's Ctrl-C reaches the whole process group: a worker must not die of it."""
    code = textwrap.dedent(f"""
        import signal, sys
        sys.path.insert(0, {SRC!r})
        from ctp2mri.training.batches import _leave_signals_to_the_main_process
        _leave_signals_to_the_main_process(0)
        print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
    """)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["True", "True"]


# 5. singular and non-finite affines ----------------------------------------------------------------
@pytest.mark.parametrize("affine, match", [
    (np.zeros((4, 4)), "singular voxel-to-world affine"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "singular voxel-to-world affine"),
    (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "singular"),
    (np.full((4, 4), np.nan), "NaN or infinite entries"),
    (np.diag([1.0, 1.0, np.inf, 1.0]), "NaN or infinite entries"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float), "last row"),
])
def test_volumes_refuse_affines_that_place_no_voxel(affine, match):
    with pytest.raises(InputError, match=match):
        Volume(np.zeros((4, 4, 4), np.int16), affine)


# 6. a full disk, a refused write -------------------------------------------------------------------
@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, r"No space left on device writing {out} \(.* free there; the output needs up to .*\); free "
                   r"some space or choose an output folder on another disk\. Nothing was written\."),
    (errno.EACCES, r"cannot write {out}: permission denied; choose a folder you can write to.*"),
    (errno.EROFS, r"cannot write {out}: the file system is read-only; .*"),
])
def test_a_failed_write_is_one_line_naming_the_output_and_the_space_needed(
        code, expected, ctp_file, tmp_path, monkeypatch, capsys):
    from ctp2mri.synthesis import synthesize as engine

    real_save = engine.save_nifti
    written = []

    def fail_on_the_second_file(volume, path, *args, **kwargs):
        if written:
            raise OSError(code, os.strerror(code), str(path))
        written.append(path)
        return real_save(volume, path, *args, **kwargs)

    monkeypatch.setattr(engine, "save_nifti", fail_on_the_second_file)
    out = tmp_path / "out"
    assert main(_synth(ctp_file, out)) == 1
    line = _one_line(capsys.readouterr().err)
    assert re.fullmatch(r"ctp2mri synthesize: error: " + expected.format(out=re.escape(str(out))), line), line
    assert listing(tmp_path) == []  # the first file was written, then removed with the temporary folder


def test_os_errors_outside_a_write_are_one_line_too(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "log.csv"))
    assert user_message(full).startswith(f"No space left on device writing {tmp_path / 'log.csv'} (")
    assert "permission denied" in user_message(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert user_message(RuntimeError("a bug")) is None  # bugs keep their traceback
    err = OutputWriteError(errno.ENOSPC, "the message", tmp_path)
    assert isinstance(err, OSError) and err.filename == str(tmp_path) and str(err) == "the message"


# 7. leftovers of killed writers, SIGTERM like Ctrl-C -------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_are_removed_by_the_next_write_there(tmp_path):
    from ctp2mri.io.atomic import _host_tag

    dead, alive, host = _dead_pid(), os.getppid(), _host_tag()
    stale_dir = tmp_path / f".out.0123abcd.{dead}-{host}.partial"
    legacy_dir = tmp_path / ".out.89abcdef.partial"  # written before writers were tagged
    live_dir = tmp_path / f".out.11111111.{alive}-{host}.partial"  # another run still writing
    other_host = tmp_path / f".out.22222222.{dead}-ffff.partial"  # its pid means nothing here
    for d in (stale_dir, legacy_dir, live_dir, other_host):
        d.mkdir()
        (d / "dwi.nii.gz").write_bytes(b"half")
    stale_file = tmp_path / f".img.nii.gz.3333aaaa.{dead}-{host}.partial.nii.gz"
    stale_file.write_bytes(b"half")
    unrelated = tmp_path / ".outer.44444444.partial"
    unrelated.mkdir()

    with atomic_dir(tmp_path / "out") as tmp:
        assert re.fullmatch(rf"\.out\.[0-9a-f]{{8}}\.{os.getpid()}-{host}\.partial", tmp.name)
        (tmp / "x").write_text("x")
    left = {p.name for p in tmp_path.iterdir()}
    assert stale_dir.name not in left and legacy_dir.name not in left
    assert {live_dir.name, other_host.name, unrelated.name, stale_file.name} <= left
    with atomic_path(tmp_path / "img.nii.gz") as tmp:
        tmp.write_bytes(b"whole")
    assert not stale_file.exists() and clean_stale_partials(tmp_path / "out") == []


def test_a_signal_never_separates_the_two_renames_that_replace_a_result(tmp_path, monkeypatch):
    from ctp2mri.interrupts import Interrupted, handle_interrupts

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous result")
    real_replace = os.replace

    def signalled_between(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            os.kill(os.getpid(), signal.SIGTERM)  # right after the old result moved aside

    monkeypatch.setattr(os, "replace", signalled_between)
    with pytest.raises(Interrupted), handle_interrupts():
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new result")
    assert listing(tmp_path) == ["out", "out/new"]  # swapped completely, then stopped


def test_a_previous_result_left_aside_by_a_killed_swap_is_restored(tmp_path):
    from ctp2mri.io.atomic import _host_tag

    aside = tmp_path / f".out.0123abcd.{_dead_pid()}-{_host_tag()}.old"
    aside.mkdir()
    (aside / "dwi.nii.gz").write_text("previous result")
    assert clean_stale_partials(tmp_path / "out") == []
    assert listing(tmp_path) == ["out", "out/dwi.nii.gz"]


def test_sigterm_during_a_write_removes_the_temporary_folder_and_exits_143(ctp_file, tmp_path, monkeypatch, capsys):
    from ctp2mri.synthesis import synthesize as engine

    real_save = engine.save_nifti

    def terminated_after_the_first_file(volume, path, *args, **kwargs):
        real_save(volume, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine, "save_nifti", terminated_after_the_first_file)
    assert main(_synth(ctp_file, tmp_path / "out")) == 143
    assert _one_line(capsys.readouterr().err) == "ctp2mri synthesize: interrupted; no partial output was kept"
    assert listing(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_to_a_running_command_line_process_ends_it_cleanly(ctp_file, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "ctp2mri.cli", *_synth(ctp_file, out, "--steps", "1000",
                                                                         "--sampler", "ddim")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".ctp2mri-lock") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the run has claimed its output: it is past start-up
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "ctp2mri synthesize: interrupted; no partial output was kept"
    assert "Traceback" not in err and listing(tmp_path) == []


# 8. the pickle refusal's advice ------------------------------------------------------------------------
def test_the_pickle_refusal_recommends_nothing_that_does_not_exist(tmp_path):
    from ctp2mri.checkpoints import checkpoint_dir

    with pytest.raises(InputError) as refused:
        checkpoint_dir(tmp_path / "last.ckpt")
    message = str(refused.value)
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert "convert-checkpoint" not in message
    assert all(c in commands for c in re.findall(r"`ctp2mri ([a-z][a-z-]+)", message)), message
    import ctp2mri.checkpoints as checkpoints
    assert hasattr(checkpoints, "save_checkpoint") and "save_checkpoint" in message


# 9. Ctrl-C while starting up ---------------------------------------------------------------------------
def test_ctrl_c_while_starting_up_exits_quietly_with_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["synthesize", "--help"]) == 130
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_a_command_imports_its_modules_is_one_line(monkeypatch, capsys, tmp_path):
    def importing(args):
        raise KeyboardInterrupt  # e.g. during `import torch` inside the command
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["perfusion"].set_defaults(func=importing)
    assert main(["perfusion", "x.nii.gz", "--out", str(tmp_path / "out")]) == 130
    assert _one_line(capsys.readouterr().err) == "ctp2mri perfusion: interrupted; no partial output was kept"
    assert listing(tmp_path) == []


def test_usage_errors_and_help_return_instead_of_exiting(capsys):
    assert main(["synthesize"]) == 2
    assert _one_line(capsys.readouterr().err).endswith("(see ctp2mri synthesize --help)")
    assert main(["--version"]) == 0


# 10. bundled bases, file modes, frame and brain notices --------------------------------------------------
def test_post_train_accepts_a_bundled_model_name(monkeypatch, tmp_path):
    from ctp2mri.bundled import bundled_model
    module = importlib.import_module("ctp2mri.training.post_train")  # the package exports the function

    seen = {}

    def capture(info, data, base, *rest):
        seen["base"] = base
        return tmp_path
    monkeypatch.setattr(module, "_post_train", capture)
    module.post_train(tmp_path, "demo-base", tmp_path / "run", device="cpu")
    assert seen["base"] == bundled_model("demo-base")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_weights_get_the_same_mode_as_config_json(umask, tmp_path):
    from ctp2mri.checkpoints import save_checkpoint
    from ctp2mri.models.autoencoder import VQAutoencoder

    net = VQAutoencoder(channels=(4, 4, 4), num_res_blocks=0, num_embeddings=8, mid_attention=False,
                        norm_num_groups=4)
    old = os.umask(umask)
    try:
        folder = save_checkpoint(tmp_path / "ck", {"model": net}, {"kind": "autoencoder", "profile": "demo"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_long_ctp_is_resampled_in_time_with_a_notice(tmp_path, capsys):
    ctp = save(tiny_head(frames=200), tmp_path / "ctp.nii.gz")
    assert main(["preprocess", str(ctp), "--profile", "demo", "--out", str(tmp_path / "case")]) == 0
    printed = capsys.readouterr().out
    assert "note: the CTP's 200 frames (0.0–21.0 s) are resampled to the model's 15 equally spaced frames" in printed


def test_a_noise_brain_is_accepted_with_a_warning_naming_the_figure(tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = Volume(rng.normal(50, 100, (64, 64, 20, 15)).astype(np.float32), np.diag([2.0, 2.0, 5.0, 1.0]))
    ctp = save(noise, tmp_path / "noise.nii.gz")
    assert main(["preprocess", str(ctp), "--profile", "demo", "--out", str(tmp_path / "case")]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if "implausible brain mask" in line]
    assert len(note) == 1 and re.search(r"the 8\d\d ml of \"brain\" found in the CTP vary by \d+ HU", note[0]), note


def test_brain_masks_outside_a_heads_volume_are_named(tmp_path):
    from ctp2mri.preprocessing.brain_mask import brain_mask_notice

    small = np.zeros((48, 56, 16), np.uint8)
    small[20:28, 20:28, :] = 1  # 8 × 8 voxels × 16 slices of 4 × 4 × 8 mm: 131 ml over 128 mm
    note = brain_mask_notice(Volume(small, head_affine()))
    assert note.startswith("implausible brain mask: 131 ml over 128 mm (a head's brain is 600–2500 ml")
    head = tiny_head()
    assert brain_mask_notice(Volume((np.asarray(mri_like(head).array) > 0).astype(np.uint8), head.affine)) is None
    huge = np.ones((96, 112, 40), np.uint8)  # 2 × 2 × 5 mm: 8.6 l
    assert "implausible brain mask: 8602 ml" in brain_mask_notice(Volume(huge, np.diag([2.0, 2.0, 5.0, 1.0])))
