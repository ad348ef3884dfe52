"""Non-finite inputs: every compiled kernel agrees with its NumPy reference on NaN and ±inf.

The NumPy references in :mod:`numformer.ops` are the specification, for
non-finite inputs too (the rule is written out in docs/kernels.md,
"Non-finite inputs"): IEEE arithmetic on the formulas as written, like
NumPy's and PyTorch's, except that what a mask hides (a key a query may
not see, a row cross-entropy ignores) does not exist for it, so its NaN or
inf never reaches the result (``0 · NaN`` would be NaN).

Every test draws an awkward shape, fills it with finite values, puts NaN,
+inf or −inf at a few positions that hypothesis picks (so a failure shrinks
to the fewest), runs the kernel — ``numformer._cpu`` in a drawn instruction-set
variant, and the CUDA kernel source through ``numformer._cuda_emu`` — and the
float64 reference on the same inputs, and asserts that

* the same positions are NaN, +inf and −inf, class for class, and
* the finite positions agree within a tolerance (float32 rounding only; the
  per-kernel test files hold the tight error bounds for finite inputs).

Examples per test are capped (``cap`` below) so that the file runs in
well under 30 s on 2 cores in the default suite. The long run raises every
cap: ``NUMFORMER_NONFINITE_EXAMPLES=2000 pytest tests/test_nonfinite.py``
(on 2 cores about 2 minutes for the ``_cpu`` tests and 12 for the emulator's;
``-k "not emu"`` leaves those out); ``HYPOTHESIS_PROFILE=dev`` lowers them.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

pytest.importorskip("hypothesis")
_cpu = pytest.importorskip("numformer._cpu", reason="numformer._cpu (the C++ extension) is not built")
try:
    from numformer import _cuda_emu as emu
except ImportError:  # pragma: no cover - built without the emulator
    emu = None

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_settings import using_isa  # noqa: E402  (tests/kernel_settings.py)
from test_cpu_attention import reference as cpu_attention_reference  # noqa: E402

from numformer import backend  # noqa: E402
from numformer.backend import _masked_logits  # noqa: E402
from numformer.ops import attention, cross_entropy, gelu, layernorm  # noqa: E402
from numformer.ops.softmax import softmax_backward_reference, softmax_reference  # noqa: E402

ISAS = st.sampled_from(_cpu.available_isas())
LONG = int(os.environ.get("NUMFORMER_NONFINITE_EXAMPLES", "0"))
needs_emu = pytest.mark.skipif(emu is None, reason="numformer._cuda_emu (the CUDA emulator) is not built")


def cap(n: int) -> settings:
    """``n`` examples (the long run: NUMFORMER_NONFINITE_EXAMPLES), never more than the profile allows."""
    return settings(max_examples=max(LONG, min(n, settings.default.max_examples)))


SPECIALS = [np.nan, np.inf, -np.inf]


@st.composite
def poison(draw, size: int, most: int = 3):
    """A few (flat index, value) pairs: where to put NaN, +inf or −inf in an array of ``size`` elements."""
    if size == 0:
        return []
    return draw(st.lists(st.tuples(st.integers(0, size - 1), st.sampled_from(SPECIALS)), min_size=0, max_size=most))


def spoil(x: np.ndarray, hits) -> np.ndarray:
    """x with the drawn non-finite values written in (a copy)."""
    x = x.copy()
    flat = x.reshape(-1)
    for idx, val in hits:
        flat[idx] = val
    return x


def check(name, got, want, rtol, atol):
    """Same NaN / +inf / −inf positions; finite ones within atol + rtol·|want|."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    for label, cls in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        g, w = cls(got), cls(want)
        if not np.array_equal(g, w):
            idx = tuple(np.argwhere(g != w)[0])
            raise AssertionError(f"{name}: {label} positions differ ({g.sum()} in the kernel, {w.sum()} in the "
                                 f"reference); first at {idx}: got {got[idx]!r}, want {want[idx]!r}")
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin])
    bad = ~(err <= atol + rtol * np.abs(want[fin]))
    if bad.any():
        i = int(np.argmax(bad))
        raise AssertionError(f"{name}: {bad.sum()} finite elements off; e.g. got {got[fin][i]!r}, "
                             f"want {want[fin][i]!r}")


