"""Autoregressive sampling with a KV cache.

Each step feeds only the newest token: the keys and values of earlier
positions are kept in a :class:`~numformer.models.gpt2.KVCache`, so a step
costs O(T) attention work instead of re-running the whole prefix.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from numformer.models.gpt2 import GPT2, KVCache


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


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """logits: (B, V) -> next ids (B,). temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    z = filter_logits(np.asarray(logits, np.float64) / temperature, top_k, top_p)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    # inverse-CDF sampling with one uniform per row: deterministic given the rng state
    u = rng.random(p.shape[0])[:, None]
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
    ids = list(int(t) for t in prompt)
    if not ids:
        raise ValueError("the prompt is empty; give at least one token (e.g. the end-of-text token)")
    n_ctx = model.cfg.n_positions
    rng = np.random.default_rng(seed)
    cache, logits = _prefill(model, ids[-n_ctx:])
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits, rng, temperature, top_k, top_p)[0])
        yield nxt
        if eot_id is not None and nxt == eot_id:
            return
        ids.append(nxt)
        if cache.length >= n_ctx:                       # window full: restart from the recent half
            cache, logits = _prefill(model, ids[-(n_ctx // 2 + 1):])
        else:
            logits = model.forward(np.array([[nxt]]), kv_cache=cache)[0][:, -1]


def _prefill(model: GPT2, ids: list[int]):
    """Run the prompt through the model once, filling a fresh cache. -> (cache, last logits (1, V))."""
    cache = KVCache(model.cfg, 1, model.cfg.n_positions, model.dtype)
    logits = model.forward(np.array([ids]), kv_cache=cache)[0]
    return cache, logits[:, -1]


def generate(model: GPT2, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new token ids at once (see :func:`stream` for the arguments)."""
    return list(stream(model, prompt, max_new_tokens, **kwargs))
