"""numformer._cpu agrees with NumPy: property tests for matmul and softmax.

The NumPy definitions are the specification (``np.matmul``;
``numformer.ops.softmax.softmax_reference`` / ``softmax_backward_reference``).
References are evaluated in float64, so a comparison measures the kernel's
own rounding error, and every tolerance below is an error *bound* for the
algorithm (not a fudge factor), so the tests do not flake while a real bug —
a wrong index, a missed edge, a lost bias — is orders of magnitude above it.

Each hypothesis example also picks the instruction-set variant
(generic / avx2 / avx512, as far as this CPU has them), so every code path
is checked on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("hypothesis")
_cpu = pytest.importorskip("numformer._cpu", reason="numformer._cpu (the C++ extension) is not built")
from kernel_settings import using_isa, using_threads  # noqa: E402  (tests/kernel_settings.py)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numformer import backend  # noqa: E402

try:  # the specification, when the lead's module is importable
    from numformer.ops.softmax import softmax_backward_reference, softmax_reference
except Exception:  # pragma: no cover - fallback with the same documented semantics

    def softmax_reference(x):
        m = np.max(x, axis=-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,), x.dtype)
        m = np.where(np.isneginf(m), 0, m)
        e = np.exp(x - m)
        s = np.sum(e, axis=-1, keepdims=True)
        return e / np.where(s == 0, 1, s)

    def softmax_backward_reference(dy, y):
        return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))


ISAS = _cpu.available_isas()
DTYPES = [np.float32, np.float64]
# Sizes that stress the blocking: 0, 1, primes, register-tile edges of every
# variant (MR = 4/6/12 → 11/12/13, 23/24/25; NR = 8/16/32 → 15/16/17, 31/32/33,
# 63/64/65) and the few-rows cut-off (_cpu.gemm_stream_rows = 16: 15/16/17). Cache-block edges (KC, NC = 384,
# MC = 3072, …) are too large for random draws: test_matmul_block_edges.
EDGE_SIZES = [0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33, 63, 64, 65, 97, 127,
              128, 129]
sizes = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 160))


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


# ---------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------

def random_operands(rng, dtype, batch, m, n, k, trans_a, trans_b, magnitude=1.0):
    lead = () if batch is None else (batch,)
    a = (rng.standard_normal(lead + ((k, m) if trans_a else (m, k))) * magnitude).astype(dtype)
    b = (rng.standard_normal(lead + ((n, k) if trans_b else (k, n))) * magnitude).astype(dtype)
    return a, b


def op(x, trans):
    return np.swapaxes(x, -1, -2) if trans else x


def matmul_tolerance(a_op, b_op, k, dtype, extra_abs=0.0):
    """Elementwise error bound for a computed product.

    A dot product of length K in floating point satisfies (Higham, Accuracy
    and Stability of Numerical Algorithms, §3.1)
        |fl(a·b) − a·b| ≤ γ_K Σ_p |a_p||b_p|,   γ_K = K·u / (1 − K·u) ≈ K·u
    whatever the summation order (blocked, FMA, lanes). The typical error is
    ~√K·u·Σ|a||b|; we use the worst case K·u so that no example can fail by
    bad luck. ``extra_abs`` adds the magnitude of bias / old C, whose
    additions cost one more rounding each. u = eps/2; we allow (K + 2)·eps.
    """
    magnitude = np.matmul(np.abs(a_op).astype(np.float64), np.abs(b_op).astype(np.float64))
    return (k + 2) * eps(dtype) * (magnitude + extra_abs) + np.finfo(dtype).tiny


def assert_within(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.abs(actual.astype(np.float64) - expected)
    bad = ~(err <= tol) & ~(np.isnan(actual) & np.isnan(expected))  # an unexpected NaN is bad
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), 0)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements off; worst at {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, |err| {err[i]:.3g} > tol {np.broadcast_to(tol, err.shape)[i]:.3g}"
        )


@settings(deadline=None)
@given(
    m=sizes, n=sizes, k=sizes,
    batch=st.one_of(st.none(), st.integers(1, 3)),
    dtype=st.sampled_from(DTYPES),
    trans_a=st.booleans(), trans_b=st.booleans(),
    use_bias=st.booleans(),
    mode=st.sampled_from(["new", "out", "accumulate"]),
    magnitude=st.sampled_from([1.0, 1e-3, 1e3]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_matches_numpy(m, n, k, batch, dtype, trans_a, trans_b, use_bias, mode, magnitude, isa, seed):
    rng = np.random.default_rng(seed)
    a, b = random_operands(rng, dtype, batch, m, n, k, trans_a, trans_b, magnitude)
    a64, b64 = op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64)
    expected = np.matmul(a64, b64)
    extra = 0.0
    kwargs = {}
    if use_bias:
        bias = rng.standard_normal(n).astype(dtype)
        kwargs["bias"] = bias
        expected = expected + bias
        extra = extra + np.abs(bias.astype(np.float64))
    out = None
    if mode != "new":
        out = rng.standard_normal(expected.shape).astype(dtype)
        kwargs["out"] = out
        if mode == "accumulate":
            kwargs["accumulate"] = True
            expected = expected + out
            extra = extra + np.abs(out.astype(np.float64))

    with using_isa(isa):
        got = _cpu.matmul(a, b, trans_a, trans_b, **kwargs)

    assert got.dtype == dtype and got.flags.c_contiguous
    if out is not None:
        assert got is out  # written in place and returned
    assert_within(got, expected, matmul_tolerance(op(a, trans_a), op(b, trans_b), k, dtype, extra),
                  f"matmul {isa} {np.dtype(dtype).name} a{a.shape} b{b.shape} ta={trans_a} tb={trans_b} {mode}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,n,k", [(33, 17, 1000), (5, 65, 1537), (130, 3, 2048), (1, 300, 4099)])
def test_matmul_large_k(dtype, trans_a, trans_b, m, n, k):
    """Long dot products cross several KC depth slices (and the few-rows path for m=1)."""
    rng = np.random.default_rng(k + m)
    a, b = random_operands(rng, dtype, None, m, n, k, trans_a, trans_b)
    for isa in ISAS:
        with using_isa(isa):
            got = _cpu.matmul(a, b, trans_a, trans_b)
        expected = np.matmul(op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64))
        assert_within(got, expected, matmul_tolerance(op(a, trans_a), op(b, trans_b), k, dtype), f"{isa}")


# Cache-block edges of the AVX-512 float kernel (MR×NR = 12×32, KC = NC = 384,
# MC = 3072) and of the others (KC = 256, NC = 256/320/512, MC = 2048/2304):
# one dimension just below / at / above an edge, the others small but not tile
# multiples, so each case is cheap. K = 385 and 769 give unequal balanced
# slices; M = 3073 gives two A blocks; N = 769 three B blocks.
BLOCK_EDGES = [(13, 31, 383), (13, 31, 384), (13, 31, 385), (11, 33, 769), (25, 17, 257),
               (13, 383, 37), (13, 384, 37), (13, 385, 37), (11, 767, 29), (11, 769, 29), (7, 513, 33),
               (3071, 13, 19), (3072, 13, 19), (3073, 13, 19), (2049, 9, 21), (2305, 9, 21),
               (401, 401, 401)]


@pytest.mark.parametrize("m,n,k", BLOCK_EDGES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_block_edges(m, n, k, trans_a, trans_b):
    """Every variant, float32, with bias and accumulate, across cache-block edges."""
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    a, b = random_operands(rng, np.float32, None, m, n, k, trans_a, trans_b)
    bias = rng.standard_normal(n).astype(np.float32)
    old = rng.standard_normal((m, n)).astype(np.float32)
    expected = np.matmul(op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64)) + bias + old
    tol = matmul_tolerance(op(a, trans_a), op(b, trans_b), k, np.float32, np.abs(bias) + np.abs(old))
    for isa in ISAS:
        out = old.copy()
        with using_isa(isa):
            _cpu.matmul(a, b, trans_a, trans_b, bias=bias, out=out, accumulate=True)
        assert_within(out, expected, tol, f"{isa} {m}x{k}x{n} ta={trans_a} tb={trans_b}")


@pytest.mark.parametrize("batch", [2, 9])
def test_matmul_batched_drivers_agree(batch):
    """batch ≥ 4·threads runs one whole product per thread, smaller batches share
    every product between threads: both give the same bits as one thread."""
    rng = np.random.default_rng(batch)
    a = rng.standard_normal((batch, 150, 200)).astype(np.float32)
    b = rng.standard_normal((batch, 333, 200)).astype(np.float32)
    before = _cpu.num_threads()
    try:
        _cpu.set_num_threads(1)
        one = _cpu.matmul(a, b, False, True)
        _cpu.set_num_threads(2)
        two = _cpu.matmul(a, b, False, True)
    finally:
        _cpu.set_num_threads(before)
    assert np.array_equal(one, two)
    expected = a.astype(np.float64) @ np.swapaxes(b, -1, -2)
    assert_within(two, expected, matmul_tolerance(a, np.swapaxes(b, -1, -2), 200, np.float32), "batched")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_training_shapes(dtype):
    """The shapes a small GPT trains with: x·W, dY·Wᵀ, Xᵀ·dY (accumulated), batched attention."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128)).astype(dtype)
    w = rng.standard_normal((128, 384)).astype(dtype)
    bias = rng.standard_normal(384).astype(dtype)
    y = _cpu.matmul(x, w, bias=bias)
    assert_within(y, x.astype(np.float64) @ w + bias, matmul_tolerance(x, w, 128, dtype, np.abs(bias)), "x·W+b")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = _cpu.matmul(dy, w, False, True)
    assert_within(dx, dy.astype(np.float64) @ w.T, matmul_tolerance(dy, w.T, 384, dtype), "dY·Wᵀ")
    dw = np.ones_like(w)
    _cpu.matmul(x, dy, True, False, out=dw, accumulate=True)
    assert_within(dw, 1 + x.astype(np.float64).T @ dy, matmul_tolerance(x.T, dy, 256, dtype, 1.0), "dW += Xᵀ·dY")
    q = rng.standard_normal((12, 64, 32)).astype(dtype)
    kk = rng.standard_normal((12, 64, 32)).astype(dtype)
    s = _cpu.matmul(q, kk, False, True)
    assert_within(s, q.astype(np.float64) @ np.swapaxes(kk, -1, -2),
                  matmul_tolerance(q, np.swapaxes(kk, -1, -2), 32, dtype), "Q·Kᵀ")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_zero_inner_dimension(dtype, trans_a, trans_b):
    """K = 0: the empty sum is 0, so C = bias (or 0); accumulate leaves C (+ bias)."""
    a = np.zeros((0, 4) if trans_a else (4, 0), dtype)
    b = np.zeros((3, 0) if trans_b else (0, 3), dtype)
    assert np.array_equal(_cpu.matmul(a, b, trans_a, trans_b), np.zeros((4, 3), dtype))
    bias = np.arange(3, dtype=dtype)
    assert np.array_equal(_cpu.matmul(a, b, trans_a, trans_b, bias=bias), np.tile(bias, (4, 1)))
    out = np.full((4, 3), 7, dtype)
    _cpu.matmul(a, b, trans_a, trans_b, out=out, accumulate=True)
    assert np.array_equal(out, np.full((4, 3), 7, dtype))
    _cpu.matmul(a, b, trans_a, trans_b, out=out, accumulate=True, bias=bias)
    assert np.array_equal(out, 7 + np.tile(bias, (4, 1)))
    assert _cpu.matmul(np.zeros((0, 5), dtype), np.zeros((5, 2), dtype)).shape == (0, 2)
    assert _cpu.matmul(np.zeros((2, 0, 5), dtype), np.zeros((2, 5, 0), dtype)).shape == (2, 0, 0)
    assert _cpu.matmul(np.zeros((0, 3, 5), dtype), np.zeros((0, 5, 2), dtype)).shape == (0, 3, 2)


