"""Layer normalization over the last axis.

    μ = mean(x),  σ² = mean((x − μ)²),  r = 1/√(σ² + ε)
    x̂ = (x − μ) · r
    out = γ ⊙ x̂ + β

``forward_reference`` / ``backward_reference`` are the specification. On the
cpu backend, float32 inputs run ``numformer._cpu``'s fused kernel instead
(one pass per row; its cache keeps x, μ and r and the backward recomputes x̂).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numformer import backend


class _FusedCache(NamedTuple):
    """Cache of the compiled forward: input, per-row mean and 1/std, γ."""
    x: np.ndarray        # (..., C) float32, contiguous
    mean: np.ndarray     # (...)
    rstd: np.ndarray     # (...)
    gamma: np.ndarray    # (C,)


def forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """x: (..., C), gamma: (C,), beta: (C,) -> out: (..., C), cache."""
    if backend.fused(x, gamma, beta) and x.ndim >= 1:
        xc = np.ascontiguousarray(x)
        gc = np.ascontiguousarray(gamma)
        out, mean, rstd = backend.layernorm_forward(xc, gc, beta, eps)
        return out, _FusedCache(xc, mean, rstd, gc)
    return forward_reference(x, gamma, beta, eps)


def backward(dout: np.ndarray, cache):
    """dout: (..., C) -> dx (..., C), dgamma (C,), dbeta (C,); see :func:`backward_reference`."""
    if isinstance(cache, _FusedCache):
        return backend.layernorm_backward(dout, *cache)
    return backward_reference(dout, cache)


def forward_reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """x: (..., C), gamma: (C,), beta: (C,) -> out: (..., C), cache (x̂, r, γ)."""
    mu = x.mean(axis=-1, keepdims=True)                      # (..., 1)
    xc = x - mu                                              # (..., C)
    var = np.mean(xc * xc, axis=-1, keepdims=True)           # (..., 1) biased variance, as PyTorch
    rstd = 1.0 / np.sqrt(var + eps)                          # (..., 1)
    xhat = xc * rstd                                         # (..., C)
    out = xhat * gamma + beta
    return out, (xhat, rstd, gamma)


def backward_reference(dout: np.ndarray, cache):
    """dout: (..., C) -> dx (..., C), dgamma (C,), dbeta (C,).

    Forward lines: ``x̂ = (x − μ) r`` and ``out = γ x̂ + β``.

    ``dβ = Σ dout`` and ``dγ = Σ dout ⊙ x̂`` (sums over all leading axes).
    Let ``g = γ ⊙ dout`` be the gradient reaching x̂. Since μ and r depend on
    every x_j of the row, with ``∂μ/∂x_j = 1/C`` and ``∂r/∂x_j = −r³ (x_j − μ)/C``:

        dx_j = r (g_j − mean(g) − x̂_j · mean(g ⊙ x̂))

    (the two means are the two paths through μ and through σ²).
    """
    xhat, rstd, gamma = cache
    lead = tuple(range(dout.ndim - 1))
    dbeta = dout.sum(axis=lead)                              # (C,)
    dgamma = (dout * xhat).sum(axis=lead)                    # (C,)
    g = dout * gamma                                         # (..., C)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dgamma, dbeta
