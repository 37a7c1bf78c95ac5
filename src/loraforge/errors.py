"""The one exception type for mistakes a user can make (bad config, missing file, bad data).

The CLI prints a `LoraforgeError` as a single message without a traceback and exits with its `exit_code`:
2 for a mistake to fix, 3 for a run stopped on purpose that `--resume` continues (`Stopped`), 0 when there
was nothing to do (`NothingToDo`). Programming errors are ordinary exceptions and keep their tracebacks.
"""


class LoraforgeError(Exception):
    """A user-fixable error. The message says what is wrong and how to fix it."""

    exit_code = 2
    label = "error"

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        parts = [f"{where}: {message}" if where else message]
        if hint:
            parts.append(f"Fix: {hint}")
        super().__init__("\n".join(parts))


class Stopped(LoraforgeError):
    """A run stopped on purpose (SIGTERM, Ctrl-C) after saving a checkpoint: resumable, not a failure."""

    exit_code = 3
    label = "stopped"


class NothingToDo(LoraforgeError):
    """The command had nothing left to do (e.g. --resume on a finished run); nothing was changed."""

    exit_code = 0
    label = "nothing to do"
