"""Scaled dot-product attention, and the head split/merge around it.

For one head, with queries Q: (Tq, D), keys K: (Tk, D), values V: (Tk, D):

    S = Q Kᵀ / √D + M          (Tq, Tk) scores; M is 0 or −inf (mask)
    P = softmax(S)             row-wise over keys
    O = P V                    (Tq, D)

Masks:

* causal: query i may see key j only if j ≤ i + (Tk − Tq). With Tq = Tk that
  is the usual lower triangle; with a KV cache (Tq new queries after
  Tk − Tq cached positions) the same rule lines the queries up at the end.
* key padding: ``key_mask[b, j] = False`` hides key j of batch row b.

A fully masked row produces zeros (see :mod:`numformer.ops.softmax`).

:func:`forward_reference` / :func:`backward_reference` are the specification:
plain NumPy that materializes the Tq×Tk matrix P and caches it.
:func:`forward` / :func:`backward` are what models call; they go through
:mod:`numformer.backend`, which runs the compiled flash-attention kernel
(``numformer._cpu``: online softmax over key tiles, nothing Tq×Tk stored;
the cache is (q, k, v, out, log-sum-exp) and the backward recomputes P
tile by tile) or the reference. The cache is opaque: ``backward`` takes
whatever ``forward`` returned, whichever path made it.
"""

from __future__ import annotations

import math

import numpy as np

from numformer import backend
from numformer.ops import softmax as softmax_op


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, C) -> (B, H, T, D) with D = C / H (a view + transpose, no math)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, D) -> (B, T, C): the inverse of :func:`split_heads`."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def build_mask(Tq: int, Tk: int, causal: bool, key_mask: np.ndarray | None):
    """Boolean "may attend" mask broadcastable to (B, 1, Tq, Tk), or None for no mask."""
    allowed = None
    if causal:
        q_pos = np.arange(Tq)[:, None] + (Tk - Tq)             # absolute query positions
        allowed = (np.arange(Tk)[None, :] <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if key_mask is not None:
        km = np.asarray(key_mask, dtype=bool)[:, None, None, :]   # (B, 1, 1, Tk)
        allowed = km if allowed is None else (allowed & km)
    return allowed


def forward(q, k, v, causal: bool = True, key_mask: np.ndarray | None = None):
    """q: (B, H, Tq, D), k, v: (B, H, Tk, D), key_mask: (B, Tk) bool or None
    -> out: (B, H, Tq, D), cache (opaque; pass it to :func:`backward`).

    ``softmax(q kᵀ/√D + mask) v`` on the selected backend: the compiled
    flash kernel when available (q, k, v may be strided views, e.g. from
    :func:`split_heads` or a KV-cache slice), else :func:`forward_reference`.
    """
    return backend.attention_forward(q, k, v, causal, key_mask)


def backward(dout: np.ndarray, cache):
    """dout: (B, H, Tq, D) -> dq (B, H, Tq, D), dk, dv (B, H, Tk, D).

    Runs on the path that made ``cache`` (see :func:`backward_reference` for
    the derivation; the kernel computes the same identities tile by tile).
    """
    return backend.attention_backward(dout, cache)


def forward_reference(q, k, v, causal: bool = True, key_mask: np.ndarray | None = None):
    """The specification. q: (B, H, Tq, D), k, v: (B, H, Tk, D), key_mask: (B, Tk) bool or None
    -> out: (B, H, Tq, D), cache (holds P, (B, H, Tq, Tk))."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    q3 = q.reshape(B * H, Tq, D)
    k3 = k.reshape(B * H, Tk, D)
    v3 = v.reshape(B * H, Tk, D)
    s = backend.matmul(q3, k3, trans_b=True).reshape(B, H, Tq, Tk) * q.dtype.type(scale)  # Q Kᵀ/√D
    allowed = build_mask(Tq, Tk, causal, key_mask)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf).astype(q.dtype, copy=False)
    p, _ = softmax_op.forward(s)                                            # (B, H, Tq, Tk)
    out = backend.matmul(p.reshape(B * H, Tq, Tk), v3).reshape(B, H, Tq, D)  # P V
    return out, (q3, k3, v3, p, scale, q.shape, k.shape)


def backward_reference(dout: np.ndarray, cache):
    """dout: (B, H, Tq, D) -> dq (B, H, Tq, D), dk, dv (B, H, Tk, D), for a
    cache from :func:`forward_reference`.

    Differentiating the three forward lines in reverse:

    * ``O = P V``          ⇒  ``dP = dO Vᵀ``,  ``dV = Pᵀ dO``
    * ``P = softmax(S)``   ⇒  ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``
    * ``S = Q Kᵀ / √D``    ⇒  ``dQ = dS K / √D``,  ``dK = dSᵀ Q / √D``

    Masked scores are constants (−inf); their P is 0 so dS is 0 there too.

    The flash kernel uses ``rowsum(dP ⊙ P) = rowsum(dO ⊙ O)`` (since
    ``O = P V``) and recomputes ``P = exp(S − L)`` from the log-sum-exp ``L``.
    """
    q3, k3, v3, p, scale, q_shape, k_shape = cache
    B, H, Tq, D = q_shape
    Tk = k_shape[2]
    do3 = dout.reshape(B * H, Tq, D)
    p3 = p.reshape(B * H, Tq, Tk)
    dp = backend.matmul(do3, v3, trans_b=True)                  # (BH, Tq, Tk)  dO Vᵀ
    dv = backend.matmul(p3, do3, trans_a=True)                  # (BH, Tk, D)   Pᵀ dO
    ds = softmax_op.backward(dp, p3) * p3.dtype.type(scale)     # (BH, Tq, Tk)  softmax backward, then 1/√D
    dq = backend.matmul(ds, k3)                                 # (BH, Tq, D)   dS K
    dk = backend.matmul(ds, q3, trans_a=True)                   # (BH, Tk, D)   dSᵀ Q
    return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(k_shape)
