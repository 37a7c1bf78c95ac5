"""The one exception type for mistakes a user can make (bad config, missing file, bad data).

The CLI prints a `LoraforgeError` as a single message without a traceback and exits with code 2.
Programming errors are ordinary exceptions and keep their tracebacks.
"""


class LoraforgeError(Exception):
    """A user-fixable error. The message says what is wrong and how to fix it."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        parts = [f"{where}: {message}" if where else message]
        if hint:
            parts.append(f"Fix: {hint}")
        super().__init__("\n".join(parts))
