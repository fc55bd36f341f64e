"""Post-training in a child process: events out, cancel in, nothing shared but files.

The napari widget (`napari_ctp2mri._post_train_widget`) runs post-training here rather than in a
thread of the viewer's process, as MONAI Label and the Slicer synthesis extensions do: the viewer
keeps its CPU time and stays responsive, the child's (GPU) memory is gone when it ends, and a
crash of the child (killed, out of memory) cannot take the viewer with it.

Parent side (Qt-free)::

    run = start(job)            # spawns ``python -m ctp2mri.training.child``
    for event in run:           # dicts, in order; the last one says how the run ended
        ...
    run.cancel()                # graceful: checkpoint at the current step, kill after a timeout
    run.kill()                  # at once (SIGKILL)

``job`` is JSON: ``{"base", "out", "sources": [case folders], "settings": {PostTrainSettings
fields}, "device", "resume", "compare_steps": DDIM steps of the before/after check | None,
"threads"}``; the child runs it with `ctp2mri.evaluation.post_train_compare.post_train_and_compare`
and only carries the job, events and signals. The data go through files: the training set is a
list of case folders (the widget writes the viewer case as one). The job is written to the
child's stdin as one line; its events come back as JSON lines on its stdout (everything the
child prints goes to its stderr, kept in a log file):

- ``{"event": "started", "pid"}``
- ``{"event": "progress", "phase": "data" | "train" | "eval", "step", "total", "info"}``
- ``{"event": "done", "out", "steps", "seconds", "rows": before/after rows | None, "metrics_note"}``
- ``{"event": "cancelled", "message", "step", "checkpoint"}`` (checkpoint None: nothing saved)
- ``{"event": "error", "type", "message", "user_error", "traceback"}``
- ``{"event": "crashed", "returncode", "message", "log"}``: made by the parent when the child
  ended without saying how (killed by a signal, the OOM killer, a segfault).

Cancel sends SIGTERM (POSIX; elsewhere a ``cancel`` line on stdin), which
`ctp2mri.interrupts.handle_interrupts` turns into the training's cancel token: the running step
ends, a resumable checkpoint is saved, the child reports ``cancelled`` and exits. If it has not
ended ``timeout`` seconds later it is killed. The child also cancels itself when its stdin closes
(the parent died), so an orphan does not train on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ChildFailed", "ChildRun", "FINAL_EVENTS", "run_job", "start"]

FINAL_EVENTS = ("done", "cancelled", "error", "crashed")
CANCEL_TIMEOUT_S = 30.0
_LOG_TAIL = 2000  # characters of the child's log quoted in a crash message


class ChildFailed(RuntimeError):
    """The child ended with an ``error`` (a bug, not the user's input) or ``crashed`` event;
    ``event`` is that event."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        super().__init__(str(event.get("message", "the post-training process failed")))
        self.event = dict(event)

    @property
    def crashed(self) -> bool:
        return self.event.get("event") == "crashed"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


# parent side -----------------------------------------------------------------------------------
class ChildRun:
    """One post-training job in a child process; iterate it for its events.

    Parameters
    ----------
    job
        The job (see the module's docstring); JSON-serialisable.
    python
        The interpreter of the child (default: this one).
    env
        Environment variables added to the child's.
    """

    def __init__(self, job: Mapping[str, Any], *, python: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.job = dict(job)
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.cancel_requested = False
        self.killed = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._final: dict[str, Any] | None = None

    # control
    def start(self) -> ChildRun:
        """Spawn the child and hand it the job."""
        fd, log = tempfile.mkstemp(prefix="ctp2mri-post-train-", suffix=".log")
        self.log_path = Path(log)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with os.fdopen(fd, "wb") as log_file:
            self.proc = subprocess.Popen([self.python, "-m", "ctp2mri.training.child"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log_file, env=env, bufsize=0)
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(self.job, default=_json_default) + "\n").encode())
        self.proc.stdin.flush()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def cancel(self, timeout: float | None = CANCEL_TIMEOUT_S) -> None:
        """Ask the child to stop after its running step, saving a resumable checkpoint; kill it
        if it has not ended ``timeout`` seconds later (None: never). A second call does nothing
        (a second signal would stop the child at once, without the checkpoint)."""
        with self._lock:
            if self.cancel_requested or not self.running:
                return
            self.cancel_requested = True
            try:
                if os.name == "posix":
                    self.proc.send_signal(signal.SIGTERM)
                else:  # no catchable SIGTERM: the child's stdin reader sets its token
                    self.proc.stdin.write(b"cancel\n")
                    self.proc.stdin.flush()
            except (OSError, ValueError):  # it ended meanwhile
                return
            if timeout is not None:
                self._timer = threading.Timer(timeout, self.kill)
                self._timer.daemon = True
                self._timer.start()

    def kill(self) -> None:
        """Stop the child at once (SIGKILL); the steps since its last checkpoint are lost."""
        with self._lock:
            if self.running:
                self.killed = True
                try:
                    self.proc.kill()
                except OSError:
                    pass

    # events
    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events()

    def events(self) -> Iterator[dict[str, Any]]:
        """The child's events until it ends; the last is always one of `FINAL_EVENTS`.

        Blocks while waiting for the child: iterate in a worker thread, not a GUI thread.
        """
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue  # not an event (cannot happen: the child's prints go to stderr)
                if not isinstance(event, dict) or "event" not in event:
                    continue
                if event["event"] in FINAL_EVENTS:
                    self._final = event
                yield event
            returncode = self.proc.wait()
            if self._final is None:
                self._final = self._ended_silently(returncode)
                yield self._final
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self.running:  # the consumer stopped iterating early: do not leave the child behind
                self.cancel(timeout=None)
                try:
                    self.proc.wait(timeout=CANCEL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.kill()
                    self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            final = self._final or {}
            if final.get("event") in ("done", "cancelled") or final.get("user_error"):
                self._remove_log()  # kept only where it may explain a failure

    def _remove_log(self) -> None:
        if self.log_path is not None and not self.running:
            try:
                self.log_path.unlink()
            except OSError:
                pass

    def log_tail(self, n: int = _LOG_TAIL) -> str:
        """The end of the child's stderr (its warnings, a traceback printed on the way out)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def _ended_silently(self, returncode: int) -> dict[str, Any]:
        out = self.job.get("out")
        if self.cancel_requested and (returncode < 0 or returncode in (130, 143)):
            step = _saved_step(out)
            how = "stopped" if not self.killed else "killed after not stopping in time"
            return {"event": "cancelled", "step": step, "checkpoint": out if step is not None else None,
                    "message": f"the post-training process was {how}"}
        if returncode < 0:
            name = _signal_name(returncode)
            cause = {"SIGKILL": " (killed: the system may have run out of memory, or it was killed by hand)",
                     "SIGSEGV": " (a crash in native code)", "SIGABRT": " (aborted)"}.get(name, "")
            how = f"was ended by {name}{cause}"
        else:
            how = f"exited with code {returncode} without a result"
        step = _saved_step(out)
        kept = (f"; the checkpoint in {out} (step {step}) can be continued ('Continue the saved run' / --resume)"
                if step is not None else "; no checkpoint was saved")
        return {"event": "crashed", "returncode": returncode, "log": str(self.log_path),
                "message": f"the post-training process {how}{kept}",
                "log_tail": self.log_tail()}


def _saved_step(folder: str | os.PathLike | None) -> int | None:
    """Step of the resumable checkpoint in ``folder``, or None."""
    if folder is None:
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return int(config["provenance"]["steps"]) if "training_state" in config else None
    except (OSError, TypeError, ValueError, KeyError):
        return None


def start(job: Mapping[str, Any], **kwargs: Any) -> ChildRun:
    """Spawn a child running ``job``; iterate the result for its events (see `ChildRun`)."""
    return ChildRun(job, **kwargs).start()


# child side ------------------------------------------------------------------------------------
def run_job(job: Mapping[str, Any], emit: Callable[[dict[str, Any]], None], cancel: Any) -> dict[str, Any]:
    """Post-train (and score before/after) as ``job`` says; returns the ``done`` event.

    Runs in the child (or, for a test, in-process); ``emit`` receives the progress events.
    """
    from ctp2mri.evaluation.post_train_compare import post_train_and_compare
    from ctp2mri.training.post_train import PostTrainSettings

    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))

    def progress(phase: str, step: int, total: int, info: dict[str, Any]) -> None:
        emit({"event": "progress", "phase": phase, "step": int(step), "total": int(total), "info": dict(info)})

    result = post_train_and_compare(
        job["base"], job["out"], [Path(p) for p in job.get("sources") or []],
        PostTrainSettings(**(job.get("settings") or {})), device=job.get("device", "auto"),
        resume=bool(job.get("resume")), compare_steps=job.get("compare_steps"), progress=progress, cancel=cancel)
    return {"event": "done", "out": str(result.out), "steps": result.steps, "seconds": result.seconds,
            "rows": result.rows, "metrics_note": result.note}


def main() -> int:
    """The child: read the job from stdin, run it, report events on stdout (see the docstring)."""
    # The event channel is the original stdout; anything else printed (libraries, warnings,
    # C-level writes) goes to stderr, the log file.
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps(event, default=_json_default)  # NaN metrics stay NaN (json's extension)
        with lock:
            events.write(line + "\n")
            events.flush()

    from ctp2mri.interrupts import Interrupted, handle_interrupts
    from ctp2mri.progress import CancelToken

    token = CancelToken()
    with handle_interrupts(token):  # first SIGTERM/SIGINT: checkpoint after the running step
        job = json.loads(sys.stdin.readline() or "{}")

        def listen() -> None:  # "cancel" on stdin, or its end (the parent is gone): stop
            for line in sys.stdin:
                if line.strip() == "cancel":
                    break
            token.cancel()
        threading.Thread(target=listen, daemon=True, name="ctp2mri-child-stdin").start()
        emit({"event": "started", "pid": os.getpid()})
        from ctp2mri.errors import Cancelled, user_message

        try:
            emit(run_job(job, emit, token))
            return 0
        except Cancelled as exc:
            emit({"event": "cancelled", "message": str(exc), "step": exc.step,
                  "checkpoint": str(exc.checkpoint) if exc.checkpoint is not None else None})
            return 130
        except Interrupted as exc:  # a second signal: stopped at once
            step = _saved_step(job.get("out"))
            emit({"event": "cancelled", "message": f"stopped at once ({exc})", "step": step,
                  "checkpoint": job.get("out") if step is not None else None})
            return 130
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
            message = user_message(exc)
            emit({"event": "error", "type": type(exc).__name__, "user_error": message is not None,
                  "message": message or str(exc), "traceback": traceback.format_exc()[-_LOG_TAIL:]})
            return 1


if __name__ == "__main__":
    sys.exit(main())
