"""Affine map with the weight stored (out, in), as ``torch.nn.Linear`` (BERT).

    out = x @ wᵀ + b        x: (..., C_in), w: (C_out, C_in), b: (C_out,)

GPT-2's ``Conv1D`` stores (in, out) and uses :mod:`numformer.ops.linear`;
BERT checkpoints store (out, in). Rather than transposing every weight on
load, this op keeps the checkpoint layout and uses the A·Bᵀ form of
:func:`numformer.backend.matmul`, which needs no copy. The backward then
uses A·B (for dx) and Aᵀ·B (for dw) — the same three products as ``linear``,
assigned differently.
"""

from __future__ import annotations

import numpy as np

from numformer import backend


def forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None):
    """x: (..., C_in), w: (C_out, C_in), b: (C_out,) or None -> out: (..., C_out), cache."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"dense: x has {x.shape[-1]} features but w is {w.shape} (out, in)")
    x2 = x.reshape(-1, x.shape[-1])                        # (N, C_in)
    out = backend.matmul(x2, w, trans_b=True, bias=b)      # (N, C_in)·(C_in, C_out) + b  — A·Bᵀ
    return out.reshape(x.shape[:-1] + (w.shape[0],)), (x, w, b is not None)


def backward(dout: np.ndarray, cache, grads: tuple[np.ndarray, np.ndarray | None] | None = None):
    """dout: (..., C_out) -> dx (..., C_in), dw (C_out, C_in), db (C_out,) or None.

    Forward line: ``out[n, j] = Σ_i x[n, i] w[j, i] + b[j]``.

    * ``∂out[n,j]/∂x[n,i] = w[j,i]``  ⇒  ``dx = dout @ w``       (A·B)
    * ``∂out[n,j]/∂w[j,i] = x[n,i]``  ⇒  ``dw = doutᵀ @ x``      (Aᵀ·B), summed over n
    * ``∂out[n,j]/∂b[j] = 1``        ⇒  ``db = Σ_n dout[n]``

    ``grads=(dw_acc, db_acc)`` adds dw and db into these arrays (views of a
    model's flat gradient buffer) instead of allocating; they are returned.
    """
    x, w, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                        # (N, C_in)
    d2 = dout.reshape(-1, dout.shape[-1])                  # (N, C_out)
    dx = backend.matmul(d2, w)                             # (N, C_out)·(C_out, C_in) -> (N, C_in)
    if grads is None:
        dw = backend.matmul(d2, x2, trans_a=True)          # (C_out, N)·(N, C_in) -> (C_out, C_in)
        db = d2.sum(axis=0) if has_bias else None
    else:
        dw, db = grads
        backend.matmul(d2, x2, trans_a=True, out=dw, accumulate=True)
        if has_bias:
            db += d2.sum(axis=0)
    return dx.reshape(x.shape), dw, db
