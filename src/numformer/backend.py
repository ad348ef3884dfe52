"""One place that decides who runs the hot operations.

The NumPy functions in :mod:`numformer.ops` are the specification. The
compiled extension ``numformer._cpu`` implements the same hot operations
(matmul, softmax forward/backward, flash attention forward/backward); this module routes each call to the
selected implementation.

Selection, in order of precedence:

1. ``with numformer.backend.use("numpy"):`` — a context manager (thread-local),
2. the environment variable ``NUMFORMER_BACKEND=numpy|cpu|cuda``,
3. the default: ``cpu`` when the extension imports, else ``numpy``.

A missing or broken extension never raises for the user: we fall back to
NumPy and warn once. Asking *explicitly* for ``cpu`` or ``cuda`` when it is
unavailable is an error, because the user asked for something we cannot give.

``cuda`` (opt-in, never the default): matmul, softmax and attention on
float32 arrays run on the GPU through ``numformer._cuda`` — each call copies
its NumPy inputs to the device and the result back, so it pays off for large
operations; code that keeps data on the device uses ``numformer._cuda``'s
``DeviceArray`` directly (as :class:`numformer.cuda_model.DeviceGPT2` does
for a whole GPT-2 forward). Everything else (float64, the fused LayerNorm/GELU/…
kernels) runs on ``numformer._cpu`` when it is available, else NumPy.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import numpy as np

from .intargs import int_array, int_scalar

BACKENDS = ("numpy", "cpu", "cuda")

_state = threading.local()
_cpu_module = None
_cpu_error: str | None = None
_cpu_probed = False
_warned = False
_cuda_module = None
_cuda_error: str | None = None
_cuda_probed = False


def _load_cpu():
    """Import ``numformer._cpu`` once; remember why it failed if it did."""
    global _cpu_module, _cpu_error, _cpu_probed
    if not _cpu_probed:
        _cpu_probed = True
        try:
            from numformer import _cpu  # type: ignore[attr-defined]

            _cpu_module = _cpu
        except Exception as exc:  # ImportError, or a broken shared object
            _cpu_error = f"{type(exc).__name__}: {exc}"
    return _cpu_module


def cpu_available() -> bool:
    """True when the compiled extension ``numformer._cpu`` imports."""
    return _load_cpu() is not None


def _load_cuda():
    """Import ``numformer._cuda`` once and check for a device; remember why not."""
    global _cuda_module, _cuda_error, _cuda_probed
    if not _cuda_probed:
        _cuda_probed = True
        try:
            from numformer import _cuda  # type: ignore[attr-defined]
        except Exception as exc:
            _cuda_error = (f"numformer._cuda is not built ({type(exc).__name__}: {exc}); reinstall on a "
                           "machine with nvcc (pip install . -Ccmake.define.NUMFORMER_CUDA=ON)")
        else:
            if _cuda.device_count() > 0:
                _cuda_module = _cuda
            else:
                _cuda_error = "numformer._cuda is built but there is no CUDA device (no GPU or no driver)"
    return _cuda_module


def cuda_available() -> bool:
    """True when ``numformer._cuda`` imports and sees at least one GPU."""
    return _load_cuda() is not None


def _require(name: str) -> None:
    if name == "cpu" and not cpu_available():
        raise RuntimeError(
            f"backend 'cpu' was requested but numformer._cpu is unavailable ({_cpu_error}); "
            "reinstall with a C++17 compiler (pip install .) or use NUMFORMER_BACKEND=numpy"
        )
    if name == "cuda" and not cuda_available():
        raise RuntimeError(f"backend 'cuda' was requested but {_cuda_error}; "
                           "use NUMFORMER_BACKEND=cpu or numpy")


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_env_parsed: tuple = ("", None)   # (raw NUMFORMER_BACKEND, its validated name or None)


def _env_backend() -> str | None:
    """The backend named by ``NUMFORMER_BACKEND`` (None when unset or blank).

    Read on every call, so a change of the variable takes effect at once, but
    parsed only when its text changes: ``current()`` runs once per op, ~160
    times per generated token of GPT-2, and the parse was 5 % of a token.
    """
    global _env_parsed
    raw = os.environ.get("NUMFORMER_BACKEND", "")
    if raw != _env_parsed[0]:
        _env_parsed = (raw, _validate(raw) if raw.strip() else None)  # raises on a bad name: not cached
    return _env_parsed[1]


def current() -> str:
    """Name of the backend that the next op call will use."""
    global _warned
    explicit = getattr(_state, "name", None)
    if explicit is None:
        explicit = _env_backend()
    if explicit == "numpy":
        return "numpy"
    if _cpu_module is not None and explicit in (None, "cpu"):  # the common cases, without a call
        return "cpu"
    if explicit in ("cpu", "cuda"):
        _require(explicit)
        return explicit
    if cpu_available():
        return "cpu"
    if not _warned:
        _warned = True
        warnings.warn(
            f"numformer._cpu is unavailable ({_cpu_error}); running on NumPy alone",
            RuntimeWarning,
            stacklevel=3,
        )
    return "numpy"


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed block on backend ``name`` ("numpy", "cpu" or "cuda").

    >>> with use("numpy"):
    ...     y = matmul(a, b)
    """
    name = _validate(name)
    _require(name)
    previous = getattr(_state, "name", None)
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


