"""Problems with what a caller sent, raised by the array code and answered as 4xx by the HTTP layer."""

from __future__ import annotations

__all__ = ["InputError", "WorkLimitError"]


class InputError(ValueError):
    """Input that cannot be used, with a message that says why and how to fix it.

    Parameters
    ----------
    message : str
        What is wrong and what to do.
    field : str, optional
        The form field or parameter the problem is in.
    code : str
        A short machine-readable reason.
    status : int
        The HTTP status the service answers with (4xx).
    """

    def __init__(self, message: str, *, field: str | None = None, code: str = "bad_input", status: int = 422):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
        self.status = status


class WorkLimitError(InputError):
    """A request that would do more work, or answer more bytes, than the service's limits allow."""
