"""The platform's error and warning classes, in one place.

Every message names what was wrong, where (file, line, column or config key) and what was
expected.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Base class of the platform's errors."""


class DataError(RecsysError):
    """Input data is missing, has the wrong format, or has too many bad rows."""


class ConfigError(RecsysError, ValueError):
    """A configuration value is invalid or cannot be honoured."""


class CheckpointError(RecsysError):
    """A checkpoint is missing, incomplete or does not match the model."""


class DataWarning(UserWarning):
    """Input data was usable but something about it deserves attention."""
