"""The one error hierarchy: every failure a user can cause is a ``PipxLlamaError`` subclass.

Each error carries a message (what failed, where) and a hint (what to do next); the CLI prints both
as one line each and maps the class to an exit code.
"""

from __future__ import annotations


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
    """A command-line argument or API parameter is invalid."""

    exit_code = 2


class ModelFileError(PipxLlamaError):
    """A model file is missing, unreadable, truncated or not a valid GGUF file."""

    exit_code = 3


class UnsupportedModelError(ModelFileError):
    """A valid GGUF file uses an architecture, tensor type or feature the engine does not run."""


class TokenizerError(PipxLlamaError):
    """The tokenizer described by the model's metadata cannot be built or used."""

    exit_code = 3


class ChatTemplateError(PipxLlamaError):
    """The chat template cannot be rendered for the given messages."""


class ContextFullError(PipxLlamaError):
    """The prompt or conversation does not fit the context window."""

    exit_code = 4
