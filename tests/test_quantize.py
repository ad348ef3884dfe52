"""int8 weight-only quantization: the kernel, the math, the files, the model.

Kernel tolerance. The reference is evaluated in float64 on the same inputs,
``ref = (x @ q) · s + b``. The kernel forms the float32 sum ``Σ_p x·q``
(``float(q)`` is exact), then one multiply by ``s`` and one add of ``b``.
By the standard bound for a sum of K rounded products in any order
(Higham, γ_K ≈ K·eps), plus one rounding each for the scaling and the bias:

    |y − ref| ≤ (K + 2)·eps·(s·(|x| @ |q|) + |b|) + (K + 2)·tiny

with eps = 2⁻²³ (float32 machine epsilon, twice the unit roundoff u, so
(K+2)·eps ≥ γ_{K+2} = (K+2)u/(1−(K+2)u) for any K we test) and a ``tiny``
absolute term for results in the subnormal range. The observed
error is ~√K·eps relative; a wrong index, lost column or missed scale is
orders of magnitude above the bound.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from numformer import backend, safetensors
from numformer.checkpoint import CheckpointError
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.ops import linear
from numformer.quantize import (QUANT_MODULES, Int8Weight, QuantizedGPT2, QuantizedModelError, dequantize_weight,
                                load_quantized, quantize_checkpoint, quantize_model, quantize_weight)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from numformer import _cpu  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - NumPy-only install
    _cpu = None
needs_cpu = pytest.mark.skipif(_cpu is None or not hasattr(_cpu, "matmul_int8"),
                               reason="numformer._cpu with matmul_int8 is not built")

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).tiny)
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")

# Row counts: every streaming tile (1–8, 4-row groups + 1–3 remainder), more
# groups (9–64), the cut-over to the GEMM path (64/65) and GEMM tile edges.
# Column/depth sizes: the 64-column block and 16-lane vector edges, primes, and 1.
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17, 31, 63, 64, 65, 97]
SIZES = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 191, 193, 257]


def _reference64(x, q, s, b):
    ref = (x.astype(np.float64) @ q.astype(np.float64)) * s.astype(np.float64)
    return ref if b is None else ref + b.astype(np.float64)


def _bound(x, q, s, b):
    K = x.shape[1]
    mag = (np.abs(x).astype(np.float64) @ np.abs(q).astype(np.float64)) * s.astype(np.float64)
    if b is not None:
        mag = mag + np.abs(b).astype(np.float64)
    return (K + 2) * EPS32 * mag + (K + 2) * TINY32


@st.composite
def int8_problems(draw):
    M = draw(st.sampled_from(ROWS) | st.integers(1, 40))
    K = draw(st.sampled_from(SIZES) | st.integers(1, 300))
    N = draw(st.sampled_from(SIZES) | st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x_mag = 10.0 ** draw(st.floats(-3, 2))
    x = (rng.standard_normal((M, K)) * x_mag).astype(np.float32)
    q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    if draw(st.booleans()):                      # extremes of the int8 range
        q[rng.random((K, N)) < 0.3] = 127
        q[rng.random((K, N)) < 0.3] = -127
    # per-column scales over many decades (1e-30 .. 1e25: no float32 overflow)
    lo, hi = sorted((draw(st.floats(-30, 25)), draw(st.floats(-30, 25))))
    s = (10.0 ** rng.uniform(lo, hi, size=N)).astype(np.float32)
    zero_cols = rng.random(N) < draw(st.sampled_from([0.0, 0.2, 1.0]))
    s[zero_cols] = 0.0                           # all-zero channels: scale 0, q 0
    q[:, zero_cols] = 0
    b = None if draw(st.booleans()) else (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    return x, q, s, b


@needs_cpu
@settings(deadline=None)
@given(problem=int8_problems(), data=st.data())
def test_kernel_matches_reference_on_every_isa(problem, data):
    x, q, s, b = problem
    isa = data.draw(st.sampled_from(_cpu.available_isas()))
    packed = data.draw(st.booleans())              # q as stored, or in the kernel's packed layout
    previous = _cpu.set_isa(isa)
    try:
        y = _cpu.matmul_int8(x, linear.pack_int8(q) if packed else q, s, bias=b)
    finally:
        _cpu.set_isa(previous)
    assert y.dtype == np.float32 and y.shape == (x.shape[0], q.shape[1])
    ref, bound = _reference64(x, q, s, b), _bound(x, q, s, b)
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"isa {isa}: max err/bound {np.max(err / bound):.3g}"
    zero = s == 0
    if b is None:
        assert np.all(y[:, zero] == 0)


@needs_cpu
@pytest.mark.parametrize("M", [1, 3, 8, 9, 64])
def test_numpy_reference_and_backend_agree_on_gpt2_like_shapes(M):
    rng = np.random.default_rng(M)
    K, N = 768, 2304 + 16 + 3            # not a multiple of the 64-column block
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    q, s = quantize_weight(w)
    b = rng.standard_normal(N).astype(np.float32)
    with backend.use("cpu"):
        y_cpu = backend.matmul_int8(x, q, s, bias=b)
    with backend.use("numpy"):
        y_np = backend.matmul_int8(x, q, s, bias=b)
    ref, bound = _reference64(x, q, s, b), _bound(x, q, s, b)
    assert np.all(np.abs(y_cpu - ref) <= bound)
    assert np.all(np.abs(y_np - ref) <= bound)
    assert np.array_equal(y_np, linear.int8_matmul_reference(x, q, s, b))


@needs_cpu
def test_stream_rows_constant_matches_the_kernel():
    # quantize.py decides when to slice the head by the kernel's cut-over; the two must agree
    import numformer.quantize as qmod

    assert qmod.INT8_STREAM_ROWS == _cpu.int8_stream_rows


@needs_cpu
def test_large_k_and_n_edges():
    # K and N not multiples of 16/64; both paths (stream: M ≤ 64, GEMM: M > 64)
    rng = np.random.default_rng(0)
    for M in (1, 8, 9, 40, 64, 65, 71):
        K, N = 1031, 577
        x = rng.standard_normal((M, K)).astype(np.float32)
        q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
        s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
        y = _cpu.matmul_int8(x, q, s)
        assert np.all(np.abs(y - _reference64(x, q, s, None)) <= _bound(x, q, s, None))


@needs_cpu
def test_non_contiguous_x_through_the_backend():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((6, 2 * 70)).astype(np.float32)
    x = big[:, ::2]                                # (6, 70), strided
    q = rng.integers(-127, 128, size=(70, 33)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, 33).astype(np.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul_int8(x, q, s)
    with backend.use("cpu"):
        y = backend.matmul_int8(x, q, s)
    assert np.all(np.abs(y - _reference64(x, q, s, None)) <= _bound(x, q, s, None))
    # 3-D input through the linear op (reshaped to rows)
    x3 = rng.standard_normal((2, 3, 70)).astype(np.float32)
    b = rng.standard_normal(33).astype(np.float32)
    with backend.use("cpu"):
        out = linear.forward_int8(x3, q, s, b)
    assert out.shape == (2, 3, 33)
    ref = _reference64(x3.reshape(6, 70), q, s, b).reshape(2, 3, 33)
    assert np.all(np.abs(out - ref) <= _bound(x3.reshape(6, 70), q, s, b).reshape(2, 3, 33))


@needs_cpu
@pytest.mark.parametrize("M", [1, 5, 8, 200])
def test_results_do_not_depend_on_the_thread_count(M):
    rng = np.random.default_rng(M)
    K, N = 1024, 3072 + 5                    # large enough to run on several threads
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    s = rng.uniform(1e-3, 1e-2, N).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    before = _cpu.num_threads()
    try:
        _cpu.set_num_threads(1)
        y1 = _cpu.matmul_int8(x, q, s, bias=b)
        _cpu.set_num_threads(4)
        y4 = _cpu.matmul_int8(x, q, s, bias=b)
    finally:
        _cpu.set_num_threads(before)
    assert np.array_equal(y1, y4)


def test_pack_int8_layout():
    q = np.arange(5 * 70, dtype=np.int64).reshape(5, 70).astype(np.int8)
    p = linear.pack_int8(q)
    assert p.shape == (2, 5, 64) and p.flags.c_contiguous
    assert np.array_equal(p[0], q[:, :64]) and np.array_equal(p[1, :, :6], q[:, 64:])
    assert np.all(p[1, :, 6:] == 0)


@settings(deadline=None, max_examples=40)
@given(K=st.sampled_from([0, 1, 7, 64]) | st.integers(0, 90), N=st.sampled_from(SIZES + [0]) | st.integers(0, 300),
       seed=st.integers(0, 2**32 - 1))
def test_unpack_int8_inverts_pack_int8(K, N, seed):
    q = np.random.default_rng(seed).integers(-127, 128, size=(K, N)).astype(np.int8)
    p = linear.pack_int8(q)
    assert p.shape == (-(-N // 64), K, 64)
    u = linear.unpack_int8(p, N)
    assert u.dtype == np.int8 and u.flags.c_contiguous and np.array_equal(u, q)
    assert np.array_equal(linear.pack_int8(q.T.copy().T), p)            # any view packs alike
    cols = np.random.default_rng(seed).integers(0, N, size=5) if N else np.zeros(0, np.int64)
    assert np.array_equal(linear.int8_columns(p, cols), q[:, cols].T)    # gather without unpacking


def test_unpack_int8_checks_the_column_count():
    p = linear.pack_int8(np.zeros((3, 70), np.int8))
    with pytest.raises(ValueError, match=r"does not hold 129 columns"):
        linear.unpack_int8(p, 129)
    with pytest.raises(ValueError, match=r"does not hold 64 columns"):
        linear.unpack_int8(p, 64)


@settings(deadline=None, max_examples=30)
@given(problem=int8_problems())
def test_numpy_reference_reads_the_packed_layout(problem):
    x, q, s, b = problem
    y = linear.int8_matmul_reference(x, linear.pack_int8(q), s, b)
    assert y.dtype == np.float32 and y.shape == (x.shape[0], q.shape[1])
    ref, bound = _reference64(x, q, s, b), _bound(x, q, s, b)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= bound)
    with backend.use("numpy"):                                          # and through the backend
        assert np.array_equal(backend.matmul_int8(x, linear.pack_int8(q), s, bias=b), y)


def test_numpy_reference_refuses_a_mismatched_packed_weight():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"packed q \(2, 5, 64\) does not fit"):
        linear.int8_matmul_reference(x, np.zeros((2, 5, 64), np.int8), np.ones(129, np.float32))


@needs_cpu
@pytest.mark.parametrize("M", [1, 3, 9])
def test_kernel_on_a_vocabulary_sized_head(M):
    # the int8 LM head: N = 50257 columns (785 full 64-column blocks + one of 17), packed
    rng = np.random.default_rng(M)
    K, N = 24, 50257
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    y = _cpu.matmul_int8(x, linear.pack_int8(q), s)
    assert y.shape == (M, N)
    assert np.all(np.abs(y - _reference64(x, q, s, None)) <= _bound(x, q, s, None))
    assert np.array_equal(y[:, -17:], _cpu.matmul_int8(x, q, s)[:, -17:])   # the edge block, both layouts


@needs_cpu
def test_packed_and_plain_layouts_agree_bitwise():
    rng = np.random.default_rng(5)
    for M in (1, 3, 8, 9, 33):
        K, N = 97, 131
        x = rng.standard_normal((M, K)).astype(np.float32)
        q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
        s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
        assert np.array_equal(_cpu.matmul_int8(x, q, s), _cpu.matmul_int8(x, linear.pack_int8(q), s))
    with pytest.raises(ValueError, match=r"packed q must have shape \(3, 97, 64\)"):
        _cpu.matmul_int8(x, np.zeros((2, 97, 64), np.int8), s)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        _cpu.matmul_int8(x, np.zeros((3, 96, 64), np.int8), s)


@needs_cpu
def test_empty_dimensions():
    s = np.ones(5, np.float32)
    b = np.arange(5, dtype=np.float32)
    y = _cpu.matmul_int8(np.zeros((3, 0), np.float32), np.zeros((0, 5), np.int8), s, bias=b)
    assert np.array_equal(y, np.tile(b, (3, 1)))          # empty sum: the bias
    assert _cpu.matmul_int8(np.zeros((0, 4), np.float32), np.zeros((4, 5), np.int8), s).shape == (0, 5)
    assert _cpu.matmul_int8(np.zeros((2, 4), np.float32), np.zeros((4, 0), np.int8),
                            np.zeros(0, np.float32)).shape == (2, 0)


@needs_cpu
def test_invalid_arguments_raise():
    x = np.zeros((2, 4), np.float32)
    q = np.zeros((4, 3), np.int8)
    s = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="q has dtype float32; expected int8"):
        _cpu.matmul_int8(x, q.astype(np.float32), s)
    with pytest.raises(TypeError, match="x has dtype float64"):
        _cpu.matmul_int8(x.astype(np.float64), q, s)
    with pytest.raises(TypeError, match="scale has dtype"):
        _cpu.matmul_int8(x, q, s.astype(np.float64))
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        _cpu.matmul_int8([[1.0]], q, s)
    with pytest.raises(ValueError, match=r"inner dimensions differ: x is \(2, 4\), q is \(5, 3\)"):
        _cpu.matmul_int8(x, np.zeros((5, 3), np.int8), s)
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        _cpu.matmul_int8(x, q, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        _cpu.matmul_int8(x, q, s, bias=np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="x must be 2-D"):
        _cpu.matmul_int8(np.zeros(4, np.float32), q, s)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul_int8(x, np.asfortranarray(np.zeros((4, 3), np.int8)), s)


# ----------------------------------------------------------------------------- the math


@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), cols=st.integers(1, 40),
       mag=st.floats(-30, 30))
def test_quantize_weight_error_bound(seed, rows, cols, mag):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 10.0 ** mag).astype(np.float32)
    w[:, rng.random(cols) < 0.2] = 0.0                    # all-zero channels
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (cols,)
    assert np.all(np.abs(q.astype(int)) <= 127)
    amax = np.max(np.abs(w.astype(np.float64)), axis=0)
    zero = amax == 0
    assert np.all(s[zero] == 0) and np.all(q[:, zero] == 0)
    # the largest |w| of each nonzero column maps to ±127
    assert np.all(np.max(np.abs(q[:, ~zero].astype(int)), axis=0) == 127)
    # round to nearest: |w − q·s| ≤ s/2 (plus the float32 rounding of q·s)
    err = np.abs(w.astype(np.float64) - q.astype(np.float64) * s.astype(np.float64))
    assert np.all(err <= s.astype(np.float64) * (0.5 + 1e-6))
    assert np.all(np.abs(dequantize_weight(q, s) - w) <= s * 0.5 + np.abs(w) * 2 * EPS32)


def test_quantize_weight_refuses_non_finite():
    w = np.ones((3, 2), np.float32)
    w[1, 1] = np.inf
    with pytest.raises(ValueError, match="h.0.mlp.c_fc.weight: has non-finite"):
        quantize_weight(w, "h.0.mlp.c_fc.weight")


# ----------------------------------------------------------------------------- model + files

CFG = GPT2Config(vocab_size=67, n_positions=32, n_embd=48, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def float_model():
    return GPT2.init(CFG, seed=3)


BACKENDS = ("numpy", "cpu") if backend.cpu_available() else ("numpy",)


@pytest.mark.parametrize("int8_head", [True, False])
def test_quantized_model_computes_the_dequantized_model(float_model, int8_head):
    qm = quantize_model(float_model, int8_head=int8_head)
    assert isinstance(qm, QuantizedGPT2) and qm.num_params == float_model.num_params
    assert qm.int8_head is int8_head and ("wte.weight" in qm.params) is not int8_head
    deq = qm.dequantize()
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(3, 17))
    ref = deq.forward(ids)[0].astype(np.float64)
    scale = np.max(np.abs(ref))
    for name in BACKENDS:
        with backend.use(name):
            logits, loss, _ = qm.forward(ids, ids)
            last = qm.forward(ids, last_only=True)[0]                  # the generation path
        assert np.max(np.abs(logits - ref)) <= 1e-4 * scale
        assert np.max(np.abs(last[:, 0] - ref[:, -1])) <= 1e-4 * scale
        assert np.isfinite(loss)
    # and close to the float model: the quantization error is small
    flt = float_model.forward(ids)[0]
    assert np.max(np.abs(logits - flt)) <= 0.05 * np.max(np.abs(flt))


@pytest.mark.parametrize("slice_cols", [64, 3072])
def test_int8_head_in_column_slices(float_model, monkeypatch, slice_cols):
    # more than INT8_STREAM_ROWS rows: the head runs in slices of whole 64-column blocks
    # (V = 67: 64 + 3 with slices of 64)
    import numformer.quantize as qmod

    monkeypatch.setattr(qmod, "HEAD_SLICE_COLS", slice_cols)
    qm = quantize_model(float_model)
    x = np.random.default_rng(2).standard_normal((70, CFG.n_embd)).astype(np.float32)
    q, s = qm.head.unpack(), qm.head.scale
    for name in BACKENDS:
        with backend.use(name):
            for rows in (1, 8, 9, qmod.INT8_STREAM_ROWS, qmod.INT8_STREAM_ROWS + 1, 70):
                y = qm._head(x[:rows])
                assert y.shape == (rows, CFG.vocab_size)
                assert np.all(np.abs(y - _reference64(x[:rows], q, s, None)) <= _bound(x[:rows], q, s, None))


def test_int8_head_error_bound(float_model):
    # q_head (C, V) = quantized wteᵀ: one scale per vocabulary row v = per output column of the head
    qm = quantize_model(float_model)
    wte = float_model.params["wte.weight"].astype(np.float64)                 # (V, C)
    q = qm.head.unpack().astype(np.float64)                                   # (C, V)
    s = qm.head.scale.astype(np.float64)                                      # (V,)
    assert q.shape == (CFG.n_embd, CFG.vocab_size) and s.shape == (CFG.vocab_size,)
    amax = np.max(np.abs(wte), axis=1)
    np.testing.assert_allclose(s, amax / 127, rtol=2 * EPS32)                 # s[v] = max_c |wte[v, c]| / 127
    assert np.all(np.max(np.abs(q), axis=0) == 127)                          # each row's largest |w| maps to ±127
    err = np.abs(wte - (q * s).T)                                             # |wte[v, c] − s[v]·q[c, v]|
    assert np.all(err <= s[:, None] * (0.5 + 1e-6))
    # the head's logit error for an input x: |Δ logit_v| ≤ (s[v] / 2)·‖x‖₁
    x = np.random.default_rng(1).standard_normal(CFG.n_embd)
    assert np.all(np.abs(x @ (wte - (q * s).T).T) <= s / 2 * np.abs(x).sum() * (1 + 1e-6))


def test_int8_head_lookup_is_the_dequantized_rows(float_model):
    qm = quantize_model(float_model)
    wte = qm.head.dequantize().T                                             # (V, C) = s[v]·q[:, v]
    wpe = qm.params["wpe.weight"]
    ids = np.array([[5, 5, 0, CFG.vocab_size - 1, 64, 63], [1, 2, 3, 5, 5, 5]])  # repeats, block edges
    x, _ = qm._embed(ids, 3, None)
    assert np.array_equal(x, wte[ids] + wpe[3:9])                           # bitwise: the same products
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    x, _ = qm._embed(ids, 0, positions)
    assert np.array_equal(x, wte[ids] + wpe[positions])
    assert np.array_equal(x, qm.dequantize().params["wte.weight"][ids] + wpe[positions])
    with pytest.raises(ValueError, match="token id outside"):
        qm.forward(np.array([[CFG.vocab_size]]))


def _int8_arrays(obj, seen=None):
    """Every int8 ndarray reachable from obj through attributes, slots, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype == np.int8 else []
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        children += [getattr(obj, n) for n in getattr(type(obj), "__slots__", ()) if hasattr(obj, n)]
    return [a for c in children for a in _int8_arrays(c, seen)]


