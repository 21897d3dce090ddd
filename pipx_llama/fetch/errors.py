"""Errors raised while fetching files: ``FetchError`` subclasses (pipx_llama.errors), exit code 1.

Callers trying several sources in order treat them differently: ``SourceNotFound`` and
``ChecksumError`` mean "try the next source" (and, for a checksum, report the bad one);
``AccessDenied`` needs the user to act; ``OfflineError`` (and ``pipx_llama.errors.DiskFullError``,
not a fetch error: exit code 5) stop the whole pull;
``NetworkError`` means retries were exhausted (the partial download is kept for a later resume).
"""

from __future__ import annotations

from pipx_llama.errors import FetchError


class SourceNotFound(FetchError):
    """The source answered 404/410: the file is not there. Not retried; try the next source."""


class AccessDenied(FetchError):
    """The source answered 401/403: the file needs credentials or an accepted licence."""


class ChecksumError(FetchError):
    """The downloaded bytes (or their size) do not match the manifest; the bad bytes were deleted."""

    def __init__(self, message: str, hint: str = "", *, file: str, source: str, expected: str,
                 actual: str) -> None:
        super().__init__(message, hint)
        self.file = file
        self.source = source
        self.expected = expected
        self.actual = actual


class NetworkError(FetchError):
    """Connection errors, timeouts or server errors persisted after every retry."""


class OfflineError(FetchError):
    """Offline mode is on and the file would have to be fetched over the network."""
