"""numformer._cpu flash attention agrees with the NumPy reference.

The specification is ``numformer.ops.attention.forward_reference`` /
``backward_reference`` (materialized Tq×Tk scores). References run in
float64 on the *same* inputs (float32 inputs are upcast exactly), so a
difference measures the kernel's own rounding, and the tolerances below are
first-order error *bounds* built from the reference's own P, not fudge
factors. With u = the kernel dtype's unit roundoff and, per score,
a_ij = scale·Σ_d |q_id||k_jd| (what rounding in S = scale·q·kᵀ is relative to):

  ΔS_ij  ≤ (D+2)·u·a_ij + 4u·|S_ij|          dot product, then exp(S − m)
  ΔP_ij  ≤ P_ij·ε_i,  ε_i = 2·max_j ΔS_ij + (Tk+8)·u       (softmax, running sum)
  Δout_i ≤ (ε_i + (Tk+D)·u) · (P|V|)_i
  Δlse_i ≤ max_j ΔS_ij + (Tk+4)·u·(1 + |lse_i|)
  ΔdP_ij ≤ (D+2)·u·(|dO||V|ᵀ)_ij,  ΔD_i ≤ (D+2)·u·(|dO|·|O|)_i + D·u·(|dO||ΔO|)
  ΔdS_ij ≤ P_ij·(ε_i·|dP_ij − D_i| + ΔdP_ij + ΔD_i)
  ΔdV ≤ (Pᵀ(ε|dO|) + (Tq+2)u·Pᵀ|dO|),  ΔdQ ≤ scale·(ΔdS|K| + (Tk+2)u·|dS||K|),  ΔdK likewise
Each is multiplied by a safety factor of 4. A wrong index, a missed tile or a
mask off by one is O(|V|) — far above these — while typical errors are far
below. Where P is exactly 0 (masked) the bound is 0: masked scores must give
*exact* zeros (a fully masked query row: out = 0, lse = −inf, zero gradients).
Results of exp below the smallest normal number are flushed to 0 (vexp.h);
a tiny absolute term ((Tq+Tk)·tiny·magnitude³, ~1e-30 in float32) covers that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("hypothesis")
_cpu = pytest.importorskip("numformer._cpu", reason="numformer._cpu (the C++ extension) is not built")
from kernel_settings import using_isa  # noqa: E402  (tests/kernel_settings.py)
if not hasattr(_cpu, "attention_forward"):  # pragma: no cover - an older build
    pytest.skip("numformer._cpu has no attention kernels", allow_module_level=True)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numformer import backend  # noqa: E402
from numformer.ops import attention  # noqa: E402

ISAS = _cpu.available_isas()
SAFETY = 4.0
# Sequence lengths around the kernel's tiles (64 queries × 64 keys) and
# vector widths (4/8/16 lanes): 1, primes, edges ± 1.
T_EDGES = [1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 33, 63, 64, 65, 97, 127, 128, 129]
seq = st.one_of(st.sampled_from(T_EDGES), st.integers(1, 140))
dims = st.one_of(st.sampled_from([1, 3, 32, 64, 80, 128]), st.integers(1, 40))


def reference(q, k, v, dout, causal, key_mask, scale):
    """float64 reference forward + backward, plus the pieces the bounds need."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    with backend.use("numpy"):
        out, cache = attention.forward_reference(q, k, v, causal, key_mask)
        dq, dk, dv = attention.backward_reference(dout, cache)
    p = cache[3]                                                   # (B, H, Tq, Tk)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    allowed = attention.build_mask(Tq, Tk, causal, key_mask)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    with np.errstate(divide="ignore"):
        m = s.max(-1, keepdims=True) if Tk else np.full((B, H, Tq, 1), -np.inf)
        ms = np.where(np.isneginf(m), 0, m)
        lse = (np.log(np.exp(s - ms).sum(-1, keepdims=True)) + ms)[..., 0] if Tk else m[..., 0]
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, p=p, s=s, q=q, k=k, v=v, dout=dout)


