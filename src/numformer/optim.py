"""Optimizers, learning-rate schedule and gradient clipping on flat buffers.

A numformer model keeps every parameter in one flat 1-D float buffer
(``params``, shape ``(P,)``) with named views into it, and its gradients in
a buffer of the same layout (``grads``, shape ``(P,)``). The optimizers here
therefore see just two arrays and update ``params`` *in place*, so the
model's named views stay valid. Per-parameter choices such as "no weight
decay on biases, LayerNorm and embeddings" arrive as a flat ``decay_mask``
of shape ``(P,)``: 1.0 where decay applies, 0.0 where it does not.

The update runs every training step over the whole model, so it is written
with in-place NumPy ufuncs (``out=``) into one preallocated scratch buffer:
no temporaries of size P are allocated per step. Optimizer state has the
dtype of ``params`` (a float32 model has float32 moments).

On the cpu backend, float32 buffers are updated by ``numformer._cpu`` in one
pass (``adamw_step`` / ``sgd_step``) instead of a dozen NumPy passes. The
kernels perform exactly the float32 operations written below, in the same
order, so the two paths give bitwise-identical parameters and state: a run
may be resumed on either backend.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from numformer import backend

__all__ = ["AdamW", "SGD", "cosine_schedule", "clip_grad_norm"]


# --------------------------------------------------------------------------
# shared validation
# --------------------------------------------------------------------------


def _check_params(params: Any) -> np.ndarray:
    if not isinstance(params, np.ndarray) or params.dtype not in (np.float32, np.float64):
        got = params.dtype if isinstance(params, np.ndarray) else type(params).__name__
        raise TypeError(f"params must be a float32 or float64 numpy array, got {got}")
    if not params.flags.writeable:
        raise ValueError("params must be writable: the optimizer updates it in place")
    return params


def _check_like(name: str, arr: Any, params: np.ndarray) -> np.ndarray:
    """``arr`` must match ``params`` in shape and dtype (no silent casts)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.shape != params.shape:
        raise ValueError(f"{name} has shape {arr.shape}, params have shape {params.shape}")
    if arr.dtype != params.dtype:
        raise ValueError(f"{name} has dtype {arr.dtype}, params have dtype {params.dtype}")
    return arr


def _use_kernel(*arrays: np.ndarray | None) -> bool:
    """The compiled update runs for contiguous float32 buffers on the cpu backend."""
    present = [a for a in arrays if a is not None]
    return backend.fused(*present) and all(a.flags.c_contiguous for a in present)


def _mask(decay_mask: Any, params: np.ndarray) -> np.ndarray | None:
    """Copy the decay mask into params' dtype (None = decay everywhere)."""
    if decay_mask is None:
        return None
    m = np.asarray(decay_mask)
    if m.shape != params.shape:
        raise ValueError(f"decay_mask has shape {m.shape}, params have shape {params.shape}")
    return m.astype(params.dtype, copy=True)


def _scalar(state: Mapping[str, Any], key: str, kind: type) -> Any:
    """Read a scalar from a state dict; 0-d / size-1 arrays are accepted
    because checkpoints may store scalars as arrays."""
    if key not in state:
        raise ValueError(f"optimizer state is missing {key!r}")
    v = state[key]
    if isinstance(v, np.ndarray):
        if v.size != 1:
            raise ValueError(f"optimizer state {key!r} must be a scalar, got an array of shape {v.shape}")
        v = v.reshape(()).item()
    if isinstance(v, (str, bytes)) or not isinstance(v, (int, float, np.number)):
        raise ValueError(f"optimizer state {key!r} must be a number, got {type(v).__name__}")
    if kind is int:
        if isinstance(v, bool) or not float(v).is_integer():
            raise ValueError(f"optimizer state {key!r} must be an integer, got {v!r}")
        return int(v)
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"optimizer state {key!r} must be finite, got {v!r}")
    return v


def _load_buffer(state: Mapping[str, Any], key: str, dest: np.ndarray) -> None:
    """Copy ``state[key]`` into ``dest`` after checking shape and dtype."""
    if key not in state:
        raise ValueError(f"optimizer state is missing {key!r}")
    src = np.asarray(state[key])
    if src.shape != dest.shape:
        raise ValueError(f"optimizer state {key!r} has shape {src.shape}, params have shape {dest.shape}")
    # A float64 state loaded into a float32 model (or vice versa) would not
    # reproduce the original run bit for bit; refuse rather than round.
    if src.dtype != dest.dtype:
        raise ValueError(f"optimizer state {key!r} has dtype {src.dtype}, params have dtype {dest.dtype}")
    np.copyto(dest, src)


