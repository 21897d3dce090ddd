"""The one error hierarchy and its one table of exit codes.

Every failure a user can cause is a ``PipxLlamaError``. Each carries a message (what failed, where)
and a hint (what to do next); the CLI prints both, one line each, and exits with the class's
``exit_code``. There is one class per concern, defined here; a package's own errors subclass one
of them (``fetch.errors.ChecksumError`` is a ``FetchError``, ``models.manifest.ManifestError`` a
``ModelFileError``) and keep its exit code, so the same trouble gives the same code wherever it
happens -- a full disk is a ``DiskFullError`` (5) while downloading, converting or quantizing.

======  ===========================  =================================================================
 code    concern                      meaning
======  ===========================  =================================================================
 1       ``FetchError``               a file could not be fetched from any source (network, not found,
                                      access denied, bad checksum, offline)
 1       ``StoreError``               the store cannot do what was asked (e.g. it is read-only)
 1       ``ChatTemplateError``        the model's chat template cannot render these messages
 1       ``PipxLlamaError``           anything else (and unexpected errors)
 2       ``UsageError``               bad usage: an argument, an unknown model name, a config value
 3       ``ModelFileError``           a model file, its tokenizer or its manifest is missing, damaged
                                      or unsupported
 4       ``ContextFullError``         the context window is full
 5       ``InsufficientResources``    not enough RAM or disk: refused before anything is downloaded,
         ``Error``, ``DiskFullError`` or the disk filled up while writing (what was written is kept or
                                      removed, never half-used)
 130     (Ctrl-C)                     interrupted
======  ===========================  =================================================================

The same table is in README.md ("Errors and exit codes"); tests/test_errors.py keeps them equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PipxLlamaError(Exception):
    """Base of every error pipx-llama raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(PipxLlamaError):
    """A command-line argument, API parameter or setting is invalid."""

    exit_code = 2


class ConfigError(UsageError):
    """The config file or an environment variable has a value pipx-llama cannot use."""


class ModelFileError(PipxLlamaError):
    """A model file (or its manifest) is missing, unreadable, truncated or not valid."""

    exit_code = 3


class UnsupportedModelError(ModelFileError):
    """A valid GGUF file uses an architecture, tensor type or feature the engine does not run."""


class TokenizerError(ModelFileError):
    """The tokenizer described by the model's metadata cannot be built or used."""


class ChatTemplateError(PipxLlamaError):
    """The chat template cannot be rendered for the given messages."""


class ContextFullError(PipxLlamaError):
    """The prompt or conversation does not fit the context window."""

    exit_code = 4


class InsufficientResourcesError(PipxLlamaError):
    """The machine lacks the RAM or the disk for the work; raised before anything is downloaded when it
    can be foreseen.

    ``resource`` is "ram" or "disk"; ``needed`` and ``available`` are bytes (``needed`` None when not
    known); ``alternatives`` lists what would fit (dicts with model, variant, quant, n_ctx, ram_bytes,
    peak_disk_bytes, args).
    """

    exit_code = 5

    def __init__(self, message: str, hint: str, *, resource: str, needed: int | None, available: int,
                 alternatives: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message, hint)
        self.resource = resource
        self.needed = needed
        self.available = available
        self.alternatives = list(alternatives)


class DiskFullError(InsufficientResourcesError):
    """A disk is (or would be) too full for what must be written there; whatever a resumable step had
    written is kept for a later run, anything else is removed."""

    def __init__(self, message: str, hint: str = "", *, folder: str, needed: int | None, free: int,
                 alternatives: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message, hint, resource="disk", needed=needed, available=free,
                         alternatives=alternatives)
        self.folder = folder
        self.free = free


class FetchError(PipxLlamaError):
    """A file could not be fetched (base of :mod:`pipx_llama.fetch.errors`; also protocol errors and
    refused URLs)."""


class StoreError(PipxLlamaError):
    """The store cannot do what was asked."""


# The concerns, one exit code each (the table above); every other error subclasses one of them.
CONCERNS: tuple[type[PipxLlamaError], ...] = (
    PipxLlamaError, FetchError, StoreError, ChatTemplateError, UsageError, ModelFileError, ContextFullError,
    InsufficientResourcesError,
)
