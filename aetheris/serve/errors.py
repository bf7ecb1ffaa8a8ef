"""Errors answered in OpenAI's shape, and the one-line text a client may see of a library's error."""

from __future__ import annotations

import re


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        # Messages quote the request (a model name, an unknown key): lone surrogates there cannot be
        # encoded as UTF-8, so they are written as escapes (``\\ud800``) rather than failing the response.
        message, param = printable(message), printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def printable(text: str | None, limit: int = 2000) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


_SOURCE_LOCATION = re.compile(r"\[[0-9:.]+\]\s*|\S*\.(?:cc|cpp|h|hpp|py):\d+:?\s*")


def library_message(err: BaseException) -> str:
    """A library's error as one line for a client: no timestamps or source paths (``/project/cpp/x.cc:12:``)."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [err.__class__.__name__]
    return _SOURCE_LOCATION.sub("", lines[0]).strip()[:300]


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the request field at fault."""
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code=code)