# --------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------


class AdamW:
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots`, learning rate
    :math:`\eta`, decay :math:`\lambda` and mask :math:`k` (1 = decay):

    .. math::

        p &\leftarrow p - \eta \lambda\, k \odot p            && \text{(decoupled decay, before the Adam step)}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t              \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2            \\
        \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t) \\
        p &\leftarrow p - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

    This is the same order and arithmetic as ``torch.optim.AdamW``, so the
    two agree to rounding. Decay is *decoupled*: it shrinks weights directly
    instead of adding :math:`\lambda p` to the gradient (which Adam would
    then rescale per coordinate).

    Parameters
    ----------
    params : (P,) float32/float64 array, updated in place by :meth:`step`.
    lr : default learning rate :math:`\eta` (``step(lr=...)`` overrides it,
        which is how schedules are applied).
    betas : :math:`(\beta_1, \beta_2)`.
    eps : :math:`\epsilon`, added to :math:`\sqrt{\hat v}` (not under the root).
    weight_decay : :math:`\lambda`.
    decay_mask : (P,) array of 1.0/0.0, or None to decay every parameter.
    """

    def __init__(
        self,
        params: np.ndarray,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_mask: np.ndarray | None = None,
    ) -> None:
        self.params = _check_params(params)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        self.lr, self.beta1, self.beta2 = float(lr), float(b1), float(b2)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decay_mask = _mask(decay_mask, params)
        self.t = 0                          # number of steps taken
        self.m = np.zeros_like(params)      # (P,) first moment
        self.v = np.zeros_like(params)      # (P,) second moment
        self._tmp = np.empty_like(params)   # (P,) scratch, reused every step

    def step(self, grads: np.ndarray, lr: float | None = None) -> None:
        """Apply one AdamW update to ``params`` in place.

        ``grads``: (P,) same dtype as params; not modified. ``lr`` overrides
        the default learning rate for this step only.
        """
        g = _check_like("grads", grads, self.params)
        p, m, v, tmp = self.params, self.m, self.v, self._tmp
        lr = self.lr if lr is None else float(lr)
        self.t += 1

        if _use_kernel(p, g, m, v, self.decay_mask):
            # The lines below, fused into one pass (bitwise the same result).
            backend.adamw_step(p, g, m, v, self.decay_mask, lr=lr, beta1=self.beta1,
                               beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                               step=self.t)
            return

        # p -= lr * wd * mask * p   (decoupled decay, on the pre-update p)
        if self.weight_decay != 0.0 and lr != 0.0:
            if self.decay_mask is None:
                np.multiply(p, 1.0 - lr * self.weight_decay, out=p)
            else:
                np.multiply(self.decay_mask, lr * self.weight_decay, out=tmp)
                np.multiply(tmp, p, out=tmp)
                np.subtract(p, tmp, out=p)

        # m = b1 m + (1-b1) g, written as m += (1-b1)(g - m): one scratch op
        # fewer, and the same rounding as torch's lerp.
        np.subtract(g, m, out=tmp)
        np.multiply(tmp, 1.0 - self.beta1, out=tmp)
        np.add(m, tmp, out=m)

        # v = b2 v + (1-b2) g^2
        np.multiply(v, self.beta2, out=v)
        np.multiply(g, g, out=tmp)
        np.multiply(tmp, 1.0 - self.beta2, out=tmp)
        np.add(v, tmp, out=v)

        # p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        # Bias correction folded into scalars: m_hat = m/bc1, sqrt(v_hat) = sqrt(v)/sqrt(bc2).
        bc1 = 1.0 - self.beta1**self.t
        bc2_sqrt = math.sqrt(1.0 - self.beta2**self.t)
        np.sqrt(v, out=tmp)
        np.divide(tmp, bc2_sqrt, out=tmp)
        np.add(tmp, self.eps, out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, -lr / bc1, out=tmp)
        np.add(p, tmp, out=p)

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Copies of the moments plus the step count and hyperparameters.

        Keys: ``m``, ``v`` ((P,) arrays), ``step`` (int), ``lr``, ``beta1``,
        ``beta2``, ``eps``, ``weight_decay`` (floats). The decay mask is not
        included: it is a function of the model, rebuilt with it.
        """
        return {
            "m": self.m.copy(),
            "v": self.v.copy(),
            "step": self.t,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ValueError naming any mismatch.

        Validates everything before changing anything, so a bad state leaves
        the optimizer as it was.
        """
        step = _scalar(state, "step", int)
        if step < 0:
            raise ValueError(f"optimizer state 'step' must be >= 0, got {step}")
        hp = {k: _scalar(state, k, float) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}
        if not (0.0 <= hp["beta1"] < 1.0 and 0.0 <= hp["beta2"] < 1.0):
            raise ValueError(f"optimizer state betas must lie in [0, 1), got {hp['beta1']}, {hp['beta2']}")
        m, v = self.m.copy(), self.v.copy()
        _load_buffer(state, "m", m)
        _load_buffer(state, "v", v)
        self.m[...], self.v[...] = m, v
        self.t = step
        self.lr, self.beta1, self.beta2 = hp["lr"], hp["beta1"], hp["beta2"]
        self.eps, self.weight_decay = hp["eps"], hp["weight_decay"]


# --------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------


class SGD:
    r"""Stochastic gradient descent with optional (Nesterov) momentum.

    With learning rate :math:`\eta`, momentum :math:`\mu`, L2 coefficient
    :math:`\lambda` and mask :math:`k`:

    .. math::

        d &= g + \lambda\, k \odot p                 && \text{(coupled L2: decay enters the gradient)}\\
        b &\leftarrow \mu b + d                        && \text{(if } \mu > 0\text{; } b_0 = 0)\\
        u &= d + \mu b \ \text{(Nesterov)}, \quad u = b \ \text{(classical)}, \quad u = d \ (\mu = 0)\\
        p &\leftarrow p - \eta\, u

    This matches ``torch.optim.SGD`` with ``dampening=0`` (not offered here).
    Unlike :class:`AdamW`, weight decay here is the classical *coupled* L2
    penalty: it is part of the gradient and so is accumulated by momentum.

    Parameters
    ----------
    params : (P,) float32/float64 array, updated in place.
    lr, momentum, nesterov, weight_decay, decay_mask : as above;
        ``decay_mask`` None decays every parameter.
    """

    def __init__(
        self,
        params: np.ndarray,
        lr: float = 1e-2,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decay_mask: np.ndarray | None = None,
    ) -> None:
        self.params = _check_params(params)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.decay_mask = _mask(decay_mask, params)
        self.t = 0
        # The momentum buffer costs P floats; only allocate it when used.
        self.buf = np.zeros_like(params) if self.momentum else None  # (P,)
        self._tmp = np.empty_like(params)                            # (P,) scratch

    def step(self, grads: np.ndarray, lr: float | None = None) -> None:
        """Apply one SGD update to ``params`` in place (``grads`` unchanged)."""
        g = _check_like("grads", grads, self.params)
        p, tmp, buf = self.params, self._tmp, self.buf
        lr = self.lr if lr is None else float(lr)
        self.t += 1

        if _use_kernel(p, g, buf, self.decay_mask):
            # The lines below, fused into one pass (bitwise the same result).
            backend.sgd_step(p, g, buf, self.decay_mask, lr=lr, momentum=self.momentum,
                             nesterov=self.nesterov, weight_decay=self.weight_decay)
            return

        # d = g + wd * mask * p   (in tmp; never modify the caller's grads)
        if self.weight_decay != 0.0:
            if self.decay_mask is None:
                np.multiply(p, self.weight_decay, out=tmp)
            else:
                np.multiply(self.decay_mask, self.weight_decay, out=tmp)
                np.multiply(tmp, p, out=tmp)
            np.add(tmp, g, out=tmp)
        else:
            np.copyto(tmp, g)

        if buf is not None:
            # b = mu b + d
            np.multiply(buf, self.momentum, out=buf)
            np.add(buf, tmp, out=buf)
            if self.nesterov:
                # p -= lr * (d + mu b), applied as two in-place subtractions
                np.multiply(tmp, -lr, out=tmp)
                np.add(p, tmp, out=p)
                np.multiply(buf, -lr * self.momentum, out=tmp)
                np.add(p, tmp, out=p)
                return
            np.copyto(tmp, buf)

        # p -= lr * u
        np.multiply(tmp, -lr, out=tmp)
        np.add(p, tmp, out=p)

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """``step``, hyperparameters, and ``momentum_buffer`` when momentum > 0.

        ``nesterov`` is stored as 0/1 so every value is an array or a number.
        """
        state: dict[str, np.ndarray | int | float] = {
            "step": self.t,
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": int(self.nesterov),
            "weight_decay": self.weight_decay,
        }
        if self.buf is not None:
            state["momentum_buffer"] = self.buf.copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ValueError naming any mismatch."""
        step = _scalar(state, "step", int)
        if step < 0:
            raise ValueError(f"optimizer state 'step' must be >= 0, got {step}")
        lr = _scalar(state, "lr", float)
        momentum = _scalar(state, "momentum", float)
        nesterov = bool(_scalar(state, "nesterov", int))
        wd = _scalar(state, "weight_decay", float)
        if (momentum != 0) != (self.buf is not None):
            # Switching momentum on/off changes which buffers exist; a resume
            # must use the optimizer configuration it was saved with.
            raise ValueError(
                f"optimizer state has momentum={momentum}, this SGD has momentum={self.momentum}; "
                "create the SGD with the saved configuration"
            )
        buf = None
        if momentum != 0:
            buf = self.buf.copy()
            _load_buffer(state, "momentum_buffer", buf)
        self.t, self.lr, self.momentum, self.nesterov, self.weight_decay = step, lr, momentum, nesterov, wd
        if buf is not None:
            self.buf[...] = buf


# --------------------------------------------------------------------------
# schedule and clipping
# --------------------------------------------------------------------------


def cosine_schedule(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    r"""Linear warmup, then cosine decay to ``min_lr``; ``step`` counts from 0.

    .. math::

        \eta(s) = \begin{cases}
            \eta_{max} \, \dfrac{s + 1}{W}                                  & s < W \\[4pt]
            \eta_{min} + \tfrac12 (\eta_{max} - \eta_{min}) (1 + \cos \pi \tfrac{s - W}{T - W}) & W \le s < T \\[4pt]
            \eta_{min}                                                      & s \ge T
        \end{cases}

    with :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``. The
    ``+1`` makes the first step (s = 0) train with a small non-zero rate
    ``max_lr / W`` instead of wasting a step at lr = 0; the last warmup step
    (s = W-1) and the first decay step (s = W) both use ``max_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    if max_lr < 0 or min_lr < 0:
        raise ValueError(f"learning rates must be >= 0, got max_lr={max_lr}, min_lr={min_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# Elements per float64 chunk in the norm: bounds the temporary to 8 MiB
# instead of a float64 copy of the whole (possibly 100M+) gradient buffer.
_NORM_CHUNK = 1 << 20


def _global_norm(flat: np.ndarray) -> float:
    """sqrt(sum(g^2)) accumulated in float64, chunk by chunk."""
    total = 0.0
    with np.errstate(over="ignore"):  # overflow is handled just below
        for i in range(0, flat.size, _NORM_CHUNK):
            c = flat[i : i + _NORM_CHUNK].astype(np.float64)
            total += float(np.dot(c, c))
    norm = math.sqrt(total)
    if math.isinf(norm) and np.isfinite(flat).all():
        # Finite float64 grads whose squares overflow: rescale by max|g|.
        scale = float(np.max(np.abs(flat)))
        total = 0.0
        for i in range(0, flat.size, _NORM_CHUNK):
            c = flat[i : i + _NORM_CHUNK].astype(np.float64) / scale
            total += float(np.dot(c, c))
        norm = scale * math.sqrt(total)
    return norm


def clip_grad_norm(grads: np.ndarray, max_norm: float) -> float:
    r"""Scale ``grads`` in place so its global L2 norm is at most ``max_norm``.

    .. math::

        n = \lVert g \rVert_2 = \sqrt{\textstyle\sum_i g_i^2}, \qquad
        g \leftarrow g \cdot \min(1, \; \text{max\_norm} / n)

    ``n`` is accumulated in float64 whatever the dtype of ``grads``.
    Returns the norm *before* clipping (log it: spikes flag instabilities).
    If ``n`` is NaN or inf the gradients are left untouched, so the caller
    can see the non-finite norm and skip the step.
    """
    if not isinstance(grads, np.ndarray) or grads.dtype.kind != "f":
        raise TypeError(f"grads must be a floating-point numpy array, got {getattr(grads, 'dtype', type(grads))}")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    flat = grads.reshape(-1)  # a view for contiguous grads
    norm = _global_norm(flat)
    if math.isfinite(norm) and norm > max_norm:
        np.multiply(grads, max_norm / norm, out=grads)
    return norm
