"""Softmax over the last axis.

    y_i = exp(x_i − m) / Σ_j exp(x_j − m),    m = max_j x_j

Subtracting the row maximum ``m`` changes nothing mathematically (it cancels
between numerator and denominator) but keeps ``exp`` from overflowing.
Masked entries are ``−inf`` and get probability exactly 0. A row that is
*entirely* masked has no valid distribution; we define its output as all
zeros (and its gradient as zeros), never NaN — the compiled kernel follows
the same rule.
"""

from __future__ import annotations

import numpy as np

from numformer import backend


def softmax_reference(x: np.ndarray) -> np.ndarray:
    """The specification. x: (..., N) -> y: (..., N), rows sum to 1 (or 0 if fully masked)."""
    m = np.max(x, axis=-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,), x.dtype)
    m = np.where(np.isneginf(m), 0, m)                # fully masked row: avoid (−inf) − (−inf) = NaN
    e = np.exp(x - m)                                 # (..., N), each in [0, 1]
    s = np.sum(e, axis=-1, keepdims=True)             # (..., 1), ≥ 1 unless the row is fully masked
    return e / np.where(s == 0, 1, s)


def softmax_backward_reference(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = y ⊙ (dy − Σ_j dy_j y_j)   (see :func:`backward`)."""
    return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))


def forward(x: np.ndarray):
    """x: (..., N) -> y: (..., N), cache = y (the backward needs only the output)."""
    y = backend.softmax(x)
    return y, y


def backward(dy: np.ndarray, cache) -> np.ndarray:
    """Gradient of the softmax.

    Forward: ``y_i = exp(x_i) / Σ_j exp(x_j)``. Its Jacobian is

        ∂y_i/∂x_k = y_i (δ_ik − y_k)

    so, with upstream gradient ``dy``,

        dx_k = Σ_i dy_i ∂y_i/∂x_k = y_k dy_k − y_k Σ_i dy_i y_i
             = y_k (dy_k − ⟨dy, y⟩).

    One reduction per row; no N×N Jacobian is ever formed. Masked entries
    have y_k = 0 and therefore dx_k = 0.
    """
    y = cache
    return backend.softmax_backward(dy, y)
