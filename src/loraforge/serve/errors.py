"""The server's errors as types. The registry raises the adapter ones (they are LoraforgeErrors, so the CLI
prints them without a traceback), request parsing raises BadRequest; app.py maps each type to its HTTP
status and OpenAI error body in one table (`EXCEPTION_HANDLERS`), so no handler matches on message text."""

from __future__ import annotations

from loraforge.errors import LoraforgeError


class AdapterLoadFailed(LoraforgeError):
    """An adapter folder (or name) the registry refuses: missing files, bad JSON, made for another base."""


class AdapterAlreadyLoaded(AdapterLoadFailed):
    """A load under a name that is already taken (unload it first)."""


class AdapterNotFound(LoraforgeError):
    """An unload of a name that is not loaded."""


class BadRequest(Exception):
    """A request the server refuses with a 4xx: `status`, and OpenAI's `param` and `code` fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Unauthorized(Exception):
    """A request to a guarded route without the right `Authorization: Bearer KEY`."""