@pytest.mark.parametrize("int8_head", [True, False])
def test_model_holds_one_int8_copy_of_each_weight(tmp_path, float_model, int8_head):
    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "int8")
    quantize_checkpoint(src, out, int8_head=int8_head)
    from numformer import checkpoint

    for qm in (quantize_model(float_model, int8_head=int8_head), checkpoint.load_model(out)):
        ids = np.arange(12).reshape(2, 6)
        for name in BACKENDS:                                   # no copy is made on first use either
            with backend.use(name):
                qm.forward(ids)
        held = _int8_arrays(qm)
        packed = [w.packed for w in qm.qweights.values()] + ([qm.head.packed] if int8_head else [])
        assert len(held) == len(packed) and all(any(a is p for p in packed) for a in held)
        assert all(p.base is None for p in packed)              # own memory, not views of something larger
        shapes = {w.shape for w in qm.qweights.values()} | {(CFG.vocab_size, CFG.n_embd), (CFG.n_embd, CFG.vocab_size)}
        assert not any(a.shape in shapes for a in held)         # no (K, N) q beside the packed copy
        padded = sum(-(-n // 64) * 64 * k for k, n in [w.shape for w in qm.qweights.values()]
                     + ([qm.head.shape] if int8_head else []))
        assert sum(a.nbytes for a in held) == padded
        assert qm.nbytes == qm.flat.nbytes + padded + 4 * sum(w.scale.size for w in qm.qweights.values()) \
            + (4 * CFG.vocab_size if int8_head else 0)


def test_quantized_model_refuses_training(float_model):
    qm = quantize_model(float_model)
    ids = np.zeros((1, 4), np.int64)
    _, _, cache = qm.forward(ids, ids)
    with pytest.raises(QuantizedModelError, match="int8 weights and is for inference only"):
        qm.backward(cache)
    with pytest.raises(QuantizedModelError):
        qm.loss_and_grads(ids, ids)
    with pytest.raises(QuantizedModelError):
        qm.decay_mask()
    with pytest.raises(QuantizedModelError):
        qm.astype(np.float64)
    with pytest.raises(QuantizedModelError, match="already quantized"):
        quantize_model(qm)


def _numformer_checkpoint(tmp_path, model):
    from numformer import checkpoint
    from numformer.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,\n")
    path = str(tmp_path / "float")
    checkpoint.save(path, model, tok)
    return path, tok


def test_quantize_numformer_checkpoint_round_trip(tmp_path, float_model):
    from numformer import checkpoint
    from numformer.generate import generate

    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "int8")
    info = quantize_checkpoint(src, out)
    assert 0 < info["max_rel_error"] <= 1 / 254 + 1e-6
    header, meta = safetensors.read_header(os.path.join(out, "model.safetensors"))
    assert header["h.0.attn.c_attn.weight"]["dtype"] == "I8"
    assert header["h.0.attn.c_attn.weight_scale"]["dtype"] == "F32"
    assert header["h.0.attn.c_attn.weight_scale"]["shape"] == [3 * CFG.n_embd]
    assert header["h.1.ln_2.bias"]["dtype"] == "F32" and header["wpe.weight"]["dtype"] == "F32"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization"]["modules"] == list(QUANT_MODULES)
    assert os.path.exists(os.path.join(out, "numformer_tokenizer.json"))
    assert not os.path.exists(os.path.join(out, "optimizer.safetensors"))

    assert header["wte.weight"]["dtype"] == "I8" and header["wte.weight"]["shape"] == [CFG.vocab_size, CFG.n_embd]
    assert header["wte.weight_scale"]["dtype"] == "F32" and header["wte.weight_scale"]["shape"] == [CFG.vocab_size]
    with open(os.path.join(out, "config.json")) as f:
        entry = json.load(f)["quantization"]
    assert entry["format_version"] == 2 and entry["int8_head"] is True

    qm = checkpoint.load_model(out)
    assert isinstance(qm, QuantizedGPT2) and qm.int8_head
    ref = quantize_model(float_model)
    tensors = safetensors.load_file(os.path.join(out, "model.safetensors"))
    for name, w in ref.qweights.items():
        assert np.array_equal(qm.qweights[name].packed, w.packed) and np.array_equal(qm.qweights[name].scale, w.scale)
        q, s = quantize_weight(float_model.params[name])             # the file: the documented (in, out) layout
        assert np.array_equal(tensors[name], q) and np.array_equal(tensors[name + "_scale"], s)
    q, s = quantize_weight(float_model.params["wte.weight"].T)       # head: (C, V), per vocabulary row
    assert np.array_equal(tensors["wte.weight"], q.T) and np.array_equal(tensors["wte.weight_scale"], s)
    assert np.array_equal(qm.head.packed, ref.head.packed) and np.array_equal(qm.head.scale, ref.head.scale)
    assert np.array_equal(qm.flat, ref.flat)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert np.array_equal(qm.forward(ids)[0], ref.forward(ids)[0])
    # saving what was loaded writes the same tensors
    again = str(tmp_path / "int8-again")
    from numformer.quantize import save_quantized

    save_quantized(qm, again)
    for name, t in safetensors.load_file(os.path.join(again, "model.safetensors")).items():
        assert np.array_equal(t, tensors[name]), name
    toks = generate(qm, [1, 2, 3], 10, temperature=0.0 + 1.0, seed=0)
    assert len(toks) == 10
    with pytest.raises(CheckpointError, match="already int8-quantized"):
        quantize_checkpoint(out, str(tmp_path / "again"))


