"""The CUDA kernels, run by the CPU emulator, agree with the NumPy specification.

``numformer._cuda_emu`` is built from the *same* kernel sources as
``numformer._cuda`` (csrc/cuda/*.cu), compiled as C++ against
csrc/cuda/emu/emu.h: every CUDA thread of a block is an OS thread,
``__syncthreads`` and warp shuffles are barriers, dynamic shared memory is
poisoned with NaN before each block (see docs/kernels.md for what this
cannot catch). Emulation is slow — one OS thread per CUDA thread — so shapes
are small and example counts limited, but they are chosen around the
kernels' tile edges (32-lane warps, 32×32 attention tiles, 128×128×8 GEMM
tiles, float4 alignment).

Every test name contains ``emu``: ``pytest -k emu`` runs this file.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("hypothesis")
emu = pytest.importorskip("numformer._cuda_emu", reason="numformer._cuda_emu (the CUDA emulator) is not built")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numformer.backend import _masked_logits  # noqa: E402
from numformer.ops import attention  # noqa: E402
from numformer.ops.softmax import softmax_backward_reference, softmax_reference  # noqa: E402

try:  # the float64 attention reference and its error bounds, shared with the CPU kernel's tests
    from test_cpu_attention import bounds as attention_bounds  # noqa: E402
    from test_cpu_attention import check as attention_check  # noqa: E402
    from test_cpu_attention import reference as attention_ref  # noqa: E402
except (ImportError, pytest.skip.Exception):  # pragma: no cover - numformer._cpu not built
    attention_ref = None

EPS = float(np.finfo(np.float32).eps)


def few(n: int) -> settings:
    """At most ``n`` examples (emulation is slow), fewer under the dev profile."""
    return settings(max_examples=min(n, settings.default.max_examples))


# How the emulator runs a block's threads: all at once (OS-interleaved), or
# one at a time in forward / reverse thread order, switching at barriers —
# which makes a missing barrier fail deterministically. Kernel tests draw one.
SCHEDULES = st.sampled_from(["threads", "forward", "reverse"])


@contextlib.contextmanager
def schedule(name: str):
    previous = emu.set_schedule(name)
    try:
        yield
    finally:
        emu.set_schedule(previous)


# ---------------------------------------------------------------------------
# the harness itself
# ---------------------------------------------------------------------------

@few(10)
@given(blocks=st.integers(1, 3), threads=st.sampled_from([32, 64, 128, 256]), data=st.data())
def test_emu_block_tree_sum_uses_shared_memory_and_barriers(blocks, threads, data):
    n = data.draw(st.integers(1, threads))
    x = np.random.default_rng(n).standard_normal((blocks, n)).astype(np.float32)
    got = emu._selftest_tree_sum(x, threads)
    np.testing.assert_allclose(got, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)


@few(10)
@given(threads=st.sampled_from([32, 64, 96]), delta=st.integers(0, 31), seed=st.integers(0, 2**31))
def test_emu_warp_shuffles_votes_and_atomics(threads, delta, seed):
    x = np.random.default_rng(seed).integers(-5, 6, threads).astype(np.int32)
    out = emu._selftest_warp_ops(x, delta)
    lane = np.arange(threads) % 32
    base = np.arange(threads) - lane                       # first thread of each warp
    np.testing.assert_array_equal(out[0], x[base + (lane ^ delta)])                             # xor
    np.testing.assert_array_equal(out[1], x[np.where(lane + delta < 32, np.arange(threads) + delta,
                                                     np.arange(threads))])                     # down
    np.testing.assert_array_equal(out[2], x[np.where(lane >= delta, np.arange(threads) - delta,
                                                     np.arange(threads))])                     # up
    np.testing.assert_array_equal(out[3], x[base + delta])                                     # broadcast
    ballots = np.array([sum(1 << i for i in range(32) if x[w * 32 + i] > 0) for w in range(threads // 32)],
                       dtype=np.uint64).astype(np.uint32).view(np.int32)
    np.testing.assert_array_equal(out[4], np.repeat(ballots, 32))
    pos = (x > 0).reshape(-1, 32)
    np.testing.assert_array_equal(out[5], np.repeat(pos.any(1), 32).astype(np.int32))
    np.testing.assert_array_equal(out[6], np.repeat(pos.all(1), 32).astype(np.int32))
    assert out[7, 0] == x.sum()                                                                # atomicAdd


@pytest.mark.parametrize("bug, match", [
    ("divergent_barrier", "divergent barrier"),
    ("divergent_shuffle", "divergent shuffle"),
    ("partial_mask", "not the whole warp"),
    ("too_many_threads", "invalid launch configuration"),
])
def test_emu_reports_kernel_bugs(bug, match):
    with pytest.raises(RuntimeError, match=match):
        emu._selftest_bug(bug)


def test_emu_poisons_uninitialised_shared_memory():
    out = emu._selftest_bug("uninitialised_shared")   # thread 63 reads s[0], which nobody wrote
    assert np.isnan(out[63]) and not np.isnan(out[:63]).any()


def test_emu_serialized_schedules_expose_a_missing_barrier():
    # Each of 64 threads writes s[t] and reads s[t + 1 mod 64]; without the
    # barrier, forward order has threads 0..62 read before their neighbour
    # wrote, reverse order has thread 63 read s[0] before thread 0 ran.
    for name, unwritten in [("forward", np.arange(63)), ("reverse", np.array([63]))]:
        with schedule(name):
            np.testing.assert_array_equal(np.flatnonzero(np.isnan(emu._selftest_bug("missing_barrier"))), unwritten)
            np.testing.assert_array_equal(emu._selftest_bug("with_barrier"), (np.arange(64) + 1) % 64)
            with pytest.raises(RuntimeError, match="divergent barrier"):
                emu._selftest_bug("divergent_barrier")
    with pytest.raises(ValueError, match="unknown emulator schedule"):
        emu.set_schedule("random")


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------
# Row lengths around the warp width (32 lanes, columns lane + 32·t).
ROW = st.one_of(st.sampled_from([1, 2, 31, 32, 33, 63, 64, 65, 100, 257]), st.integers(1, 80))


def softmax_spec(x, scale, mask, causal):
    """The definition in float64 (numformer.backend's NumPy path)."""
    x64 = x.astype(np.float64)
    m64 = None if mask is None else mask.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return softmax_reference(_masked_logits(x64, scale, m64, causal))


def check_softmax(got, want, n, zabs=0.0):
    """|err| ≤ atol + rtol·|y|: exp (≈1 ulp), the running sum of n terms in 32
    lanes, one division give rtol = (24 + n/16)·eps; forming the logit
    z = scale·x + mask in float32 is off by up to eps·|z|, which exp turns
    into a relative error of y (and of the max) — zabs = |scale·x| + |mask|."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    zmax = np.max(np.where(np.isfinite(zabs), zabs, 0), axis=-1, keepdims=True) if np.ndim(zabs) else 0.0
    rtol = (24 + n / 16) * EPS + 2 * EPS * (np.where(np.isfinite(zabs), zabs, 0) + zmax)
    ok = np.isnan(want) | (abs(got - want) <= EPS + rtol * abs(want))
    assert ok.all(), f"{(~ok).sum()} elements off; max err {np.nanmax(abs(got - want))}"


@few(80)
@given(lead=st.sampled_from([(), (3,), (2, 3), (1, 2, 5)]), n=ROW,
       mask_kind=st.sampled_from([None, "row", "full", "query", "padding"]), causal=st.booleans(),
       scale=st.sampled_from([1.0, 0.125, 3.0]), neg_inf=st.floats(0, 0.6), big=st.sampled_from([1.0, 30.0]),
       misalign=st.booleans(), sched=SCHEDULES, seed=st.integers(0, 2**31))
def test_emu_softmax_forward_matches_reference(lead, n, mask_kind, causal, scale, neg_inf, big, misalign, sched,
                                               seed):
    rng = np.random.default_rng(seed)
    if causal and len(lead) == 0:
        lead = (4,)                                   # causal needs (..., Tq, Tk)
    if mask_kind in ("padding", "query") and len(lead) == 0:
        mask_kind = "row"
    shape = lead + (n,)
    x = (rng.standard_normal(shape) * big).astype(np.float32)
    if misalign:  # one float past a 16-byte boundary: the float4 path must not be taken
        buf = np.empty(x.size + 1, np.float32)
        buf[1:] = x.ravel()
        x = buf[1:].reshape(shape)
    mask = None
    if mask_kind is not None:
        mshape = {"row": (n,), "full": shape, "query": shape[-2:],
                  "padding": (shape[0],) + (1,) * (len(shape) - 2) + (n,)}[mask_kind]
        mask = np.where(rng.random(mshape) < neg_inf, -np.inf, rng.standard_normal(mshape)).astype(np.float32)
    with schedule(sched):
        got = emu.softmax_forward(x, scale=scale, mask=mask, causal=causal)
    zabs = abs(scale * x.astype(np.float64)) + (0 if mask is None else abs(mask.astype(np.float64)))
    check_softmax(got, softmax_spec(x, scale, mask, causal), n, zabs)


def test_emu_softmax_special_rows():
    x = np.array([[0.0, 1.0, -np.inf, 2.0] * 10,                 # ordinary, with −inf entries
                  [-np.inf] * 40,                                 # fully masked: zeros
                  [0.0] * 39 + [np.nan],                          # NaN anywhere: all NaN
                  [1.0] * 20 + [np.inf] + [-np.inf] * 19,         # +inf: all NaN
                  [3e38, -3e38] * 20], dtype=np.float32)          # huge but finite
    got = emu.softmax_forward(x)
    check_softmax(got, softmax_spec(x, 1.0, None, False), 40)
    assert (got[1] == 0).all() and np.isnan(got[2]).all() and np.isnan(got[3]).all()
    # causal rows without visible keys (Tq > Tk) are zeros
    z = np.zeros((6, 3), np.float32)
    y = emu.softmax_forward(z, causal=True)
    np.testing.assert_array_equal(y[:3], 0)
    check_softmax(y, softmax_spec(z, 1.0, None, True), 3)


@few(40)
@given(rows=st.integers(1, 9), n=ROW, scale=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 2**31))
def test_emu_softmax_backward_matches_reference(rows, n, scale, seed):
    rng = np.random.default_rng(seed)
    y = softmax_reference(rng.standard_normal((rows, n))).astype(np.float32)
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    got = emu.softmax_backward(dy, y, scale=scale)
    want = scale * softmax_backward_reference(dy.astype(np.float64), y.astype(np.float64))
    # dot product of n terms, then one FMA-like update per element
    bound = (n + 4) * EPS * scale * abs(y) * (abs(dy) + (abs(dy) * y).sum(-1, keepdims=True)) + EPS
    assert (abs(got - want) <= bound).all()


def test_emu_softmax_rejects_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="float64"):
        emu.softmax_forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="broadcast"):
        emu.softmax_forward(x, mask=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        emu.softmax_forward(np.zeros((3, 2), np.float32).T)
    with pytest.raises(ValueError, match="dy is"):
        emu.softmax_backward(np.zeros((2, 2), np.float32), x)


# ---------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------
# Sizes around the 128×128×8 block tile, the 4-wide float4 loads and 1.
DIM = st.one_of(st.sampled_from([1, 3, 4, 5, 7, 8, 9, 31, 64, 127, 128, 129]), st.integers(1, 140))


def gemm_bound(a_op, b_op, K, extra=0.0):
    """Higham: |fl(A·B) − A·B| ≤ γ_K·|A|·|B|; +2 roundings for bias and old C."""
    return (K + 2) * EPS * (abs(a_op) @ abs(b_op) + extra) + 1e-30


@few(60)
@given(M=DIM, N=DIM, K=st.one_of(st.sampled_from([0, 1, 7, 8, 9, 16, 33]), st.integers(0, 70)),
       batch=st.sampled_from([None, 1, 3]), trans_a=st.booleans(), trans_b=st.booleans(),
       bias=st.booleans(), accumulate=st.booleans(), misalign=st.booleans(), sched=SCHEDULES,
       seed=st.integers(0, 2**31))
def test_emu_matmul_matches_numpy(M, N, K, batch, trans_a, trans_b, bias, accumulate, misalign, sched, seed):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)

    def operand(shape):
        # misalign: a C-contiguous view one float past a 16-byte boundary, so the
        # float4 path must fall back to element loads.
        n = int(np.prod(shape))
        buf = rng.standard_normal(n + 1).astype(np.float32)
        return (buf[1:] if misalign else buf[:n]).reshape(shape)

    a = operand(lead + ((K, M) if trans_a else (M, K)))
    b = operand(lead + ((N, K) if trans_b else (K, N)))
    a_op = np.swapaxes(a, -1, -2) if trans_a else a
    b_op = np.swapaxes(b, -1, -2) if trans_b else b
    want = a_op.astype(np.float64) @ b_op.astype(np.float64)
    extra = 0.0
    kw = {}
    if bias:
        kw["bias"] = rng.standard_normal(N).astype(np.float32)
        want = want + kw["bias"]
        extra = abs(kw["bias"])
    if accumulate:
        out = rng.standard_normal(lead + (M, N)).astype(np.float32)
        want = want + out
        extra = extra + abs(out)
        kw.update(out=out, accumulate=True)
    with schedule(sched):
        got = emu.matmul(a, b, trans_a, trans_b, **kw)
    if accumulate:
        assert got is kw["out"]
    bound = gemm_bound(a_op.astype(np.float64), b_op.astype(np.float64), K, extra)
    err = abs(got - want)
    assert (err <= bound).all(), f"max err {err.max()} (bound there {bound.flat[err.argmax()]})"


def test_emu_matmul_rejects_bad_input():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"inner dimensions differ: a is \(3, 4\), b is \(5, 6\)"):
        emu.matmul(a, np.zeros((5, 6), np.float32))
    with pytest.raises(TypeError, match="float64"):
        emu.matmul(a, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="bias"):
        emu.matmul(a, np.zeros((4, 2), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="accumulate"):
        emu.matmul(a, np.zeros((4, 2), np.float32), accumulate=True)
    with pytest.raises(ValueError, match="2-D or both 3-D"):
        emu.matmul(a, np.zeros((1, 4, 2), np.float32))


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------
# Sequence lengths around the 32×32 tiles; head sizes 1..128 around the
# 32-lane groups (a lane owns dims lane, lane + 32, …).
SEQ = st.one_of(st.sampled_from([1, 2, 31, 32, 33, 64, 65]), st.integers(1, 70))
HEAD = st.sampled_from([1, 16, 31, 32, 33, 64, 80, 96, 128])


def attention_reference(q, k, v, dout, causal, key_mask):
    """Forward + backward + lse in float64, and error bounds (from test_cpu_attention)."""
    if attention_ref is None:
        pytest.skip("tests/test_cpu_attention.py (the reference bounds) needs numformer._cpu")
    scale = 1.0 / np.sqrt(q.shape[-1])
    r = attention_ref(q, k, v, dout, causal, key_mask, scale)
    return r, attention_bounds(r, np.float32, scale)


@few(30)
@given(BH=st.sampled_from([(1, 1), (2, 1), (1, 2)]), Tq=SEQ, Tk=SEQ, D=HEAD,
       mode=st.sampled_from(["causal", "full", "padding", "causal+padding"]),
       big=st.sampled_from([1.0, 1.0, 10.0]), sched=SCHEDULES, seed=st.integers(0, 2**31))
def test_emu_attention_forward_backward_match_reference(BH, Tq, Tk, D, mode, big, sched, seed):
    # (B, H) = (2, 1) and (1, 2) cover the batch and head offsets; more heads
    # would only multiply the (slow) emulated blocks.
    B, H = BH
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, H, Tq, D)) * big).astype(np.float32)
    k = (rng.standard_normal((B, H, Tk, D)) * big).astype(np.float32)
    v = rng.standard_normal((B, H, Tk, D)).astype(np.float32)
    dout = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    causal = "causal" in mode
    key_mask = None
    if "padding" in mode:
        key_mask = rng.random((B, Tk)) < rng.uniform(0.2, 1.0)
        key_mask[0] = False if rng.random() < 0.2 else key_mask[0]   # sometimes a fully padded row
    with schedule(sched):
        out, lse = emu.attention_forward(q, k, v, causal=causal, key_mask=key_mask)
        dq, dk, dv = emu.attention_backward(dout, q, k, v, out, lse, causal=causal, key_mask=key_mask)
    want, bound = attention_reference(q, k, v, dout, causal, key_mask)
    got = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    for name in ("out", "lse", "dq", "dk", "dv"):
        attention_check(name, got[name], want[name], bound[name])
    # exact zeros where nothing is visible
    sees_nothing = ~(want["p"] > 0).any(-1)                   # (B, H, Tq)
    assert (out[sees_nothing] == 0).all() and np.isneginf(lse[sees_nothing]).all()
    assert (dq[sees_nothing] == 0).all()
    never_seen = ~(want["p"] > 0).any(-2)                      # (B, H, Tk)
    assert (dk[never_seen] == 0).all() and (dv[never_seen] == 0).all()


def test_emu_attention_cross_and_scale():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 1, 5, 32)).astype(np.float32)
    k = rng.standard_normal((1, 1, 40, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, 40, 32)).astype(np.float32)
    out, lse = emu.attention_forward(q, k, v, scale=0.5)
    s = 0.5 * q[0, 0].astype(np.float64) @ k[0, 0].T
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(lse[0, 0], np.log(p.sum(-1)) + s.max(-1), rtol=1e-5)
    np.testing.assert_allclose(out[0, 0], (p / p.sum(-1, keepdims=True)) @ v[0, 0], atol=1e-5)


def test_emu_attention_empty_and_bad_input():
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    out, lse = emu.attention_forward(z(1, 1, 3, 8), z(1, 1, 0, 8), z(1, 1, 0, 8))
    assert (out == 0).all() and np.isneginf(lse).all()
    dq, dk, dv = emu.attention_backward(z(1, 1, 3, 8), z(1, 1, 3, 8), z(1, 1, 0, 8), z(1, 1, 0, 8), out, lse)
    assert (dq == 0).all() and dk.shape == (1, 1, 0, 8)
    with pytest.raises(ValueError, match="head dimension"):
        emu.attention_forward(z(1, 1, 2, 129), z(1, 1, 2, 129), z(1, 1, 2, 129))
    with pytest.raises(ValueError, match="agree in B, H and D"):
        emu.attention_forward(z(1, 1, 2, 8), z(1, 2, 2, 8), z(1, 2, 2, 8))
    with pytest.raises(ValueError, match="key_mask"):
        emu.attention_forward(z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 2, 8), key_mask=np.ones((1, 3), bool))
    with pytest.raises(TypeError, match="key_mask"):
        emu.attention_forward(z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 2, 8), key_mask=np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="lse"):
        emu.attention_backward(z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 2, 8), z(1, 1, 3))
