"""Reading JSON files that a user (or anyone) handed us: one path for all of them.

``json.loads`` on an untrusted file can fail in more ways than
``JSONDecodeError``: bytes that are not UTF-8 (``UnicodeDecodeError``), a
deeply nested document (``RecursionError``, which is not even a
``ValueError``), an integer literal of more than 4300 digits (a plain
``ValueError``). Every loader of a ``config.json``, ``tokenizer.json``,
``vocab.json``, ... goes through :func:`load` / :func:`loads`, which turn all
of them into the loader's own error naming the file.

Nesting is also bounded up front (:data:`MAX_DEPTH`, far above any real
config or tokenizer file) so a document that parses but is thousands of
levels deep never reaches code that walks it recursively.

This module imports nothing of numformer: every layer may use it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np

__all__ = ["JSONFileError", "MAX_DEPTH", "load", "loads"]

MAX_DEPTH = 100

_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"\\')   # bytes dropped before the scan
_STRING = re.compile(rb'"[^"]*"')


class JSONFileError(ValueError):
    """A file that is not the JSON it should be: names the file and the problem."""


def _default_error(source: str, problem: str) -> Exception:
    return JSONFileError(f"{source}: {problem}")


def _depth(data: bytes, limit: int) -> int:
    """The deepest nesting of arrays/objects in ``data``, brackets inside strings ignored
    (0 when it cannot exceed ``limit``). Linear, in C: keep only the bytes ``[]{}"\\``,
    drop escape sequences (``\\\\`` pairs first, as a JSON reader pairs them), then strings."""
    if data.count(b"[") + data.count(b"{") <= limit:        # cheap bound: cannot be deeper
        return 0
    # escapes first, on the raw bytes (``\\\\`` pairs, then ``\\"``), then only []{}" are kept
    skeleton = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _STRUCTURE).replace(b"\\", b"")
    brackets = np.frombuffer(_STRING.sub(b"", skeleton), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1,
                     np.where((brackets == ord("]")) | (brackets == ord("}")), -1, 0))
    return int(np.max(np.cumsum(steps), initial=0))


def loads(data: bytes | str, source: str, *, error: Callable[[str, str], Exception] | None = None,
          max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) read from ``source``.

    Any failure raises ``error(source, problem)`` (default:
    :class:`JSONFileError` ``"{source}: {problem}"``), never a bare decoder,
    recursion or value error. ``kwargs`` go to :func:`json.loads`
    (``object_pairs_hook``, ``parse_constant``, ...); a ValueError that a
    hook raises is reported the same way.
    """
    make = error or _default_error
    if not isinstance(data, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{source}: JSON text must be str or bytes, got {type(data).__name__}")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise make(source, f"not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    depth = _depth(raw, max_depth)
    if depth > max_depth:
        raise make(source, f"JSON nested {depth} levels deep (at most {max_depth} are accepted)")
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise make(source, f"line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise make(source, "JSON nested too deeply to parse") from None
    except ValueError as exc:                   # e.g. an integer literal beyond int_max_str_digits
        raise make(source, f"not valid JSON ({exc})") from None


def load(path: str | os.PathLike, *, error: Callable[[str, str], Exception] | None = None,
         max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """Read and parse the JSON file ``path`` (see :func:`loads`).

    A missing or unreadable file raises the usual ``OSError``
    (``FileNotFoundError``, ...), so callers can tell "absent" from "bad".
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, path, error=error, max_depth=max_depth, **kwargs)
