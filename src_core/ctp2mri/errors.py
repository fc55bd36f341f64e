"""Errors that speak to the user."""


class InputError(ValueError):
    """Input the user can fix: wrong shape, NaN voxels, mismatched grids, bad files.

    The message always says what is wrong and what to do about it; the CLI prints it
    without a traceback and napari shows it as a notification.
    """


class Cancelled(RuntimeError):
    """Raised inside long-running work when the user's cancel token is set."""