@contextlib.contextmanager
def pinned():
    """Hold the backend that :func:`current` names now for the enclosed block.

    A model's forward or backward pass runs inside one, so that
    ``NUMFORMER_BACKEND`` is looked up once per pass instead of once per op
    (~160 ops per generated GPT-2 token, each lookup ~1 µs). Inside
    :func:`use` (or another ``pinned``) it changes nothing.
    """
    if getattr(_state, "name", None) is not None:
        yield
        return
    with use(current()):
        yield


def _cpu_kernels() -> bool:
    """The C++ kernels run: backend ``cpu``, or ``cuda`` for what has no CUDA kernel."""
    return current() in ("cpu", "cuda") and _cpu_module is not None


def _cuda_f32(*arrays) -> bool:
    """Backend ``cuda`` and every given array (None = absent) is float32."""
    return current() == "cuda" and all(a is None or (isinstance(a, np.ndarray) and a.dtype == np.float32)
                                       for a in arrays)


def _dev(x):
    """NumPy -> a new ``numformer._cuda.DeviceArray`` (host -> device copy)."""
    return None if x is None else _cuda_module.to_device(np.ascontiguousarray(x))


def _host(d) -> np.ndarray:
    """DeviceArray -> a new NumPy array (device -> host copy)."""
    return np.asarray(d)


# --------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------

def _as_kernel_operand(x: np.ndarray, trans: bool):
    """Return (array, trans) with a C-contiguous array for the kernel.

    A transposed view (``w.T``) is C-contiguous once transposed back, so we
    flip the flag instead of copying; anything else non-contiguous is copied.
    """
    if x.flags.c_contiguous:
        return x, trans
    if x.ndim >= 2:
        back = np.swapaxes(x, -1, -2)
        if back.flags.c_contiguous:
            return back, not trans
    return np.ascontiguousarray(x), trans


def matmul(a: np.ndarray, b: np.ndarray, trans_a: bool = False, trans_b: bool = False, *,
           bias: np.ndarray | None = None, out: np.ndarray | None = None,
           accumulate: bool = False) -> np.ndarray:
    """``op(a) @ op(b) (+ bias)`` where ``op`` optionally transposes the last two axes.

    a: (..., M, K) or (..., K, M) if trans_a
    b: (..., K, N) or (..., N, K) if trans_b
    bias: (N,) or None, added to every row
    out: (..., M, N) or None. With ``accumulate=True`` the product is *added*
    into ``out`` (gradient accumulation without a temporary), else written.
    Returns the result (``out`` itself when given).
    The three forms the backward pass needs are A·B, A·Bᵀ and Aᵀ·B.
    """
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True needs an out array")
    if _cuda_f32(a, b, bias, out) and a.ndim in (2, 3) and a.ndim == b.ndim:
        a2, ta = _as_kernel_operand(a, trans_a)
        b2, tb = _as_kernel_operand(b, trans_b)
        d_out = _dev(out) if accumulate else None
        r = _host(_cuda_module.matmul(_dev(a2), _dev(b2), ta, tb, bias=_dev(bias), out=d_out,
                                      accumulate=accumulate))
        if out is None:
            return r
        out[...] = r
        return out
    if _use_cpu_matmul(a, b, out):
        a2, ta = _as_kernel_operand(a, trans_a)
        b2, tb = _as_kernel_operand(b, trans_b)
        return _cpu_module.matmul(a2, b2, ta, tb, bias=bias, out=out, accumulate=accumulate)
    a_op = np.swapaxes(a, -1, -2) if trans_a else a
    b_op = np.swapaxes(b, -1, -2) if trans_b else b
    result = np.matmul(a_op, b_op)
    if bias is not None:
        result += bias
    if out is None:
        return result
    if accumulate:
        out += result
    else:
        out[...] = result
    return out


