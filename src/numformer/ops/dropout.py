"""Inverted dropout: zero each element with probability p, scale the rest by 1/(1−p).

    out = x ⊙ m / (1 − p),   m_i ~ Bernoulli(1 − p)

so that E[out] = x and evaluation (``train=False`` or ``p = 0``) is the identity.
The random generator is passed in, so a seeded run is reproducible.
"""

from __future__ import annotations

import numpy as np


def forward(x: np.ndarray, p: float, rng: np.random.Generator | None, train: bool):
    """x: (...) -> out: (...), cache = scaled mask or None (identity)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout in training mode needs a random generator")
    mask = (rng.random(x.shape, dtype=np.float64) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
    return x * mask, mask


def backward(dout: np.ndarray, cache) -> np.ndarray:
    """Forward line ``out = x ⊙ mask`` ⇒ ``dx = dout ⊙ mask`` (mask already holds 1/(1−p))."""
    mask = cache
    return dout if mask is None else dout * mask
