"""Affine map with the weight stored (in, out), as GPT-2's ``Conv1D``.

    out = x @ w + b        x: (..., C_in), w: (C_in, C_out), b: (C_out,)

The backward needs the other two matrix-product forms, A·Bᵀ and Aᵀ·B;
:func:`numformer.backend.matmul` computes them without copying a transpose.
"""

from __future__ import annotations

import numpy as np

from numformer import backend


def forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None):
    """x: (..., C_in), w: (C_in, C_out), b: (C_out,) or None -> out: (..., C_out), cache."""
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w is {w.shape}")
    x2 = x.reshape(-1, x.shape[-1])                  # (N, C_in), N = prod(leading dims)
    out = backend.matmul(x2, w, bias=b)              # (N, C_out)   A·B + b (bias fused in the kernel)
    return out.reshape(x.shape[:-1] + (w.shape[1],)), (x, w, b is not None)


def backward(dout: np.ndarray, cache, grads: tuple[np.ndarray, np.ndarray | None] | None = None):
    """dout: (..., C_out) -> dx (..., C_in), dw (C_in, C_out), db (C_out,) or None.

    Forward line: ``out[n, j] = Σ_i x[n, i] w[i, j] + b[j]``.

    * ``∂out[n,j]/∂x[n,i] = w[i,j]``  ⇒  ``dx = dout @ wᵀ``   (A·Bᵀ)
    * ``∂out[n,j]/∂w[i,j] = x[n,i]``  ⇒  ``dw = xᵀ @ dout``   (Aᵀ·B), summed over all n
    * ``∂out[n,j]/∂b[j] = 1``        ⇒  ``db = Σ_n dout[n]``

    ``grads=(dw_acc, db_acc)``: add dw and db into these arrays instead of
    returning fresh ones (a model's gradient buffer accumulates without a
    weight-sized temporary); they are returned as dw, db.
    """
    x, w, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                  # (N, C_in)
    d2 = dout.reshape(-1, dout.shape[-1])            # (N, C_out)
    dx = backend.matmul(d2, w, trans_b=True)         # (N, C_out)·(C_out, C_in) -> (N, C_in)
    if grads is None:
        dw = backend.matmul(x2, d2, trans_a=True)    # (C_in, N)·(N, C_out) -> (C_in, C_out)
        db = d2.sum(axis=0) if has_bias else None    # (C_out,)
    else:
        dw, db = grads
        backend.matmul(x2, d2, trans_a=True, out=dw, accumulate=True)
        if has_bias:
            db += d2.sum(axis=0)
    return dx.reshape(x.shape), dw, db


# --------------------------------------------------------------------------
# int8 weights (inference only; see numformer.quantize and docs/quantization.md)
# --------------------------------------------------------------------------
#
# A quantized layer stores q (C_in, C_out) int8 and one scale per output
# column, with w ≈ dequant(q) = q ⊙ scale (scale broadcast over rows). Since
# the scale belongs to column j, it factors out of the sum over i:
#
#     out[n, j] = Σ_i x[n, i] · scale[j] q[i, j] + b[j] = scale[j] · (x @ q)[n, j] + b[j]
#
# so the product runs on the integer-valued q and the scale is applied once
# per output element. There is no backward: quantized models are for inference.

def int8_matmul_reference(x: np.ndarray, q: np.ndarray, scale: np.ndarray,
                          b: np.ndarray | None = None) -> np.ndarray:
    """The specification of the int8 kernel, in NumPy.

    x: (N, C_in) float32, q: (C_in, C_out) int8, scale: (C_out,) float32,
    b: (C_out,) float32 or None -> (N, C_out) float32 = (x @ float(q)) ⊙ scale + b.
    ``float(q)`` is exact (|q| ≤ 127), so the only roundings are the sum's,
    the scaling's and the bias's.
    """
    out = (x @ q.astype(np.float32)) * scale                 # (N, C_out)
    return out if b is None else out + b


PACK_COLS = 64   # columns per block of the packed layout (numformer._cpu.int8_pack_cols)


def pack_int8(q: np.ndarray) -> np.ndarray:
    """q: (K, N) int8 -> (⌈N/64⌉, K, 64): 64-column blocks, each K contiguous rows.

    The kernel's few-rows path walks down one 64-column block at a time; in
    q's own layout that is one 64-byte line every N bytes (a stride the
    hardware prefetchers do not follow), packed it is one sequential stream.
    The last block's missing columns are zero.
    """
    K, N = q.shape
    nb = -(-N // PACK_COLS)
    padded = np.zeros((K, nb * PACK_COLS), np.int8)
    padded[:, :N] = q
    return np.ascontiguousarray(padded.reshape(K, nb, PACK_COLS).transpose(1, 0, 2))   # (nb, K, 64)


def forward_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None,
                 packed: np.ndarray | None = None) -> np.ndarray:
    """x: (..., C_in) float32, q: (C_in, C_out) int8, scale: (C_out,), b: (C_out,) or None
    -> out (..., C_out) = x @ (q ⊙ scale) + b. Inference only: no cache, no backward.
    ``packed``: :func:`pack_int8` of q, used by the compiled kernel when given."""
    if x.shape[-1] != q.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but the int8 weight is {q.shape}")
    x2 = x.reshape(-1, x.shape[-1])                          # (N, C_in)
    out = backend.matmul_int8(x2, q, scale, bias=b, packed=packed)   # (N, C_out)
    return out.reshape(x.shape[:-1] + (q.shape[1],))