def test_matmul_propagates_nan_and_inf():
    a = np.ones((20, 20), np.float32)
    b = np.ones((20, 20), np.float32)
    a[3, 4] = np.nan
    b[5, 6] = np.inf
    got = _cpu.matmul(a, b)
    expected = a.astype(np.float64) @ b
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.array_equal(np.isposinf(got), np.isposinf(expected))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("n", [1, 17, 513, 2304, 8197, 20011])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k", [37, 300])
def test_few_rows_wide_tasks(m, n, threads, k):
    """M ≤ _cpu.gemm_stream_rows (16) streams B (K×N) in tasks of 128-row depth chunks × up to 8192
    columns: odd widths, more columns than one task holds, several chunks
    and a partial one, and any thread count agree with NumPy; bias and
    accumulate take the same path. (k = 37 = 8 + 8 + 8 + 8 + 4 + 1: every
    sweep width of the row loop; 300 = 128 + 128 + 44.)"""
    rng = np.random.default_rng(m * 1000 + n + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = rng.standard_normal((m, n)).astype(np.float32)
    expected = out.astype(np.float64) + a.astype(np.float64) @ b + bias
    with using_threads(threads):
        got = _cpu.matmul(a, b, bias=bias)
        _cpu.matmul(a, b, bias=bias, out=out, accumulate=True)
    tol = 1e-5 * (np.abs(a).astype(np.float64) @ np.abs(b) + np.abs(bias) + 1)
    assert np.all(np.abs(got - (a.astype(np.float64) @ b + bias)) <= tol)
    assert np.all(np.abs(out - expected) <= tol + 1e-6 * np.abs(expected))


@pytest.mark.parametrize("trans_a", [False, True])
def test_few_rows_depth_chunks_are_deterministic_and_row_independent(trans_a):
    """The partial sums of the depth chunks are added in chunk order: the same
    bits for any thread count, and every row of a streamed product is bitwise
    the product of that row alone (a prompt's tokens do not depend on what
    else is in the decoding batch)."""
    rng = np.random.default_rng(5)
    k, n, rows = 1000, 777, _cpu.gemm_stream_rows
    a = rng.standard_normal((rows, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a_op = np.ascontiguousarray(a.T) if trans_a else a
    with using_threads(1):
        one = _cpu.matmul(a_op, b, trans_a=trans_a)
    for threads in (2, 3, 5):
        with using_threads(threads):
            assert np.array_equal(_cpu.matmul(a_op, b, trans_a=trans_a), one), threads
    for i in range(rows):
        assert np.array_equal(_cpu.matmul(a[i:i + 1], b), one[i:i + 1]), i
    assert_within(one, a.astype(np.float64) @ b, matmul_tolerance(a, b, k, np.float32), "depth chunks")


@pytest.mark.parametrize("k", [1, 15, 16, 17, 768, 1000])
def test_few_rows_transposed_b_rows_equal_single_row_products(k):
    """A·Bᵀ with M ≤ _cpu.gemm_stream_rows takes four rows per read of a B row (the LM head while
    decoding a batch); each row's sums keep the one-row order, so every row of
    the batched product is bitwise the product of that row alone."""
    rng = np.random.default_rng(k)
    a = rng.standard_normal((_cpu.gemm_stream_rows, k)).astype(np.float32)
    b = rng.standard_normal((1031, k)).astype(np.float32)     # (N, K), used as Bᵀ
    bias = rng.standard_normal(1031).astype(np.float32)
    for m in range(1, _cpu.gemm_stream_rows + 1):
        batched = _cpu.matmul(a[:m], b, trans_b=True, bias=bias)
        for i in range(m):
            assert np.array_equal(batched[i], _cpu.matmul(a[i:i + 1], b, trans_b=True, bias=bias)[0]), (m, i)
    expected = a.astype(np.float64) @ b.T.astype(np.float64) + bias
    assert np.allclose(batched, expected, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_thread_count(dtype):
    """Each output element is computed by one thread in a fixed order: bitwise equal."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 200)).astype(dtype)
    b = rng.standard_normal((200, 700)).astype(dtype)
    x = rng.standard_normal((500, 333)).astype(dtype)
    before = _cpu.num_threads()
    try:
        _cpu.set_num_threads(1)
        c1, y1 = _cpu.matmul(a, b), _cpu.softmax_forward(x)
        d1 = _cpu.softmax_backward(x, y1)
        _cpu.set_num_threads(5)
        assert _cpu.num_threads() == 5
        c5, y5 = _cpu.matmul(a, b), _cpu.softmax_forward(x)
        d5 = _cpu.softmax_backward(x, y5)
    finally:
        _cpu.set_num_threads(before)
    assert np.array_equal(c1, c5) and np.array_equal(y1, y5) and np.array_equal(d1, d5)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,n,k", [(3100, 700, 800), (3100, 16, 1100)])
def test_shared_driver_orders_depth_slices_under_any_thread_count(m, n, k, trans_a, trans_b):
    """The shared-block driver's task dependencies (packed blocks ready, the
    double-buffered B block free, each C tile's depth slices added in order)
    across several A blocks (M > MC), depth slices (K > KC) and B blocks
    (N > NC), with bias and accumulate; more threads than cores forces
    preemption inside tasks. With N = 16 a task is a few microseconds, so a
    preempted thread is often still holding a tile's previous slice when the
    next slice's task comes up (a version without that wait failed here).
    Bitwise equal to one thread, and correct."""
    rng = np.random.default_rng(11)
    a, b = random_operands(rng, np.float32, None, m, n, k, trans_a, trans_b)
    bias = rng.standard_normal(n).astype(np.float32)
    old = rng.standard_normal((m, n)).astype(np.float32)
    results = {}
    for threads in (1, 2, 3, 7, 7, 7, 7, 7):
        out = old.copy()
        with using_threads(threads):
            _cpu.matmul(a, b, trans_a, trans_b, bias=bias, out=out, accumulate=True)
        results.setdefault(threads, []).append(out)
    for threads in (2, 3, 7):
        for out in results[threads]:
            assert np.array_equal(out, results[1][0]), threads
    results = {t: r[0] for t, r in results.items()}
    expected = np.matmul(op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64)) + bias + old
    tol = matmul_tolerance(op(a, trans_a), op(b, trans_b), k, np.float32, np.abs(bias) + np.abs(old))
    assert_within(results[2], expected, tol, f"{m}x{k}x{n} ta={trans_a} tb={trans_b}")


def test_concurrent_python_threads():
    """The GIL is released during compute; concurrent calls must not interfere."""
    rng = np.random.default_rng(4)
    pairs = [(rng.standard_normal((150, 90)).astype(np.float32), rng.standard_normal((90, 120)).astype(np.float32))
             for _ in range(6)]
    results = [None] * len(pairs)

    def work(i):
        for _ in range(5):
            results[i] = _cpu.matmul(*pairs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (a, b), got in zip(pairs, results):
        assert_within(got, a.astype(np.float64) @ b, matmul_tolerance(a, b, 90, np.float32), "threaded")


# ---- non-contiguous inputs go through numformer.backend ---------------------

VIEWS = {
    "contiguous": lambda x: x,
    "transposed": lambda x: np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2),
    "row_slice": lambda x: np.repeat(x, 2, axis=-2)[..., ::2, :],
    "col_slice": lambda x: np.concatenate([x, x], axis=-1)[..., : x.shape[-1]],
    "reversed": lambda x: np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :],
    "fortran": lambda x: np.asfortranarray(x),
}


@settings(deadline=None)
@given(
    m=sizes, n=sizes, k=sizes,
    batch=st.one_of(st.none(), st.integers(1, 3)),
    dtype=st.sampled_from(DTYPES),
    trans_a=st.booleans(), trans_b=st.booleans(),
    view_a=st.sampled_from(sorted(VIEWS)), view_b=st.sampled_from(sorted(VIEWS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_backend_matmul_non_contiguous(m, n, k, batch, dtype, trans_a, trans_b, view_a, view_b, seed):
    rng = np.random.default_rng(seed)
    a, b = random_operands(rng, dtype, batch, m, n, k, trans_a, trans_b)
    va, vb = VIEWS[view_a](a), VIEWS[view_b](b)
    assert np.array_equal(va, a) and np.array_equal(vb, b)
    with backend.use("cpu"):
        got = backend.matmul(va, vb, trans_a=trans_a, trans_b=trans_b)
    expected = np.matmul(op(a, trans_a).astype(np.float64), op(b, trans_b).astype(np.float64))
    assert_within(got, expected, matmul_tolerance(op(a, trans_a), op(b, trans_b), k, dtype),
                  f"backend.matmul {view_a}/{view_b}")


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------

def softmax_tolerance(x, dtype, scale):
    """Error bound for y = softmax(scale·x), per row, as (atol, rtol).

    With d_j = s·x_j − m and e_j = exp(d_j):
      * exp is accurate to a few ulp:                       4u relative;
      * d_j is one rounding of a difference: relative error u in d_j, so
        u·|d_j| relative in e_j, i.e. ≤ u·max_d(|d|e^d) = u/e absolute
        in y_j — covered by atol = eps;
      * Σ_j e_j with 16 lane sums: ≤ (n/16 + 16)·u relative (worst case);
      * the final multiply by 1/Σ: 2u.
      * if scale ≠ 1, s·x_j itself is rounded (or fused): an absolute error
        of u·|s·x_j| in the exponent, i.e. relative u·max|s·x| in y.
    Values below the smallest normal number are flushed to 0: covered by atol.
    """
    n = x.shape[-1]
    e = eps(dtype)
    rtol = (8 + n / 16 + 16) * e
    if scale != 1.0:
        finite = np.abs(scale * x.astype(np.float64))
        finite = finite[np.isfinite(finite)]
        rtol += 2 * e * (finite.max() if finite.size else 0.0)
    return e, rtol


def reference_softmax(x, scale):
    with np.errstate(invalid="ignore"):  # NaN rows are expected where the input has NaN/+inf
        return softmax_reference(scale * x.astype(np.float64))


def make_logits(rng, shape, dtype, magnitude, masked_fraction):
    x = rng.standard_normal(shape) * magnitude
    if masked_fraction:
        x[rng.random(shape) < masked_fraction] = -np.inf
    return x.astype(dtype)


ROW_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 127, 1000, 1031]
row_lengths = st.one_of(st.sampled_from(ROW_LENGTHS), st.integers(1, 300))


@settings(deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    n=row_lengths,
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    masked=st.sampled_from([0.0, 0.3, 0.95]),
    scale=st.sampled_from([1.0, 0.125, -2.0, 3.7]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_forward_matches_reference(lead, n, dtype, magnitude, masked, scale, isa, seed):
    rng = np.random.default_rng(seed)
    if scale != 1.0:
        magnitude = min(magnitude, 30.0)  # |s·x| large makes the *problem* ill-conditioned, see tolerance
    if scale < 0:
        masked = 0.0  # s·(−inf) = +inf: a different (NaN) case, tested in test_softmax_extreme_logits
    x = make_logits(rng, tuple(lead) + (n,), dtype, magnitude, masked)
    with using_isa(isa):
        y = _cpu.softmax_forward(x) if scale == 1.0 else _cpu.softmax_forward(x, scale=scale)
    assert y.dtype == dtype and y.shape == x.shape and y.flags.c_contiguous
    expected = reference_softmax(x, scale)
    atol, rtol = softmax_tolerance(x, dtype, scale)
    assert_within(y, expected, atol + rtol * np.abs(expected), f"softmax {isa} {np.dtype(dtype).name} {x.shape}")
    assert np.all(y[np.isneginf(x)] == 0)  # masked entries are exactly 0
    rows = y.reshape(-1, n)
    live = ~np.all(np.isneginf(x.reshape(-1, n)), axis=-1)
    np.testing.assert_allclose(rows[live].sum(-1), 1, rtol=0, atol=(n + 16) * eps(dtype))
    assert np.all(rows[~live] == 0)


@settings(deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    n=row_lengths,
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    masked=st.sampled_from([0.0, 0.3, 1.0]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_backward_matches_reference(lead, n, dtype, magnitude, masked, isa, seed):
    """dx_j = y_j (dy_j − D), D = Σ dy_i y_i.

    Bound: D with 16 lane sums errs by ≤ (n/16 + 16)·u·Σ|dy_i y_i|; the
    subtraction and the product add a rounding each of the size of
    |dy_j| + |D| and |dx_j|. So |err_j| ≤ y_j·eps·((n/16+16)Σ|dy y| + |dy_j| + |D|) + eps|dx_j|.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (n,)
    y = softmax_reference(make_logits(rng, shape, np.float64, magnitude, masked)).astype(dtype)
    dy = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3])).astype(dtype)
    with using_isa(isa):
        dx = _cpu.softmax_backward(dy, y)
    assert dx.dtype == dtype and dx.shape == shape
    y64, dy64 = y.astype(np.float64), dy.astype(np.float64)
    expected = softmax_backward_reference(dy64, y64)
    d = np.sum(dy64 * y64, axis=-1, keepdims=True)
    mag = np.sum(np.abs(dy64 * y64), axis=-1, keepdims=True)
    e = eps(dtype)
    tol = y64 * e * ((n / 16 + 16) * mag + np.abs(dy64) + np.abs(d)) + 2 * e * np.abs(expected) + np.finfo(dtype).tiny
    assert_within(dx, expected, tol, f"softmax_backward {isa} {np.dtype(dtype).name} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_softmax_extreme_logits(dtype, isa):
    x = np.array(
        [
            [1e4, -1e4, 0.0, 1e4],               # ties at a huge maximum
            [-1e4, -1e4 + 1, -1e4, -1e4],        # everything hugely negative
            [-np.inf, 0.0, -np.inf, -np.inf],    # one live entry -> exactly 1
            [-np.inf] * 4,                       # fully masked -> zeros, not NaN
            [np.nan, 0.0, 1.0, 2.0],             # NaN propagates to the row
            [np.inf, 0.0, 1.0, 2.0],             # +inf: inf − inf is NaN -> row is NaN
            [-np.inf, np.nan, -np.inf, -np.inf],  # NaN wins over masking
            [3.0, 3.0, 3.0, 3.0],                # uniform
        ],
        dtype=dtype,
    )
    with using_isa(isa):
        y = _cpu.softmax_forward(x)
        dx = _cpu.softmax_backward(np.ones_like(x), np.nan_to_num(y))
    np.testing.assert_allclose(y[0], [0.5, 0, 0, 0.5], atol=eps(dtype))
    np.testing.assert_allclose(y[1], softmax_reference(x[1].astype(np.float64)), rtol=8 * eps(dtype))
    assert np.array_equal(y[2], np.array([0, 1, 0, 0], dtype))
    assert np.array_equal(y[3], np.zeros(4, dtype))
    assert np.isnan(y[4]).all() and np.isnan(y[5]).all() and np.isnan(y[6]).all()
    np.testing.assert_allclose(y[7], 0.25, rtol=2 * eps(dtype))
    # the reference agrees on every special row, NaN for NaN
    ref = reference_softmax(x, 1.0)
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    # a fully masked row has zero gradient; rows of y sum to 1 give dx = 0 for dy = 1
    assert np.array_equal(dx[3], np.zeros(4, dtype))
    assert np.abs(dx[[0, 1, 2, 7]]).max() <= 4 * eps(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_vocabulary_sized_rows(dtype):
    """Rows as long as GPT-2's vocabulary (50257) — several, so threads share them."""
    rng = np.random.default_rng(5)
    x = make_logits(rng, (3, 50257), dtype, 10.0, 0.01)
    x[1] = x[1] * 100  # logits in the thousands
    y = _cpu.softmax_forward(x)
    expected = reference_softmax(x, 1.0)
    atol, rtol = softmax_tolerance(x, dtype, 1.0)
    assert_within(y, expected, atol + rtol * np.abs(expected), "softmax 50257")
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = _cpu.softmax_backward(dy, y)
    y64 = y.astype(np.float64)
    exp_dx = softmax_backward_reference(dy.astype(np.float64), y64)
    tol = y64 * eps(dtype) * ((50257 / 16 + 16) * np.sum(np.abs(dy * y64), -1, keepdims=True) + np.abs(dy) + 1)
    assert_within(dx, exp_dx, tol + np.finfo(dtype).tiny, "softmax_backward 50257")


def test_softmax_empty_shapes():
    for shape in [(0,), (0, 5), (3, 0), (2, 0, 4)]:
        x = np.zeros(shape, np.float32)
        assert _cpu.softmax_forward(x).shape == shape
        assert _cpu.softmax_backward(x, x).shape == shape


def test_softmax_scale_is_softmax_of_scaled_input():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 64))
    for s in (0.125, 1 / np.sqrt(64), -1.0, 8.0):
        np.testing.assert_allclose(_cpu.softmax_forward(x, scale=s), softmax_reference(s * x), rtol=1e-13, atol=1e-16)


def test_backend_softmax_non_contiguous():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    with backend.use("cpu"):
        for view in (x.T, x[:, ::2], x[::-1]):
            y = backend.softmax(view)
            np.testing.assert_allclose(y, softmax_reference(view.astype(np.float64)), rtol=1e-5, atol=1e-7)
            dx = backend.softmax_backward(view, y)
            np.testing.assert_allclose(dx, softmax_backward_reference(view.astype(np.float64), y.astype(np.float64)),
                                       rtol=1e-4, atol=1e-6)


# ---- scale, additive masks, causal -------------------------------------------

def masked_reference(x, scale, mask, causal):
    """softmax(scale·x + mask) with causal positions at −inf, in float64."""
    x64 = x.astype(np.float64)
    m64 = None if mask is None else mask.astype(np.float64)
    return softmax_reference(backend._masked_logits(x64, scale, m64, causal))


MASK_KINDS = ["none", "keys", "square", "padding", "full"]


def make_mask(rng, kind, shape, dtype, masked_fraction):
    """An additive mask of the given broadcast kind for x of `shape` (..., Tq, Tk)."""
    tq, tk = shape[-2], shape[-1]
    mshape = {"none": None, "keys": (tk,), "square": (tq, tk),
              "padding": shape[:-2] + (1, tk) if len(shape) > 2 else (1, tk), "full": shape}[kind]
    if mshape is None:
        return None
    mask = rng.standard_normal(mshape) * 3
    mask[rng.random(mshape) < masked_fraction] = -np.inf
    return mask.astype(dtype)


@settings(deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    tq=st.sampled_from([1, 2, 5, 16, 17, 33]),
    tk=st.sampled_from([1, 3, 15, 16, 17, 31, 33, 64, 100]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(MASK_KINDS),
    masked=st.sampled_from([0.0, 0.3, 1.0]),
    causal=st.booleans(),
    scale=st.sampled_from([1.0, 0.125, 2.5]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_mask_and_causal(lead, tq, tk, dtype, kind, masked, causal, scale, isa, seed):
    """softmax(scale·x + mask), causal or not, against the NumPy definition.

    Tolerance: softmax_tolerance for the logits z = s·x + mask (|z| bounds the
    extra rounding of the product and the sum: 2·eps·max|z| relative).
    Causal with Tq > Tk leaves the first Tq − Tk rows without keys: zeros.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (tq, tk)
    x = make_logits(rng, shape, dtype, 4.0, 0.0)
    mask = make_mask(rng, kind, shape, dtype, masked)
    with using_isa(isa):
        y = _cpu.softmax_forward(x, scale=scale, mask=mask, causal=causal)
    expected = masked_reference(x, scale, mask, causal)
    z = np.abs(scale * x.astype(np.float64)) + (0 if mask is None else np.abs(mask.astype(np.float64)))
    z = z[np.isfinite(z)]
    e = eps(dtype)
    rtol = (8 + tk / 16 + 16) * e + 2 * e * (z.max() if z.size else 0.0)
    assert_within(y, expected, e + rtol * np.abs(expected), f"masked softmax {isa} {kind} causal={causal}")
    if causal:
        visible = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)
        assert np.all(y[..., ~visible] == 0)
    dead = ~np.any(expected > 0, axis=-1)  # fully masked rows: exactly zero, not NaN
    assert np.all(y[dead] == 0)
    # the backend routes the same arguments (and agrees with NumPy's backend)
    with backend.use("cpu"), using_isa(isa):
        yb = backend.softmax(x, scale=scale, mask=mask, causal=causal)
    assert np.array_equal(y, yb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_softmax_fully_masked_rows_and_long_causal(dtype, isa):
    """Whole rows masked by the mask or by causality (Tq > Tk) are zeros; a
    50257-long row with a mask hits the vector tails."""
    x = np.zeros((2, 6, 4), dtype)
    mask = np.zeros((6, 4), dtype)
    mask[1] = -np.inf
    with using_isa(isa):
        y = _cpu.softmax_forward(x, mask=mask, causal=True)  # Tq = 6 > Tk = 4: rows 0, 1 see no key
    assert np.array_equal(y[:, :2], np.zeros((2, 2, 4), dtype))
    np.testing.assert_allclose(y[:, 2], np.broadcast_to([1, 0, 0, 0], (2, 4)), atol=eps(dtype))
    np.testing.assert_allclose(y[:, 5], 0.25, rtol=4 * eps(dtype))
    rng = np.random.default_rng(8)
    xl = make_logits(rng, (3, 50257), dtype, 5.0, 0.0)
    ml = make_logits(rng, (50257,), dtype, 1.0, 0.5)
    with using_isa(isa):
        yl = _cpu.softmax_forward(xl, mask=ml, scale=0.5)
    expected = masked_reference(xl, 0.5, ml, False)
    atol, rtol = softmax_tolerance(xl, dtype, 1.0)
    assert_within(yl, expected, atol + (rtol + 2 * eps(dtype) * 20) * np.abs(expected), "long masked row")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_scale(dtype):
    """softmax_backward(dy, y, scale=s) = s · softmax_backward(dy, y): the gradient
    of softmax(s·x + mask) with respect to x."""
    rng = np.random.default_rng(9)
    y = softmax_reference(rng.standard_normal((7, 300))).astype(dtype)
    dy = rng.standard_normal((7, 300)).astype(dtype)
    s = 0.125  # a power of two: scaling is exact
    np.testing.assert_array_equal(_cpu.softmax_backward(dy, y, scale=s), s * _cpu.softmax_backward(dy, y))
    with backend.use("numpy"):
        ref = backend.softmax_backward(dy.astype(np.float64), y.astype(np.float64), scale=s)
    np.testing.assert_allclose(_cpu.softmax_backward(dy, y, scale=s), ref, rtol=50 * eps(dtype), atol=50 * eps(dtype))


def test_softmax_mask_errors():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\) does not broadcast to x of shape \(2, 3, 4\)"):
        _cpu.softmax_forward(x, mask=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        _cpu.softmax_forward(x, mask=np.zeros((3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        _cpu.softmax_forward(x, mask=np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="dtypes differ"):
        _cpu.softmax_forward(x, mask=np.zeros(4))
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.softmax_forward(x, mask=np.zeros((4, 3), np.float32).T)
    with pytest.raises(ValueError, match="causal=True needs"):
        _cpu.softmax_forward(np.zeros(4, np.float32), causal=True)


def test_backend_softmax_mask_views_match_numpy():
    """Non-contiguous x and mask through the backend; NumPy backend as the oracle."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 8, 10)).astype(np.float32)
    mask = np.where(rng.random((10, 8)) < 0.2, -np.inf, 0).astype(np.float32).T  # (8, 10) view
    xv = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, 1, 2)), 1, 2)            # same values, strided
    with backend.use("numpy"):
        ref = backend.softmax(x.astype(np.float64), scale=0.3, mask=mask.astype(np.float64), causal=True)
    with backend.use("cpu"):
        got = backend.softmax(xv, scale=0.3, mask=mask, causal=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# bad input: TypeError / ValueError, never a crash
# ---------------------------------------------------------------------------

F32 = np.ones((3, 4), np.float32)


@pytest.mark.parametrize("bad", [np.ones((3, 4), np.float16), np.ones((3, 4), np.int64), np.ones((3, 4), complex),
                                 np.ones((3, 4), ">f4"), np.ones((3, 4), bool)])
def test_wrong_dtype_raises_type_error(bad):
    name = str(bad.dtype)
    with pytest.raises(TypeError, match=f"dtype {name}"):
        _cpu.matmul(bad, F32.T.copy())
    with pytest.raises(TypeError, match=f"dtype {name}"):
        _cpu.matmul(F32, bad.T.copy())
    with pytest.raises(TypeError, match=f"dtype {name}"):
        _cpu.softmax_forward(bad)
    with pytest.raises(TypeError, match=f"dtype {name}"):
        _cpu.softmax_backward(bad, bad)


def test_mixed_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="dtypes differ: a is float32, b is float64"):
        _cpu.matmul(F32, np.ones((4, 2)))
    with pytest.raises(TypeError, match="dtypes differ"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), bias=np.ones(2))
    with pytest.raises(TypeError, match="dtypes differ"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), out=np.ones((3, 2)))
    with pytest.raises(TypeError, match="dtypes differ"):
        _cpu.softmax_backward(F32, F32.astype(np.float64))


