"""The GPT-2 tokenizer: byte-level BPE over real GPT-2 vocabularies.

Reads the three formats GPT-2 vocabularies come in:

* Hugging Face ``vocab.json`` + ``merges.txt`` (token strings in GPT-2's
  printable *byte alphabet*, see :func:`bytes_to_unicode`);
* Hugging Face ``tokenizer.json`` of a byte-level BPE model;
* tiktoken rank files (``*.tiktoken``: one ``base64(token bytes) rank`` per line).

The byte alphabet and the checked readers of these files are
:mod:`numformer.tokenizers.gpt2_files` (``bytes_to_unicode`` is re-exported here).

Pre-tokenization
    The text is cut with GPT-2's pattern (:data:`GPT2_PATTERN`), which needs
    Unicode letter/number classes ``\\p{L}``/``\\p{N}``. Three engines, fastest
    first: the C++ scanner of ``numformer._cpu`` (GPT-2's pattern only); the
    third-party ``regex`` module when it is installed (what the pattern was
    written for; needed for any other pattern); else the hand-written scanner
    of :mod:`numformer.tokenizers.gpt2_split`, so that a NumPy-only install
    can tokenize. The scanners classify characters with one table per process
    (:func:`class_table`), asked of ``regex`` when it imports and of
    :mod:`unicodedata` otherwise. BPE never merges across chunk boundaries.

Merging, two rules (one engine)
    *tiktoken rank files* merge by the rank of the concatenation: among all
    adjacent pairs of parts whose concatenated bytes are a token, merge the
    one of lowest rank (leftmost on ties), repeat. A chunk that is itself a
    token is emitted whole without merging (tiktoken does the same).
    *Hugging Face merges* merge by pair: only pairs listed in merges.txt
    merge, the earlier line first (leftmost on ties).
    Both become one table ``(left id, right id) -> (priority, merged id)``:
    for a rank file it holds every split of every token into two tokens
    (priority = the token's rank). For GPT-2's own vocabulary both rules give
    identical ids; for odd vocabularies each reproduces its own library.

The merge loop runs in C++ (``numformer._cpu.BPE``) when the extension is
built, else in the pure-Python code below, which is the specification: both
are tested to agree.

Special tokens
    ``<|endoftext|>`` (and any other special token the files declare) is
    plain text by default -- ``encode("<|endoftext|>")`` gives the ids of
    its characters, like ``tiktoken``'s ``encode(..., disallowed_special=())``.
    With ``allowed_special=True`` (or a set of names) each literal occurrence
    becomes its id.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import os
import re
from typing import Any, Iterable

from . import gpt2_split
from .base import EOT_TOKEN, Tokenizer, as_id_list, fail
from .gpt2_files import (_parse_merge_lines, _read_json_object, _read_merges_txt, _read_vocab_json,
                         _token_from_alphabet, _token_to_alphabet, _vocab_to_ranks, bytes_to_unicode,
                         read_tiktoken_file)  # bytes_to_unicode: re-exported

try:
    import regex as _regex
except ImportError:  # a minimal (NumPy-only) install: gpt2_split does GPT-2's pattern
    _regex = None

#: GPT-2's pre-tokenization pattern (the same string tiktoken's "gpt2" encoding uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Chunks longer than this use the O(n log n) heap merge instead of the O(n²) scan.
LONG_PIECE = 128
_CACHE_LIMIT = 100_000


def _fix_surrogates(text: str) -> str:
    """What tiktoken does with text that is not valid Unicode: lone surrogates
    become U+FFFD (and a high+low surrogate pair becomes its character)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def class_table() -> bytes:
    """One byte per code point: bit 1 ``\\p{L}``, bit 2 ``\\p{N}``, bit 4 ``\\s``.

    Asked of the ``regex`` module itself when it is installed, so the C++
    pre-tokenizer classifies every character exactly as the pattern does
    (same Unicode version); else from :mod:`unicodedata` (see
    :mod:`numformer.tokenizers.gpt2_split`). Built once per process (~0.5 s, 1.1 MB).
    """
    return gpt2_split.class_table()


def _load_core():
    try:
        from numformer._cpu import BPE  # type: ignore[attr-defined]
    except Exception:  # no extension, an older build, or a broken one
        return None
    return BPE