def test_quantize_hugging_face_folder(tmp_path):
    import numformer

    out = str(tmp_path / "tiny-int8")
    quantize_checkpoint(FIXTURE, out)
    for f in ("vocab.json", "merges.txt"):
        assert os.path.exists(os.path.join(out, f))
    qm = numformer.from_pretrained(out)
    assert isinstance(qm, QuantizedGPT2)
    flt = numformer.from_pretrained(FIXTURE)
    ids = np.array([[1, 5, 9, 2, 7]])
    a, b = qm.forward(ids)[0], flt.forward(ids)[0]
    assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(b))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gpt2" and "quantization" in cfg
    tok = numformer.load_tokenizer(out)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_cli_quantize_then_sample(tmp_path, float_model, capsys):
    from numformer.cli import main

    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "q")
    assert main(["quantize", "--checkpoint", src, "--out", out]) == 0
    assert "int8" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", out, "--prompt", "ab", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["quantize", "--checkpoint", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_quantize_float_head(tmp_path, float_model, capsys):
    from numformer import checkpoint
    from numformer.cli import main

    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "q")
    assert main(["quantize", "--checkpoint", src, "--out", out]) == 0
    assert "int8 head" in capsys.readouterr().out
    small = os.path.getsize(os.path.join(out, "model.safetensors"))
    assert main(["quantize", "--checkpoint", src, "--out", out, "--float-head"]) == 0
    assert "float32 head" in capsys.readouterr().out
    header, _ = safetensors.read_header(os.path.join(out, "model.safetensors"))
    assert header["wte.weight"]["dtype"] == "F32" and "wte.weight_scale" not in header
    with open(os.path.join(out, "config.json")) as f:
        entry = json.load(f)["quantization"]
    assert entry["format_version"] == 2 and entry["int8_head"] is False and "wte" in entry["float"]
    qm = checkpoint.load_model(out)
    assert not qm.int8_head and np.array_equal(qm.params["wte.weight"], float_model.params["wte.weight"])
    # the int8 head saves 3 of every 4 bytes of wte, less the (V,) scales and their header entry
    V, C = CFG.vocab_size, CFG.n_embd
    assert os.path.getsize(os.path.join(out, "model.safetensors")) - small >= 3 * V * C - 4 * V - 200


