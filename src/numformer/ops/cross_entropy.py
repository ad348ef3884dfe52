"""Cross-entropy of logits against integer targets, averaged over counted positions.

    p = softmax(z),   loss = −(1/N) Σ_{n: y_n ≠ ignore} log p[n, y_n]

computed as ``log p[n, y] = z[n, y] − logsumexp(z[n])`` so it never takes the
log of an underflowed probability. Positions whose target equals
``ignore_index`` (default −100, as PyTorch) add nothing and are not counted.
"""

from __future__ import annotations

import numpy as np

from numformer import backend


def forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100):
    """logits: (..., V), targets: (...) int -> scalar loss, cache."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                                    # (N, V)
    y = targets.reshape(-1)                                      # (N,)
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"cross_entropy: logits {logits.shape} do not match targets {targets.shape}")
    valid = y != ignore_index                                    # (N,)
    if np.any((y[valid] < 0) | (y[valid] >= V)):
        raise ValueError(f"cross_entropy: a target is outside [0, {V})")
    count = int(valid.sum())
    m = z.max(axis=-1, keepdims=True)                            # (N, 1)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))           # (N,) logsumexp
    safe_y = np.where(valid, y, 0)
    logp_y = z[np.arange(z.shape[0]), safe_y] - lse              # (N,) log p[n, y_n]
    loss = -float(np.sum(np.where(valid, logp_y, 0.0))) / max(count, 1)
    return loss, (z, safe_y, valid, count, logits.shape)


def backward(dloss: float, cache) -> np.ndarray:
    """dloss: scalar -> dlogits: (..., V).

    Forward line ``loss_n = logsumexp(z_n) − z_n[y_n]``. Since
    ``∂ logsumexp(z)/∂z_k = softmax(z)_k``,

        ∂loss_n/∂z_n = softmax(z_n) − onehot(y_n),

    scaled by ``dloss / N`` for the mean; ignored rows get zero gradient.
    """
    z, safe_y, valid, count, shape = cache
    dz = backend.softmax(z)                                      # (N, V) recomputed, not cached
    dz[np.arange(z.shape[0]), safe_y] -= 1.0
    dz *= (dloss / max(count, 1)) * valid[:, None]
    return dz.reshape(shape).astype(z.dtype, copy=False)
