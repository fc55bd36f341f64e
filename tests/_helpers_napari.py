"""Helpers of the napari widget tests (the ``notes`` fixture is in conftest.py)."""

from __future__ import annotations


def errors(notes: list[tuple[str, str]]) -> list[str]:
    """The messages of the error notifications among ``notes``."""
    return [message for severity, message in notes if severity == "error"]
