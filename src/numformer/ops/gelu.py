"""GELU, the Gaussian error linear unit: ``gelu(x) = x Φ(x)``.

Two forms are in use:

* ``approximate="tanh"`` (GPT-2):  ``0.5 x (1 + tanh(k (x + 0.044715 x³)))``, ``k = √(2/π)``
* ``approximate="none"`` (BERT):  ``0.5 x (1 + erf(x/√2))`` — the exact Φ.

``forward_reference`` / ``backward_reference`` are the specification. On the
cpu backend the float32 tanh form runs ``numformer._cpu``'s fused kernel,
which computes ``½(1 + tanh u)`` as the logistic ``σ(2u) = 1/(1 + e^{−2u})``
(the same function, without the cancellation of ``1 + tanh u`` near −1),
caches only ``x`` and recomputes ``e^{−2u}`` in the backward. The exact (erf)
form stays on NumPy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from numformer import backend

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715
_erf = np.frompyfunc(math.erf, 1, 1)   # exact erf; NumPy has none. Slow-ish, used by encoders only.


_scipy_erf = None


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise error function in the dtype of ``x``.

    Uses ``scipy.special.erf`` (vectorized, accurate to a few ulp) when SciPy is
    installed — ~10x faster, which matters for BERT-sized MLPs — else
    ``math.erf`` element by element.
    """
    global _scipy_erf
    if not x.size:
        return np.zeros_like(x)
    if _scipy_erf is None:
        try:
            from scipy.special import erf as fast
        except ImportError:            # SciPy is optional
            fast = False
        _scipy_erf = fast
    if _scipy_erf:
        return _scipy_erf(x).astype(x.dtype, copy=False)
    return _erf(x).astype(x.dtype)


class _FusedCache(NamedTuple):
    """Cache of the compiled tanh-form forward: just its (contiguous) input."""
    x: np.ndarray


def forward(x: np.ndarray, approximate: str = "tanh"):
    """x: (...) -> out: (...), cache."""
    if approximate == "tanh" and backend.fused(x):
        xc = np.ascontiguousarray(x)
        return backend.gelu_tanh_forward(xc), _FusedCache(xc)
    return forward_reference(x, approximate)


def backward(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (...) -> dx: (...); see :func:`backward_reference`."""
    if isinstance(cache, _FusedCache):
        return backend.gelu_tanh_backward(dout, cache.x)
    return backward_reference(dout, cache)


def forward_reference(x: np.ndarray, approximate: str = "tanh"):
    """x: (...) -> out: (...), cache."""
    if approximate == "tanh":
        u = _K * (x + _A * (x * x * x))   # x*x*x, not x**3: NumPy's float pow is ~100x slower
        t = np.tanh(u)
        return 0.5 * x * (1.0 + t), (x, t, approximate)
    if approximate == "none":
        phi_cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        return x * phi_cdf, (x, phi_cdf, approximate)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def backward_reference(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (...) -> dx: (...).

    tanh form, forward line ``out = ½ x (1 + tanh u)``, ``u = k (x + a x³)``:

        d out/dx = ½ (1 + tanh u) + ½ x (1 − tanh² u) · k (1 + 3a x²)

    exact form, forward line ``out = x Φ(x)``:

        d out/dx = Φ(x) + x φ(x),   φ(x) = exp(−x²/2)/√(2π)
    """
    x, saved, approximate = cache
    if approximate == "tanh":
        t = saved
        # local = ½(1 + t) + ½ x (1 − t²) k (1 + 3a x²), evaluated in place: this runs on
        # (B, T, 4C) arrays, and each temporary costs a full pass over memory.
        local = t * t
        np.subtract(1.0, local, out=local)                   # 1 − t²
        local *= x
        local *= 0.5 * _K                                    # ½ k x (1 − t²)
        poly = x * x
        poly *= 3.0 * _A
        poly += 1.0                                          # 1 + 3a x²
        local *= poly
        np.add(t, 1.0, out=poly)
        poly *= 0.5                                          # ½ (1 + t)
        local += poly
    else:
        phi_cdf = saved
        local = phi_cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dout * local
