"""The one base class of known failures: a wrong input, a damaged file, a busy run directory.

``mergevq.entries.cli.run_entry`` prints such an error as one line (``error: <message>``) and exits with
status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Subclasses also derive from the builtin
they refine (ValueError, OSError, ...), so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; the message is one line naming the key or file and the fix."""


class RunDirError(UserError, OSError):
    """The run directory cannot be used: another writer holds it, or it cannot be written."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is damaged (hash mismatch, truncated) or is of the wrong kind for this entry."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """The data cannot be used as given (every file unreadable, fewer items than one batch, bad labels)."""


class TrainingStopped(UserError, FloatingPointError):
    """Training stopped on purpose (too many non-finite steps in a row)."""


def one_line(error: BaseException) -> str:
    """The error's text with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(error).split()) or type(error).__name__


class PathNotFound(UserError, FileNotFoundError):
    """A path given in the config (or stored in a run) does not exist."""
