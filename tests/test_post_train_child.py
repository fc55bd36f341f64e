"""Post-training in a child process (`ctp2mri.training.child`), without Qt: events, cancel with a
resumable checkpoint, and a killed child reported as such (no hang)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ctp2mri.checkpoints import load_checkpoint, load_training_state
from ctp2mri.training.child import FINAL_EVENTS, start

TIMEOUT_S = 300  # a child that hangs is killed: the test fails instead of blocking


@pytest.fixture(scope="module")
def case_folder(tmp_path_factory) -> Path:
    from ctp2mri.casefolder import write_case
    from ctp2mri.phantom import generate_case

    return write_case(generate_case(1, profile="demo"), tmp_path_factory.mktemp("child") / "data" / "p001")


def _job(base, out, folder, steps, resume=False, compare_steps=None):
    return {"base": str(base), "out": str(out), "sources": [str(folder)], "threads": 1, "device": "cpu",
            "resume": resume, "compare_steps": compare_steps,
            "settings": {"steps": steps, "batch_size": 2, "seed": 0, "lambda_image": 0.01, "lambda_lesion": 0.02}}


def _drain(run, on_event=None):
    events, started = [], time.monotonic()
    watchdog = threading.Timer(TIMEOUT_S, run.kill)
    watchdog.start()
    try:
        for event in run:
            events.append(event)
            if on_event is not None:
                on_event(event)
    finally:
        watchdog.cancel()
    assert time.monotonic() - started < TIMEOUT_S, "the child run did not end"
    assert events and events[-1]["event"] in FINAL_EVENTS
    assert not run.running
    return events


def _train_steps(events):
    return [e["step"] for e in events if e["event"] == "progress" and e["phase"] == "train"]


def test_a_child_run_reports_progress_and_loss_and_writes_a_checkpoint(tiny_cldm, case_folder, tmp_path):
    out = tmp_path / "out"
    run = start(_job(tiny_cldm, out, case_folder, 3, compare_steps=2))
    events = _drain(run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done", events[-1]
    assert events[0]["pid"] == run.pid
    phases = [e["phase"] for e in events if e["event"] == "progress"]
    assert phases.index("data") < phases.index("train") < phases.index("eval")
    train = [e for e in events if e["event"] == "progress" and e["phase"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3] and {e["total"] for e in train} == {3}
    for e in train:  # the loss curve's values
        assert all(math.isfinite(e["info"][k]) and e["info"][k] >= 0
                   for k in ("loss", "latent_loss", "image_loss", "lesion_loss"))
    done = events[-1]
    assert done["out"] == str(out) and done["steps"] == 3 and done["seconds"] > 0
    assert [row["model"] for row in done["rows"]] == ["base", "post-trained"]  # before/after, in the child
    assert run.returncode == 0
    nets, config = load_checkpoint(out, names=["ema"], kind="cldm")
    assert config["training"]["steps"] == 3 and config["training"]["data"]["cases"] == ["p001"]


def test_cancel_leaves_a_checkpoint_that_resume_continues(tiny_cldm, case_folder, tmp_path):
    out = tmp_path / "out"
    run = start(_job(tiny_cldm, out, case_folder, 500))

    def cancel_at_first_step(event):
        if event["event"] == "progress" and event["phase"] == "train":
            run.cancel(timeout=30)
    events = _drain(run, cancel_at_first_step)
    final = events[-1]
    assert final["event"] == "cancelled", final
    assert not run.killed  # stopped by itself, at the end of a step
    step = final["step"]
    assert step == _train_steps(events)[-1] and 1 <= step < 500
    assert Path(final["checkpoint"]) == out
    assert load_training_state(out)["step"] == step

    resumed = _drain(start(_job(tiny_cldm, out, case_folder, step + 2, resume=True)))
    assert resumed[-1]["event"] == "done", resumed[-1]
    assert _train_steps(resumed) == [step + 1, step + 2]
    assert load_training_state(out)["step"] == step + 2


def test_a_killed_child_gives_a_clear_error_event_not_a_hang(tiny_cldm, case_folder, tmp_path):
    out = tmp_path / "out"
    run = start(_job(tiny_cldm, out, case_folder, 100_000))

    def kill_at_first_step(event):
        if event["event"] == "progress" and event["phase"] == "train":
            os.kill(run.pid, signal.SIGKILL)  # as the OOM killer does
    events = _drain(run, kill_at_first_step)
    final = events[-1]
    assert final["event"] == "crashed", final
    assert final["returncode"] == -signal.SIGKILL
    assert "SIGKILL" in final["message"] and "out of memory" in final["message"]
    assert "no checkpoint was saved" in final["message"]


def test_a_cancelled_child_that_does_not_stop_in_time_is_killed(tiny_cldm, case_folder, tmp_path):
    run = start(_job(tiny_cldm, tmp_path / "out", case_folder, 100_000))

    def cancel_with_no_time_to_stop(event):
        if event["event"] == "progress" and event["phase"] == "train":
            run.cancel(timeout=0.001)
            run.cancel(timeout=0.001)  # a second call does nothing (no second signal)
    events = _drain(run, cancel_with_no_time_to_stop)
    final = events[-1]
    assert final["event"] == "cancelled", final  # the user asked for it: not reported as a crash
    if run.killed:
        assert "killed after not stopping in time" in final["message"]


def test_an_error_in_the_child_is_reported_with_its_message(case_folder, tmp_path):
    events = _drain(start(_job(tmp_path / "no_such_model", tmp_path / "out", case_folder, 3)))
    final = events[-1]
    assert final["event"] == "error" and final["user_error"], final
    assert "does not exist" in final["message"]
