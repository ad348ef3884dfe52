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

    x: (N, C_in) float32, q: (C_in, C_out) int8 — or the same packed by
    :func:`pack_int8`, (⌈C_out/64⌉, C_in, 64) — scale: (C_out,) float32,
    b: (C_out,) float32 or None -> (N, C_out) float32 = (x @ float(q)) ⊙ scale + b.
    ``float(q)`` is exact (|q| ≤ 127), so the only roundings are the sum's,
    the scaling's and the bias's. The packed layout is multiplied block by
    block (a few MB of float32 at a time, never a float copy of the whole
    weight); its zero padding columns are dropped.
    """
    if q.ndim == 2:
        out = (x @ q.astype(np.float32)) * scale             # (N, C_out)
        return out if b is None else out + b
    nb, K, cols = q.shape
    n_out = scale.shape[0]
    if cols != PACK_COLS or nb != -(-n_out // PACK_COLS) or x.shape[-1] != K:
        raise ValueError(f"int8_matmul_reference: packed q {q.shape} does not fit x {x.shape} and "
                         f"scale ({n_out},) (expected ({-(-n_out // PACK_COLS)}, {x.shape[-1]}, {PACK_COLS}))")
    M = x.shape[0]
    out = np.empty((M, nb * PACK_COLS), np.float32)
    step = max(1, (1 << 20) // max(1, K * PACK_COLS))        # blocks per chunk: ≤ 4 MB of float32
    for b0 in range(0, nb, step):
        blk = np.matmul(x, q[b0:b0 + step].astype(np.float32))   # (g, N, 64)
        out[:, b0 * PACK_COLS:(b0 + blk.shape[0]) * PACK_COLS] = blk.transpose(1, 0, 2).reshape(M, -1)
    out = out[:, :n_out] * scale
    return out if b is None else out + b


PACK_COLS = 64   # columns per block of the packed layout (numformer._cpu.int8_pack_cols)


def pack_int8(q: np.ndarray) -> np.ndarray:
    """q: (K, N) int8 -> (⌈N/64⌉, K, 64): 64-column blocks, each K contiguous rows.

    The kernel's few-rows path walks down one 64-column block at a time; in
    q's own layout that is one 64-byte line every N bytes (a stride the
    hardware prefetchers do not follow), packed it is one sequential stream.
    The last block's missing columns are zero. ``q`` may be any view (a
    transpose, say); the result is a new C-contiguous array.
    """
    K, N = q.shape
    nb = -(-N // PACK_COLS)
    packed = np.zeros((nb, K, PACK_COLS), np.int8)
    full = N // PACK_COLS
    if full:                                                  # whole blocks, one strided copy
        packed[:full] = q[:, :full * PACK_COLS].reshape(K, full, PACK_COLS).transpose(1, 0, 2)
    if N % PACK_COLS:                                         # the last block, zero-padded
        packed[full, :, :N % PACK_COLS] = q[:, full * PACK_COLS:]
    return packed


def unpack_int8(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`pack_int8`: (⌈n/64⌉, K, 64) -> q (K, n) int8, C-contiguous.

    ``n`` (the number of columns) is not recoverable from the padded blocks,
    so it is passed (a quantized layer knows it: the length of its scale).
    """
    nb, K, cols = packed.shape
    if cols != PACK_COLS or nb != -(-n // PACK_COLS):
        raise ValueError(f"unpack_int8: a packed ({nb}, {K}, {cols}) array does not hold {n} columns "
                         f"(expected ({-(-n // PACK_COLS)}, K, {PACK_COLS}))")
    return np.ascontiguousarray(packed.transpose(1, 0, 2).reshape(K, nb * PACK_COLS)[:, :n])


def int8_columns(packed: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Columns ``cols`` of the packed q, as int8 (len(cols), K) — q[:, cols]ᵀ without unpacking.

    Column j lives in block j // 64 at lane j % 64 (a K-long gather with a
    64-byte stride): what an embedding lookup from the tied int8 head needs.
    """
    cols = np.asarray(cols)
    return packed[cols // PACK_COLS, :, cols % PACK_COLS]    # advanced indices first: (len, K)


def forward_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None,
                 packed: np.ndarray | None = None) -> np.ndarray:
    """x: (..., C_in) float32, q: (C_in, C_out) int8 or :func:`pack_int8`'s layout of it,
    scale: (C_out,), b: (C_out,) or None -> out (..., C_out) = x @ (q ⊙ scale) + b.
    Inference only: no cache, no backward. ``packed``: the packed layout of a 2-D q,
    used instead of it when given."""
    w = packed if packed is not None else q
    k_in = w.shape[0] if w.ndim == 2 else w.shape[1]
    if x.shape[-1] != k_in:
        raise ValueError(f"linear: x has {x.shape[-1]} features but the int8 weight is {w.shape}"
                         + (" (packed)" if w.ndim == 3 else ""))
    x2 = x.reshape(-1, x.shape[-1])                          # (N, C_in)
    out = backend.matmul_int8(x2, w, scale, bias=b)          # (N, C_out)
    return out.reshape(x.shape[:-1] + (scale.shape[0],))
