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

Non-finite inputs (the rule every kernel follows; docs/kernels.md):

* A key that query i may not see does not exist for it: its k and v
  (NaN, ±inf) never reach row i's output, lse or gradients, nor does row i's
  q or dout reach that key's dk, dv. (Not ``0 · v``: 0 · NaN is NaN.)
* Over the visible keys everything is IEEE arithmetic on the formulas below,
  as in PyTorch's math path: a NaN in q row i makes row i NaN; a NaN in k
  row j makes every row that sees j NaN; a NaN in v[j, d] makes column d
  of those rows NaN; +inf in a score gives inf − inf = NaN for the row; a
  −inf score gives p = 0 for that key, and ``0 · (±inf)`` in ``P V`` is NaN.
* A query with no visible key gives O = 0, lse = −inf, zero gradients. A
  query with visible keys whose scores are all −inf (an infinite input, or
  an overflow) gives 0/0: O = NaN, lse = NaN, NaN gradients in what it
  reaches.

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


def _visible_matmul(x: np.ndarray, y: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """x: (N, M, K), y: (N, K, C), allowed: bool broadcastable to (N, M, K) or None -> (N, M, C).

    ``Σ_k x[m, k] y[k, c]`` over the *allowed* pairs (m, k) only; x is 0 at
    the others. That equals ``x @ y`` unless y holds inf or NaN at a hidden
    pair, where ``0 · inf`` would make a NaN that the mask must not let
    through. Then the finite part is a matmul and the non-finite entries of y
    are added one by one where they are allowed.
    """
    bad = ~np.isfinite(y)
    if allowed is None or not bad.any():
        return backend.matmul(x, y)
    out = backend.matmul(x, np.where(bad, 0, y).astype(y.dtype, copy=False))
    n, k, c = np.nonzero(bad)                                 # the non-finite entries y[n, k, c]
    a = np.broadcast_to(allowed, x.shape)[n, :, k]             # (entries, M)
    with np.errstate(invalid="ignore"):
        terms = np.where(a, x[n, :, k] * y[n, k, c][:, None], 0).astype(out.dtype, copy=False)
    np.add.at(out, (n[:, None], np.arange(x.shape[1])[None, :], c[:, None]), terms)
    return out


def forward_reference(q, k, v, causal: bool = True, key_mask: np.ndarray | None = None):
    """The specification. q: (B, H, Tq, D), k, v: (B, H, Tk, D), key_mask: (B, Tk) bool or None
    -> out: (B, H, Tq, D), cache (holds P, (B, H, Tq, Tk)).

    Non-finite inputs follow the rule in the module docstring: hidden keys do
    not exist for the query (P = 0 there, and ``_visible_matmul`` keeps their
    v out); a query with visible keys whose scores are all −inf gets NaN.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    q3 = q.reshape(B * H, Tq, D)
    k3 = k.reshape(B * H, Tk, D)
    v3 = v.reshape(B * H, Tk, D)
    s = backend.matmul(q3, k3, trans_b=True).reshape(B, H, Tq, Tk) * q.dtype.type(scale)  # Q Kᵀ/√D
    allowed = build_mask(Tq, Tk, causal, key_mask)
    if allowed is not None:
        allowed = np.broadcast_to(allowed, (B, H, Tq, Tk))
        s = np.where(allowed, s, -np.inf).astype(q.dtype, copy=False)
    with np.errstate(invalid="ignore"):
        p, _ = softmax_op.forward(s)                                        # (B, H, Tq, Tk)
    seen = allowed.any(-1, keepdims=True) if allowed is not None else Tk > 0  # a visible key?
    dead = seen & (p.sum(-1, keepdims=True) == 0)       # visible keys, all scores −inf: 0/0
    if allowed is not None or dead.any():
        keep = True if allowed is None else allowed
        p = np.where(keep, np.where(dead, np.nan, p), 0).astype(q.dtype, copy=False)  # hidden: exactly 0
    a3 = None if allowed is None else allowed.reshape(B * H, Tq, Tk)
    out = _visible_matmul(p.reshape(B * H, Tq, Tk), v3, a3).reshape(B, H, Tq, D)  # P V
    return out, (q3, k3, v3, p, scale, q.shape, k.shape, a3, out)


def backward_reference(dout: np.ndarray, cache):
    """dout: (B, H, Tq, D) -> dq (B, H, Tq, D), dk, dv (B, H, Tk, D), for a
    cache from :func:`forward_reference`.

    Differentiating the three forward lines in reverse:

    * ``O = P V``          ⇒  ``dP = dO Vᵀ``,  ``dV = Pᵀ dO``
    * ``P = softmax(S)``   ⇒  ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``, and
      ``rowsum(dP ⊙ P) = rowsum(dO ⊙ (P V)) = rowsum(dO ⊙ O)``
    * ``S = Q Kᵀ / √D``    ⇒  ``dQ = dS K / √D``,  ``dK = dSᵀ Q / √D``

    Masked scores are constants (−inf); their P is 0 so dS is 0 there too
    (set, not multiplied: a hidden key's dP may be NaN), and the products
    that sum over keys or queries skip hidden pairs (``_visible_matmul``).

    We use ``rowsum(dO ⊙ O)``, as the flash kernels do (they recompute
    ``P = exp(S − L)`` from the log-sum-exp ``L`` and never hold a row of
    P): equal in exact arithmetic, and with an infinite dO the same IEEE
    result as the kernels (``rowsum(dP ⊙ P)`` would split the inf over the
    keys and could meet +inf − inf where ``dO ⊙ O`` does not).
    """
    q3, k3, v3, p, scale, q_shape, k_shape, a3, out = cache
    B, H, Tq, D = q_shape
    Tk = k_shape[2]
    do3 = dout.reshape(B * H, Tq, D)
    p3 = p.reshape(B * H, Tq, Tk)
    a3t = None if a3 is None else a3.transpose(0, 2, 1)        # (BH, Tk, Tq)
    dp = backend.matmul(do3, v3, trans_b=True)                  # (BH, Tq, Tk)  dO Vᵀ
    dv = _visible_matmul(p3.transpose(0, 2, 1), do3, a3t)       # (BH, Tk, D)   Pᵀ dO
    delta = np.sum(do3 * out.reshape(B * H, Tq, D), axis=-1, keepdims=True)  # (BH, Tq, 1) rowsum(dO ⊙ O)
    with np.errstate(invalid="ignore"):
        ds = p3 * (dp - delta) * p3.dtype.type(scale)          # (BH, Tq, Tk)  softmax backward, then 1/√D
    if a3 is not None:
        ds = np.where(a3, ds, 0).astype(ds.dtype, copy=False)  # hidden: 0, even in a NaN row
    dq = _visible_matmul(ds, k3, a3)                            # (BH, Tq, D)   dS K
    dk = _visible_matmul(ds.transpose(0, 2, 1), q3, a3t)        # (BH, Tk, D)   dSᵀ Q
    return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(k_shape)
