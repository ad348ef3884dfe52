"""Errors the server answers with, in the OpenAI error format.

Every failure a client can cause is an :class:`APIError`; the app turns it
into an HTTP status and this body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` plus OpenAI's error fields.

    ``type`` follows OpenAI's names: ``invalid_request_error`` for anything
    wrong with the request (4xx), ``server_error`` for a failure of ours (5xx).
    ``param`` names the offending request field, where there is one.
    """

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers        # extra response headers (e.g. "Connection: close" after a 408)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is well-formed JSON but asks for something wrong."""
    return APIError(message, status=400, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """404: an unknown model or route."""
    return APIError(message, status=404, param=param, code=code)


def describe_char(c: str) -> str:
    """A character as error messages show it: its repr and code point, ``'\\t' (U+0009)``.

    The repr escapes what would not print (controls, lone surrogates), so
    the message stays valid UTF-8 and readable.
    """
    return f"{c!r} (U+{ord(c):04X})"


def server_error(message: str) -> APIError:
    """500: something failed on our side; the server keeps serving."""
    return APIError(message, status=500, type="server_error")
