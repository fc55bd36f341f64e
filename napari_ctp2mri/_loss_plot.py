"""The post-training widget's loss plot: Eq. 8's total and its image and lesion terms.

matplotlib draws the figure on a background thread into an Agg buffer; the GUI thread only
paints the finished image. A full matplotlib draw (axes, ticks, text) takes 40–300 ms, which
on the GUI thread froze the viewer whenever an axis changed (the worst heartbeat gap of a
post-training run from the widget); off it, recording and showing a step cost the GUI thread
well under a millisecond at any rate.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from qtpy.QtCore import QObject, QSize, Qt, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossPlot"]


class _Delivery(QObject):
    """Carries a finished image from the render thread to the GUI thread (a queued signal)."""

    rendered = Signal(object)


class _PlotView(QWidget):
    """Paints the latest rendered image; a resize asks for a render at the new size."""

    def __init__(self, owner: LossPlot) -> None:
        super().__init__()
        self._owner = owner
        self.image: QImage | None = None
        self.setMinimumHeight(180)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(336, 192)

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        if self.image is not None:
            painter.drawImage(0, 0, self.image)
        painter.end()

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        self._owner.request()


class LossPlot:
    """Total, image, lesion and core loss against the step, rendered off the GUI thread.

    `add` only records (cheap, any rate); `redraw` asks for a render of what was added, which a
    single background thread draws with matplotlib (Agg) and hands back to the GUI thread as an
    image. Requests made while a render runs are merged into one more render. The x axis
    spans `FIRST_X` steps at first and doubles as the steps pass its end, up to the run's
    length; the log y axis grows with headroom when a loss leaves it. ``canvas`` is the widget
    to put in a layout.
    """

    SERIES = (("loss", "total (Eq. 8)"), ("image_loss", "image (Eq. 6)"),
              ("lesion_loss", "lesion (Eq. 7)"), ("core_loss", "core"))
    FIRST_X = 50  # steps the x axis spans at first; it doubles as needed, up to the run's end
    HEADROOM = 2.0  # y limits: factor beyond the extreme values when they are reset (log axis)
    DPI = 80

    def __init__(self, background: str = "#23242b", text: str = "#f0f1f2") -> None:
        # fixed margins: a constrained layout costs ~40 % more per draw
        self.figure = Figure(figsize=(4.2, 2.4), dpi=self.DPI, facecolor=background)
        self.figure.subplots_adjust(left=0.13, right=0.97, top=0.87, bottom=0.19)
        self._agg = FigureCanvasAgg(self.figure)
        self.axes = self.figure.add_subplot()
        ax = self.axes
        ax.set_facecolor(background)
        ax.set_yscale("log", nonpositive="mask")  # a lesion-free batch's lesion loss is 0
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("step", color=text)
        ax.tick_params(colors=text, which="both")
        for spine in ax.spines.values():
            spine.set_color(text)
        self.lines = {key: ax.plot([], [], label=label, linewidth=1.2)[0] for key, label in self.SERIES}
        legend = ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(self.SERIES), fontsize="x-small",
                           frameon=False, borderaxespad=0.2, handlelength=1.2)
        for item in legend.get_texts():
            item.set_color(text)
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {key: [] for key, _ in self.SERIES}
        self.full_draws = 0  # renders finished (each one a full matplotlib draw)
        self._total = 1
        self._xlim = (0.0, float(self.FIRST_X))
        self._ylim: tuple[float, float] | None = None
        self._shown = 0  # steps in the image on screen
        # the render thread owns the figure once it exists; the GUI thread hands it snapshots
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loss-plot")
        self._delivery = _Delivery()
        self._delivery.rendered.connect(self._show, Qt.QueuedConnection)
        self.canvas = _PlotView(self)
        # The first draw loads fonts and lays out text (~0.4 s): paid on the render thread now,
        # while the widget is built, not at the first step of a run.
        self.reset(1)

    # GUI thread ----------------------------------------------------------------------------
    def reset(self, total_steps: int) -> None:
        """Empty the plot for a run of ``total_steps`` (the x axis grows up to them all)."""
        self.steps.clear()
        for values in self.values.values():
            values.clear()
        self._total = max(int(total_steps), 1)
        self._xlim = (0.0, float(min(self._total, self.FIRST_X)))
        self._ylim = None
        self.request()

    def add(self, step: int, info: dict[str, Any]) -> None:
        """Record one step's losses (missing parts as gaps: λ = 0 leaves a term out)."""
        self.steps.append(int(step))
        for key, values in self.values.items():
            values.append(float(info.get(key, math.nan)))

    def points(self) -> int:
        """Steps drawn in the image on screen (what the user sees, not what was recorded)."""
        return self._shown

    def idle(self) -> bool:
        """No render running or waiting, and the image on screen shows every recorded step."""
        with self._lock:
            return not self._busy and self._pending is None and self._shown == len(self.steps)

    def redraw(self) -> None:
        """Show the steps added since the last render (drawn off the GUI thread)."""
        if len(self.steps) != self._shown or self._pending is not None:
            self.request()

    def request(self) -> None:
        """Ask for a render of the current data at the view's size."""
        self._update_limits()
        ratio = float(self.canvas.devicePixelRatioF()) if hasattr(self, "canvas") else 1.0
        size = (self.canvas.width(), self.canvas.height()) if hasattr(self, "canvas") else (336, 192)
        job = {"steps": list(self.steps), "values": {k: list(v) for k, v in self.values.items()},
               "xlim": self._xlim, "ylim": self._ylim, "size": size, "ratio": ratio}
        with self._lock:
            self._pending = job
            if self._busy:
                return  # the running render picks it up when it ends
            self._busy = True
        self._executor.submit(self._render_loop)

    def close(self) -> None:
        """Stop the render thread (pending renders are dropped)."""
        with self._lock:
            self._pending = None
        self._executor.shutdown(wait=False)

    def _update_limits(self) -> None:
        """Widen the axes to the data when needed."""
        right = self._xlim[1]
        if self.steps and self.steps[-1] > right:  # doubling: the axis changes now and then
            self._xlim = (0.0, float(max(min(self._total, 2 * right), self.steps[-1])))
        positive = [v for values in self.values.values() for v in values if v > 0 and math.isfinite(v)]
        if positive:
            lo, hi = min(positive), max(positive)
            if self._ylim is None or lo < self._ylim[0] or hi > self._ylim[1]:
                self._ylim = (lo / self.HEADROOM, hi * self.HEADROOM)

    def _show(self, result: tuple[QImage, int]) -> None:
        image, shown = result
        self._shown = shown
        try:
            self.canvas.image = image
            self.canvas.update()
        except RuntimeError:  # the widget was deleted while the image was drawn
            pass

    # render thread -------------------------------------------------------------------------
    def _render_loop(self) -> None:
        while True:
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._busy = False
                    return
            try:
                result = self._render(job)
            except Exception:  # a failed frame must not leave the plot stuck as busy
                with self._lock:
                    self._busy = False
                raise
            self.full_draws += 1
            self._delivery.rendered.emit(result)

    def _render(self, job: dict[str, Any]) -> tuple[QImage, int]:
        width, height = job["size"]
        ratio = job["ratio"]
        if width > 10 and height > 10:
            self.figure.set_dpi(self.DPI * ratio)
            self.figure.set_size_inches(width / self.DPI, height / self.DPI)
        for key, line in self.lines.items():
            line.set_data(job["steps"], job["values"][key])
        self.axes.set_xlim(*job["xlim"])
        self.axes.set_ylim(*(job["ylim"] or (0.1, 10.0)))
        self._agg.draw()
        pixels = np.ascontiguousarray(np.asarray(self._agg.buffer_rgba()))
        image = QImage(pixels.data, pixels.shape[1], pixels.shape[0], pixels.strides[0],
                       QImage.Format_RGBA8888).copy()  # owns its pixels: the buffer is reused
        image.setDevicePixelRatio(ratio)
        return image, len(job["steps"])
