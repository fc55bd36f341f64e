"""The perfusion widget's plot: the arterial input and venous output functions over time.

Embedded matplotlib as in `napari_ctp2mri._loss_plot`, with the viewer's theme colours. The
curves change once per analysis, so every change is one full draw (no blitting needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

# the AIF and VOF voxel points are drawn in the same colours
from napari_ctp2mri._perfusion_layers import AIF_COLOUR, VOF_COLOUR

__all__ = ["AIF_COLOUR", "VOF_COLOUR", "CurvePlot"]


class CurvePlot:
    """AIF and VOF enhancement (HU) against time (s) in an embedded matplotlib canvas."""

    def __init__(self, background: str = "#23242b", text: str = "#f0f1f2") -> None:
        # fixed margins: a constrained layout costs ~40 % more per draw
        self.figure = Figure(figsize=(4.2, 2.4), dpi=80, facecolor=background)
        self.figure.subplots_adjust(left=0.15, right=0.97, top=0.85, bottom=0.2)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self._text = text
        ax = self.axes = self.figure.add_subplot()
        ax.set_facecolor(background)
        ax.set_xlabel("time (s)", color=text)
        ax.set_ylabel("enhancement (HU)", color=text)
        ax.tick_params(colors=text, which="both")
        for spine in ax.spines.values():
            spine.set_color(text)
        self.lines = {"aif": ax.plot([], [], "-o", color=AIF_COLOUR, ms=3, linewidth=1.2)[0],
                      "vof": ax.plot([], [], "-s", color=VOF_COLOUR, ms=3, linewidth=1.2)[0]}
        self._legend: Any = None
        # The first draw loads fonts and lays out text (~0.4 s): pay it while the widget is
        # built, not when the first result arrives.
        self.canvas.draw()

    def show(self, times: np.ndarray, aif: np.ndarray, vof: np.ndarray | None = None,
             aif_label: str = "AIF", vof_label: str = "VOF") -> None:
        """Draw the curves (``vof`` None: the AIF alone)."""
        self.lines["aif"].set_data(times, aif)
        self.lines["aif"].set_label(aif_label)
        if vof is None:
            self.lines["vof"].set_data([], [])
        else:
            self.lines["vof"].set_data(times, vof)
            self.lines["vof"].set_label(vof_label)
        values = np.concatenate([np.ravel(aif)] + ([] if vof is None else [np.ravel(vof)]))
        top = float(np.nanmax(values)) if values.size else 1.0
        bottom = min(0.0, float(np.nanmin(values))) if values.size else 0.0
        self.axes.set_xlim(float(times[0]), float(times[-1]))
        self.axes.set_ylim(bottom, max(top, 1.0) * 1.08)
        self._draw_legend([line for line in self.lines.values() if len(line.get_xdata())])

    def shown(self) -> dict[str, np.ndarray]:
        """The drawn curves' y values by name (``aif``, ``vof``; empty ones left out)."""
        return {key: np.asarray(line.get_ydata()) for key, line in self.lines.items()
                if len(line.get_ydata())}

    def _draw_legend(self, lines: list[Any]) -> None:
        if self._legend is not None:
            self._legend.remove()
            self._legend = None
        if lines:
            self._legend = self.axes.legend(handles=lines, loc="lower left",
                                            bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize="small",
                                            frameon=False, borderaxespad=0.2, handlelength=1.5)
            for item in self._legend.get_texts():
                item.set_color(self._text)
        self.canvas.draw_idle()