def _use_cpu_matmul(a, b, out) -> bool:
    """The kernel takes 2-D or 3-D operands of one float dtype (and a contiguous out)."""
    return (_cpu_kernels() and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
            and a.ndim in (2, 3) and a.ndim == b.ndim
            and (out is None or (out.dtype == a.dtype and out.flags.c_contiguous)))


def matmul_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray,
                bias: np.ndarray | None = None) -> np.ndarray:
    """``(x @ float(q)) ⊙ scale + bias``: a linear layer with int8 weights.

    x: (M, K) float32, q: (K, N) int8 or its packed layout
    (``ops.linear.pack_int8(q)``, (⌈N/64⌉, K, 64)), scale: (N,) float32 (one
    per output column), bias: (N,) float32 or None -> (M, N) float32.
    On ``cpu`` this is the ``_cpu.matmul_int8`` kernel (non-contiguous x is
    copied first), which reads either layout (the packed one streams
    sequentially: the fast one at few rows); on ``numpy`` it is
    :func:`numformer.ops.linear.int8_matmul_reference`, which also takes both.
    """
    if current() == "cpu" and hasattr(_cpu_module, "matmul_int8") and x.ndim == 2 \
            and (q.ndim == 2 or hasattr(_cpu_module, "int8_pack_cols")):
        b = None if bias is None else _f32(bias)
        return _cpu_module.matmul_int8(_f32(x), np.ascontiguousarray(q), _f32(scale), bias=b)
    from numformer.ops import linear as linear_op

    return linear_op.int8_matmul_reference(x, q, scale, bias)


# --------------------------------------------------------------------------
# softmax over the last axis
# --------------------------------------------------------------------------

def _masked_logits(x, scale, mask, causal):
    """NumPy definition of the logits ``scale·x + mask`` with causal positions at −inf."""
    z = x * x.dtype.type(scale) if scale != 1.0 else x
    if mask is not None:
        z = z + mask
    if causal:
        tq, tk = x.shape[-2], x.shape[-1]
        visible = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)  # (Tq, Tk)
        z = np.where(visible, z, -np.inf).astype(x.dtype, copy=False)
    return z


def softmax(x: np.ndarray, scale: float = 1.0, mask: np.ndarray | None = None,
            causal: bool = False) -> np.ndarray:
    """``softmax(scale·x + mask)`` over the last axis.

    mask: optional additive mask broadcasting against ``x`` (its last axis equal
    to x's), e.g. (Tq, Tk) or (B, 1, 1, Tk). causal: ``x`` is (..., Tq, Tk) and
    query i sees keys j ≤ i + Tk − Tq only. ``-inf`` entries get probability 0
    and a row that is entirely ``-inf`` gives all zeros (not NaN).
    """
    if _cuda_f32(x, mask) and x.ndim >= 1 and (mask is None or 1 <= mask.ndim <= x.ndim) \
            and (not causal or x.ndim >= 2):
        return _host(_cuda_module.softmax_forward(_dev(x), scale=scale, mask=_dev(mask), causal=causal))
    if _cpu_kernels() and x.dtype in (np.float32, np.float64) and x.ndim >= 1 \
            and (mask is None or (mask.dtype == x.dtype and 1 <= mask.ndim <= x.ndim)) \
            and (not causal or x.ndim >= 2):
        m = None if mask is None else np.ascontiguousarray(mask)
        return _cpu_module.softmax_forward(np.ascontiguousarray(x), scale=scale, mask=m, causal=causal)
    from numformer.ops import softmax as softmax_op

    if scale == 1.0 and mask is None and not causal:
        return softmax_op.softmax_reference(x)
    return softmax_op.softmax_reference(_masked_logits(x, scale, mask, causal))


