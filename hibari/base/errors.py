"""The one base class of user errors.

A `UserError` is bad input (a config field, a data file, a checkpoint, a command-line value):
its message names the file, field or line at fault and what to do. Every room's input errors
derive from it; `hibari.cli.main` catches it once and prints the message without a traceback
(exit status 1). Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input; the message names the file, field or line and what to do."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the user named (or a stage should have written) does not exist."""


class UsageError(UserError, ValueError):
    """Arguments (of a command or a public function) that are missing, malformed or in conflict
    with each other."""
