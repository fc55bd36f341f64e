"""The post-training widget's loss plot: Eq. 8's total and its image and lesion terms.

Embedded matplotlib, updated by blitting: recording a step is cheap at any rate, and only a
change of the axes costs a full draw (see `LossPlot`).
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["LossPlot"]


class LossPlot:
    """Total, image and lesion loss against the step, in an embedded matplotlib canvas.

    `add` only records (cheap, any rate); `redraw` shows what was added since. A full draw
    (axes, ticks, text) takes 100–300 ms of the GUI thread on a busy laptop, so it happens
    only when the axes change: the x axis doubles when the steps pass its end, the y axis
    grows with headroom when a loss leaves it. Otherwise only the lines are redrawn over the saved
    background and blitted (a few ms), matplotlib's blitting recipe.
    """

    SERIES = (("loss", "total (Eq. 8)"), ("image_loss", "image (Eq. 6)"),
              ("lesion_loss", "lesion (Eq. 7)"))
    FIRST_X = 50  # steps the x axis spans at first; it doubles as needed, up to the run's end
    HEADROOM = 2.0  # y limits: factor beyond the extreme values when they are reset (log axis)

    def __init__(self, background: str = "#23242b", text: str = "#f0f1f2") -> None:
        # fixed margins: a constrained layout costs ~40 % more per draw
        self.figure = Figure(figsize=(4.2, 2.4), dpi=80, facecolor=background)
        self.figure.subplots_adjust(left=0.13, right=0.97, top=0.87, bottom=0.19)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
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
        # animated: left out of full draws, drawn over the cached background instead
        self.lines = {key: ax.plot([], [], label=label, linewidth=1.2, animated=True)[0]
                      for key, label in self.SERIES}
        legend = ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize="small",
                           frameon=False, borderaxespad=0.2, handlelength=1.2)
        for item in legend.get_texts():
            item.set_color(text)
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {key: [] for key, _ in self.SERIES}
        self.dirty = False
        self.full_draws = 0
        self._background: Any = None  # the axes without lines, after the last full draw
        self._stale = False  # the axes changed since the last full draw
        self._ylim: tuple[float, float] | None = None
        self.canvas.mpl_connect("draw_event", self._on_draw)
        # The first draw loads fonts and lays out text (~0.4 s): pay it while the widget is
        # built, not at the first step of a run.
        self.reset(1, now=True)

    def reset(self, total_steps: int, now: bool = False) -> None:
        """Empty the plot for a run of ``total_steps`` (the x axis spans them all); drawn
        at the event loop's next turn, or ``now``."""
        self.steps.clear()
        for values in self.values.values():
            values.clear()
        for line in self.lines.values():
            line.set_data([], [])
        self._total = max(int(total_steps), 1)
        self.axes.set_xlim(0, min(self._total, self.FIRST_X))
        self._ylim = None
        self.axes.set_ylim(0.1, 10.0)
        self.dirty = False
        if now:
            self.canvas.draw()
        else:  # one full draw, with the first losses (its y range); until then no lines
            self._stale = True
            if self._background is not None:
                self.canvas.restore_region(self._background)
                self.canvas.blit(self.axes.bbox)

    def add(self, step: int, info: dict[str, Any]) -> None:
        """Record one step's losses (missing parts as gaps: λ = 0 leaves a term out)."""
        self.steps.append(int(step))
        for key, values in self.values.items():
            values.append(float(info.get(key, math.nan)))
        self.dirty = True

    def points(self) -> int:
        """Steps drawn in the plot now (what the user sees, not what was recorded)."""
        return len(self.lines["loss"].get_xdata())

    def redraw(self) -> None:
        """Show the steps added since the last call (lines only, unless an axis must change)."""
        if not self.dirty:
            return
        self.dirty = False
        for key, line in self.lines.items():
            line.set_data(self.steps, self.values[key])
        if self._update_limits() or self._background is None or self._stale:
            self.canvas.draw()  # axes changed: full draw; _on_draw adds the lines
            return
        self.canvas.restore_region(self._background)
        self._draw_lines()
        self.canvas.blit(self.axes.bbox)

    def _update_limits(self) -> bool:
        """Widen the axes to the data when needed; True if they changed."""
        changed = False
        right = self.axes.get_xlim()[1]
        if self.steps and self.steps[-1] > right:  # doubling: a full draw now and then
            self.axes.set_xlim(0, max(min(self._total, 2 * right), self.steps[-1]))
            changed = True
        positive = [v for values in self.values.values() for v in values if v > 0 and math.isfinite(v)]
        if positive:
            lo, hi = min(positive), max(positive)
            if self._ylim is None or lo < self._ylim[0] or hi > self._ylim[1]:
                self._ylim = (lo / self.HEADROOM, hi * self.HEADROOM)
                self.axes.set_ylim(*self._ylim)
                changed = True
        return changed

    def _on_draw(self, _event: Any) -> None:
        # after any full draw (ours, a resize, a theme change): new background, lines on top
        self._background = self.canvas.copy_from_bbox(self.axes.bbox)
        self._stale = False
        self._draw_lines()
        self.full_draws += 1

    def _draw_lines(self) -> None:
        for line in self.lines.values():
            self.axes.draw_artist(line)