def test_version_1_folder_still_loads(tmp_path, float_model):
    # a folder as the first int8 release wrote it: format_version 1, no "int8_head", float wte
    from numformer import checkpoint

    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "v1")
    quantize_checkpoint(src, out, int8_head=False)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["quantization"] = {"method": "numformer-int8-weight-only", "format_version": 1, "bits": 8,
                           "symmetric": True, "granularity": "per_output_channel", "modules": list(QUANT_MODULES),
                           "scale_suffix": "_scale", "float": ["wte", "wpe", "layer norms", "biases"],
                           "num_quantized_weights": 4 * CFG.n_layer}
    with open(path, "w") as f:
        json.dump(cfg, f)
    qm = checkpoint.load_model(out)
    assert isinstance(qm, QuantizedGPT2) and not qm.int8_head
    ref = quantize_model(float_model, int8_head=False)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert np.array_equal(qm.forward(ids)[0], ref.forward(ids)[0])
    # version 1 knew no int8 head: claiming one is an error, and so is an I8 wte
    cfg["quantization"]["int8_head"] = True
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="config.json: 'int8_head' needs format_version 2"):
        checkpoint.load_model(out)


# ----------------------------------------------------------------------------- corrupt folders


@pytest.fixture
def int8_folder(tmp_path, float_model):
    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "int8")
    quantize_checkpoint(src, out)
    return out


