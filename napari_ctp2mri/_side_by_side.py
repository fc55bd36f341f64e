"""The compare widget's side-by-side view: ground truth | synthetic, with contours.

napari's grid mode draws each group of ``stride`` consecutive layers in its own viewbox, all
sharing one camera and the viewer's dims (so pan, zoom and slice stay linked). A layer
cannot appear in two viewboxes, so the lesion gets one contour-only Labels layer per image,
all *sharing the lesion layer's data array* (a painted correction shows in every cell). The
layers are moved to the bottom of the layer list as pairs ``[image, contour]`` — ground
truth, synthetic, and, when both ADCs are picked, the ADC pair — with ``stride = 2`` and two
columns: ground truth on the left, synthetic on the right, DWI above ADC. A picked perfusion
core (the perfusion widget's, from the CTP) is outlined the same way, one more contour per
image (``stride = 3``). Other layers are hidden while the view is on (hidden layers take no
viewbox) and come back when it is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

__all__ = ["CONTOUR_SOURCES", "SideBySide", "viewer_grid"]

# masks outlined on every image of the side-by-side view, in this order (compare-widget keys)
CONTOUR_SOURCES = ("lesion", "perfusion_core")
CONTOUR_PX = 1  # Labels.contour thickness


def viewer_grid(viewer: napari.viewer.Viewer) -> Any:
    """The viewer's grid settings (``enabled``, ``stride``, ``shape``)."""
    # napari ≥ 0.6 moved the grid to viewer.canvas; viewer.grid is deprecated there
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


class SideBySide:
    """The grid view of one viewer, and what it changed there until `restore`."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.contours: list[Labels] = []  # the contour layers while the view is on
        self._saved: dict[str, Any] | None = None

    def show(self, images: list[Any], sources: list[tuple[str, Any]]) -> None:
        """Grid view of ``images`` (ground truth, synthetic: DWI, then ADC), each with a contour
        of every ``(what, mask layer)`` source, e.g. ``("lesion", lesion)``. Call `restore`
        first when a view is on."""
        grid = viewer_grid(self.viewer)
        self._saved = {
            "visible": {layer: layer.visible for layer in self.viewer.layers},
            "grid": (grid.enabled, grid.stride, grid.shape),
            "sources": [source for _, source in sources],
        }
        order = []
        for image in images:
            order.append(image)
            for what, source in sources:
                contour = self.viewer.add_labels(
                    source.data, name=f"{what} contour ({image.name})",
                    scale=source.scale, translate=source.translate, rotate=source.rotate,
                    shear=source.shear, affine=source.affine, colormap=source.colormap,
                    opacity=1.0, metadata={"ctp2mri_contour_of": image.name},
                    **{k: getattr(source, k) for k in ("units", "axis_labels")
                       if hasattr(source, k)})
                contour.contour = CONTOUR_PX  # not a constructor argument in napari
                self.contours.append(contour)
                order.append(contour)
        for _, source in sources:
            source.events.paint.connect(self._refresh_contours)
            source.events.data.connect(self._refresh_contours)
        for layer in self.viewer.layers:
            layer.visible = layer in order
        # one move per layer: napari's move_multiple misplaces some non-monotonic index lists
        # (seen in napari 0.9 with two contours per image)
        for position, layer in enumerate(order):
            self.viewer.layers.move(self.viewer.layers.index(layer), position)
        # both images in one window, so a contrast difference is a real difference
        images[1].contrast_limits = images[0].contrast_limits
        if len(images) == 4:
            images[3].contrast_limits = images[2].contrast_limits
        grid.stride = 1 + len(sources)
        grid.shape = (len(images) // 2, 2)
        grid.enabled = True
        self.viewer.reset_view()  # fit the new viewboxes

    def _refresh_contours(self, _event: Any = None) -> None:
        for contour in self.contours:
            contour.refresh()

    def restore(self) -> bool:
        """Remove the contours and bring back the layers' visibility and the grid settings;
        True if a view was on."""
        saved, self._saved = self._saved, None
        for contour in self.contours:
            if contour in self.viewer.layers:
                self.viewer.layers.remove(contour)
        self.contours = []
        if saved is None:
            return False
        for source in saved["sources"]:
            source.events.paint.disconnect(self._refresh_contours)
            source.events.data.disconnect(self._refresh_contours)
        for layer, visible in saved["visible"].items():
            if layer in self.viewer.layers:
                layer.visible = visible
        grid = viewer_grid(self.viewer)
        grid.enabled, grid.stride, grid.shape = saved["grid"]
        self.viewer.reset_view()
        return True
