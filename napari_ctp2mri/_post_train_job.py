"""The post-training widget's run, without a widget: the job goes to a child process
(`ctp2mri.training.child`, which runs the core's
`ctp2mri.evaluation.post_train_compare.post_train_and_compare`), its events come back, and the
last one becomes a result or an error.

Called in the widget's worker thread. The data go to the child as files: the case folders,
and the viewer case written (with its lesion as it is at Start) to a temporary case folder.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.evaluation.before_after import metric_rows
from ctp2mri.progress import CancelToken
from ctp2mri.training.child import ChildFailed, ChildRun
from napari_ctp2mri._training_set import LayerInput, save_viewer_case

__all__ = ["CANCEL_TIMEOUT_S", "PostTrainResult", "prefetch", "run_in_child"]

CANCEL_TIMEOUT_S = 30.0  # a cancelled child that has not stopped by then is killed
_IMPORT_LOCK = threading.Lock()


@dataclass
class PostTrainResult:
    """What a finished run hands back to the GUI thread."""

    out: Path
    base: Path
    steps: int
    seconds: float
    metrics: list[dict[str, Any]] | None  # `ctp2mri.evaluation.before_after.metric_rows`, None when not evaluated
    metrics_note: str = ""  # why there are no metrics, when asked for


def prefetch() -> None:
    """Import, ahead of Start, what the widget's workers import (writing case folders).

    Training and evaluation run in a child process, so the viewer's process no longer imports
    their modules (``torch._dynamo``, the evaluation). Every worker calls it first: module
    initialisation is not safe against a second thread importing the same modules at the same
    time, so the imports happen under one lock, once.
    """
    with _IMPORT_LOCK:
        import ctp2mri.casefolder  # noqa: F401


def run_in_child(job: Mapping[str, Any], folders: Sequence[Path],
                 layers: Mapping[str, LayerInput] | None, token: CancelToken,
                 emit: Callable[[str, int, int, dict[str, Any]], None],
                 started: Callable[[ChildRun], None]) -> PostTrainResult:
    """Run a post-training ``job`` (without its ``sources``) in a child process.

    ``folders`` and the viewer case ``layers`` (None: none) are its training set; each
    progress event goes to ``emit(phase, step, total, info)``, and ``started`` gets the child
    as soon as it exists (to cancel or kill it). Raises `Cancelled` (with the checkpoint and
    step a cancelled run saved), `InputError` (the user's error, found in the child) or
    `ChildFailed` (a bug in the child, or a child that ended without its last word).
    """
    prefetch()
    sources = [str(f) for f in folders]
    tmp = None
    try:
        if layers is not None:  # the viewer case goes to the child as a case folder
            tmp = tempfile.mkdtemp(prefix="ctp2mri-viewer-case-")
            sources.append(str(save_viewer_case(layers, tmp)))
        token.raise_if_cancelled()
        child = ChildRun({**job, "sources": sources}).start()
        started(child)
        if token.cancelled:  # Cancel pressed while the child was being started
            child.cancel(CANCEL_TIMEOUT_S)
        final: dict[str, Any] = {}
        for event in child:
            if event["event"] == "progress":
                # the GUI thread gets its own copy (a queued signal)
                emit(event["phase"], event["step"], event["total"], event["info"])
            else:
                final = event
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    kind = final.get("event")
    if kind == "done":
        rows = final.get("rows")
        return PostTrainResult(Path(job["out"]), Path(job["base"]), final["steps"], final["seconds"],
                               metric_rows(rows) if rows is not None else None,
                               final.get("metrics_note", ""))
    if kind == "cancelled":
        raise Cancelled(final.get("message") or "cancelled", checkpoint=final.get("checkpoint"),
                        step=final.get("step"))
    if kind == "error" and final.get("user_error"):
        raise InputError(final["message"])
    raise ChildFailed(final)
