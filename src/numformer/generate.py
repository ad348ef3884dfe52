"""Autoregressive sampling with a KV cache.

Each step feeds only the newest token: the keys and values of earlier
positions are kept in a :class:`~numformer.models.gpt2.KVCache`, so a step
costs O(T) attention work instead of re-running the whole prefix.

Two entry points:

* :func:`stream` / :func:`generate` — one prompt; past the context window the
  cache is rebuilt from the recent half window, so it can run forever.
* :func:`batch_stream` / :func:`generate_batch` — several prompts of
  different lengths in one batch (left padding, per-row positions, per-row
  stopping and seeds), within the context window.

:class:`IncrementalDecoder` turns a stream of ids into text pieces without
cutting a multi-byte UTF-8 character in two.
"""

from __future__ import annotations

import codecs
import operator
from collections import deque
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from numformer.models.gpt2 import GPT2, KVCache

__all__ = ["stream", "generate", "batch_stream", "generate_batch", "BatchStream", "TokenEvent",
           "IncrementalDecoder", "sample_next", "filter_logits", "validate_sampling"]


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for settings that have no meaning."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """logits: (B, V) -> logits with excluded tokens set to −inf.

    top-k keeps the k largest logits; top-p (nucleus) keeps the smallest set
    of most likely tokens whose probability mass reaches p (the token that
    crosses p is kept, so at least one token always survives).
    """
    logits = np.array(logits, dtype=np.float64)
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k][:, None]   # k-th largest
        logits[logits < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")                    # most likely first
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        mass_before = np.cumsum(probs, axis=-1) - probs                         # mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    return logits


def sample_next(logits: np.ndarray, rng: np.random.Generator | Sequence[np.random.Generator],
                temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """logits: (B, V) -> next ids (B,). temperature 0 means greedy (argmax).

    ``rng``: one generator (one uniform per row, in row order) or a sequence
    of B generators (row b draws its one uniform from ``rng[b]``, so a row's
    sample does not depend on the other rows of the batch).
    """
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    z = filter_logits(np.asarray(logits, np.float64) / temperature, top_k, top_p)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    # inverse-CDF sampling with one uniform per row: deterministic given the rng state
    if isinstance(rng, np.random.Generator):
        u = rng.random(p.shape[0])[:, None]
    else:
        if len(rng) != p.shape[0]:
            raise ValueError(f"{len(rng)} generators for {p.shape[0]} rows")
        u = np.array([r.random() for r in rng])[:, None]
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


def stream(model: GPT2, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eot_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, stopping after ``eot_id`` or ``max_new_tokens``.

    When the context window fills up, the cache is rebuilt from the most
    recent half window (the model never sees more than ``n_positions``).
    """
    validate_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = [_token_id(t, "prompt") for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty; give at least one token (e.g. the end-of-text token)")
    n_ctx = model.cfg.n_positions
    rng = np.random.default_rng(seed)
    window = ids[-n_ctx:]
    # The cache holds the prompt and one position per new token (each new
    # token is fed back once), up to the context window.
    cache, logits = _prefill(model, window, min(n_ctx, len(window) + max_new_tokens))
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits, rng, temperature, top_k, top_p)[0])
        yield nxt
        if eot_id is not None and nxt == eot_id:
            return
        ids.append(nxt)
        if cache.length >= n_ctx:                       # window full: restart from the recent half
            cache, logits = _prefill(model, ids[-(n_ctx // 2 + 1):], n_ctx)
        else:
            logits = model.forward(np.array([[nxt]]), kv_cache=cache)[0][:, -1]


def _prefill(model: GPT2, ids: list[int], capacity: int):
    """Run the prompt through a fresh cache of ``capacity`` positions. -> (cache, last logits (1, V)).

    Sized to what the generation will use, not to the whole context window:
    a full GPT-2 window is 75 MB of zeros, 30 ms of the first token."""
    cache = KVCache(model.cfg, 1, capacity, model.dtype)
    logits = model.forward(np.array([ids]), kv_cache=cache, last_only=True)[0]
    return cache, logits[:, -1]


def generate(model: GPT2, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new token ids at once (see :func:`stream` for the arguments)."""
    return list(stream(model, prompt, max_new_tokens, **kwargs))


# ----------------------------------------------------------------------------- batched generation


class TokenEvent(NamedTuple):
    """One generated token: the ``row`` of the batch (index into the prompts) and its id."""

    row: int
    token: int


class BatchStream:
    """Iterator of :class:`TokenEvent` for several prompts decoded together.

    Made by :func:`batch_stream` (see there for the arguments). Besides
    iterating, the caller can read:

    * ``tokens[b]`` — the ids generated for row b so far (list of int);
    * ``finish_reason[b]`` — None while row b runs, then ``"stop"`` (it
      produced a stop id, or the caller called :meth:`finish`) or
      ``"length"`` (it reached its ``max_new_tokens``). It is set *before*
      the event of the row's last token is yielded, so a consumer can close
      the row on that event;
    * ``prompt_lengths``, ``max_new_tokens`` — per row; ``cache`` — the KV cache.

    Not thread-safe: iterate and call :meth:`finish` from one thread (a
    server's worker thread can check stop strings between events).

    Layout: left padding. The prompts are right-aligned in one (B, T) block,
    T = the longest prompt, pad positions hidden from every query by a key
    mask, and each row gets its own position ids (its first real token is
    position 0). Why left and not per-row cache offsets: every decode step
    then writes all rows' new keys into the *same* cache column, so the
    cache stays one rectangular array with one length, each step is one
    (B, 1) forward, and the attention kernel's existing key mask does the
    rest. Per-row offsets would need ragged caches (a column per row per
    step); right padding would leave pads between a prompt and its
    continuation. The cost: pads occupy cache columns, so the longest
    prompt + max_new_tokens must fit the context (``n_positions``).

    Finished rows stay in the batch (fed a dummy token whose output is
    ignored) instead of being cut out: cutting would copy every layer's
    cache, and at the small batches of interactive use a step costs about
    the same for 1 or 8 rows because reading the weights dominates.
    """

    def __init__(self, model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int | None] | None = None, eot_id: int | Iterable[int] | None = None):
        validate_sampling(temperature, top_k, top_p)
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise TypeError("prompts must be a sequence of token-id sequences (or a (B, T) array), one per row")
        self.prompts = [_id_list(p, i) for i, p in enumerate(prompts)]
        B = len(self.prompts)
        if B == 0:
            raise ValueError("no prompts: give at least one")
        for i, p in enumerate(self.prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the end-of-text token)")
        self.max_new_tokens = _per_row(max_new_tokens, B, "max_new_tokens")
        if any(n < 0 for n in self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.model = model
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = _stop_set(eot_id)
        self.prompt_lengths = [len(p) for p in self.prompts]
        T = max(self.prompt_lengths)
        need = T + max(self.max_new_tokens)                  # cache columns: pads + prompt + new tokens
        n_ctx = model.cfg.n_positions
        if need > n_ctx:
            raise ValueError(f"the longest prompt ({T} tokens) + max_new_tokens ({max(self.max_new_tokens)}) "
                             f"= {need} exceeds the model's context of {n_ctx} positions; shorten the prompt "
                             f"or ask for fewer tokens")
        self.rngs = [np.random.default_rng(s) for s in _row_seeds(seed, B)]
        self.cache = KVCache(model.cfg, B, need, model.dtype)

        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.finish_reason: list[str | None] = ["length" if n == 0 else None for n in self.max_new_tokens]
        self._pads = T - np.array(self.prompt_lengths)                      # (B,) pad tokens on the left
        self._padded = bool(self._pads.any())
        # key_mask[b, j]: cache column j of row b holds a real token (not a pad)
        self._key_mask = np.arange(need)[None, :] >= self._pads[:, None]   # (B, need)
        self._feed = np.zeros((B, 1), np.int64)     # next input id per row (finished rows: a dummy)
        self._logits: np.ndarray | None = None      # (B, V) logits of each row's next token
        self._events: deque[TokenEvent] = deque()
        self._cancelled: set[int] = set()

    # ----------------------------------------------------------------- control
    def finish(self, row: int, reason: str = "stop") -> None:
        """Stop ``row`` now (e.g. the caller saw a stop string in its text): it
        produces no further events. Finishing a finished row does nothing."""
        if not 0 <= row < len(self.prompts):
            raise IndexError(f"row {row} is outside the batch of {len(self.prompts)}")
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason
            self._cancelled.add(row)

    @property
    def done(self) -> bool:
        """True when every row has finished."""
        return all(r is not None for r in self.finish_reason)

    # --------------------------------------------------------------- iteration
    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> TokenEvent:
        while True:
            while self._events:
                event = self._events.popleft()
                if event.row not in self._cancelled:       # the caller may have stopped it meanwhile
                    return event
            if self.done:
                raise StopIteration
            self._step()

    def _step(self) -> None:
        """Compute the logits of every row's next token (prefill on the first
        call), then sample one token for every running row."""
        if self._logits is None:
            self._prefill()
        else:
            self._decode()
        running = [b for b, r in enumerate(self.finish_reason) if r is None]
        picked = sample_next(self._logits[running], [self.rngs[b] for b in running],
                             self.temperature, self.top_k, self.top_p)
        for b, t in zip(running, picked.tolist()):
            self.tokens[b].append(t)
            self._feed[b, 0] = t
            if t in self.stop_ids:
                self.finish_reason[b] = "stop"
            elif len(self.tokens[b]) >= self.max_new_tokens[b]:
                self.finish_reason[b] = "length"
            self._events.append(TokenEvent(b, t))

    def _prefill(self) -> None:
        """All prompts, right-aligned in one (B, T) block, through the model once."""
        T = max(self.prompt_lengths)
        ids = np.zeros((len(self.prompts), T), np.int64)             # pad id 0: masked, any id would do
        for b, p in enumerate(self.prompts):
            ids[b, T - len(p):] = p
        key_mask = positions = None
        if self._padded:
            key_mask = self._key_mask[:, :T]
            positions = np.maximum(np.arange(T)[None, :] - self._pads[:, None], 0)   # (B, T); pads: 0
        logits = self.model.forward(ids, kv_cache=self.cache, key_mask=key_mask, positions=positions,
                                    last_only=True)[0]
        self._logits = logits[:, -1]                                               # (B, V)

    def _decode(self) -> None:
        """One (B, 1) step: the tokens just sampled, at their rows' next positions."""
        col = self.cache.length                         # the cache column every row writes now
        key_mask = positions = None
        if self._padded:
            key_mask = self._key_mask[:, :col + 1]
            positions = (col - self._pads)[:, None]    # row b's token number col - pads[b]
        logits = self.model.forward(self._feed, kv_cache=self.cache, key_mask=key_mask,
                                    positions=positions)[0]
        self._logits = logits[:, -1]


def batch_stream(model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int | None] | None = None,
                 eot_id: int | Iterable[int] | None = None) -> BatchStream:
    """Decode several prompts together; iterate for :class:`TokenEvent` ``(row, token)``.

    Parameters
    ----------
    model : GPT2
    prompts : sequence of B sequences of int
        Token ids, one non-empty prompt per row; lengths may differ.
    max_new_tokens : int or sequence of B ints
        Per-row limit (one int applies to all rows). The longest prompt +
        the largest limit must fit ``model.cfg.n_positions`` (the KV cache,
        (B, H, that length, D) per layer for keys and values, is allocated once).
    temperature, top_k, top_p :
        As in :func:`stream`; temperature 0 is greedy.
    seed : int, sequence of B (int or None), or None
        Row b samples from ``np.random.default_rng(seed[b])`` — the generator
        :func:`stream` would use for that prompt alone, so batching does not
        change a row's tokens. One int means seeds ``seed, seed + 1, …``
        (as ``numformer sample --num-samples`` does); None: fresh entropy.
    eot_id : int, iterable of int, or None
        Ids that end a row (the id is yielded, then the row stops). Stop
        *strings* are the caller's: decode the row's text and call
        :meth:`BatchStream.finish`.

    Returns
    -------
    BatchStream
        An iterator of ``TokenEvent(row, token)`` in the order produced: per
        step, one event per running row in row order. Computation happens
        while iterating (the first ``next`` runs the prompt = time to first
        token). It ends when every row has finished.

    Under greedy decoding a row's tokens equal :func:`generate` on its prompt
    alone (up to float32 rounding of the padded batch, which only matters at
    near-ties of the two best logits).
    """
    return BatchStream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eot_id=eot_id)


def generate_batch(model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   **kwargs) -> list[list[int]]:
    """All new ids per row, ``[row][i]`` (see :func:`batch_stream` for the arguments)."""
    bs = batch_stream(model, prompts, max_new_tokens, **kwargs)
    for _ in bs:
        pass
    return bs.tokens


def _token_id(t, what: str) -> int:
    """A token id as an int. ``operator.index``, not ``int``: int(1.5) == 1 and int("7") == 7
    would turn a wrong value into a wrong token silently; NumPy integers pass."""
    try:
        return operator.index(t)
    except TypeError:
        raise TypeError(f"{what} must hold integer token ids, got {type(t).__name__} {t!r}") from None


def _id_list(prompt, index: int) -> list[int]:
    if isinstance(prompt, (str, bytes)):
        raise TypeError(f"prompt {index} is a string; encode it with the tokenizer first")
    try:
        items = list(prompt)
    except TypeError:
        raise TypeError(f"prompt {index} must be a sequence of token ids, got {type(prompt).__name__}") from None
    return [_token_id(t, f"prompt {index}") for t in items]


def _per_row(value, B: int, name: str) -> list[int]:
    """An int for every row, or one int per row."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * B
    try:
        values = [operator.index(v) for v in value]
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of one int per prompt, got {value!r}") from None
    if len(values) != B:
        raise ValueError(f"{name} has {len(values)} entries for {B} prompts")
    return values


def _row_seeds(seed, B: int) -> list:
    if seed is None:
        return [None] * B
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + b for b in range(B)]
    seeds = list(seed)
    if len(seeds) != B:
        raise ValueError(f"seed has {len(seeds)} entries for {B} prompts")
    return seeds


def _stop_set(eot_id) -> frozenset:
    if eot_id is None:
        return frozenset()
    if isinstance(eot_id, (int, np.integer)):
        return frozenset([int(eot_id)])
    return frozenset(_token_id(t, "eot_id") for t in eot_id)


# ----------------------------------------------------------------------------- text


class IncrementalDecoder:
    """Token ids -> text pieces as they arrive, never splitting a character.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8
    character (e.g. the first two of the three bytes of "€"); decoding it
    alone would print U+FFFD. The bytes of such an unfinished character are
    held back until the tokens that complete it arrive; bytes that can never
    form a character still become U+FFFD, as in ``tokenizer.decode``.

    >>> dec = IncrementalDecoder(tokenizer)
    >>> pieces = [dec.push(t) for t in ids] + [dec.flush()]   # "".join(pieces) == tokenizer.decode(ids)
    """

    def __init__(self, tokenizer, skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)          # e.g. the end-of-text token
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that ``token`` completes (possibly "")."""
        if token in self.skip_ids:
            return ""
        return self._utf8.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        """Whatever is held back at the end (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