# ----------------------------------------------------------------------------- merge loop (Python)


def bpe_scan(piece: bytes, byte_ids: list[int], pairs: dict, limit: int | None = None) -> list[int]:
    """Merge one chunk: repeatedly merge the adjacent pair of lowest priority
    (leftmost on ties). O(n²) in the chunk length, fast for short chunks.

    ``pairs``: (left id, right id) -> (priority, merged id). With ``limit``,
    only merges of priority < limit are used.
    """
    if limit is not None:
        full = pairs
        pairs = _Limited(full, limit)
    ids = [byte_ids[b] for b in piece]
    # prio[i]: priority of merging ids[i] with ids[i + 1] (None: not a pair)
    prio = [pairs.get((a, b)) for a, b in zip(ids, ids[1:])]
    while True:
        best, at = None, -1
        for i, r in enumerate(prio):
            if r is not None and (best is None or r[0] < best[0]):
                best, at = r, i
        if best is None:
            return ids
        ids[at:at + 2] = [best[1]]                      # merge ids[at], ids[at + 1]
        del prio[at]
        if at < len(ids) - 1:
            prio[at] = pairs.get((ids[at], ids[at + 1]))
        if at > 0:
            prio[at - 1] = pairs.get((ids[at - 1], ids[at]))


class _Limited:
    """A view of a pair table without the merges of priority >= limit."""

    def __init__(self, pairs: dict, limit: int):
        self.pairs, self.limit = pairs, limit

    def get(self, key):
        r = self.pairs.get(key)
        return r if r is not None and r[0] < self.limit else None


def bpe_heap(piece: bytes, byte_ids: list[int], pairs: dict) -> list[int]:
    """The same merges as :func:`bpe_scan` in O(n log n), for long chunks.

    Parts form a linked list over their starting byte positions; a heap holds
    (priority, position, version) for every mergeable adjacent pair. Popping
    the smallest (priority, position) is the leftmost lowest-priority pair,
    since positions keep their left-to-right order. Entries go stale when
    either part changes; a per-part version number detects that.
    """
    n = len(piece)
    ids = [byte_ids[b] for b in piece]
    nxt = list(range(1, n + 1))                          # n: end of list
    prv = list(range(-1, n - 1))
    ver = [0] * n
    heap = []
    for i in range(n - 1):
        r = pairs.get((ids[i], ids[i + 1]))
        if r is not None:
            heap.append((r[0], i, 0, r[1]))
    heapq.heapify(heap)
    while heap:
        _, i, v, new_id = heapq.heappop(heap)
        if ver[i] != v or ver[i] < 0:
            continue                                     # stale: part i changed or is gone
        j = nxt[i]
        ids[i] = new_id                                  # part i absorbs part j
        ver[j] = -1
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        ver[i] += 1
        if nxt[i] < n:
            r = pairs.get((ids[i], ids[nxt[i]]))
            if r is not None:
                heapq.heappush(heap, (r[0], i, ver[i], r[1]))
        p = prv[i]
        if p >= 0:
            ver[p] += 1
            r = pairs.get((ids[p], ids[i]))
            if r is not None:
                heapq.heappush(heap, (r[0], p, ver[p], r[1]))
    out, i = [], 0
    while i < n:
        out.append(ids[i])
        i = nxt[i]
    return out


# ----------------------------------------------------------------------------- tokenizer


