"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def notes():
    """(severity, message) of the napari notifications shown while the test runs."""
    from napari.utils.notifications import notification_manager  # only the GUI tests need napari

    seen: list[tuple[str, str]] = []

    def keep(notification):
        seen.append((str(notification.severity), str(notification.message)))
    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)
