"""GPT-2's tokenizer files: the byte alphabet and the readers of its file formats.

* ``vocab.json`` (token -> id, tokens written in GPT-2's printable byte
  alphabet, :func:`bytes_to_unicode`) and ``merges.txt`` (one merge per line);
* the ``model`` block of a Hugging Face ``tokenizer.json`` (vocab and merges,
  read through the same checks: :func:`_vocab_to_ranks`, :func:`_parse_merge_lines`);
* tiktoken rank files (``*.tiktoken``: one ``base64(token bytes) rank`` per line).

Every reader refuses a malformed file with the tokenizer error of
:func:`numformer.tokenizers.base.fail`, naming the file and the line. The
tokenizer itself (encode, decode, writing these files back) is
:mod:`numformer.tokenizers.gpt2`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from numformer import jsonfile

from .base import fail

# Tokens of vocab.json that are special tokens, not BPE pieces (GPT-2 keeps <|endoftext|> there).
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: byte -> one printable character.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves; the other 68 bytes (controls, space, soft hyphen …)
    are given the characters U+0100, U+0101, … in byte order. So a space is
    'Ġ' (U+0120) and a newline 'Ċ' (U+010A) in vocab.json.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}
_CHAR_OF_BYTE = bytes_to_unicode()


def _token_from_alphabet(token: str) -> bytes | None:
    """A vocab.json token string -> its bytes (None if a character is outside the alphabet)."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return None


def _token_to_alphabet(token: bytes) -> str:
    return "".join(_CHAR_OF_BYTE[b] for b in token)



def _line_of(raw: str, pos: int) -> int:
    return raw.count("\n", 0, pos) + 1


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise fail(path, f"line {line}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


class _Duplicate(Exception):
    pass


def _pairs_no_dup(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _read_json_object(path: str) -> dict:
    raw = _read_text(path)
    try:
        d = jsonfile.loads(raw, path, error=fail, object_pairs_hook=_pairs_no_dup)
    except _Duplicate as e:
        key = e.args[0]
        needle = json.dumps(key, ensure_ascii=False)
        pos = raw.find(needle, raw.find(needle) + 1)          # the second occurrence
        raise fail(path, f"line {_line_of(raw, max(pos, 0))}: key {key!r} appears twice") from None
    if not isinstance(d, dict):
        raise fail(path, f"expected a JSON object, got {type(d).__name__}")
    return d


def _vocab_to_ranks(vocab: dict, path: str, raw: str | None) -> tuple[dict[bytes, int], dict[str, int]]:
    """vocab.json mapping (alphabet strings -> ids) -> (ranks, special tokens)."""
    def where(token):
        if raw is None:
            return ""
        pos = raw.find(json.dumps(token, ensure_ascii=False))
        return f"line {_line_of(raw, pos)}: " if pos >= 0 else ""

    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    seen: dict[int, str] = {}
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise fail(path, f"{where(token)}token {token!r} has id {i!r}, not a non-negative integer")
        if i in seen:
            raise fail(path, f"{where(token)}tokens {seen[i]!r} and {token!r} have the same id {i}")
        seen[i] = token
        if _SPECIAL.fullmatch(token):         # <|endoftext|> and the like
            special[token] = i                      # GPT-2 keeps <|endoftext|> in vocab.json
            continue
        t = _token_from_alphabet(token)
        if t is None:
            bad = next(c for c in token if c not in _BYTE_OF_CHAR)
            raise fail(path, f"{where(token)}token {token!r} contains {bad!r} (U+{ord(bad):04X}), "
                             f"which is not in GPT-2's byte alphabet")
        ranks[t] = i
    return ranks, special


def _read_vocab_json(path: str) -> tuple[dict[bytes, int], dict[str, int]]:
    d = _read_json_object(path)
    return _vocab_to_ranks(d, path, _read_text(path))


def _parse_merge_lines(lines, ranks, path, first_line=1, line_word="line"):
    merges: list[tuple[bytes, bytes]] = []
    seen: dict[tuple[bytes, bytes], int] = {}
    for n, line in enumerate(lines, start=first_line):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise fail(path, f"{line_word} {n}: expected two tokens separated by one space, got {line!r}")
        a, b = _token_from_alphabet(parts[0]), _token_from_alphabet(parts[1])
        for s, t in ((parts[0], a), (parts[1], b)):
            if t is None or t not in ranks:
                raise fail(path, f"{line_word} {n}: token {s!r} is not in the vocabulary")
        if a + b not in ranks:
            raise fail(path, f"{line_word} {n}: the merged token {parts[0] + parts[1]!r} is not in the vocabulary")
        if (a, b) in seen:
            raise fail(path, f"{line_word} {n}: merge {line!r} repeats {line_word} {seen[(a, b)]}")
        seen[(a, b)] = n
        merges.append((a, b))
    return merges


def _read_merges_txt(path: str, ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    text = _read_text(path)
    return _parse_merge_lines(text.split("\n"), ranks, path)


def read_tiktoken_file(path: str) -> dict[bytes, int]:
    """Parse a tiktoken rank file: ``base64(token) rank`` per line (empty lines skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    ranks: dict[bytes, int] = {}
    by_rank: dict[int, int] = {}
    for n, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise fail(path, f"line {n}: not ASCII (a rank file holds base64 and digits only)") from None
        parts = text.split()
        if len(parts) != 2:
            raise fail(path, f"line {n}: expected 'base64-token rank', got {text[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise fail(path, f"line {n}: {parts[0][:40]!r} is not valid base64") from None
        if not parts[1].isdigit():
            raise fail(path, f"line {n}: rank {parts[1][:20]!r} is not a non-negative integer")
        rank = int(parts[1])
        if not token:
            raise fail(path, f"line {n}: empty token")
        if token in ranks:
            raise fail(path, f"line {n}: token {token!r} already appeared on line {by_rank[ranks[token]]}")
        if rank in by_rank:
            raise fail(path, f"line {n}: rank {rank} already used on line {by_rank[rank]}")
        ranks[token] = rank
        by_rank[rank] = n
    if not ranks:
        raise fail(path, "no ranks in the file")
    return ranks