def finite_part(x):
    return np.where(np.isfinite(x), x, 0)


SIDE = st.one_of(st.sampled_from([1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65]), st.integers(1, 80))
SMALL = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33]), st.integers(1, 40))


# ---------------------------------------------------------------------------
# GEMM: the reference is NumPy's matmul — Σ_k a_ik b_kj in IEEE arithmetic,
# so 0·inf is NaN and +inf + −inf is NaN, whatever the blocking and packing.
# ---------------------------------------------------------------------------

def gemm_case(data, M, N, K, batch, trans_a, trans_b, bias, accumulate, dtype=np.float32):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    lead = () if batch is None else (batch,)
    a = rng.standard_normal(lead + ((K, M) if trans_a else (M, K))).astype(dtype)
    b = rng.standard_normal(lead + ((N, K) if trans_b else (K, N))).astype(dtype)
    if data.draw(st.booleans()):      # exact zeros: 0·inf must stay NaN
        a[rng.random(a.shape) < 0.3] = 0
    a = spoil(a, data.draw(poison(a.size)))
    b = spoil(b, data.draw(poison(b.size)))
    kw = {}
    a_op = np.swapaxes(a, -1, -2) if trans_a else a
    b_op = np.swapaxes(b, -1, -2) if trans_b else b
    with np.errstate(invalid="ignore", over="ignore"):
        want = a_op.astype(np.float64) @ b_op.astype(np.float64)
        mag = finite_part(abs(a_op).astype(np.float64)) @ finite_part(abs(b_op).astype(np.float64))
        if bias:
            kw["bias"] = spoil(rng.standard_normal(N).astype(dtype), data.draw(poison(N, 1)))
            want = want + kw["bias"]
        if accumulate:
            out = rng.standard_normal(lead + (M, N)).astype(dtype)
            out = spoil(out, data.draw(poison(out.size, 2)))
            kw.update(out=out, accumulate=True)
            want = want + out
    return a, b, kw, want, (K + 4) * float(np.finfo(dtype).eps) * (mag + 4)


@cap(60)
@given(M=SIDE, N=SIDE, K=SIDE, batch=st.sampled_from([None, 2]), trans_a=st.booleans(), trans_b=st.booleans(),
       bias=st.booleans(), accumulate=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]), isa=ISAS,
       data=st.data())
def test_cpu_matmul_nonfinite(M, N, K, batch, trans_a, trans_b, bias, accumulate, dtype, isa, data):
    a, b, kw, want, tol = gemm_case(data, M, N, K, batch, trans_a, trans_b, bias, accumulate, dtype)
    with using_isa(isa):
        got = _cpu.matmul(a, b, trans_a, trans_b, **kw)
    check_with_bound("matmul", got, want, tol)


def check_with_bound(name, got, want, bound):
    """check() with an elementwise absolute bound (Higham's γ_K·|A||B|) for the finite positions."""
    check(name, got, want, 0, np.inf)                              # the classes only
    fin = np.isfinite(want)
    err = np.abs(got.astype(np.float64)[fin] - want[fin])
    assert (err <= bound[fin]).all(), f"{name}: max error {err.max()} over the bound"


def test_cpu_matmul_zero_times_inf_is_nan_at_every_size():
    """Pinned: a zero row of A against an inf in B, through the few-rows
    (streaming) path and the packed path, both transposes of B."""
    for M in (1, 5, 16, 17, 40, 130):
        for trans_b in (False, True):
            a = np.ones((M, 9), np.float32)
            a[0] = 0
            b = np.ones((9, 11), np.float32)
            b[4, 3] = np.inf
            bb = np.ascontiguousarray(b.T) if trans_b else b
            got = _cpu.matmul(a, bb, False, trans_b)
            with np.errstate(invalid="ignore"):
                want = a.astype(np.float64) @ b
            check("matmul", got, want, 1e-6, 1e-6)


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------

