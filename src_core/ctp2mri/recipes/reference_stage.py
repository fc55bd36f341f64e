"""The demo recipe's reference stage: the L1 U-Net trained beside the base cLDM.

On a CPU it trains in a spawned process with one thread while the base trains on the others,
and the base takes its threads back at its next step once the reference is done: on two cores
that costs less wall time than training the two one after the other, since a second thread
speeds one training up by only ≈ 1.6× (the base: 0.96 s/step beside the reference, 0.59 s
alone). On a GPU it trains after the base, in this process. ``rec`` is the recipe as a dict
(`dataclasses.asdict`), so the child process receives plain data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctp2mri.errors import InputError
from ctp2mri.progress import ProgressCallback

__all__ = ["ReferenceStage"]


def _train_reference(data: str, run: str, rec: dict[str, Any], device: str, resume: bool, threads: int | None
                     ) -> tuple[str, float]:
    """The L1 reference U-Net of a recipe; returns (run folder, seconds)."""
    import torch

    from ctp2mri.training.pix2pix import train_pix2pix

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out = train_pix2pix(data, run, profile="demo", steps=rec["reference_steps"], batch_size=rec["reference_batch"],
                        adversarial=False, lesion_oversample=rec["ldm_lesion_oversample"], device=device,
                        resume=resume, seed=rec["seed"], checkpoint_every=max(1, rec["reference_steps"] // 4),
                        num_workers=0, dwi_hi_median=rec.get("dwi_hi_median"))
    return str(out), time.perf_counter() - start


def _reference_child(connection: Any, *args: Any) -> None:
    """Entry of the spawned process: the result, or the error's text, goes back through the pipe."""
    try:
        connection.send(("ok", _train_reference(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()


class ReferenceStage:
    """The reference stage: in a spawned process with one thread while the base trains (CPU), or
    in this process after it (GPU). `abort` stops the child when the recipe is interrupted; the
    child's last checkpoint lets a rerun resume it."""

    def __init__(self, run: Path, state: bool | None, data: Path, rec: dict[str, Any], device: str,
                 say: Callable[[str], None], timings: dict[str, float],
                 timed: Callable[[str, Callable[[], Any]], Any]) -> None:
        # state: True finished, False interrupted (resume it), None not started
        self.run, self.state = run, state
        self.args = (str(data), str(self.run), rec, device)
        self.steps, self.say, self.timings, self.timed = rec["reference_steps"], say, timings, timed
        self.process: Any = None
        self.threads_before: int | None = None  # the parent's threads while the child runs

    def start(self) -> None:
        import multiprocessing

        import torch

        if self.state:
            self.say(f"reference: done ({self.steps} steps) in {self.run}")
            return
        if self.args[3] != "cpu":
            return  # a GPU trains one model at a time: after the base, in `result`
        self.say(f"reference: {'resuming' if self.state is False else 'training'} {self.steps} steps → {self.run}, "
                 "in a second process beside the base cLDM (one thread each)")
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, self.threads_before - 1))
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_reference_child, args=(child_end, *self.args, self.state is False, 1),
                                       daemon=True)
        self.process.start()
        child_end.close()

    def poll(self) -> None:
        """Give this process its threads back once the child has finished (cheap: per step)."""
        if self.threads_before is not None and not self.process.is_alive():
            import torch

            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    def watch(self, progress: ProgressCallback | None) -> ProgressCallback:
        """``progress`` for a stage that trains while the child runs: polls it at every step."""
        def report(step: int, total: int, info: dict[str, Any]) -> None:
            self.poll()
            if progress is not None:
                progress(step, total, info)

        return report

    def abort(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join()

    def result(self) -> Path:
        if self.state:
            return self.run
        if self.process is None:
            self.say(f"reference: {'resuming' if self.state is False else 'training'} {self.steps} steps → {self.run}")
            return Path(self.timed("reference", lambda: _train_reference(*self.args, self.state is False, None))[0])
        import torch

        try:
            status, value = self.connection.recv()
        except EOFError:
            status, value = "error", f"the process stopped with exit code {self.process.exitcode}"
        finally:
            self.process.join()
            if self.threads_before is not None:
                torch.set_num_threads(self.threads_before)
                self.threads_before = None
        if status != "ok":
            raise InputError(f"the reference U-Net's training failed ({value}); rerun train-demo to resume it")
        self.timings["reference"] = round(self.timings.get("reference", 0.0) + value[1], 1)  # (path, seconds)
        return Path(value[0])