def bounds(r, dtype, scale):
    """The first-order error bounds from the module docstring (before SAFETY)."""
    u = float(np.finfo(dtype).eps) / 2
    q, k, v, dout, p, s, out = r["q"], r["k"], r["v"], r["dout"], r["p"], r["s"], r["out"]
    D, Tq, Tk = q.shape[-1], q.shape[2], k.shape[2]
    a = np.einsum("bhid,bhjd->bhij", abs(q), abs(k)) * scale
    vis = p > 0
    ds_err = np.where(vis, (D + 2) * u * a + 4 * u * np.where(np.isfinite(s), abs(s), 0), 0)
    ds_max = ds_err.max(-1, initial=0.0)                                        # (B, H, Tq)
    eps_i = (2 * ds_max + (Tk + 8) * u)[..., None]                               # (B, H, Tq, 1)
    pv = np.einsum("bhij,bhjd->bhid", p, abs(v))
    # exp results below the smallest normal are flushed to 0 (vexp.h): a P that
    # small moves any output by at most tiny·(sizes)·(magnitudes).
    mag = 1 + max(abs(x).max(initial=0) for x in (q, k, v, dout, out))
    tiny = (Tq + Tk + 1) * float(np.finfo(dtype).tiny) * mag**3 * (1 + scale) * 4
    e_out = (eps_i + (Tk + D) * u) * pv + tiny
    e_lse = ds_max + (Tk + 4) * u * (1 + np.where(np.isfinite(r["lse"]), abs(r["lse"]), 0))
    dp = np.einsum("bhid,bhjd->bhij", dout, v)
    Di = (dout * out).sum(-1, keepdims=True)
    e_dp = (D + 2) * u * np.einsum("bhid,bhjd->bhij", abs(dout), abs(v))
    e_D = (D + 2) * u * (abs(dout) * abs(out)).sum(-1, keepdims=True) + (abs(dout) * e_out).sum(-1, keepdims=True)
    ds = p * (dp - Di)
    e_ds = p * (eps_i * abs(dp - Di) + e_dp + e_D)
    e_dv = np.einsum("bhij,bhid->bhjd", p * (eps_i + (Tq + 2) * u), abs(dout)) + tiny
    e_dq = scale * (np.einsum("bhij,bhjd->bhid", e_ds + (Tk + 2) * u * abs(ds), abs(k))) + tiny
    e_dk = scale * (np.einsum("bhij,bhid->bhjd", e_ds + (Tq + 2) * u * abs(ds), abs(q))) + tiny
    return dict(out=e_out, lse=e_lse, dq=e_dq, dk=e_dk, dv=e_dv)


def check(name, got, want, bound):
    got = got.astype(np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    both_inf = np.isneginf(got) & np.isneginf(want)
    err = np.where(both_inf, 0.0, abs(got - np.where(both_inf, 0, want)))
    bad = ~(err <= SAFETY * bound)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} elements off; first at {idx}: "
                             f"got {got[idx]!r}, want {want[idx]!r}, bound {SAFETY * bound[idx]:.3g}")


