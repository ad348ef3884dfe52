"""Byte-level byte-pair encoding (BPE), trained and applied in pure Python.

Vocabulary
    ids 0..255 are the 256 single bytes, so *any* byte string can be
    encoded; id ``256 + i`` is merge ``i`` (the concatenation of the two
    tokens it merges); the last id is ``<|endoftext|>``.

Pre-tokenization
    Text is first cut into chunks with a GPT-2-like regular expression
    (a contraction, a run of letters, a run of digits or a run of other
    symbols, each with an optional leading space, or a run of whitespace).
    Merges never cross chunk boundaries, so " the" and "the," never share a
    token with their neighbours. GPT-2's own pattern uses ``\\p{L}``/``\\p{N}``,
    which needs the third-party ``regex`` module; here the standard ``re``
    module approximates them (letters = ``[^\\W\\d_]``, digits = ``\\d``). The
    pattern is stored in the JSON so a file always encodes as it was trained.
    Loading real GPT-2 vocabularies with the exact pattern is a later step.

Training (:meth:`ByteBPETokenizer.train`)
    Count each distinct chunk once, then repeatedly merge the most frequent
    adjacent pair of tokens (ties: the smallest pair of ids), updating the
    pair counts incrementally only for the chunks that contain that pair.

Encoding (:meth:`ByteBPETokenizer.encode`)
    Per chunk, repeatedly merge the adjacent pair whose merge has the lowest
    rank (was learned first) until no learned pair remains; results are
    cached per chunk because natural text repeats its words constantly.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from typing import Any, Iterable

from .base import EOT_TOKEN, FORMAT_VERSION, Tokenizer, as_id_list, check_version, fail, split_special

# GPT-2-like chunking with stdlib ``re`` (see module docstring). Alternatives:
#   contractions | ' '? letters | ' '? digits | ' '? other symbols
#   | whitespace not followed by a non-space (so " word" keeps its space)
#   | remaining whitespace.
# "other" is [^\s\w] plus "_" (``\w`` includes "_", GPT-2's \p{L}\p{N} does not).
# Every character is whitespace, a letter, a digit, "_" or other, so the
# chunks always cover the whole text.
GPT2_LIKE_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)

_CACHE_LIMIT = 200_000  # chunk-cache entries kept before the cache is reset


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids``
    (scanning left to right) by ``new_id``; e.g. ``[a, a, a]`` with
    ``(a, a)`` gives ``[aa, a]``. Training and encoding both use this."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ByteBPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer.

    Parameters
    ----------
    merges : sequence of (int, int)
        Merge ``i`` joins tokens ``merges[i]`` into token ``256 + i``; both
        ids must already exist (``< 256 + i``) and no pair may repeat.
    pattern : str
        Pre-tokenization regular expression (stdlib ``re`` syntax).
    """

    kind = "bpe"

    def __init__(self, merges: Iterable[tuple[int, int]], pattern: str = GPT2_LIKE_PATTERN):
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._regex = re.compile(pattern)
        # pair -> id of the merged token; a lower id means a higher priority.
        self._ranks: dict[tuple[int, int], int] = {}
        # id -> the bytes it stands for.
        self._vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merge {i} = ({a}, {b}) references a token id >= {new_id}")
            if (a, b) in self._ranks:
                raise ValueError(f"merge {i} = ({a}, {b}) repeats an earlier merge")
            self._ranks[(a, b)] = new_id
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self._vocab.append(EOT_TOKEN.encode("utf-8"))
        self._cache: dict[bytes, tuple[int, ...]] = {}  # chunk bytes -> ids

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """256 bytes + one id per merge + the end-of-text token."""
        return 256 + len(self.merges) + 1

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``: ``256 + len(merges)``, the last id."""
        return 256 + len(self.merges)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that one token stands for (handy for inspecting a vocab)."""
        return self._vocab[as_id_list([token_id], self.vocab_size)[0]]

    # ------------------------------------------------------------------ train
    @classmethod
    def train(cls, text: str, vocab_size: int, progress: bool = False,
              pattern: str = GPT2_LIKE_PATTERN) -> "ByteBPETokenizer":
        """Learn ``vocab_size - 257`` merges from ``text``.

        Algorithm (standard BPE with incremental counts):

        1. Split ``text`` on ``<|endoftext|>`` (document separators are not
           learned), cut each document into chunks, count distinct chunks.
        2. Count every adjacent pair of ids over all chunks, weighted by chunk
           frequency, remembering which chunks contain each pair.
        3. Repeat: pop the most frequent pair from a max-heap (ties: the
           smallest ``(a, b)``), record it as the next merge, rewrite only the
           chunks that contain it, and apply the resulting count changes.

        The heap uses lazy deletion: every count change pushes a fresh
        entry, and a popped entry whose count is out of date is skipped.
        If the text runs out of pairs first, fewer merges are learned and
        ``vocab_size`` of the result is smaller than requested.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + "
                             f"{EOT_TOKEN}), got {vocab_size}")
        num_merges = vocab_size - 257
        regex = re.compile(pattern)

        # 1. distinct chunks and how often each occurs
        chunk_counts: Counter[str] = Counter()
        for doc in text.split(EOT_TOKEN):
            chunk_counts.update(regex.findall(doc))
        words = [list(c.encode("utf-8", "surrogatepass")) for c in chunk_counts]
        freqs = list(chunk_counts.values())

        # 2. pair counts and, per pair, the set of chunks (indices) holding it
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (ids, f) in enumerate(zip(words, freqs)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += f
                where[pair].add(w)
        heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
        heapq.heapify(heap)

        bar = None
        if progress:
            from tqdm import tqdm  # only needed for the optional bar
            bar = tqdm(total=num_merges, desc="training BPE", unit="merge")

        # 3. merge loop
        merges: list[tuple[int, int]] = []
        try:
            while len(merges) < num_merges and heap:
                neg_count, a, b = heapq.heappop(heap)
                if pair_counts.get((a, b), 0) != -neg_count:
                    continue  # stale heap entry
                pair, new_id = (a, b), 256 + len(merges)
                merges.append(pair)
                delta: dict[tuple[int, int], int] = defaultdict(int)
                for w in list(where.pop(pair)):
                    old = words[w]
                    new = merge_pair(old, pair, new_id)
                    if len(new) == len(old):
                        continue  # chunk no longer holds the pair
                    f = freqs[w]
                    old_pairs = list(zip(old, old[1:]))
                    new_pairs = list(zip(new, new[1:]))
                    for p in old_pairs:  # remove the chunk's old pairs ...
                        delta[p] -= f
                    for p in new_pairs:  # ... and add its new ones
                        delta[p] += f
                    for p in set(old_pairs) - set(new_pairs):
                        if p != pair:
                            where[p].discard(w)
                    for p in new_pairs:
                        where[p].add(w)
                    words[w] = new
                for p, d in delta.items():
                    if d == 0:
                        continue
                    c = pair_counts[p] + d
                    if c > 0:
                        pair_counts[p] = c
                        heapq.heappush(heap, (-c, p[0], p[1]))
                    else:  # pair gone everywhere
                        del pair_counts[p]
                        where.pop(p, None)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return cls(merges, pattern=pattern)

    # ----------------------------------------------------------------- encode
    def _bpe(self, chunk: bytes) -> tuple[int, ...]:
        """Apply the merges to one chunk's bytes, lowest rank first (cached)."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = list(chunk)
        ranks = self._ranks
        while len(ids) >= 2:
            # the adjacent pair learned earliest (smallest merged id), if any
            best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
            new_id = ranks.get(best)
            if new_id is None:
                break  # no learned pair left in this chunk
            ids = merge_pair(ids, best, new_id)
        result = tuple(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # crude bound on memory; hits refill it fast
        self._cache[chunk] = result
        return result

    def _encode_plain(self, text: str, errors: str) -> list[int]:
        """Chunk ``text`` and BPE each chunk; ``errors`` is the codec error
        handler that turns chunks back into bytes."""
        out: list[int] = []
        bpe = self._bpe
        for chunk in self._regex.findall(text):
            out.extend(bpe(chunk.encode("utf-8", errors)))
        return out

    def encode(self, text: str, allowed_special: bool = False) -> list[int]:
        """Encode ``text`` (its UTF-8 bytes) into token ids.

        With ``allowed_special=True`` each literal ``<|endoftext|>`` becomes
        ``eot_id``; otherwise it is encoded as ordinary text. Lone
        surrogates (not valid Unicode) are encoded with "surrogatepass" and
        so cannot round-trip; every valid string does.
        """
        out: list[int] = []
        for k, piece in enumerate(split_special(text, allowed_special)):
            if k > 0:
                out.append(self.eot_id)
            out.extend(self._encode_plain(piece, "surrogatepass"))
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode arbitrary bytes (not necessarily UTF-8) into token ids.

        The bytes are decoded with "surrogateescape" (each invalid byte
        becomes one lone surrogate, which the pattern treats as a symbol),
        chunked like text, and re-encoded with the same handler, so
        ``decode_bytes(encode_bytes(b)) == b`` for every ``b``. Special
        tokens are never recognized here.
        """
        return self._encode_plain(bytes(data).decode("utf-8", "surrogateescape"),
                                  "surrogateescape")

    # ----------------------------------------------------------------- decode
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of ``ids``; ``eot_id`` gives ``b"<|endoftext|>"``."""
        vocab = self._vocab
        return b"".join([vocab[i] for i in as_id_list(ids, self.vocab_size)])

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ``ids`` to text; invalid UTF-8 (e.g. a sequence cut inside
        a character) becomes U+FFFD rather than raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable description; inverse of :meth:`from_dict`."""
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [[a, b] for a, b in self.merges],
            "special_tokens": {EOT_TOKEN: self.eot_id},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ByteBPETokenizer":
        """Rebuild from :meth:`to_dict` output, validating every field.

        Checks: the version; the pattern compiles; merges is a list of
        ``[a, b]`` int pairs whose ids exist before the merge that uses them,
        with no repeats; the end-of-text id is ``256 + len(merges)``.
        Raises ValueError naming ``source`` and the problem.
        """
        check_version(d, source)
        pattern = d.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise fail(source, "'pattern' must be a non-empty string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise fail(source, f"'pattern' is not a valid regular expression: {e}") from None
        merges = d.get("merges")
        if not isinstance(merges, list):
            raise fail(source, "'merges' must be a list of [id_a, id_b] pairs")
        seen: set[tuple[int, int]] = set()
        for i, m in enumerate(merges):
            if (not isinstance(m, list) or len(m) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in m)):
                raise fail(source, f"merges[{i}] = {m!r} is not a pair of integer ids")
            a, b = m
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise fail(source, f"merges[{i}] = {m!r} references a token id that does "
                                   f"not exist yet (ids must be < {256 + i})")
            if (a, b) in seen:
                raise fail(source, f"merges[{i}] = {m!r} repeats an earlier merge")
            seen.add((a, b))
        special = d.get("special_tokens")
        if special != {EOT_TOKEN: 256 + len(merges)}:
            raise fail(source, f"'special_tokens' must be {{{EOT_TOKEN!r}: "
                               f"{256 + len(merges)}}}, got {special!r}")
        return cls([tuple(m) for m in merges], pattern=pattern)