def test_non_arrays_raise_type_error():
    with pytest.raises(TypeError, match="must be a numpy.ndarray, got list"):
        _cpu.matmul([[1.0]], [[1.0]])
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        _cpu.softmax_forward(3.0)
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        _cpu.matmul(F32, F32.T.copy(), bias=[1.0, 2.0, 3.0])


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"matmul: inner dimensions differ: a is \(3, 4\), b is \(5, 6\)"):
        _cpu.matmul(F32, np.ones((5, 6), np.float32))
    with pytest.raises(ValueError, match=r"a is \(3, 4\), b is \(3, 3\) \(trans_a=False, trans_b=True\)"):
        _cpu.matmul(F32, np.ones((3, 3), np.float32), False, True)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        _cpu.matmul(np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        _cpu.matmul(np.ones((1, 2, 3, 4), np.float32), np.ones((1, 2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="same number of dimensions"):
        _cpu.matmul(np.ones((2, 3, 4), np.float32), np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"batch dimensions differ: a is \(2, 3, 4\), b is \(3, 4, 5\)"):
        _cpu.matmul(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), bias=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), bias=np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"out has shape \(2, 3\), expected \(3, 2\)"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), out=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), accumulate=True)
    with pytest.raises(ValueError, match=r"shapes differ: dy is \(3, 4\), y is \(4, 3\)"):
        _cpu.softmax_backward(F32, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        _cpu.softmax_forward(np.array(1.0, np.float32))


def test_layout_errors():
    nc = np.ones((4, 6), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul(nc, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul(np.ones((2, 4), np.float32), nc)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul(F32.T, F32)  # a transposed view: pass trans_a=True with the base instead
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.softmax_forward(nc)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.softmax_backward(nc, nc)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), bias=np.ones(4, np.float32)[::2])
    out = np.ones((2, 3), np.float32).T
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), out=out)
    unaligned = np.frombuffer(bytearray(4 * 12 + 1), dtype=np.float32, offset=1).reshape(3, 4)
    assert not unaligned.flags.aligned
    with pytest.raises(ValueError, match="not aligned"):
        _cpu.matmul(unaligned, F32.T.copy())
    with pytest.raises(ValueError, match="not aligned"):
        _cpu.softmax_forward(unaligned)
    readonly = np.ones((3, 2), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _cpu.matmul(F32, np.ones((4, 2), np.float32), out=readonly)


def test_out_must_not_alias_inputs():
    buf = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        _cpu.matmul(buf, buf, out=buf)
    with pytest.raises(ValueError, match="must not share memory"):
        _cpu.matmul(buf[:2].copy(), buf, out=buf[2:], accumulate=True)
    flat = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        _cpu.matmul(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), out=flat[:16].reshape(4, 4),
                    bias=flat[12:16])