def _rewrite(folder, edit):
    file = os.path.join(folder, "model.safetensors")
    tensors = safetensors.load_file(file)
    edit(tensors)
    safetensors.save_file(tensors, file)


def _load(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return load_quantized(folder, json.load(f))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("h.1.mlp.c_fc.weight_scale"), r"missing tensor 'h.1.mlp.c_fc.weight_scale'"),
    (lambda t: t.pop("h.0.attn.c_proj.weight"), r"missing tensor 'h.0.attn.c_proj.weight'"),
    (lambda t: t.__setitem__("h.0.mlp.c_fc.weight", t["h.0.mlp.c_fc.weight"][:-1]),
     r"tensor 'h.0.mlp.c_fc.weight' has shape \(47, 192\)"),
    (lambda t: t.__setitem__("h.0.mlp.c_fc.weight", t["h.0.mlp.c_fc.weight"].astype(np.float32)),
     r"tensor 'h.0.mlp.c_fc.weight' is F32, but config.json says it is int8"),
    (lambda t: t.__setitem__("h.1.attn.c_attn.weight_scale", t["h.1.attn.c_attn.weight_scale"][:5]),
     r"'h.1.attn.c_attn.weight_scale' must be F32 of shape \(144,\)"),
    (lambda t: t.__setitem__("h.1.attn.c_attn.weight_scale", -t["h.1.attn.c_attn.weight_scale"]),
     r"negative or non-finite scale"),
    (lambda t: t.__setitem__("extra.weight", np.zeros(2, np.float32)), r"unexpected tensor 'extra.weight'"),
])
def test_corrupt_int8_folders_name_file_and_tensor(int8_folder, edit, match):
    _rewrite(int8_folder, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        _load(int8_folder)
    assert "model.safetensors" in str(info.value)


def _with_minus_128(t):
    q = t["wte.weight"].copy()
    q[7, 3] = -128
    t["wte.weight"] = q


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("wte.weight_scale"), r"missing tensor 'wte.weight_scale'"),
    (lambda t: t.pop("wte.weight"), r"missing tensor 'wte.weight'"),
    (lambda t: t.__setitem__("wte.weight", np.ascontiguousarray(t["wte.weight"].T)),
     r"tensor 'wte.weight' has shape \(48, 67\), the config needs \(67, 48\)"),
    (lambda t: t.__setitem__("wte.weight", t["wte.weight"][:-1]),
     r"tensor 'wte.weight' has shape \(66, 48\)"),
    (lambda t: t.__setitem__("wte.weight", t["wte.weight"].astype(np.float32)),
     r"tensor 'wte.weight' is F32, but config.json says it is int8-quantized"),
    (lambda t: t.__setitem__("wte.weight", t["wte.weight"].astype(np.int16)),
     r"tensor 'wte.weight' is I16, but config.json says it is int8-quantized"),
    (lambda t: t.__setitem__("wte.weight_scale", t["wte.weight_scale"][:48]),
     r"'wte.weight_scale' must be F32 of shape \(67,\) \(one scale per vocabulary row\), got F32 \(48,\)"),
    (lambda t: t.__setitem__("wte.weight_scale", t["wte.weight_scale"].astype(np.float64)),
     r"'wte.weight_scale' must be F32 of shape \(67,\)"),
    (lambda t: t.__setitem__("wte.weight_scale", np.full(67, np.nan, np.float32)),
     r"tensor 'wte.weight_scale' has a negative or non-finite scale"),
    (_with_minus_128, r"tensor 'wte.weight' holds -128"),
])
def test_corrupt_int8_head_names_file_and_tensor(int8_folder, edit, match):
    _rewrite(int8_folder, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        _load(int8_folder)
    assert "model.safetensors" in str(info.value)


@pytest.fixture
def float_head_folder(tmp_path, float_model):
    src, _ = _numformer_checkpoint(tmp_path, float_model)
    out = str(tmp_path / "int8-float-head")
    quantize_checkpoint(src, out, int8_head=False)
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__("wte.weight", t["wte.weight"].astype(np.int8)),
     r"tensor 'wte.weight' has dtype I8, not a float type"),
    (lambda t: t.__setitem__("wte.weight_scale", np.ones(67, np.float32)),
     r"unexpected tensor 'wte.weight_scale' for an int8 GPT-2 with n_layer=2 and a float head"),
    (lambda t: t.__setitem__("wte.weight", t["wte.weight"][:, :5]),
     r"wte.weight: expected \(67, 48\), got \(67, 5\)"),
])
def test_corrupt_float_head_folders(float_head_folder, edit, match):
    _rewrite(float_head_folder, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        _load(float_head_folder)
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize("value, match", [
    ("yes", r"'int8_head' must be true or false, got 'yes'"),
    (None, r"'int8_head' must be true or false, got None"),
])
def test_bad_int8_head_entry(int8_folder, value, match):
    path = os.path.join(int8_folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if value is None:
        del cfg["quantization"]["int8_head"]
    else:
        cfg["quantization"]["int8_head"] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="config.json: quantization " + match):
        _load(int8_folder)
    for version in (3, True, "2"):
        cfg["quantization"]["format_version"] = version
        with open(path, "w") as f:
            json.dump(cfg, f)
        with pytest.raises(CheckpointError, match=r"unsupported quantization format_version"):
            _load(int8_folder)


def test_truncated_int8_tensor_is_a_safetensors_error(int8_folder):
    from numformer import checkpoint

    file = os.path.join(int8_folder, "model.safetensors")
    header, _ = safetensors.read_header(file)
    with open(file, "rb") as f:
        raw = bytearray(f.read())
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    begin, end = hdr["h.0.mlp.c_proj.weight"]["data_offsets"]
    hdr["h.0.mlp.c_proj.weight"]["data_offsets"] = [begin, end - 1]   # I8 size ≠ shape
    new = json.dumps(hdr).encode()
    new += b" " * (-len(new) % 8)
    with open(file, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'h.0.mlp.c_proj.weight'.*of I8 needs"):
        checkpoint.load_model(int8_folder)


def test_bad_quantization_entry(int8_folder):
    from numformer import checkpoint

    path = os.path.join(int8_folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["quantization"]["method"] = "gptq"
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="config.json: unknown quantization method 'gptq'"):
        checkpoint.load_model(int8_folder)
    with pytest.raises(CheckpointError, match="float32 only"):
        cfg["quantization"]["method"] = "numformer-int8-weight-only"
        with open(path, "w") as f:
            json.dump(cfg, f)
        checkpoint.load_model(int8_folder, dtype=np.float64)


def test_safetensors_i8_round_trip(tmp_path):
    file = str(tmp_path / "i8.safetensors")
    a = np.arange(-127, 128, dtype=np.int8).reshape(5, 51)
    safetensors.save_file({"a": a, "a_scale": np.ones(51, np.float32)}, file)
    header, _ = safetensors.read_header(file)
    assert header["a"]["dtype"] == "I8"
    b = safetensors.load_file(file)["a"]
    assert b.dtype == np.int8 and np.array_equal(a, b)


def test_failed_quantize_leaves_old_output(tmp_path, float_model, int8_folder, monkeypatch):
    # atomic: an error while writing keeps the previous folder intact
    import numformer.quantize as qmod

    before = sorted(os.listdir(int8_folder))
    src = str(tmp_path / "float")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(qmod, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(src, int8_folder)
    assert sorted(os.listdir(int8_folder)) == before
    assert isinstance(_load(int8_folder), QuantizedGPT2)
    shutil.rmtree(int8_folder)
