"""Shared pieces of the tokenizers: the end-of-text token, atomic saving,
special-token splitting and the error helper used when loading files.

Every tokenizer in this package is described completely by a small JSON
document (``to_dict``) with a ``"kind"`` field; :func:`numformer.tokenizers.
load_tokenizer` reads the kind and hands the document to the right class.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

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
    """Turn ``ids`` (any iterable of ints, NumPy arrays included) into a list
    of Python ints, raising ValueError if any id is outside the vocabulary."""
    if hasattr(ids, "tolist"):  # NumPy array / scalar: one fast conversion
        ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
    out = [int(i) for i in ids]
    if out:
        lo, hi = min(out), max(out)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size})")
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

        The JSON goes to a temporary file in the same directory, is flushed
        to disk, then ``os.replace``-d over ``path``: a crash mid-write leaves
        either the old file or the new one, never half a file.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        text = json.dumps(self.to_dict(), ensure_ascii=True, indent=None)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __len__(self) -> int:
        return self.vocab_size  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={len(self)})"