class GPT2Tokenizer(Tokenizer):
    """Byte-level BPE with GPT-2's pattern, from real vocabulary files.

    Parameters
    ----------
    ranks : dict bytes -> int
        Every ordinary token's bytes and id. All 256 single bytes must be present.
    merges : list of (bytes, bytes) or None
        Hugging Face merge rules, in priority order. ``None`` means tiktoken's
        rule: merge by the rank of the concatenation.
    special_tokens : dict str -> int
        E.g. ``{"<|endoftext|>": 50256}``.
    pattern : str
        Pre-tokenization pattern (``regex`` module syntax). GPT-2's own
        pattern works without ``regex``; any other needs it.
    source : str
        Where the vocabulary came from, for error messages.
    """

    kind = "gpt2_bpe"

    def __init__(self, ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]] | None = None,
                 special_tokens: dict[str, int] | None = None, pattern: str = GPT2_PATTERN,
                 source: str = "<ranks>", use_extension: bool = True):
        if _regex is None and pattern != GPT2_PATTERN:
            raise ImportError(f"{source}: the pre-tokenization pattern {pattern!r} is not GPT-2's and "
                              f"needs the 'regex' package (pip install regex)")
        self.source = source
        self.ranks = dict(ranks)
        self.merges = None if merges is None else list(merges)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self._regex = _regex.compile(pattern) if _regex is not None else None   # None: gpt2_split

        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise fail(source, f"the vocabulary has no token for byte(s) "
                               f"{', '.join(f'0x{b:02x}' for b in missing[:8])}; byte-level BPE needs all 256")
        self._byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        size = max([*self.ranks.values(), *self.special_tokens.values()]) + 1
        count = len(self.ranks) + len(self.special_tokens)
        if size > 10 * count + 1024:     # ids index a table: refuse absurd gaps (e.g. one id of 10**12)
            raise fail(source, f"the largest id is {size - 1} for only {count} tokens; ids must be (nearly) dense")
        self._decoder: list[bytes | None] = [None] * size
        for tok, i in self.ranks.items():
            if self._decoder[i] is not None:
                raise fail(source, f"id {i} is used by two tokens ({self._decoder[i]!r} and {tok!r})")
            self._decoder[i] = tok
        for name, i in self.special_tokens.items():
            if self._decoder[i] is not None:
                raise fail(source, f"special token {name!r} has id {i}, which token {self._decoder[i]!r} already uses")
            self._decoder[i] = name.encode("utf-8")

        # (left id, right id) -> (priority, merged id)
        self._pairs: dict[tuple[int, int], tuple[int, int]] = {}
        if self.merges is None:
            for tok, r in self.ranks.items():       # every split of a token into two tokens
                for k in range(1, len(tok)):
                    a, b = self.ranks.get(tok[:k]), self.ranks.get(tok[k:])
                    if a is not None and b is not None:
                        self._pairs[(a, b)] = (r, r)
        else:
            for prio, (a, b) in enumerate(self.merges):
                key = (self.ranks[a], self.ranks[b])
                if key not in self._pairs:           # a repeated rule never fires again
                    self._pairs[key] = (prio, self.ranks[a + b])
        self._whole = self.merges is None           # tiktoken: a chunk that is a token is emitted whole
        self._cache: dict[str, list[int]] = {}
        self._special_regex = None
        core = _load_core() if use_extension else None
        self._core = None
        if core is not None:
            self._core = core(self._byte_ids, [(a, b, p, m) for (a, b), (p, m) in self._pairs.items()],
                              self.ranks if self._whole else None)
        # GPT-2's pattern is also implemented in C++ (no Python list of chunks at all)
        self._fast = self._core is not None and pattern == GPT2_PATTERN and hasattr(self._core, "encode_text")
        if self._fast:
            self._core.set_classes(class_table())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, **kw) -> "GPT2Tokenizer":
        """Hugging Face ``vocab.json`` + ``merges.txt``."""
        ranks, special = _read_vocab_json(vocab_file)
        merges = _read_merges_txt(merges_file, ranks)
        return cls(ranks, merges, special, source=f"{vocab_file} + {merges_file}", **kw)

    @classmethod
    def from_tiktoken(cls, path: str, special_tokens: dict[str, int] | None = None, **kw) -> "GPT2Tokenizer":
        """A tiktoken rank file; ``<|endoftext|>`` gets the next id unless given."""
        ranks = read_tiktoken_file(path)
        if special_tokens is None:
            special_tokens = {EOT_TOKEN: max(ranks.values()) + 1}
        return cls(ranks, None, special_tokens, source=path, **kw)

    @classmethod
    def from_tokenizer_json(cls, path: str, **kw) -> "GPT2Tokenizer":
        """A Hugging Face ``tokenizer.json`` whose model is byte-level BPE."""
        d = _read_json_object(path)
        model = d.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise fail(path, f"model type {kind!r} is not byte-level BPE (only GPT-2 style BPE is read here)")
        pre = json.dumps(d.get("pre_tokenizer"))
        if "ByteLevel" not in pre:
            raise fail(path, "the pre-tokenizer is not ByteLevel; this is not a GPT-2 style tokenizer")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise fail(path, "model.vocab must be an object of token -> id")
        ranks, special = _vocab_to_ranks(vocab, path, None)
        for n, t in enumerate(d.get("added_tokens") or []):   # special tokens leave the BPE vocabulary
            if not isinstance(t, dict):
                continue
            if not isinstance(t.get("special", False), bool) or isinstance(t.get("id"), bool):
                raise fail(path, f"added_tokens[{n}]: 'special' must be true or false and 'id' an integer, "
                                 f"got special={t.get('special')!r}, id={t.get('id')!r}")
            if not (t.get("special") and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)):
                continue
            content, i = t["content"], t["id"]
            as_bytes = _token_from_alphabet(content)
            if as_bytes is not None and ranks.get(as_bytes) == i:
                del ranks[as_bytes]
            special[content] = i
        raw_merges = model.get("merges")
        if not isinstance(raw_merges, list):
            raise fail(path, "model.merges must be a list")
        lines = []
        for m in raw_merges:
            if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
                lines.append(f"{m[0]} {m[1]}")
            elif isinstance(m, str):
                lines.append(m)
            else:
                raise fail(path, f"model.merges entry {m!r} is not 'a b' or [a, b]")
        merges = _parse_merge_lines(lines, ranks, path, first_line=1, line_word="merge")
        return cls(ranks, merges, special, source=path, **kw)

    # --------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT_TOKEN)

    @property
    def uses_extension(self) -> bool:
        return self._core is not None

    def token_bytes(self, token_id: int) -> bytes:
        tok = self._decoder[as_id_list([token_id], self.vocab_size)[0]]
        if tok is None:
            raise ValueError(f"token id {token_id} is not assigned in {self.source}")
        return tok

    # ------------------------------------------------------------------ encode
    def _encode_piece_py(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        data = piece.encode("utf-8")
        whole = self.ranks.get(data) if self._whole else None
        if whole is not None:
            ids = [whole]
        elif len(data) > LONG_PIECE:
            ids = bpe_heap(data, self._byte_ids, self._pairs)
        else:
            ids = bpe_scan(data, self._byte_ids, self._pairs)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` with no special tokens at all."""
        if self._fast:
            return self._core.encode_text(_fix_surrogates(text))
        text = _fix_surrogates(text)
        pieces = self._regex.findall(text) if self._regex is not None else gpt2_split.split(text)
        if self._core is not None:
            return self._core.encode(pieces)
        out: list[int] = []
        for p in pieces:
            out.extend(self._encode_piece_py(p))
        return out

    def encode(self, text: str, allowed_special: bool | Iterable[str] = False) -> list[int]:
        """Encode ``text`` to ids.

        ``allowed_special``: False (default) -- special tokens are plain text;
        True / "all" -- every special token is recognized; or a set of names.
        """
        if allowed_special is True or allowed_special == "all":
            allowed = set(self.special_tokens)
        elif not allowed_special:
            allowed = set()
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"unknown special token(s) {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        text = _fix_surrogates(text)
        # longest first, so a special token that is a prefix of another never wins
        # (literal alternatives: the standard library's re is enough)
        pat = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
        out: list[int] = []
        start = 0
        for m in re.finditer(pat, text):
            out.extend(self.encode_ordinary(text[start:m.start()]))
            out.append(self.special_tokens[m.group()])
            start = m.end()
        out.extend(self.encode_ordinary(text[start:]))
        return out

    # ------------------------------------------------------------------ decode
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        dec = self._decoder
        ids = as_id_list(ids, self.vocab_size)         # once: ``ids`` may be a one-shot iterator
        parts = [dec[i] for i in ids]
        if None in parts:
            pos = parts.index(None)
            raise ValueError(f"token id {ids[pos]} at position {pos} is not assigned in {self.source}")
        return b"".join(parts)  # type: ignore[arg-type]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str) -> list[str]:
        """Write ``vocab.json`` + ``merges.txt`` (Hugging Face layout) into ``folder``.

        Rank-file vocabularies have no merge list; one is derived (each token
        of length ≥ 2, in rank order, split where both halves are tokens of
        lower rank) -- exact for GPT-2's vocabulary.
        """
        from numformer.fileio import atomic_write_text

        vocab = {_token_to_alphabet(t): i for t, i in self.ranks.items()}
        vocab.update(self.special_tokens)
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        merges = self.merges if self.merges is not None else self._derived_merges()
        lines = ["#version: 0.2"] + [f"{_token_to_alphabet(a)} {_token_to_alphabet(b)}" for a, b in merges]
        vpath, mpath = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        atomic_write_text(vpath, json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(mpath, "\n".join(lines) + "\n")
        return [vpath, mpath]

    def _derived_merges(self) -> list[tuple[bytes, bytes]]:
        out = []
        for tok, r in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(tok) < 2:
                continue
            ids = bpe_scan(tok, self._byte_ids, self._pairs, limit=r)
            if len(ids) != 2:
                raise ValueError(f"{self.source}: token {tok!r} (rank {r}) cannot be built from two earlier tokens")
            out.append((self._decoder[ids[0]], self._decoder[ids[1]]))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON description (kind ``gpt2_bpe``): ranks as base64, merges if any."""
        d: dict[str, Any] = {
            "kind": self.kind, "version": 1, "pattern": self.pattern,
            "ranks": [[base64.b64encode(t).decode("ascii"), i] for t, i in
                      sorted(self.ranks.items(), key=lambda kv: kv[1])],
            "special_tokens": self.special_tokens,
        }
        if self.merges is not None:
            d["merges"] = [[base64.b64encode(a).decode("ascii"), base64.b64encode(b).decode("ascii")]
                           for a, b in self.merges]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "GPT2Tokenizer":
        if d.get("version") != 1:
            raise fail(source, f"unsupported version {d.get('version')!r} (expected 1)")
        try:
            ranks: dict[bytes, int] = {}
            for k, (tok, i) in enumerate(d["ranks"]):
                t = base64.b64decode(tok, validate=True)
                if t in ranks or not isinstance(i, int) or isinstance(i, bool):
                    raise fail(source, f"ranks[{k}] is a repeated token or has a non-integer id")
                ranks[t] = i
            merges = None
            if "merges" in d:
                merges = [(base64.b64decode(a, validate=True), base64.b64decode(b, validate=True))
                          for a, b in d["merges"]]
                for k, (a, b) in enumerate(merges):
                    if a not in ranks or b not in ranks or a + b not in ranks:
                        raise fail(source, f"merges[{k}] references a token that is not in the ranks")
            special = d.get("special_tokens", {})
            if not isinstance(special, dict) or not all(isinstance(v, int) for v in special.values()):
                raise fail(source, "'special_tokens' must map names to integer ids")
            return cls(ranks, merges, special, pattern=d.get("pattern", GPT2_PATTERN), source=source)
        except (KeyError, TypeError, binascii.Error) as e:
            raise fail(source, f"malformed gpt2_bpe tokenizer ({type(e).__name__}: {e})") from None

    def __repr__(self) -> str:
        rule = "tiktoken ranks" if self.merges is None else f"{len(self.merges)} merges"
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, {rule}, source={self.source!r})"


def load_gpt2_tokenizer(path: str, **kw) -> GPT2Tokenizer:
    """A GPT-2 tokenizer from a folder (vocab.json + merges.txt, or tokenizer.json)
    or a single file (``.tiktoken`` rank file, or ``tokenizer.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.exists(vocab) and os.path.exists(merges):
            return GPT2Tokenizer.from_files(vocab, merges, **kw)
        tj = os.path.join(path, "tokenizer.json")
        if os.path.exists(tj):
            return GPT2Tokenizer.from_tokenizer_json(tj, **kw)
        ranks = [f for f in sorted(os.listdir(path)) if f.endswith(".tiktoken")]
        if len(ranks) == 1:
            return GPT2Tokenizer.from_tiktoken(os.path.join(path, ranks[0]), **kw)
        raise FileNotFoundError(f"{path}: no GPT-2 tokenizer files (vocab.json + merges.txt, tokenizer.json "
                                f"or one *.tiktoken rank file)")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return GPT2Tokenizer.from_tokenizer_json(path, **kw)
    return GPT2Tokenizer.from_tiktoken(path, **kw)