def run_kernel(q, k, v, dout, causal, key_mask):
    out, lse = _cpu.attention_forward(q, k, v, causal=causal, key_mask=key_mask)
    dq, dk, dv = _cpu.attention_backward(dout, q, k, v, out, lse, causal=causal, key_mask=key_mask)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def checked_against_reference(q, k, v, dout, causal, key_mask, isa):
    """Forward and backward on instruction set ``isa``, each output checked
    against the float64 reference within its bound -> (kernel outputs, reference)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    r = reference(q, k, v, dout, causal, key_mask, scale)
    with using_isa(isa):
        got = run_kernel(q, k, v, dout, causal, key_mask)
    e = bounds(r, q.dtype, scale)
    for name in ("out", "lse", "dq", "dk", "dv"):
        check(name, got[name], r[name], e[name])
    return got, r


@given(B=st.integers(1, 2), H=st.integers(1, 2), Tq=seq, Tk=seq, D=dims,
       mode=st.sampled_from(["causal", "full", "causal-cross", "padding", "causal+padding"]),
       dtype=st.sampled_from([np.float32, np.float64]), big=st.sampled_from([1.0, 1.0, 30.0, 1e3]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def test_forward_and_backward_match_reference(B, H, Tq, Tk, D, mode, dtype, big, isa, seed):
    rng = np.random.default_rng(seed)
    if mode in ("causal", "full"):
        Tk = Tq                                                  # self-attention
    if B * H * Tq * Tk * D > 600_000:                            # keep the float64 reference quick
        Tk = max(1, 600_000 // (B * H * Tq * D))
    causal = mode.startswith("causal")
    q = (rng.standard_normal((B, H, Tq, D)) * big).astype(dtype)   # big: extreme logits
    k, v = (rng.standard_normal((B, H, Tk, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    key_mask = None
    if "padding" in mode:
        key_mask = rng.random((B, Tk)) < rng.choice([0.0, 0.1, 0.7, 1.0])  # incl. empty / full masks
    got, r = checked_against_reference(q, k, v, dout, causal, key_mask, isa)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name].dtype == dtype
    # Queries that see no key: exactly zero output and gradient, lse = −inf.
    dead = ~(r["p"] > 0).any(-1)                                     # (B, H, Tq)
    assert np.all(got["out"][dead] == 0) and np.all(got["dq"][dead] == 0)
    assert np.all(np.isneginf(got["lse"][dead])) and not np.isnan(got["lse"]).any()
    unseen = ~(r["p"] > 0).any(-2)                                   # keys nobody sees
    assert np.all(got["dk"][unseen] == 0) and np.all(got["dv"][unseen] == 0)


@given(B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 5), Tk=st.integers(1, 300), D=dims,
       mode=st.sampled_from(["causal-cross", "full", "padding", "causal+padding"]),
       dtype=st.sampled_from([np.float32, np.float64]), big=st.sampled_from([1.0, 30.0, 1e3]),
       spare=st.integers(0, 17), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def test_few_queries_against_a_kv_cache_match_reference(B, H, Tq, Tk, D, mode, dtype, big, spare, isa, seed):
    """Decoding: up to 4 queries take the direct path (dot products per key,
    four keys at a time), 5 the tiled one; K and V are prefixes of a larger,
    preallocated cache (strided along T). Forward against the float64
    reference, and the backward from the forward's log-sum-exp."""
    rng = np.random.default_rng(seed)
    Tk = max(Tk, Tq) if mode.startswith("causal") else Tk
    causal = mode.startswith("causal")
    q = (rng.standard_normal((B, H, Tq, D)) * big).astype(dtype)
    cache_k, cache_v = (rng.standard_normal((B, H, Tk + spare, D)).astype(dtype) for _ in range(2))
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]
    dout = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    key_mask = None
    if "padding" in mode:
        key_mask = rng.random((B, Tk)) < rng.choice([0.0, 0.3, 1.0])
    got, r = checked_against_reference(q, k, v, dout, causal, key_mask, isa)
    dead = ~(r["p"] > 0).any(-1)
    assert np.all(got["out"][dead] == 0) and np.all(np.isneginf(got["lse"][dead]))
    assert not np.isnan(got["out"]).any() and not np.isnan(got["lse"]).any()


def test_fully_masked_rows_give_zeros_not_nan():
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((2, 2, 5, 8)).astype(np.float32) for _ in range(4))
    key_mask = np.array([[False] * 5, [True, False, True, False, True]])
    out, lse = _cpu.attention_forward(q, k, v, key_mask=key_mask)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0])) and np.isfinite(out).all()
    dq, dk, dv = _cpu.attention_backward(dout, q, k, v, out, lse, key_mask=key_mask)
    assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
    assert np.all(dk[1][:, 1::2] == 0) and np.all(dv[1][:, 1::2] == 0)
    # causal with more queries than keys: the first Tq − Tk queries see nothing
    out, lse = _cpu.attention_forward(q, k[:, :, :2], v[:, :, :2], causal=True)
    assert np.all(out[:, :, :3] == 0) and np.all(np.isneginf(lse[:, :, :3])) and np.all(np.isfinite(lse[:, :, 3:]))


def test_empty_sequences():
    z = np.zeros((1, 2, 0, 4), np.float32)
    x = np.ones((1, 2, 3, 4), np.float32)
    out, lse = _cpu.attention_forward(x, z, z)                        # no keys at all
    assert out.shape == (1, 2, 3, 4) and np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv = _cpu.attention_backward(x, x, z, z, out, lse)
    assert np.all(dq == 0) and dk.shape == (1, 2, 0, 4)
    out, lse = _cpu.attention_forward(z, x, x)                        # no queries
    assert out.shape == (1, 2, 0, 4) and lse.shape == (1, 2, 0)
    dq, dk, dv = _cpu.attention_backward(z, z, x, x, out, lse)
    assert np.all(dk == 0) and np.all(dv == 0)


