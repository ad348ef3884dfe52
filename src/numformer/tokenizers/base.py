"""Shared pieces of the tokenizers: the end-of-text token, atomic saving,
special-token splitting and the error helper used when loading files.

Every tokenizer in this package is described completely by a small JSON
document (``to_dict``) with a ``"kind"`` field; :func:`numformer.tokenizers.
load_tokenizer` reads the kind and hands the document to the right class.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

# The one special token. It separates documents in a training stream and is
# what generation stops on. It is always the last id of a vocabulary.
EOT_TOKEN = "<|endoftext|>"

# Bumped when the JSON layout changes incompatibly; loaders check it.
FORMAT_VERSION = 1


def fail(source: str, problem: str) -> ValueError:
    """Build the ValueError raised for a malformed tokenizer description.

    ``source`` names where the description came from (a file path, or
    ``"<dict>"``) so the user sees *which* file is bad and *why*.
    """
    return ValueError(f"bad tokenizer file {source}: {problem}")


def check_version(d: dict[str, Any], source: str) -> None:
    """Raise ValueError unless the tokenizer file is of the format version we write."""
    if d.get("version") != FORMAT_VERSION:
        raise fail(source, f"unsupported version {d.get('version')!r} (expected {FORMAT_VERSION})")


def split_special(text: str, allowed_special: bool) -> list[str]:
    """Split ``text`` on the literal end-of-text token when it is allowed.

    Returns the plain-text pieces; consecutive pieces are separated by one
    end-of-text token. With ``allowed_special=False`` the whole text is a
    single plain piece, so ``"<|endoftext|>"`` is encoded character by
    character like any other text (the safe default for untrusted input).
    """
    if not allowed_special:
        return [text]
    return text.split(EOT_TOKEN)


def as_id_list(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Turn ``ids`` into a list of Python ints, checking every one.

    Accepted: an iterable of Python ints or NumPy integer scalars, a
    one-dimensional NumPy integer array, or a single NumPy integer scalar.
    Anything else is refused rather than truncated (``int(1.5)`` would
    silently decode token 1): a float, bool, string or other non-integer
    element raises TypeError naming the value and its position; an id
    outside ``[0, vocab_size)`` raises ValueError naming it and its position.
    """
    int_arr = None                                  # an integer array: its range is checked by NumPy
    if isinstance(ids, (np.ndarray, np.generic)):
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise TypeError(f"token ids must be one-dimensional, got an array of shape {arr.shape}")
        arr = arr.reshape(-1)
        if arr.dtype.kind in "iu":                  # the fast path: a whole integer array at once
            out, int_arr = arr.tolist(), arr
        else:
            out = _check_ints(arr.tolist())
    elif isinstance(ids, (str, bytes, bytearray)):
        raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__} {ids!r:.60}")
    else:
        try:
            items = list(ids)
        except TypeError:
            raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__} "
                            f"{ids!r:.60}") from None
        out = _check_ints(items)
    if out:
        lo, hi = (int(int_arr.min()), int(int_arr.max())) if int_arr is not None else (min(out), max(out))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} at position {out.index(bad)} is outside the "
                             f"vocabulary [0, {vocab_size})")
    return out


def _check_ints(items: list) -> list[int]:
    """``items`` as Python ints; TypeError at the first element that is not an integer."""
    if set(map(type, items)) <= {int}:              # the common case (all Python ints): one pass in C
        return items
    out = []
    for pos, i in enumerate(items):
        if type(i) is int:                          # the common case, checked first
            out.append(i)
        elif isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
            out.append(int(i))
        else:
            raise TypeError(f"token id {i!r} at position {pos} is not an integer "
                            f"({type(i).__name__}); ids are never truncated or rounded")
    return out


class Tokenizer:
    """Base class: what every tokenizer offers besides encode/decode.

    Subclasses set ``kind`` and implement ``to_dict``, ``from_dict``,
    ``encode``, ``decode``, ``vocab_size`` and ``eot_id``.
    """

    kind: str = ""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically.

        Goes through :func:`numformer.fileio.atomic_write_text`, the one
        atomic-write path of the package: a temporary file in the same
        directory, fsynced, given the permissions a plain ``open`` would
        (0666 minus the umask, not ``mkstemp``'s 0600), then ``os.replace``-d
        over ``path``. A crash mid-write leaves the old file or the new one.
        """
        from numformer.fileio import atomic_write_text

        text = json.dumps(self.to_dict(), ensure_ascii=True, indent=None)
        atomic_write_text(os.fspath(path), text + "\n")

    def __len__(self) -> int:
        return self.vocab_size  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={len(self)})"