def test_too_large_result_is_an_error_not_a_crash():
    # (2^40, 0) @ (0, 2^40) is a legal, empty product whose result would hold 2^80 elements
    with pytest.raises((ValueError, MemoryError)):
        _cpu.matmul(np.zeros((2**40, 0), np.float32), np.zeros((0, 2**40), np.float32))


# ---------------------------------------------------------------------------
# runtime: threads, instruction sets, build info
# ---------------------------------------------------------------------------

def test_build_info_and_isas():
    info = _cpu.build_info()
    assert "compiler:" in info and "OpenMP:" in info and "SIMD:" in info
    assert isinstance(_cpu.__build_info__, str) and "compiler:" in _cpu.__build_info__
    assert "generic" in ISAS and _cpu.isa() in ISAS
    with pytest.raises(ValueError, match="unknown instruction set"):
        _cpu.set_isa("sse9")
    with pytest.raises(ValueError):
        _cpu.set_num_threads(0)


def _child(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_num_threads_environment_variable():
    r = _child("import numformer._cpu as c; print(c.num_threads())", NUMFORMER_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    r = _child("import numformer._cpu as c; print(c.num_threads())", NUMFORMER_NUM_THREADS="lots")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 1
    assert "ignoring NUMFORMER_NUM_THREADS='lots'" in r.stderr


def test_isa_environment_variable():
    r = _child("import numformer._cpu as c; print(c.isa())", NUMFORMER_ISA="generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"


def test_machine_ceilings():
    """The benchmark suite's roofline probes run and return plausible numbers."""
    peak = _cpu.measure_fma_peak(0.05, 1)
    assert 0.1 < peak < 1e5  # GFLOP/s
    bw = _cpu.measure_copy_bandwidth(4 << 20, 2)
    assert 0.01 < bw < 1e4  # GB/s
    with pytest.raises(ValueError):
        _cpu.measure_fma_peak(0.0, 1)
    with pytest.raises(ValueError):
        _cpu.measure_copy_bandwidth(1 << 20, 0)
