"""The errors that ``numformer`` commands report as one ``numformer: error: ...`` line.

Kept apart from :mod:`numformer.cli` so that the command modules can raise
:class:`UserError` without importing the entry point (which ``python -m
numformer.cli`` loads a second time, as ``__main__``).
"""

from __future__ import annotations

from numformer.checkpoint import CheckpointError
from numformer.data import DataError

USER_ERRORS = (ValueError, DataError, CheckpointError, FileNotFoundError, IsADirectoryError,
               PermissionError, FloatingPointError)


class UserError(Exception):
    """A mistake in how the command was called."""
