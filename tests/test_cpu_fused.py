"""numformer._cpu's fused kernels agree with their NumPy references.

Kernels: LayerNorm, GELU (tanh form), cross-entropy, embedding backward,
AdamW and SGD (``csrc/cpu/{layernorm,gelu,cross_entropy,embedding,adamw}.cpp``).
The references are the ``*_reference`` functions in ``numformer.ops`` and the
NumPy code of ``numformer.optim``.

How we compare. The kernels are float32; the references are evaluated in
float64 on the *same* float32 inputs, so a difference measures the kernel's
own rounding. Each tolerance is a rounding bound with a margin, written in
units of u = 2⁻²⁴ ≈ 6e-8 (float32 unit roundoff), and each is far below the
O(1) errors a real bug (a missed element, a wrong index, a lost term) makes:

* LayerNorm: a row mean/variance is a sum of C terms in 16 partial sums;
  its error is ≤ (C/16 + 16)·u relative to Σ|terms| (≤ 85u ≈ 5e-6 for
  C ≤ 1100), and x − μ loses a further factor 1 + |μ|/σ to cancellation
  (the row's condition number). Each output is bounded by
  1e-5 · (1 + |μ|/σ) · (1 + Σ|terms of its formula|); column sums (dγ, dβ)
  by the same relative bound on the sum of their absolute terms.
* GELU: a few u relative for σ(2u) = 1/(1 + e^{−2u}) (vexp is ≤ 2 ulp), plus
  the rounding of u = k(x + a x³) amplified by |2u| inside the exponential:
  elementwise  |err| ≤ 1e-6·(1 + |x|)·(1 + |ref|).
* Cross-entropy: the kernel caches lse in float32, so e^{z − lse} carries a
  relative error ~ u·(|z| + |lse|) — inherent to float32 logits of that size
  (a float32 NumPy softmax has the same). Bound per element:
  scale·(8u·(1 + |z| + |lse|)·p + 2u); loss: 8u·(1 + max|lse|).
* Embedding backward and AdamW/SGD: *exact*. The scatter adds rows in order
  of position exactly like ``np.add.at``; the optimizers perform NumPy's
  float32 operations in NumPy's order (built without FMA contraction).

Every hypothesis example also picks the instruction-set variant, so the
generic, AVX2 and AVX-512 builds of each kernel are all checked here.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hypothesis")
_cpu = pytest.importorskip("numformer._cpu", reason="numformer._cpu (the C++ extension) is not built")
from kernel_settings import using_isa, using_threads  # noqa: E402  (tests/kernel_settings.py)
if not hasattr(_cpu, "layernorm_forward"):
    pytest.skip("numformer._cpu was built without the fused kernels", allow_module_level=True)

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numformer import backend  # noqa: E402
from numformer.ops import cross_entropy, embedding, gelu, layernorm  # noqa: E402
from numformer.optim import SGD, AdamW  # noqa: E402

U = 2.0 ** -24                      # float32 unit roundoff
ISAS = _cpu.available_isas()
# 1, primes, and vector-width edges (16 floats per AVX-512 register, 16
# partial sums in the reductions, 512-float chunks in cross-entropy).
EDGES = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 127, 128, 129]
small = st.one_of(st.sampled_from(EDGES), st.integers(1, 70))
isas = st.sampled_from(ISAS)


def assert_within(actual, ref, bound, what=""):
    """|actual − ref| ≤ bound elementwise (bound may be an array); NaNs must match."""
    actual = np.asarray(actual, np.float64)
    ref = np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(ref), err_msg=f"{what}: NaN pattern")
    ok = np.isnan(ref) | (actual == ref) | (np.abs(actual - ref) <= bound)
    if not ok.all():
        i = np.unravel_index(np.argmin(ok), ok.shape)
        b = np.broadcast_to(bound, ok.shape)[i]
        raise AssertionError(f"{what}: {np.count_nonzero(~ok)} elements off; at {i}: "
                             f"{actual[i]!r} vs {ref[i]!r} (bound {b:.3g})")


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------

@given(rows=small, C=st.one_of(small, st.sampled_from([767, 768, 769, 1031])),
       lead=st.sampled_from([(), (1,), (2,), (2, 3)]), offset=st.sampled_from([0.0, 3.0, -50.0]),
       isa=isas, seed=st.integers(0, 2**31))
@example(rows=1, C=767, lead=(), offset=-50.0, isa="generic", seed=2718)   # an x near its row's mean
def test_layernorm_matches_reference(rows, C, lead, offset, isa, seed):
    rng = np.random.default_rng(seed)
    shape = lead + (rows, C) if lead else (rows, C)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2) + offset).astype(np.float32)
    g = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    with using_isa(isa), backend.use("cpu"):
        out, cache = layernorm.forward(x, g, b)
        dx, dg, db = layernorm.backward(dout, cache)
    assert isinstance(cache, layernorm._FusedCache)
    x64, g64, b64, d64 = (a.astype(np.float64) for a in (x, g, b, dout))
    ref, rcache = layernorm.forward_reference(x64, g64, b64)
    rdx, rdg, rdb = layernorm.backward_reference(d64, rcache)
    assert out.dtype == dx.dtype == dg.dtype == np.float32
    xhat, rstd, _ = rcache
    # x − μ loses |μ|/σ·u to cancellation: that is the condition number of the row.
    cond = 1 + np.abs(x64.mean(-1, keepdims=True)) * rstd                 # (..., 1)
    tol = 1e-5 * cond
    assert_within(out, ref, tol * (1 + np.abs(g64 * xhat) + np.abs(b64)), "out")
    gg = np.abs(d64 * g64)                                                # |g|, g = γ ⊙ dout
    terms = rstd * (gg + gg.mean(-1, keepdims=True)
                    + np.abs(xhat) * (gg * np.abs(xhat)).mean(-1, keepdims=True))
    assert_within(dx, rdx, tol * (1 + terms), "dx")
    # dγ = Σ_rows dout·x̂, dβ = Σ_rows dout: bound by the sum of the absolute
    # terms. x̂'s error is absolute (~u·cond, from rounding x and μ), not
    # relative to x̂: an x near the mean has a tiny x̂ with the same absolute
    # error (found by hypothesis: C = 767, mean −50, x̂ = −0.0024).
    lead_axes = tuple(range(x.ndim - 1))
    assert_within(dg, rdg, (tol * np.abs(d64) * (1 + np.abs(xhat))).sum(lead_axes) + 1e-5 * (1 + np.abs(rdg)),
                  "dgamma")
    assert_within(db, rdb, 1e-5 * (1 + np.abs(d64).sum(lead_axes)), "dbeta")


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 3.25])
def test_layernorm_zero_variance_rows_give_beta_and_finite_grads(value):
    C = 67
    x = np.full((5, C), value, np.float32)
    g = np.linspace(-1, 1, C).astype(np.float32)
    b = np.linspace(2, 3, C).astype(np.float32)
    with backend.use("cpu"):
        out, cache = layernorm.forward(x, g, b)
        dx, dg, db = layernorm.backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(out, np.broadcast_to(b, x.shape))   # x̂ = 0 exactly
    assert np.isfinite(dx).all()
    np.testing.assert_array_equal(dg, 0)
    np.testing.assert_array_equal(db, 5)


def test_layernorm_results_do_not_depend_on_threads():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    g, b = np.ones(96, np.float32), np.zeros(96, np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        with using_threads(n):
            out, mean, rstd = _cpu.layernorm_forward(x, g, b, 1e-5)
            results.append((out,) + _cpu.layernorm_backward(dout, x, mean, rstd, g))
    for r in results[1:]:
        for a, b_ in zip(results[0], r):
            np.testing.assert_array_equal(a, b_)


# ---------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------

@given(n=st.one_of(small, st.integers(1, 5000)), scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
       isa=isas, seed=st.integers(0, 2**31))
def test_gelu_tanh_matches_reference(n, scale, isa, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    dout = rng.standard_normal(n).astype(np.float32)
    with using_isa(isa), backend.use("cpu"):
        out, cache = gelu.forward(x)
        dx = gelu.backward(dout, cache)
    assert isinstance(cache, gelu._FusedCache)
    ref, rcache = gelu.forward_reference(x.astype(np.float64))
    rdx = gelu.backward_reference(dout.astype(np.float64), rcache)
    bound = 1e-6 * (1 + np.abs(x))
    assert_within(out, ref, bound * (1 + np.abs(ref)), "gelu")
    assert_within(dx, rdx, bound * (1 + np.abs(rdx)) * (1 + np.abs(dout)), "gelu'")


def test_gelu_extreme_values():
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 9.0, -9.0, 10.5, -10.5, 20.0, -20.0, 1e4, -1e4],
                 np.float32)
    with backend.use("cpu"):
        out, cache = gelu.forward(x)
        dx = gelu.backward(np.ones_like(x), cache)
    ref, rcache = gelu.forward_reference(x.astype(np.float64))
    rdx = gelu.backward_reference(np.ones(x.shape), rcache)
    assert np.isfinite(out).all() and np.isfinite(dx).all()
    assert_within(out, ref, 1e-6 * (1 + np.abs(x)), "gelu")
    assert_within(dx, rdx, 1e-6, "gelu'")
    assert out[-2] == 1e4 and dx[-2] == 1.0 and abs(out[-1]) < 1e-30


def test_gelu_other_shapes_dtypes_and_the_exact_form_use_numpy():
    x = np.linspace(-3, 3, 24).reshape(2, 3, 4)
    with backend.use("cpu"):
        _, c64 = gelu.forward(x)                                       # float64
        _, cexact = gelu.forward(x.astype(np.float32), "none")         # erf form
        out, c = gelu.forward(x.astype(np.float32)[:, ::2])            # non-contiguous view
    assert not isinstance(c64, gelu._FusedCache) and not isinstance(cexact, gelu._FusedCache)
    assert isinstance(c, gelu._FusedCache) and out.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="approximate"):
        gelu.forward(x.astype(np.float32), "sigmoid")


# ---------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------

def _xent_check(z, y, ignore_index=-100, dloss=1.0):
    with backend.use("cpu"):
        loss, cache = cross_entropy.forward(z, y, ignore_index)
        dz = cross_entropy.backward(dloss, cache)
    assert isinstance(cache, cross_entropy._FusedCache)
    z64 = z.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):     # −inf rows in the reference
        ref, rcache = cross_entropy.forward_reference(z64, y, ignore_index)
        rdz = cross_entropy.backward_reference(dloss, rcache)
    V = z.shape[-1]
    zz = z64.reshape(-1, V)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.max(zz, axis=-1, keepdims=True)
        lse = m + np.log(np.exp(zz - np.where(np.isfinite(m), m, 0)).sum(-1, keepdims=True)) \
            - np.where(np.isfinite(m), 0, m)
    finite = np.isfinite(lse)
    lse_max = np.abs(lse[finite]).max() if finite.any() else 0.0
    if np.isnan(ref):
        assert np.isnan(loss)
    else:
        assert abs(loss - ref) <= 8 * U * (1 + lse_max), (loss, ref)
    scale = abs(dloss) / max(cache.count, 1)
    zf = np.where(np.isfinite(zz), np.abs(zz), 0)
    with np.errstate(invalid="ignore"):
        p = np.nan_to_num(np.exp(zz - lse))              # softmax (the target's p too, not p − 1)
    bound = scale * (8 * U * (1 + zf + np.abs(np.where(finite, lse, 0))) * p + 2 * U)
    assert dz.shape == z.shape and dz.dtype == np.float32
    assert_within(dz.reshape(-1, V), rdz.reshape(-1, V), bound, "dlogits")
    return loss, dz


@given(N=small, V=st.one_of(small, st.sampled_from([511, 512, 513, 1023, 1025, 2053])),
       scale=st.sampled_from([1.0, 10.0, 1e4]), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       neg_inf=st.booleans(), isa=isas, seed=st.integers(0, 2**31))
def test_cross_entropy_matches_reference(N, V, scale, ignore_frac, neg_inf, isa, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    y = rng.integers(0, V, N)
    if neg_inf and V > 1:                      # −inf logits, never at the target
        mask = rng.random((N, V)) < 0.3
        mask[np.arange(N), y] = False
        z[mask] = -np.inf
    y[rng.random(N) < ignore_frac] = -100
    with using_isa(isa):
        _xent_check(z, y, dloss=float(rng.uniform(0.1, 3)))


@pytest.mark.parametrize("rows", [1, 3])
def test_cross_entropy_gpt2_vocabulary(rows):
    rng = np.random.default_rng(rows)
    V = 50257
    z = (rng.standard_normal((rows, 2, V)) * 5).astype(np.float32)
    z[0, 0, 1000:2000] = 60.0                  # a block of large logits mid-row (max moves)
    y = rng.integers(0, V, (rows, 2))
    for isa in ISAS:
        with using_isa(isa):
            _xent_check(z, y)


def test_cross_entropy_extreme_rows():
    V = 700
    z = np.zeros((6, V), np.float32)
    z[0] = np.linspace(-1e4, 1e4, V)           # huge spread
    z[1] = -np.inf
    z[1, 5] = 2.0                              # one finite logit: p = onehot
    z[2] = -np.inf                             # entirely −inf, ignored
    z[3, ::7] = -np.inf
    z[4] = 1e4
    z[5, 600:] = -1e4
    y = np.array([V - 1, 5, -100, 1, 3, 0])
    loss, dz = _xent_check(z, y)
    assert np.isfinite(loss) and np.isfinite(dz).all()
    np.testing.assert_array_equal(dz[2], 0)
    np.testing.assert_array_equal(dz[1], 0)    # p = onehot exactly: gradient 0


def test_cross_entropy_all_ignored_and_in_place():
    z = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    y = np.full(4, -100)
    loss, dz = _xent_check(z, y)
    assert loss == 0.0 and not dz.any()
    # reuse_logits: the gradient is written over the logits, same values.
    y = np.array([1, 2, 3, 4])
    with backend.use("cpu"):
        _, c1 = cross_entropy.forward(z, y)
        expected = cross_entropy.backward(1.0, c1)
        z2 = z.copy()
        _, c2 = cross_entropy.forward(z2, y, reuse_logits=True)
        got = cross_entropy.backward(1.0, c2)
    assert np.shares_memory(got, z2)
    np.testing.assert_array_equal(got, expected)


def test_cross_entropy_nan_and_inf_rows_are_nan():
    z = np.zeros((2, 40), np.float32)
    z[0, 3] = np.nan
    z[1, 4] = np.inf
    with backend.use("cpu"):
        _, cache = cross_entropy.forward(z, np.array([0, 0]))
    assert np.isnan(cache.lse).all()


def test_cross_entropy_validates_targets():
    z = np.zeros((2, 3), np.float32)
    with backend.use("cpu"):
        with pytest.raises(ValueError, match="outside"):
            cross_entropy.forward(z, np.array([0, 3]))
        with pytest.raises(ValueError, match="outside"):
            cross_entropy.forward(z, np.array([-1, 0]))
        with pytest.raises(ValueError, match="do not match"):
            cross_entropy.forward(z, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="int64"):
        _cpu.cross_entropy_forward(z, np.array([0, 1], np.int32))
    with pytest.raises(TypeError, match="float32"):
        _cpu.cross_entropy_forward(z.astype(np.float64), np.array([0, 1]))
    with pytest.raises(ValueError, match="2-D"):
        _cpu.cross_entropy_forward(z.reshape(-1), np.array([0, 1]))


# ---------------------------------------------------------------------------
# embedding backward
# ---------------------------------------------------------------------------

@given(B=st.integers(1, 5), T=small, C=small, V=st.sampled_from([1, 2, 7, 50, 1000]),
       pos0=st.integers(0, 3), isa=isas, threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31))
def test_embedding_backward_equals_add_at(B, T, C, V, pos0, isa, threads, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(V, rng.integers(1, 8)) if rng.random() < 0.5 else V, (B, T))  # repeats
    wte = np.zeros((V, C), np.float32)
    wpe = np.zeros((T + pos0 + 2, C), np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    _, cache = embedding.forward(ids, wte, wpe, pos0)
    with using_isa(isa), using_threads(threads), backend.use("cpu"):
        dwte, dwpe = embedding.backward(dout, cache)
    rdwte, rdwpe = embedding.backward_reference(dout, cache)        # float32 np.add.at
    # Same float32 additions in the same order (row by row, n ascending): exact.
    np.testing.assert_array_equal(dwte, rdwte)
    np.testing.assert_array_equal(dwpe, rdwpe)


def test_embedding_backward_accumulates_into_given_arrays():
    rng = np.random.default_rng(1)
    ids = np.array([[3, 3, 3, 1], [0, 3, 1, 1]])
    dout = rng.standard_normal((2, 4, 5)).astype(np.float32)
    wte0 = rng.standard_normal((6, 5)).astype(np.float32)
    wpe0 = rng.standard_normal((7, 5)).astype(np.float32)
    _, cache = embedding.forward(ids, wte0, wpe0, 2)
    with backend.use("cpu"):
        dwte, dwpe = wte0.copy(), wpe0.copy()
        out = embedding.backward(dout, cache, dwte=dwte, dwpe=dwpe)
    assert out[0] is dwte and out[1] is dwpe
    rw, rp = embedding.backward_reference(dout.astype(np.float64), cache)
    np.testing.assert_allclose(dwte, wte0 + rw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dwpe, wpe0 + rp, rtol=1e-6, atol=1e-6)


def test_embedding_backward_validates():
    dout = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="outside"):
        _cpu.embedding_backward(dout, np.array([[0, 4]]), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="dout must have shape"):
        _cpu.embedding_backward(dout, np.array([[0, 1]]), np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        _cpu.embedding_backward(dout, np.array([[0, 1]]), np.zeros((4, 3), np.float32),
                                np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros((4, 3), np.float32)
        ro.flags.writeable = False
        _cpu.embedding_backward(dout, np.array([[0, 1]]), ro)
    with pytest.raises(TypeError, match="float32"):
        _cpu.embedding_backward(dout, np.array([[0, 1]]), np.zeros((4, 3)))


# ---------------------------------------------------------------------------
# optimizers: bitwise equal to the NumPy updates
# ---------------------------------------------------------------------------

def _run(opt_factory, grads_seq, backend_name, lrs):
    with backend.use(backend_name):
        opt = opt_factory()
        for g, lr in zip(grads_seq, lrs):
            opt.step(g, lr=lr)
    return opt


@given(P=st.one_of(small, st.integers(1, 3000)), masked=st.booleans(),
       wd=st.sampled_from([0.0, 0.1]), lr0=st.sampled_from([0.0, 1e-3, 0.3]),
       isa=isas, seed=st.integers(0, 2**31))
@settings(max_examples=60)
def test_adamw_is_bitwise_the_numpy_update(P, masked, wd, lr0, isa, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(P).astype(np.float32)
    mask = (rng.random(P) < 0.5).astype(np.float32) if masked else None
    grads = [(rng.standard_normal(P) * 10.0 ** rng.integers(-6, 3)).astype(np.float32) for _ in range(4)]
    lrs = [lr0, lr0 / 2, None, lr0]

    def make():
        return AdamW(p0.copy(), lr=0.01, betas=(0.9, 0.95), weight_decay=wd, decay_mask=mask)

    with using_isa(isa):
        fast = _run(make, grads, "cpu", lrs)
    ref = _run(make, grads, "numpy", lrs)
    for a, b in ((fast.params, ref.params), (fast.m, ref.m), (fast.v, ref.v)):
        np.testing.assert_array_equal(a, b)


@given(P=st.integers(1, 500), momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(),
       wd=st.sampled_from([0.0, 0.01]), masked=st.booleans(), seed=st.integers(0, 2**31))
@settings(max_examples=60)
def test_sgd_is_bitwise_the_numpy_update(P, momentum, nesterov, wd, masked, seed):
    nesterov = nesterov and momentum > 0
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(P).astype(np.float32)
    mask = (rng.random(P) < 0.5).astype(np.float32) if masked else None
    grads = [rng.standard_normal(P).astype(np.float32) for _ in range(3)]

    def make():
        return SGD(p0.copy(), lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                   decay_mask=mask)

    fast = _run(make, grads, "cpu", [None] * 3)
    ref = _run(make, grads, "numpy", [None] * 3)
    np.testing.assert_array_equal(fast.params, ref.params)
    if momentum:
        np.testing.assert_array_equal(fast.buf, ref.buf)


def test_adamw_resume_is_exact_across_backends():
    rng = np.random.default_rng(3)
    P = 1001
    p0 = rng.standard_normal(P).astype(np.float32)
    mask = (rng.random(P) < 0.6).astype(np.float32)
    grads = [rng.standard_normal(P).astype(np.float32) for _ in range(6)]
    with backend.use("cpu"):
        whole = AdamW(p0.copy(), lr=3e-3, decay_mask=mask)
        for g in grads:
            whole.step(g)
        first = AdamW(p0.copy(), lr=3e-3, decay_mask=mask)
        for g in grads[:3]:
            first.step(g)
        state, params = first.state_dict(), first.params.copy()
    for name in ("cpu", "numpy"):                # resume on either backend
        with backend.use(name):
            resumed = AdamW(params.copy(), lr=3e-3, decay_mask=mask)
            resumed.load_state_dict(state)
            for g in grads[3:]:
                resumed.step(g)
        np.testing.assert_array_equal(resumed.params, whole.params)
        np.testing.assert_array_equal(resumed.m, whole.m)
        np.testing.assert_array_equal(resumed.v, whole.v)


def test_optimizer_kernels_validate():
    p = np.zeros(4, np.float32)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    with pytest.raises(ValueError, match="grads must have shape"):
        _cpu.adamw_step(p, np.zeros(5, np.float32), p.copy(), p.copy(), None, **kw)
    with pytest.raises(ValueError, match="share memory"):
        _cpu.adamw_step(p, p, p.copy(), p.copy(), None, **kw)
    with pytest.raises(TypeError, match="float32"):
        _cpu.adamw_step(p, np.zeros(4), p.copy(), p.copy(), None, **kw)
    with pytest.raises(ValueError, match="step"):
        _cpu.adamw_step(p, p.copy(), p.copy(), p.copy(), None, **{**kw, "step": 0})
    with pytest.raises(ValueError, match="contiguous"):
        _cpu.sgd_step(np.zeros(8, np.float32)[::2], p, None, None, lr=0.1, momentum=0.0,
                      nesterov=False, weight_decay=0.0)


# ---------------------------------------------------------------------------
# the model: both backends train alike
# ---------------------------------------------------------------------------

def test_gpt2_training_losses_agree_on_both_backends():
    from numformer.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=67, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (3, 32))
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    curves = {}
    for name in ("numpy", "cpu"):
        with backend.use(name):
            model = GPT2.init(cfg, seed=5)
            opt = AdamW(model.flat, lr=3e-3, decay_mask=model.decay_mask())
            losses = []
            for _ in range(6):
                loss, grads = model.loss_and_grads(ids, targets)
                opt.step(grads)
                losses.append(loss)
        curves[name] = np.array(losses)
    assert curves["cpu"][-1] < curves["cpu"][0] - 0.1           # it learns
    # float32 throughout; the backends round differently (GEMM blocking, fused
    # sums), and six AdamW steps amplify it a little: agree to 1e-4 relative.
    np.testing.assert_allclose(curves["cpu"], curves["numpy"], rtol=1e-4)


def test_results_do_not_depend_on_thread_count_at_parallel_sizes():
    """Sizes above the kernels' parallel threshold (2^21 elements), 1 vs 2 vs 3 threads: bitwise equal."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2100, 1024)).astype(np.float32)            # 2.1M elements
    g, b = rng.standard_normal(1024).astype(np.float32), np.zeros(1024, np.float32)
    z = rng.standard_normal((90, 50257)).astype(np.float32)
    y = rng.integers(0, 50257, 90)
    ids = rng.integers(0, 300, (3, 700))
    dout = rng.standard_normal((3, 700, 1024)).astype(np.float32)
    P = 5_000_003
    grads = rng.standard_normal(P).astype(np.float32)

    def run():
        out, mean, rstd = _cpu.layernorm_forward(x, g, b, 1e-5)
        ln = (out,) + _cpu.layernorm_backward(x, x, mean, rstd, g)
        ge = (_cpu.gelu_tanh_forward(x), _cpu.gelu_tanh_backward(x, x))
        total, lse = _cpu.cross_entropy_forward(z, y)
        xe = (np.float64(total), lse, _cpu.cross_entropy_backward(z, y, lse, 0.01))
        dwte = np.zeros((300, 1024), np.float32)
        _cpu.embedding_backward(dout, ids, dwte)
        p, m, v = np.ones(P, np.float32), np.zeros(P, np.float32), np.zeros(P, np.float32)
        _cpu.adamw_step(p, grads, m, v, None, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                        weight_decay=0.1, step=1)
        return ln + ge + xe + (dwte, p, m, v)

    results = []
    for n in (1, 2, 3):
        with using_threads(n):
            results.append(run())
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a, b_)
