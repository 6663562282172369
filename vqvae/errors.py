"""The package's user-facing errors: one base class, at the bottom of the import graph.

The scripts print a ``UserError`` (bad settings, missing or damaged files, a busy or full
disk) as one line and exit 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave or the machine it runs on, said in one line."""


class InvalidValueError(UserError, ValueError):
    """A value the package cannot use: an argument, a file's contents or data of the wrong
    shape or range. Still a ``ValueError``, for callers that catch those."""


class ConfigError(InvalidValueError):
    """A setting that is not valid, or settings that do not go together."""
