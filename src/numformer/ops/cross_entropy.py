"""Cross-entropy of logits against integer targets, averaged over counted positions.

    p = softmax(z),   loss = −(1/N) Σ_{n: y_n ≠ ignore} log p[n, y_n]

computed as ``log p[n, y] = z[n, y] − logsumexp(z[n])`` so it never takes the
log of an underflowed probability. Positions whose target equals
``ignore_index`` (default −100, as PyTorch) add nothing and are not counted.

``forward_reference`` / ``backward_reference`` are the specification. On the
cpu backend, float32 logits run ``numformer._cpu``'s fused kernels: the
forward reads the logits once (online log-sum-exp) and caches one number per
row, ``lse``; the backward writes ``dlogits = (e^{z − lse} − onehot) · scale``
in one pass, never forming the softmax separately.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numformer import backend
from numformer.intargs import int_array, int_scalar


class _FusedCache(NamedTuple):
    """Cache of the compiled forward."""
    z: np.ndarray          # (N, V) float32 logits, contiguous (a view of the caller's when possible)
    y: np.ndarray          # (N,) int64 targets
    lse: np.ndarray        # (N,) float32 log-sum-exp per row
    count: int             # rows with target ≠ ignore_index
    ignore_index: int
    shape: tuple           # the logits' original shape
    reuse_logits: bool     # backward may write dlogits over z


def forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100, *,
            reuse_logits: bool = False):
    """logits: (..., V), targets: (...) int -> scalar loss, cache.

    ``reuse_logits=True`` promises that the caller will not read ``logits``
    after :func:`backward`, which may then write the gradient into the same
    memory (on the cpu backend; it saves allocating and faulting in a second
    (N, V) array, ~200 MB for GPT-2 at N = 1024).
    """
    targets = int_array(targets, "cross_entropy", "targets")  # 1.5 is refused, not truncated
    ignore_index = int_scalar(ignore_index, "cross_entropy", "ignore_index")
    if backend.fused(logits) and logits.ndim >= 1:
        V = logits.shape[-1]
        z = np.ascontiguousarray(logits).reshape(-1, V)              # (N, V)
        y = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)  # (N,) exact: targets are integers
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"cross_entropy: logits {logits.shape} do not match targets {targets.shape}")
        total, lse = backend.cross_entropy_forward(z, y, ignore_index)  # Σ_counted lse − z[y]
        count = int(np.count_nonzero(y != ignore_index))
        reuse = reuse_logits and np.shares_memory(z, logits)
        return total / max(count, 1), _FusedCache(z, y, lse, count, ignore_index, logits.shape, reuse)
    return forward_reference(logits, targets, ignore_index)


def backward(dloss: float, cache) -> np.ndarray:
    """dloss: scalar -> dlogits: (..., V); see :func:`backward_reference`."""
    if isinstance(cache, _FusedCache):
        c = cache
        dz = backend.cross_entropy_backward(c.z, c.y, c.lse, dloss / max(c.count, 1), c.ignore_index,
                                            out=c.z if c.reuse_logits else None)
        return dz.reshape(c.shape)
    return backward_reference(dloss, cache)


def forward_reference(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100):
    """logits: (..., V), targets: (...) int -> scalar loss, cache."""
    targets = int_array(targets, "cross_entropy", "targets")
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


def backward_reference(dloss: float, cache) -> np.ndarray:
    """dloss: scalar -> dlogits: (..., V).

    Forward line ``loss_n = logsumexp(z_n) − z_n[y_n]``. Since
    ``∂ logsumexp(z)/∂z_k = softmax(z)_k``,

        ∂loss_n/∂z_n = softmax(z_n) − onehot(y_n),

    scaled by ``dloss / N`` for the mean; ignored rows get zero gradient.
    """
    z, safe_y, valid, count, shape = cache
    dz = backend.softmax(z)                                      # (N, V) recomputed, not cached
    dz[np.arange(z.shape[0]), safe_y] -= 1.0
    dz *= dloss / max(count, 1)
    dz = np.where(valid[:, None], dz, 0)                         # ignored rows: 0, even where z is NaN
    return dz.reshape(shape).astype(z.dtype, copy=False)
