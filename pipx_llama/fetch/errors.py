"""Errors raised while fetching files; all are ``PipxLlamaError`` subclasses with a message and a hint.

Callers trying several sources in order treat them differently: ``SourceNotFound`` and
``ChecksumError`` mean "try the next source" (and, for a checksum, report the bad one);
``AccessDenied`` needs the user to act; ``DiskFullError`` and ``OfflineError`` stop the whole pull;
``NetworkError`` means retries were exhausted (the partial download is kept for a later resume).
"""

from __future__ import annotations

from pipx_llama.errors import PipxLlamaError


class FetchError(PipxLlamaError):
    """A file could not be fetched (base class; also used for protocol errors and refused URLs)."""


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


class DiskFullError(FetchError):
    """The disk ran out of space; what was downloaded so far is kept for a later resume."""

    def __init__(self, message: str, hint: str = "", *, folder: str, needed: int | None,
                 free: int) -> None:
        super().__init__(message, hint)
        self.folder = folder
        self.needed = needed
        self.free = free


class OfflineError(FetchError):
    """Offline mode is on and the file would have to be fetched over the network."""
