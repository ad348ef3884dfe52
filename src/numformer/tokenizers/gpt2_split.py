"""GPT-2's pre-tokenization without the ``regex`` package.

GPT-2 cuts text into chunks with the pattern ::

    '(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

Python's own ``re`` has no ``\\p{L}``/``\\p{N}``, so the tokenizer used the
third-party ``regex`` module. For a NumPy-only install this module scans the
text by hand instead. Every character gets a class (letter, number, space
or other) from a table indexed by code point, and :func:`split` walks the
text, trying the pattern's alternatives in order at each position, exactly
as the regex engine does (derivation in :func:`split`).

The class table comes from ``regex`` itself when it is installed (then the
scanner and the pattern classify every code point alike, whatever Unicode
version ``regex`` ships), else from :mod:`unicodedata`:

* ``\\p{L}``: general category L* (Lu, Ll, Lt, Lm, Lo);
* ``\\p{N}``: general category N* (Nd, Nl, No);
* ``\\s``: the Unicode ``White_Space`` property (:data:`WHITE_SPACE`), which
  is what ``regex`` matches — not ``str.isspace``, which also counts the
  separators U+001C..U+001F.

The two sources can differ only on code points that Python's Unicode
database does not assign yet (``regex`` usually ships a newer Unicode): such
characters are "other" here. The C++ pre-tokenizer (``numformer._cpu.BPE.
encode_text``) implements the same scan and takes the same table.
"""

from __future__ import annotations

import unicodedata

LETTER, NUMBER, SPACE = 1, 2, 4          # bits of a class-table entry; 0 means "other"

#: Unicode's ``White_Space`` property (PropList.txt; unchanged since Unicode 6.3).
WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                  0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))

_N_CODE_POINTS = 0x110000
_table: bytes | None = None


def _regex_module():
    try:
        import regex
    except ImportError:
        return None
    return regex


def class_table_from_unicodedata() -> bytes:
    """One byte per code point (:data:`LETTER` | :data:`NUMBER` | :data:`SPACE` bits), from
    :mod:`unicodedata` and :data:`WHITE_SPACE`. ~0.2 s, 1.1 MB."""
    table = bytearray(_N_CODE_POINTS)
    category = unicodedata.category
    for cp in range(_N_CODE_POINTS):
        major = category(chr(cp))[0]
        if major == "L":
            table[cp] = LETTER
        elif major == "N":
            table[cp] = NUMBER
    for ch in WHITE_SPACE:
        table[ord(ch)] = SPACE
    return bytes(table)


def class_table_from_regex(regex) -> bytes:
    """The same table, asked of the ``regex`` module (what the pattern itself would match)."""
    import numpy as np

    every = "".join(map(chr, range(_N_CODE_POINTS)))
    table = np.zeros(_N_CODE_POINTS, np.uint8)
    for bit, cls in ((LETTER, r"\p{L}"), (NUMBER, r"\p{N}"), (SPACE, r"\s")):
        for m in regex.finditer(cls + "+", every):
            table[m.start():m.end()] |= bit
    return table.tobytes()


def class_table() -> bytes:
    """The table the tokenizer uses: from ``regex`` when it imports, else from
    :mod:`unicodedata`. Built once per process."""
    global _table
    if _table is None:
        regex = _regex_module()
        _table = class_table_from_regex(regex) if regex is not None else class_table_from_unicodedata()
    return _table


def split(text: str, classes: bytes | None = None) -> list[str]:
    """Cut ``text`` into GPT-2 chunks; ``"".join(split(t)) == t``.

    ``classes``: a class table (default :func:`class_table`).

    At position i the pattern's alternatives are tried left to right and the
    first that matches wins; each is greedy, and the only backtracking that
    can change a match is in the whitespace alternatives:

    1. ``'(?:[sdmt]|ll|ve|re)`` — an apostrophe + one of the 7 endings (case-sensitive).
    2.–4. `` ?X+`` for X = letter, number, other: the optional space is taken
       only when the next character is of class X (else `` ?`` backtracks to
       empty and X+ must start at i). A plain space (U+0020) only — a tab
       never glues to the following word.
    5. ``\\s+(?!\\S)``: the whitespace run i..j is taken whole when it ends the
       text; otherwise the lookahead fails at j (a non-space follows) and the
       engine backs off one character, i..j-1 — the last space is left to
       glue onto the next word (rule 2–4). That needs j-1 > i.
    6. ``\\s+``: a single whitespace character before a non-space.
    """
    table = class_table() if classes is None else classes
    n = len(text)
    cls = [table[ord(ch)] for ch in text]                 # class of every character
    chunks = []
    i = 0
    while i < n:
        c = text[i]
        end = i
        if c == "'" and i + 1 < n:                                       # 1. contractions
            if text[i + 1] in "sdmt":
                end = i + 2
            elif text[i + 1:i + 3] in ("ll", "ve", "re"):
                end = i + 3
        if end == i:
            # " ?" binds to the next character when that one is not whitespace
            start = i + 1 if c == " " and i + 1 < n and not cls[i + 1] & SPACE else i
            k = cls[start]
            if k & (LETTER | NUMBER):                                    # 2., 3.  ?\p{L}+ |  ?\p{N}+
                end = start + 1
                while end < n and cls[end] & k:
                    end += 1
            elif not k & SPACE:                                          # 4.  ?[^\s\p{L}\p{N}]+
                end = start + 1
                while end < n and not cls[end]:
                    end += 1
            else:                                                        # 5., 6. whitespace
                j = i + 1
                while j < n and cls[j] & SPACE:
                    j += 1
                end = j if j == n or j - 1 == i else j - 1
        chunks.append(text[i:end])
        i = end
    return chunks
