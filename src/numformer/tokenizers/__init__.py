"""Tokenizers: character-level, byte-level BPE and WordPiece (BERT).

Both share one small interface::

    tok = CharTokenizer.train(text)                    # or ByteBPETokenizer.train(text, 512)
    ids = tok.encode(text, allowed_special=True)       # "<|endoftext|>" -> tok.eot_id
    text = tok.decode(ids)
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")

and ``vocab_size``, ``eot_id``, ``kind`` ("char" | "bpe"), ``to_dict()``.
"""

from __future__ import annotations

import os
from typing import Any

from numformer import jsonfile

from .base import EOT_TOKEN, Tokenizer, fail
from .bpe import ByteBPETokenizer
from .char import CharTokenizer
from .gpt2 import GPT2Tokenizer
from .wordpiece import WordPieceTokenizer, load_wordpiece

__all__ = ["EOT_TOKEN", "Tokenizer", "CharTokenizer", "ByteBPETokenizer", "GPT2Tokenizer", "WordPieceTokenizer",
           "load_tokenizer", "load_wordpiece"]

_KINDS = {cls.kind: cls for cls in (CharTokenizer, ByteBPETokenizer, GPT2Tokenizer, WordPieceTokenizer)}


def load_tokenizer(path_or_dict: str | os.PathLike | dict[str, Any]) -> Tokenizer:
    """Load a tokenizer saved with ``save`` (a JSON path) or a ``to_dict`` dict.

    Dispatches on the ``"kind"`` field. Anything malformed -- unreadable
    JSON, a missing or unknown kind, missing fields, inconsistent ids --
    raises ValueError naming the file and the problem. A missing file
    raises FileNotFoundError as usual.
    """
    if isinstance(path_or_dict, dict):
        source, d = "<dict>", path_or_dict
    else:
        source = os.fspath(path_or_dict)
        d = jsonfile.load(source, error=fail)      # a missing file: FileNotFoundError as usual
    if not isinstance(d, dict):
        raise fail(source, f"expected a JSON object, got {type(d).__name__}")
    if "kind" not in d:
        raise fail(source, "missing the 'kind' field")
    cls = _KINDS.get(d["kind"])
    if cls is None:
        raise fail(source, f"unknown kind {d['kind']!r} (known: {', '.join(sorted(_KINDS))})")
    try:
        return cls.from_dict(d, source=source)
    except ValueError as e:
        if source in str(e):
            raise
        raise fail(source, str(e)) from None