def test_long_sequence_and_large_head_against_reference():
    """One bigger case (several tiles both ways, cross-attention, D = 128)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 200, 128)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 333, 128)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    for causal in (False, True):
        r = reference(q, k, v, dout, causal, None, 1 / math.sqrt(128))
        got = run_kernel(q, k, v, dout, causal, None)
        e = bounds(r, np.float32, 1 / math.sqrt(128))
        for name in ("out", "lse", "dq", "dk", "dv"):
            check(name, got[name], r[name], e[name])


def test_strided_views_are_read_in_place_and_match_copies():
    """Head-split views of a fused qkv buffer and KV-cache slices (strided along T)."""
    rng = np.random.default_rng(1)
    B, T, H, D = 2, 37, 3, 16
    C = H * D
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    q, k, v = (attention.split_heads(qkv[..., i * C:(i + 1) * C], H) for i in range(3))
    assert not q.flags.c_contiguous
    dout = attention.split_heads(rng.standard_normal((B, T, C)).astype(np.float32), H)
    got = run_kernel(q, k, v, dout, True, None)
    want = run_kernel(*(np.ascontiguousarray(x) for x in (q, k, v, dout)), True, None)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # KV cache: one new query against a prefix of a preallocated cache
    cache_k = rng.standard_normal((B, H, 64, D)).astype(np.float32)
    cache_v = rng.standard_normal((B, H, 64, D)).astype(np.float32)
    q1 = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    out, _ = _cpu.attention_forward(q1, cache_k[:, :, :20], cache_v[:, :, :20], causal=True)
    ref, _ = _cpu.attention_forward(q1, np.ascontiguousarray(cache_k[:, :, :20]),
                                    np.ascontiguousarray(cache_v[:, :, :20]), causal=True)
    np.testing.assert_array_equal(out, ref)
    # a view that is not contiguous along D goes through the backend (copied there)
    qf = np.asfortranarray(np.ascontiguousarray(q))
    with pytest.raises(ValueError, match="contiguous along its last axis"):
        _cpu.attention_forward(qf[..., ::2], k[..., ::2], v[..., ::2])
    out_b, _ = backend.attention_forward(q[..., ::2], k[..., ::2], v[..., ::2], True, None)
    with backend.use("numpy"):
        out_n, _ = backend.attention_forward(q[..., ::2], k[..., ::2], v[..., ::2], True, None)
    np.testing.assert_allclose(out_b, out_n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tq, tk", [(150, 150), (1, 300)])   # tiled path; decode path (threads from 256 KiB)
def test_results_do_not_depend_on_thread_count(tq, tk):
    rng = np.random.default_rng(2)
    q, dout = (rng.standard_normal((1, 12, tq, 64)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 12, tk, 64)).astype(np.float32) for _ in range(2))
    before = _cpu.num_threads()
    try:
        _cpu.set_num_threads(1)
        one = run_kernel(q, k, v, dout, True, None)
        _cpu.set_num_threads(3)
        three = run_kernel(q, k, v, dout, True, None)
    finally:
        _cpu.set_num_threads(before)
    for name in one:
        np.testing.assert_array_equal(one[name], three[name])


@pytest.mark.parametrize("D", [64, 80, 13])       # the AVX2 decode forms (D % 8 = 0) and the portable one
@pytest.mark.parametrize("isa", ISAS)
def test_decode_ignores_non_finite_values_of_hidden_keys(D, isa):
    """A hidden key has p = 0; its values must not reach the output even
    when they are inf or NaN (0·inf would be NaN)."""
    rng = np.random.default_rng(D)
    q = rng.standard_normal((2, 3, 1, D)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 37, D)).astype(np.float32) for _ in range(2))
    key_mask = rng.random((2, 37)) < 0.6
    key_mask[:, 0] = True
    v_bad = v.copy()
    v_bad[0][:, ~key_mask[0]] = np.inf                     # (H, hidden keys, D) of each row
    v_bad[1][:, ~key_mask[1]] = np.nan
    with using_isa(isa):
        want, _ = _cpu.attention_forward(q, k, np.where(key_mask[:, None, :, None], v, 0), causal=False,
                                         key_mask=key_mask)
        got, _ = _cpu.attention_forward(q, k, v_bad, causal=False, key_mask=key_mask)
    np.testing.assert_array_equal(got, want)


def test_explicit_scale():
    rng = np.random.default_rng(4)
    q, k, v, dout = (rng.standard_normal((1, 1, 9, 4)) for _ in range(4))
    out, lse = _cpu.attention_forward(q, k, v, scale=0.25)
    out2, lse2 = _cpu.attention_forward(q * 0.5, k, v)                 # 1/√4 = 0.5
    np.testing.assert_allclose(out, out2, rtol=1e-13)
    np.testing.assert_allclose(lse, lse2, rtol=1e-13)


# ---------------------------------------------------------------------------
# invalid input
# ---------------------------------------------------------------------------

def _qkv(dtype=np.float32, Tq=4, Tk=4, D=8):
    return (np.zeros((2, 3, Tq, D), dtype), np.zeros((2, 3, Tk, D), dtype), np.zeros((2, 3, Tk, D), dtype))


@pytest.mark.parametrize("make, exc, match", [
    (lambda q, k, v: (q.astype(np.int32), k, v), TypeError, "dtype int32"),
    (lambda q, k, v: (q.astype(np.float16), k, v), TypeError, "float16"),
    (lambda q, k, v: (q, k.astype(np.float64), v), TypeError, "dtypes differ"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "numpy.ndarray"),
    (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, "k has shape"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v has shape"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k has shape"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "D must be >= 1"),
    (lambda q, k, v: (q.astype(">f4"), k, v), TypeError, "dtype"),
])
def test_invalid_inputs_raise(make, exc, match):
    q, k, v = make(*_qkv())
    with pytest.raises(exc, match=match):
        _cpu.attention_forward(q, k, v)


def test_invalid_masks_and_backward_arguments_raise():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="key_mask has dtype"):
        _cpu.attention_forward(q, k, v, key_mask=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="key_mask has shape"):
        _cpu.attention_forward(q, k, v, key_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.attention_forward(q, k, v, key_mask=np.ones((4, 2), bool).T)
    with pytest.raises(ValueError, match="scale must be finite"):
        _cpu.attention_forward(q, k, v, scale=float("nan"))
    out, lse = _cpu.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse has shape"):
        _cpu.attention_backward(out, q, k, v, out, lse[..., :2])
    with pytest.raises(ValueError, match="dout has shape"):
        _cpu.attention_backward(out[:, :, :2], q, k, v, out, lse)
    with pytest.raises(TypeError, match="dtypes differ"):
        _cpu.attention_backward(out.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _cpu.attention_backward(out, q, k, v, out, np.zeros((4, 3, 2), np.float32).T)


def test_too_large_raises_before_touching_memory():
    q = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (1, 1, 2**32, 8), (0, 0, 0, 4))
    with pytest.raises(ValueError, match="too large"):
        _cpu.attention_forward(q, q, q)


# ---------------------------------------------------------------------------
# the model on both backends
# ---------------------------------------------------------------------------

def test_gpt2_training_and_generation_agree_across_backends():
    from numformer.generate import generate
    from numformer.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=31, n_positions=80, n_embd=32, n_layer=2, n_head=2)
    model = GPT2.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 31, (2, 70))                       # 70 > one 64-token tile
    targets = rng.integers(0, 31, (2, 70))
    with backend.use("numpy"):
        loss_n, grads_n = model.loss_and_grads(ids, targets)
        gen_n = generate(model, [1, 2, 3], 12, temperature=0)
    with backend.use("cpu"):
        loss_c, grads_c = model.loss_and_grads(ids, targets)
        gen_c = generate(model, [1, 2, 3], 12, temperature=0)
    assert abs(loss_n - loss_c) <= 1e-5 * abs(loss_n)
    np.testing.assert_allclose(grads_c, grads_n, rtol=1e-3, atol=1e-5 * np.abs(grads_n).max())
    assert gen_c == gen_n
    # float64 (what gradchecks use) goes through the kernel too, to ~1e-12
    m64 = model.astype(np.float64)
    with backend.use("numpy"):
        l64n, g64n = m64.loss_and_grads(ids, targets)
    with backend.use("cpu"):
        l64c, g64c = m64.loss_and_grads(ids, targets)
    assert abs(l64n - l64c) <= 1e-12 * abs(l64n)
    np.testing.assert_allclose(g64c, g64n, rtol=1e-9, atol=1e-12 * np.abs(g64n).max())
