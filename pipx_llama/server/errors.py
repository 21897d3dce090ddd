"""HTTP errors of the server, rendered as the API family that was called expects them.

OpenAI clients (``/v1/...``) read ``{"error": {"message", "type", "param", "code"}}``; Ollama clients
(``/api/...``) read ``{"error": "message"}``. Both carry the same status code.
"""

from __future__ import annotations

import reprlib
from typing import Any

from pipx_llama.errors import PipxLlamaError

# a client's value quoted in an error message: short, and safe for values nested a thousand deep
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxlong, _QUOTE.maxother = 3, 60, 40, 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6


def quote(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters (a request may hold megabytes, or deep nesting)."""
    return _QUOTE.repr(value)


class APIError(Exception):
    """A request the server answers with an error status instead of a result."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")


def model_not_found(name: str, available: list[str]) -> APIError:
    shown = name if len(name) <= 80 else name[:60] + "…"
    return APIError(404,
                    f"The model `{shown}` does not exist on this server; it serves: {', '.join(available)}",
                    param="model", code="model_not_found")


def from_engine(err: PipxLlamaError, param: str | None = None) -> APIError:
    """An engine error caused by the request's content (a bad chat template turn, a prompt too long)."""
    text = err.message + (f" ({err.hint})" if err.hint else "")
    return APIError(400, text, param=param)


def internal(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
