"""Token and learned position embeddings (GPT-2's ``wte`` and ``wpe``).

    out[b, t] = wte[ids[b, t]] + wpe[pos0 + t]          (default: every row starts at pos0)
    out[b, t] = wte[ids[b, t]] + wpe[positions[b, t]]   (per-row positions, e.g. left padding)

A lookup is a matrix product with a one-hot matrix, ``onehot(ids) @ wte``,
so its gradient is ``onehot(ids)ᵀ @ dout``: every row of ``dout`` is *added*
to the row of ``wte`` it came from. Repeated ids must accumulate, which is
why the backward uses ``np.add.at`` — ``dwte[ids] += dout`` would keep only
one of the repeated contributions.

``backward_reference`` is the specification. On the cpu backend, float32
gradients use ``numformer._cpu``'s deterministic scatter-add instead (each
thread owns a range of vocabulary rows and adds the rows it owns in order).
Both can add straight into existing gradient arrays (``dwte=``, ``dwpe=``),
which saves a (V, C) temporary and a pass over it.
"""

from __future__ import annotations

import numpy as np

from numformer import backend
from numformer.intargs import int_array, int_scalar


def forward(ids: np.ndarray, wte: np.ndarray, wpe: np.ndarray, pos0: int = 0,
            positions: np.ndarray | None = None):
    """ids: (B, T) int, wte: (V, C), wpe: (P, C) -> out: (B, T, C), cache.

    ``pos0`` is the position of ``ids[:, 0]`` (non-zero when decoding with a KV cache).
    ``positions``: (B, T) int or None — each token's own position instead (batched
    generation with left padding, where rows start at different positions).
    """
    ids = int_array(ids, "embedding", "ids")      # 1.5 is refused, not truncated to 1
    pos0 = int_scalar(pos0, "embedding", "pos0")
    B, T = ids.shape
    if positions is None:
        if pos0 < 0:                                    # wpe[-1:T-1] would be an empty or wrong slice
            raise ValueError(f"embedding: pos0 must be >= 0, got {pos0}")
        if pos0 + T > wpe.shape[0]:
            raise ValueError(f"sequence of length {pos0 + T} exceeds the context of {wpe.shape[0]} positions")
        out = wte[ids] + wpe[pos0:pos0 + T]             # (B, T, C) + (T, C) broadcast over B
        return out, (ids, wte.shape, wpe.shape, pos0)
    positions = int_array(positions, "embedding", "positions")
    if positions.shape != ids.shape:
        raise ValueError(f"positions must have the shape of ids {ids.shape}, got {positions.shape}")
    if positions.size and (positions.min() < 0 or positions.max() >= wpe.shape[0]):
        raise ValueError(f"positions must lie in [0, {wpe.shape[0]}) (the context), "
                         f"got [{int(positions.min())}, {int(positions.max())}]")
    out = wte[ids] + wpe[positions]                     # (B, T, C) + (B, T, C)
    return out, (ids, wte.shape, wpe.shape, positions)


def backward(dout: np.ndarray, cache, *, dwte: np.ndarray | None = None,
             dwpe: np.ndarray | None = None):
    """dout: (B, T, C) -> dwte: (V, C), dwpe: (P, C); see :func:`backward_reference`.

    If ``dwte`` / ``dwpe`` are given the gradients are *added* into them (in
    place) and they are returned; otherwise new arrays are returned.
    """
    ids, wte_shape, wpe_shape, pos0 = cache
    arrays = [a for a in (dout, dwte, dwpe) if a is not None]
    if isinstance(pos0, np.ndarray):                  # per-row positions: the reference scatter-add
        return backward_reference(dout, cache, dwte=dwte, dwpe=dwpe)
    if backend.fused(*arrays) and all(a.flags.c_contiguous and a.flags.writeable
                                      for a in (dwte, dwpe) if a is not None):
        dwte = np.zeros(wte_shape, np.float32) if dwte is None else dwte
        dwpe = np.zeros(wpe_shape, np.float32) if dwpe is None else dwpe
        backend.embedding_backward(dout, ids, dwte, dwpe, pos0)
        return dwte, dwpe
    return backward_reference(dout, cache, dwte=dwte, dwpe=dwpe)


def backward_reference(dout: np.ndarray, cache, *, dwte: np.ndarray | None = None,
                       dwpe: np.ndarray | None = None):
    """dout: (B, T, C) -> dwte: (V, C), dwpe: (P, C).

    Forward line: ``out = wte[ids] + wpe[pos0:pos0+T]``.

    * ``∂out[b,t]/∂wte[v] = I`` when ``ids[b,t] = v``, so
      ``dwte[v] = Σ_{b,t: ids[b,t]=v} dout[b,t]`` — a scatter-add.
    * ``wpe[pos0+t]`` is added to every batch row, so ``dwpe[pos0+t] = Σ_b dout[b,t]``.
    * with per-row ``positions`` the position lookup is a scatter-add like ``wte``'s:
      ``dwpe[p] = Σ_{b,t: positions[b,t]=p} dout[b,t]``.
    """
    ids, wte_shape, wpe_shape, pos0 = cache
    C = dout.shape[-1]
    dwte = np.zeros(wte_shape, dtype=dout.dtype) if dwte is None else dwte
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, C))     # repeated ids accumulate
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype) if dwpe is None else dwpe
    if isinstance(pos0, np.ndarray):                          # per-row positions (B, T)
        np.add.at(dwpe, pos0.reshape(-1), dout.reshape(-1, C))
    else:
        dwpe[pos0:pos0 + ids.shape[1]] += dout.sum(axis=0)    # (T, C)
    return dwte, dwpe
