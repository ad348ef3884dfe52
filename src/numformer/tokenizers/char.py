"""Character-level tokenizer: one id per Unicode code point.

The vocabulary is the sorted set of characters seen in the training text,
followed by the end-of-text special token as the last id. It is the
simplest possible tokenizer and the easiest to read a model's output with.
"""

from __future__ import annotations

from typing import Any, Iterable

from .base import EOT_TOKEN, FORMAT_VERSION, Tokenizer, as_id_list, check_version, fail, split_special


class CharTokenizer(Tokenizer):
    """Map each character to an id; ``<|endoftext|>`` is id ``len(chars)``.

    Parameters
    ----------
    chars : sequence of str
        The vocabulary, one single-character string per id, no duplicates.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = list(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}  # char -> id
        if len(self._stoi) != len(self.chars):
            raise ValueError("CharTokenizer: duplicate characters in vocabulary")
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer: every vocabulary entry must be one character")

    # ------------------------------------------------------------------ train
    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """Build the vocabulary from ``text``: its sorted set of characters.

        Occurrences of the literal ``<|endoftext|>`` are treated as the
        special token (document separators), not as characters to learn.
        """
        chars = sorted(set("".join(text.split(EOT_TOKEN))))
        if not chars:
            raise ValueError("CharTokenizer.train: the training text has no characters")
        return cls(chars)

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids: the characters plus the end-of-text token."""
        return len(self.chars) + 1

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``: always the last one."""
        return len(self.chars)

    # ----------------------------------------------------------- encode/decode
    def encode(self, text: str, allowed_special: bool = False) -> list[int]:
        """Return one id per character of ``text``.

        With ``allowed_special=True`` each literal ``<|endoftext|>`` becomes
        ``eot_id``; otherwise it is spelled out with character ids (which
        must then be in the vocabulary). An unknown character raises
        ValueError naming it and its position in ``text``.
        """
        stoi = self._stoi
        out: list[int] = []
        offset = 0  # position of the current piece within ``text``
        for k, piece in enumerate(split_special(text, allowed_special)):
            if k > 0:
                out.append(self.eot_id)
                offset += len(EOT_TOKEN)
            try:
                out.extend([stoi[c] for c in piece])  # fast path: all known
            except KeyError:
                for pos, c in enumerate(piece):  # slow path: find the culprit
                    if c not in stoi:
                        raise ValueError(
                            f"character {c!r} at position {offset + pos} is not in the "
                            f"character vocabulary ({len(self.chars)} characters)") from None
            offset += len(piece)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Join the characters of ``ids``; ``eot_id`` becomes ``<|endoftext|>``.

        Ids outside the vocabulary raise ValueError.
        """
        table = self.chars + [EOT_TOKEN]
        return "".join([table[i] for i in as_id_list(ids, self.vocab_size)])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of :meth:`decode` (lone surrogates passed through)."""
        return self.decode(ids).encode("utf-8", "surrogatepass")

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable description; inverse of :meth:`from_dict`."""
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "chars": list(self.chars),
            "special_tokens": {EOT_TOKEN: self.eot_id},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "CharTokenizer":
        """Rebuild from :meth:`to_dict` output, validating every field.

        Raises ValueError naming ``source`` and the problem.
        """
        check_version(d, source)
        chars = d.get("chars")
        if not isinstance(chars, list) or not chars:
            raise fail(source, "'chars' must be a non-empty list of characters")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise fail(source, f"chars[{i}] = {c!r} is not a single character")
        if len(set(chars)) != len(chars):
            raise fail(source, "'chars' contains duplicates")
        special = d.get("special_tokens")
        if special != {EOT_TOKEN: len(chars)}:
            raise fail(source, f"'special_tokens' must be {{{EOT_TOKEN!r}: {len(chars)}}}, "
                               f"got {special!r}")
        return cls(chars)