def softmax_backward(dy: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``dx = scale · y ⊙ (dy − Σ_j dy_j y_j)`` over the last axis: the gradient
    of ``softmax(scale·x + mask)`` with respect to ``x`` (``y`` is its output)."""
    if _cuda_f32(dy, y) and dy.shape == y.shape and y.ndim >= 1:
        return _host(_cuda_module.softmax_backward(_dev(dy), _dev(y), scale=scale))
    if _cpu_kernels() and dy.dtype == y.dtype and y.dtype in (np.float32, np.float64) \
            and dy.shape == y.shape:
        return _cpu_module.softmax_backward(np.ascontiguousarray(dy), np.ascontiguousarray(y), scale=scale)
    from numformer.ops import softmax as softmax_op

    dx = softmax_op.softmax_backward_reference(dy, y)
    return dx if scale == 1.0 else dx * y.dtype.type(scale)


# --------------------------------------------------------------------------
# fused non-GEMM ops: LayerNorm, GELU, cross-entropy, embedding, optimizers
# --------------------------------------------------------------------------
# These kernels are float32 only. The ops modules ask ``fused(...)`` first and
# call the NumPy reference when it says no (numpy backend, float64, an older
# extension without the kernels). The wrappers below make inputs contiguous
# and of the kernels' dtypes; they do no other work.

def fused(*arrays: np.ndarray) -> bool:
    """True when the fused float32 kernels of ``numformer._cpu`` should run:
    the cpu backend is active, the extension has them, and every array is float32."""
    if not _cpu_kernels() or not hasattr(_cpu_module, "layernorm_forward"):
        return False
    return all(a.dtype == np.float32 for a in arrays)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _i64(a, fn: str, name: str) -> np.ndarray:
    """A C-contiguous int64 copy (or view) of the integer array ``a`` (TypeError for floats)."""
    return np.ascontiguousarray(int_array(a, fn, name), dtype=np.int64)


def layernorm_forward(x, gamma, beta, eps: float):
    """-> out (..., C), mean (...), rstd (...)."""
    return _load_cpu().layernorm_forward(_f32(x), _f32(gamma), _f32(beta), float(eps))


def layernorm_backward(dout, x, mean, rstd, gamma):
    """-> dx (..., C), dgamma (C,), dbeta (C,)."""
    return _load_cpu().layernorm_backward(_f32(dout), x, mean, rstd, gamma)


def gelu_tanh_forward(x):
    return _load_cpu().gelu_tanh_forward(_f32(x))


def gelu_tanh_backward(dout, x):
    return _load_cpu().gelu_tanh_backward(_f32(dout), x)


def cross_entropy_forward(logits2d, targets1d, ignore_index: int):
    """logits (N, V), targets (N,) -> (Σ over counted rows of lse − z[y], lse (N,))."""
    fn = "cross_entropy_forward"
    return _load_cpu().cross_entropy_forward(_f32(logits2d), _i64(targets1d, fn, "targets"),
                                             int_scalar(ignore_index, fn, "ignore_index"))


def cross_entropy_backward(logits2d, targets1d, lse, scale: float, ignore_index: int, out=None):
    """(softmax − onehot) · scale, ignored rows 0; ``out`` may be ``logits2d`` (in place)."""
    fn = "cross_entropy_backward"
    return _load_cpu().cross_entropy_backward(logits2d, _i64(targets1d, fn, "targets"), lse, float(scale),
                                              int_scalar(ignore_index, fn, "ignore_index"), out=out)


def embedding_backward(dout, ids, dwte, dwpe, pos0: int) -> None:
    """In place: ``dwte[ids] += dout`` (repeats accumulate), ``dwpe[pos0+t] += Σ_b dout[:, t]``."""
    fn = "embedding_backward"
    _load_cpu().embedding_backward(_f32(dout), _i64(ids, fn, "ids"), dwte, dwpe, int_scalar(pos0, fn, "pos0"))


def adamw_step(params, grads, m, v, decay_mask, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update in place (bitwise equal to :class:`numformer.optim.AdamW`'s NumPy code)."""
    _load_cpu().adamw_step(params, grads, m, v, decay_mask, lr=lr, beta1=beta1, beta2=beta2,
                           eps=eps, weight_decay=weight_decay, step=step)


def sgd_step(params, grads, momentum_buffer, decay_mask, *, lr, momentum, nesterov, weight_decay) -> None:
    """One SGD update in place (bitwise equal to :class:`numformer.optim.SGD`'s NumPy code)."""
    _load_cpu().sgd_step(params, grads, momentum_buffer, decay_mask, lr=lr, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay)


# --------------------------------------------------------------------------
# scaled dot-product attention (flash kernel)
# --------------------------------------------------------------------------

def _attention_rows(x: np.ndarray) -> np.ndarray:
    """x itself when the kernel can read it through its strides (4-D, last
    axis contiguous, element-aligned strides), else a C-contiguous copy.
    Head-split views of a fused qkv projection and KV-cache slices pass as is."""
    # flags.aligned: the data pointer and every stride are multiples of the
    # element size (x.ctypes.data would cost ~3 µs per call).
    if x.flags.aligned and (x.shape[-1] <= 1 or x.strides[-1] == x.itemsize):
        return x
    return np.ascontiguousarray(x)


def _cpu_attention_ok(*arrays) -> bool:
    if not _cpu_kernels() or not hasattr(_cpu_module, "attention_forward"):
        return False
    dt = arrays[0].dtype
    return dt in (np.float32, np.float64) and all(
        isinstance(a, np.ndarray) and a.dtype == dt and a.ndim == 4 for a in arrays) \
        and arrays[0].shape[-1] >= 1


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
                      key_mask: np.ndarray | None = None):
    """``softmax(q kᵀ/√D + mask) v`` -> (out (B, H, Tq, D), cache for :func:`attention_backward`).

    On ``cpu`` the cache is ``("flash", q, k, v, out, lse, causal, key_mask)``
    (no Tq×Tk array); on ``cuda`` the same tensors as device arrays
    (``("cuda", …)``, so the backward copies only ``dout`` in); on ``numpy``
    it is ``("reference", cache)`` with P inside.
    """
    if _cuda_f32(q, k, v) and q.ndim == k.ndim == v.ndim == 4 and 1 <= q.shape[-1] <= 128:
        km = None if key_mask is None else np.ascontiguousarray(key_mask, dtype=bool)
        dq_, dk_, dv_ = _dev(q), _dev(k), _dev(v)
        d_out, d_lse = _cuda_module.attention_forward(dq_, dk_, dv_, causal=causal, key_mask=km)
        return _host(d_out), ("cuda", dq_, dk_, dv_, d_out, d_lse, causal, km)
    if _cpu_attention_ok(q, k, v):
        q2, k2, v2 = _attention_rows(q), _attention_rows(k), _attention_rows(v)
        km = None if key_mask is None else np.ascontiguousarray(key_mask, dtype=bool)
        out, lse = _cpu_module.attention_forward(q2, k2, v2, causal=causal, key_mask=km)
        return out, ("flash", q2, k2, v2, out, lse, causal, km)
    from numformer.ops import attention as attention_op

    out, cache = attention_op.forward_reference(q, k, v, causal, key_mask)
    return out, ("reference", cache)


def attention_backward(dout: np.ndarray, cache):
    """dout (B, H, Tq, D) -> dq, dk, dv, on the path that produced ``cache``."""
    if cache[0] == "cuda":
        _, q, k, v, out, lse, causal, km = cache
        if _load_cuda() is None:  # pragma: no cover - the cache came from the GPU
            raise RuntimeError(f"attention cache was made by numformer._cuda, which is unavailable: {_cuda_error}")
        grads = _cuda_module.attention_backward(_dev(dout.astype(np.float32, copy=False)), q, k, v, out, lse,
                                                causal=causal, key_mask=km)
        return tuple(_host(g) for g in grads)
    if cache[0] == "flash":
        _, q, k, v, out, lse, causal, km = cache
        if not _load_cpu():  # pragma: no cover - the cache came from the kernel
            raise RuntimeError("attention cache was made by numformer._cpu, which is unavailable")
        return _cpu_module.attention_backward(_attention_rows(dout.astype(q.dtype, copy=False)), q, k, v,
                                              out, lse, causal=causal, key_mask=km)
    from numformer.ops import attention as attention_op

    return attention_op.backward_reference(dout, cache[1])