def softmax_case(data, rng, lead, n, causal, mask_kind):
    if causal and not lead:
        lead = (4,)
    if mask_kind in ("padding", "query") and not lead:
        mask_kind = "row"
    shape = lead + (n,)
    x = spoil(rng.standard_normal(shape).astype(np.float32), data.draw(poison(int(np.prod(shape)))))
    mask = None
    if mask_kind is not None:
        mshape = {"row": (n,), "query": shape[-2:], "padding": (shape[0],) + (1,) * (len(shape) - 2) + (n,)}[mask_kind]
        mask = np.where(rng.random(mshape) < 0.3, -np.inf, rng.standard_normal(mshape)).astype(np.float32)
        mask = spoil(mask, data.draw(poison(mask.size, 1)))
    scale = data.draw(st.sampled_from([1.0, 0.125, 3.0]))
    with np.errstate(invalid="ignore", over="ignore"):
        want = softmax_reference(_masked_logits(x.astype(np.float64), scale, mask, causal))
    return x, mask, scale, want


@cap(60)
@given(lead=st.sampled_from([(), (3,), (2, 5)]), n=SIDE, causal=st.booleans(),
       mask_kind=st.sampled_from([None, "row", "query", "padding"]), isa=ISAS, data=st.data())
def test_cpu_softmax_forward_nonfinite(lead, n, causal, mask_kind, isa, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x, mask, scale, want = softmax_case(data, rng, lead, n, causal, mask_kind)
    with using_isa(isa):
        got = _cpu.softmax_forward(x, scale=scale, mask=mask, causal=causal)
    check("softmax", got, want, 1e-5, 1e-6)


def softmax_backward_case(data, rows, n):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    z = rng.standard_normal((rows, n))
    z[rng.random(z.shape) < 0.2] = -np.inf                       # exact zeros in y
    y = softmax_reference(z).astype(np.float32)
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    y = spoil(y, data.draw(poison(y.size, 2)))
    dy = spoil(dy, data.draw(poison(dy.size)))
    scale = data.draw(st.sampled_from([1.0, 0.5]))
    with np.errstate(invalid="ignore"):
        want = softmax_backward_reference(dy.astype(np.float64), y.astype(np.float64)) * scale
    return dy, y, scale, want


@cap(60)
@given(rows=st.integers(1, 6), n=SIDE, isa=ISAS, data=st.data())
def test_cpu_softmax_backward_nonfinite(rows, n, isa, data):
    dy, y, scale, want = softmax_backward_case(data, rows, n)
    with using_isa(isa):
        got = _cpu.softmax_backward(dy, y, scale=scale)
    check("softmax_backward", got, want, 1e-5, 1e-6)


# ---------------------------------------------------------------------------
# LayerNorm, GELU, cross-entropy (the fused float32 kernels)
# ---------------------------------------------------------------------------

@cap(60)
@given(rows=st.integers(1, 6), C=SIDE, isa=ISAS, data=st.data())
def test_cpu_layernorm_nonfinite(rows, C, isa, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x, dout = (spoil(rng.standard_normal((rows, C)).astype(np.float32), data.draw(poison(rows * C)))
               for _ in range(2))
    g, b = (spoil(rng.standard_normal(C).astype(np.float32), data.draw(poison(C, 1))) for _ in range(2))
    with using_isa(isa):
        out, mean, rstd = _cpu.layernorm_forward(x, g, b, 1e-5)
        dx, dg, db = _cpu.layernorm_backward(dout, x, mean, rstd, g)
    with np.errstate(invalid="ignore", over="ignore"):
        x64 = x.astype(np.float64)
        want, cache = layernorm.forward_reference(x64, g.astype(np.float64), b.astype(np.float64), 1e-5)
        wdx, wdg, wdb = layernorm.backward_reference(dout.astype(np.float64), cache)
        wmean = x64.mean(-1)
    check("layernorm out", out, want, 1e-4, 1e-4)
    check("layernorm mean", mean.reshape(-1), wmean, 1e-5, 1e-5)
    check("layernorm rstd", rstd.reshape(-1), cache[1].reshape(-1), 1e-4, 1e-4)
    check("layernorm dx", dx, wdx, 1e-3, 1e-3)
    check("layernorm dgamma", dg, wdg, 1e-3, 1e-3)
    check("layernorm dbeta", db, wdb, 1e-4, 1e-4)


@cap(60)
@given(n=SIDE, scale=st.sampled_from([1.0, 10.0]), isa=ISAS, data=st.data())
def test_cpu_gelu_nonfinite(n, scale, isa, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = spoil((rng.standard_normal(n) * scale).astype(np.float32), data.draw(poison(n)))
    dout = spoil(rng.standard_normal(n).astype(np.float32), data.draw(poison(n)))
    with using_isa(isa):
        y = _cpu.gelu_tanh_forward(x)
        dx = _cpu.gelu_tanh_backward(dout, x)
    with np.errstate(invalid="ignore", over="ignore"):
        want, cache = gelu.forward_reference(x.astype(np.float64), "tanh")
        wdx = gelu.backward_reference(dout.astype(np.float64), cache)
        local = gelu.backward_reference(np.ones(n), cache)
    # ±inf · gelu'(x) where float64's tanh has saturated (x < −7.5: 1 + tanh u
    # rounds to 0, so gelu' is exactly 0 there, and inf · 0 = NaN) while the
    # kernel's σ form still has the true tiny gelu' (inf · −1e-30 = −inf): the
    # class is a rounding artifact of the reference there, not compared.
    moot = np.isinf(dout) & np.isfinite(x) & (local == 0)
    check("gelu", y, want, 1e-5, 1e-5)
    check("gelu backward", np.where(moot, np.nan, dx), np.where(moot, np.nan, wdx), 1e-4, 1e-5)


def test_gelu_of_infinities_pinned():
    """GELU at ±inf as the tanh formula as written gives: +inf → +inf, −inf → NaN
    (−inf · (1 + tanh(−inf)) = −inf · 0; was −inf), gelu'(±inf) = NaN (was −inf
    at −inf), and an infinite dout where gelu' is 0 gives NaN (was −inf)."""
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -20.0], np.float32)
    dout = np.array([1.0, 1.0, 1.0, 1.0, np.inf], np.float32)   # inf · gelu'(−20) = inf · 0 = NaN
    with np.errstate(invalid="ignore", over="ignore"):
        want, cache = gelu.forward_reference(x.astype(np.float64), "tanh")
        wdx = gelu.backward_reference(dout.astype(np.float64), cache)
    check("gelu", _cpu.gelu_tanh_forward(x), want, 0, 1e-30)
    check("gelu backward", _cpu.gelu_tanh_backward(dout, x), wdx, 0, 1e-30)


@cap(60)
@given(N=st.integers(1, 7), V=SIDE, isa=ISAS, data=st.data())
def test_cpu_cross_entropy_nonfinite(N, V, isa, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    z = spoil(rng.standard_normal((N, V)).astype(np.float32) * 3, data.draw(poison(N * V)))
    y = rng.integers(0, V, N)
    y[rng.random(N) < 0.3] = -100                                   # ignored rows
    with using_isa(isa):
        total, lse = _cpu.cross_entropy_forward(z, y, -100)
        count = max(int((y != -100).sum()), 1)
        dz = _cpu.cross_entropy_backward(z, y, lse, 2.0 / count, -100)
    with backend.use("numpy"), np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        loss, cache = cross_entropy.forward_reference(z.astype(np.float64), y, -100)
        wdz = cross_entropy.backward_reference(2.0, cache)
        zz = z.astype(np.float64)
        m = zz.max(-1, keepdims=True)
        ms = np.where(np.isneginf(m), 0, m)          # logsumexp of an all −inf row is −inf (log 0)
        wlse = ms[:, 0] + np.log(np.exp(zz - ms).sum(-1))
    check("cross_entropy loss", total / count, loss, 1e-4, 1e-4)
    valid = y != -100
    check("cross_entropy lse", lse[valid], wlse[valid], 1e-5, 1e-5)
    check("cross_entropy backward", dz, wdz, 1e-5, 1e-6)


# ---------------------------------------------------------------------------
# attention (forward, backward, and the few-queries decode path on _cpu)
# ---------------------------------------------------------------------------

def attention_reference(q, k, v, dout, causal, key_mask):
    """float64 forward + backward of the specification and its log-sum-exp
    (test_cpu_attention's reference), with the non-finite rule for L: a query
    that sees keys whose scores are all −inf gets NaN (0/0), not −inf."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = cpu_attention_reference(q, k, v, dout, causal, key_mask, 1.0 / math.sqrt(q.shape[-1]))
    allowed = attention.build_mask(q.shape[2], k.shape[2], causal, key_mask)
    seen = allowed.any(-1) if allowed is not None else k.shape[2] > 0
    lse = np.where(seen & np.isneginf(r["lse"]), np.nan, r["lse"])    # −inf only where m = −inf
    return dict(out=r["out"], lse=lse, dq=r["dq"], dk=r["dk"], dv=r["dv"])


def attention_inputs(data, B, H, Tq, Tk, D, mode):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, dout = (rng.standard_normal((B, H, Tq, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, H, Tk, D)).astype(np.float32) for _ in range(2))
    which = data.draw(st.sets(st.sampled_from(["q", "k", "v", "dout"]), min_size=1, max_size=2))
    arrays = dict(q=q, k=k, v=v, dout=dout)
    for name in sorted(which):
        arrays[name] = spoil(arrays[name], data.draw(poison(arrays[name].size, 2)))
    causal = "causal" in mode
    key_mask = None
    if "padding" in mode:
        key_mask = rng.random((B, Tk)) < rng.uniform(0.3, 1.0)
    return arrays["q"], arrays["k"], arrays["v"], arrays["dout"], causal, key_mask


def check_attention(got, want):
    for name in ("out", "lse", "dq", "dk", "dv"):
        check(f"attention {name}", got[name], want[name], 2e-3, 2e-4)


MODES = st.sampled_from(["causal", "full", "padding", "causal+padding"])
TQ = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 63, 64, 65]), st.integers(1, 100))
TK = st.one_of(st.sampled_from([1, 2, 5, 63, 64, 65, 129]), st.integers(1, 140))
HEAD = st.one_of(st.sampled_from([1, 3, 8, 16, 64, 80]), st.integers(1, 40))


@cap(80)
@given(B=st.integers(1, 2), H=st.integers(1, 2), Tq=TQ, Tk=TK, D=HEAD, mode=MODES,
       dtype=st.sampled_from([np.float32, np.float64]), isa=ISAS, data=st.data())
def test_cpu_attention_nonfinite(B, H, Tq, Tk, D, mode, dtype, isa, data):
    q, k, v, dout, causal, key_mask = attention_inputs(data, B, H, Tq, Tk, D, mode)
    q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))
    with using_isa(isa):
        out, lse = _cpu.attention_forward(q, k, v, causal=causal, key_mask=key_mask)
        dq, dk, dv = _cpu.attention_backward(dout, q, k, v, out, lse, causal=causal, key_mask=key_mask)
    check_attention(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), attention_reference(q, k, v, dout, causal, key_mask))


def issue_case(case: str, Tq: int, Tk: int, D: int = 16):
    """The reported cases: NaN in one row of q, NaN in k's first row, NaN in v, +inf in k;
    then all of a query's scores −inf, and NaN / inf only in keys the padding mask
    of the tests below hides (keys 1, 4, 7, …)."""
    rng = np.random.default_rng(0)
    q, dout = (rng.standard_normal((1, 2, Tq, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, Tk, D)).astype(np.float32) for _ in range(2))
    if case == "nan q row":
        q[0, 1, Tq // 2] = np.nan
    elif case == "nan k row 0":
        k[0, 0, 0] = np.nan
    elif case == "nan v":
        v[0, 1, Tk - 1 - (Tk - 2) % 3 // 2, 3] = np.nan     # the last key the mask lets through
    elif case == "+inf k":
        k[0, 0, Tk - 1 - (Tk - 2) % 3 // 2, 5] = np.inf
        q[0, 0, :, 5] = np.abs(q[0, 0, :, 5]) + 0.1      # +inf scores (not −inf): NaN rows
    elif case == "hidden nan/inf":
        v[0, 0, 1::3] = np.nan
        k[0, 1, 1::3, 2] = np.inf
    elif case == "-inf q":                       # every score of the last query is −inf: 0/0
        k[0, 0, :, 0] = np.abs(k[0, 0, :, 0]) + 0.1
        q[0, 0, Tq - 1, 0] = -np.inf
    return q, k, v, dout


CASES = ["nan q row", "nan k row 0", "nan v", "+inf k", "-inf q", "hidden nan/inf"]


@pytest.mark.parametrize("isa", _cpu.available_isas())
@pytest.mark.parametrize("T", [3, 70])              # the decode path (≤ 4 queries) and the tiled one
@pytest.mark.parametrize("mode", ["causal", "full", "causal+padding"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_attention_issue_cases(case, mode, T, isa):
    """Pinned regression tests: the cpu backend used to give zeros (or
    leak a hidden key's NaN) where the reference gives NaN."""
    q, k, v, dout = issue_case(case, T, T)
    causal = "causal" in mode
    key_mask = None
    if "padding" in mode:
        key_mask = np.ones((1, T), bool)
        key_mask[0, 1::3] = False
    with using_isa(isa):
        out, lse = _cpu.attention_forward(q, k, v, causal=causal, key_mask=key_mask)
        dq, dk, dv = _cpu.attention_backward(dout, q, k, v, out, lse, causal=causal, key_mask=key_mask)
    want = attention_reference(q, k, v, dout, causal, key_mask)
    assert np.isfinite(want["out"]).all() == (case == "hidden nan/inf" and key_mask is not None)
    check_attention(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), want)


@pytest.mark.parametrize("T", [3, 70])
def test_attention_backends_agree_on_a_nan_row_of_q(T):
    """The report itself: cpu and numpy backends through numformer.ops.attention."""
    q, k, v, dout = issue_case("nan q row", T, T)
    got = {}
    for name in ("numpy", "cpu"):
        with backend.use(name), np.errstate(invalid="ignore"):
            out, cache = attention.forward(q, k, v, causal=True)
            got[name] = (out,) + tuple(attention.backward(dout, cache))
    for a, b in zip(got["cpu"], got["numpy"]):
        check("attention", a, b, 2e-3, 2e-4)
    assert np.isnan(got["cpu"][0][0, 1, T // 2]).all()
    assert np.isfinite(np.delete(got["cpu"][0][0, 1], T // 2, axis=0)).all()


def test_reference_hidden_keys_do_not_leak():
    """The specification itself: causal row 0 never sees key 1, so NaN in
    v[1] or k[1] must leave out[0] finite, and dout's NaN in row 0 must leave
    dk, dv of keys 1.. finite (P V with P = 0 would give 0 · NaN = NaN)."""
    rng = np.random.default_rng(1)
    q, k, v, dout = (rng.standard_normal((1, 1, 5, 4)) for _ in range(4))
    v[0, 0, 1] = np.nan
    dout[0, 0, 0] = np.nan
    with backend.use("numpy"), np.errstate(invalid="ignore"):
        out, cache = attention.forward_reference(q, k, v, True, None)
        dq, dk, dv = attention.backward_reference(dout, cache)
    assert np.isfinite(out[0, 0, 0]).all() and np.isnan(out[0, 0, 1:]).all()
    assert np.isfinite(dv[0, 0, 1:]).all()   # dv_j = Σ_{i ≥ j} P_ij dO_i: row 0 (NaN) is hidden from j ≥ 1
    assert np.isnan(dv[0, 0, 0]).all() and np.isnan(dq[0, 0, 0]).all()


# ---------------------------------------------------------------------------
# the CUDA kernel source, through the emulator
# ---------------------------------------------------------------------------

@needs_emu
@cap(12)
@given(M=SMALL, N=SMALL, K=SMALL, trans_a=st.booleans(), trans_b=st.booleans(), bias=st.booleans(),
       accumulate=st.booleans(), data=st.data())
def test_emu_matmul_nonfinite(M, N, K, trans_a, trans_b, bias, accumulate, data):
    a, b, kw, want, tol = gemm_case(data, M, N, K, None, trans_a, trans_b, bias, accumulate)
    got = emu.matmul(a, b, trans_a, trans_b, **kw)
    check_with_bound("emu matmul", got, want, tol)


@needs_emu
@cap(12)
@given(lead=st.sampled_from([(), (3,), (2, 5)]), n=SMALL, causal=st.booleans(),
       mask_kind=st.sampled_from([None, "row", "query", "padding"]), data=st.data())
def test_emu_softmax_forward_nonfinite(lead, n, causal, mask_kind, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x, mask, scale, want = softmax_case(data, rng, lead, n, causal, mask_kind)
    check("emu softmax", emu.softmax_forward(x, scale=scale, mask=mask, causal=causal), want, 1e-5, 1e-6)


@needs_emu
def test_emu_softmax_nan_alone_in_its_lane_pinned():
    """Pinned: a lane whose logits are one NaN and −inf (m = −inf, s = NaN)
    used to be merged as empty, so the row came out finite (or zeros)."""
    x = np.zeros((3, 40), np.float32)
    x[0, 5] = np.nan                      # lane 5: NaN and 0 (element 37)
    x[1] = -np.inf
    x[1, 5] = np.nan                      # NaN, all else −inf: NaN, not the zeros of a masked row
    x[2, :] = np.nan                      # every lane
    with np.errstate(invalid="ignore"):
        want = softmax_reference(x.astype(np.float64))
    check("emu softmax", emu.softmax_forward(x), want, 1e-6, 1e-7)
    check("emu softmax", emu.softmax_forward(np.full((3, 1), np.nan, np.float32)), np.full((3, 1), np.nan), 0, 0)


@needs_emu
@cap(10)
@given(rows=st.integers(1, 4), n=SMALL, data=st.data())
def test_emu_softmax_backward_nonfinite(rows, n, data):
    dy, y, scale, want = softmax_backward_case(data, rows, n)
    check("emu softmax_backward", emu.softmax_backward(dy, y, scale=scale), want, 1e-5, 1e-6)


@needs_emu
@cap(10)
@given(rows=st.integers(1, 4), C=SMALL, data=st.data())
def test_emu_layernorm_and_gelu_nonfinite(rows, C, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = spoil(rng.standard_normal((rows, C)).astype(np.float32), data.draw(poison(rows * C)))
    g, b = (spoil(rng.standard_normal(C).astype(np.float32), data.draw(poison(C, 1))) for _ in range(2))
    with np.errstate(invalid="ignore", over="ignore"):
        want, _ = layernorm.forward_reference(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), 1e-5)
        wg, _ = gelu.forward_reference(x.astype(np.float64), "tanh")
    check("emu layernorm", emu.layernorm_forward(x, g, b, 1e-5), want, 1e-4, 1e-4)
    check("emu gelu", emu.gelu_tanh_forward(x), wg, 1e-5, 1e-5)


@needs_emu
@cap(10)
@given(BH=st.sampled_from([(1, 1), (2, 1), (1, 2)]), Tq=SMALL, Tk=SMALL, D=st.sampled_from([1, 5, 16, 33, 64]),
       mode=MODES, data=st.data())
def test_emu_attention_nonfinite(BH, Tq, Tk, D, mode, data):
    q, k, v, dout, causal, key_mask = attention_inputs(data, *BH, Tq, Tk, D, mode)
    out, lse = emu.attention_forward(q, k, v, causal=causal, key_mask=key_mask)
    dq, dk, dv = emu.attention_backward(dout, q, k, v, out, lse, causal=causal, key_mask=key_mask)
    check_attention(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), attention_reference(q, k, v, dout, causal, key_mask))


@needs_emu
@pytest.mark.parametrize("case", CASES)
def test_emu_attention_issue_cases(case):
    """Pinned: the CUDA kernels (two 32-key tiles, causal + padding)."""
    q, k, v, dout = issue_case(case, 33, 33)
    key_mask = np.ones((1, 33), bool)
    key_mask[0, 1::3] = False
    out, lse = emu.attention_forward(q, k, v, causal=True, key_mask=key_mask)
    dq, dk, dv = emu.attention_backward(dout, q, k, v, out, lse, causal=True, key_mask=key_mask)
    check_attention(dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), attention_reference(q, k, v, dout, True, key_mask))


@needs_emu
def test_emu_cached_attention_nonfinite():
    """The KV-cache form: a NaN inside the cache's first `length` positions
    reaches the query; one past `length` is not a key at all."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
    kc, vc = (rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for _ in range(2))
    vc[0, 0, 2, 5] = np.nan                                     # inside: out[0, 0, :, 5] is NaN
    kc[0, 1, 6] = np.nan                                        # past length 5: never read
    out, lse = emu.attention_forward_cached(q, kc, vc, 5)
    want = attention_reference(q, kc[:, :, :5], vc[:, :, :5], np.zeros_like(q), True, None)
    check("emu cached out", out, want["out"], 2e-3, 2e-4)
    check("emu cached lse", lse, want["lse"], 2e-3, 2e-4)
