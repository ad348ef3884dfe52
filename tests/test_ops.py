"""Forward semantics of each op, on random inputs (the gradients are in test_gradcheck.py)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numformer import backend
from numformer.ops import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear, softmax

sizes = st.integers(1, 9)


def naive_attention(q, k, v, causal, key_mask=None):
    """One (b, h) at a time with explicit loops over queries: the obvious definition."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                s = k[b, h] @ q[b, h, i] / math.sqrt(D)
                ok = np.ones(Tk, bool)
                if causal:
                    ok &= np.arange(Tk) <= i + Tk - Tq
                if key_mask is not None:
                    ok &= key_mask[b]
                if ok.any():
                    w = np.exp(s[ok] - s[ok].max())
                    out[b, h, i] = (w / w.sum()) @ v[b, h][ok]
    return out


@given(B=sizes, H=st.integers(1, 3), Tq=sizes, extra=st.integers(0, 4), D=st.integers(1, 8),
       causal=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**31))
def test_attention_matches_naive_loops(B, H, Tq, extra, D, causal, masked, seed):
    rng = np.random.default_rng(seed)
    Tk = Tq + extra
    q, k, v = (rng.standard_normal((B, H, T, D)) for T in (Tq, Tk, Tk))
    key_mask = rng.random((B, Tk)) > 0.3 if masked else None
    with backend.use("numpy"):
        out, _ = attention.forward(q, k, v, causal, key_mask)
    np.testing.assert_allclose(out, naive_attention(q, k, v, causal, key_mask), atol=1e-12)


def test_fully_masked_attention_row_is_zero_not_nan():
    q = k = v = np.ones((1, 1, 3, 2))
    out, cache = attention.forward(q, k, v, causal=False, key_mask=np.zeros((1, 3), bool))
    assert np.all(out == 0)
    dq, dk, dv = attention.backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(dq)) and np.all(dq == 0)


def test_split_and_merge_heads_are_inverse():
    x = np.arange(2 * 3 * 12, dtype=float).reshape(2, 3, 12)
    heads = attention.split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(heads[1, 2, 0], x[1, 0, 6:9])
    np.testing.assert_array_equal(attention.merge_heads(heads), x)


@given(rows=sizes, n=st.integers(1, 40), seed=st.integers(0, 2**31), big=st.sampled_from([1.0, 1e3, 1e30]))
def test_softmax_reference_is_a_stable_distribution(rows, n, seed, big):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * big).astype(np.float32)
    y = softmax.softmax_reference(x)
    assert np.all(np.isfinite(y)) and np.all(y >= 0)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.argmax(y, -1) == np.argmax(x, -1))


def test_softmax_masked_entries_and_rows():
    x = np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    y = softmax.softmax_reference(x)
    np.testing.assert_array_equal(y, [[0.5, 0, 0.5], [0, 0, 0]])


@given(B=sizes, T=sizes, C=st.integers(2, 16), seed=st.integers(0, 2**31))
def test_layernorm_normalizes_each_row(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * 5 + 3
    out, _ = layernorm.forward(x, np.ones(C), np.zeros(C))
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-10)
    np.testing.assert_allclose(out.var(-1), x.var(-1) / (x.var(-1) + 1e-5), rtol=1e-8)


def test_gelu_forms_against_definitions():
    x = np.linspace(-6, 6, 101)
    exact, _ = gelu.forward(x, "none")
    phi = np.array([0.5 * (1 + math.erf(t / math.sqrt(2))) for t in x])
    np.testing.assert_allclose(exact, x * phi, rtol=1e-15, atol=1e-15)
    approx, _ = gelu.forward(x, "tanh")
    np.testing.assert_allclose(approx, exact, atol=2e-3)     # the tanh form is an approximation
    assert gelu.forward(x.astype(np.float32), "tanh")[0].dtype == np.float32
    with pytest.raises(ValueError, match="approximate"):
        gelu.forward(x, "sigmoid")


def test_embedding_scatter_add_counts_repeated_ids():
    wte, wpe = np.zeros((5, 2)), np.zeros((4, 2))
    ids = np.array([[3, 3, 3, 1]])
    out, cache = embedding.forward(ids, wte, wpe)
    dwte, dwpe = embedding.backward(np.ones((1, 4, 2)), cache)
    np.testing.assert_array_equal(dwte[3], [3, 3])           # three occurrences, not one
    np.testing.assert_array_equal(dwte[1], [1, 1])
    np.testing.assert_array_equal(dwpe, np.ones((4, 2)))
    with pytest.raises(ValueError, match="exceeds the context"):
        embedding.forward(np.zeros((1, 5), int), wte, wpe)


@given(N=sizes, V=st.integers(2, 20), seed=st.integers(0, 2**31))
def test_cross_entropy_matches_definition_with_ignore_index(N, V, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, V)) * 10
    y = rng.integers(0, V, N)
    y[rng.random(N) < 0.3] = -100
    loss, _ = cross_entropy.forward(z, y)
    keep = y != -100
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = -logp[keep, y[keep]].mean() if keep.any() else 0.0
    assert loss == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="outside"):
        cross_entropy.forward(np.zeros((2, 3)), np.array([0, 3]))


def test_dropout_train_and_eval():
    rng = np.random.default_rng(0)
    x = np.ones((200, 200), np.float32)
    out, mask = dropout.forward(x, 0.25, rng, train=True)
    assert out.dtype == np.float32
    assert abs((out == 0).mean() - 0.25) < 0.01              # about p of the entries dropped
    assert abs(out.mean() - 1.0) < 0.02                      # inverted scaling keeps the mean
    same, none = dropout.forward(x, 0.25, rng, train=False)
    assert same is x and none is None
    with pytest.raises(ValueError):
        dropout.forward(x, 1.0, rng, True)


@given(M=sizes, K=sizes, N=sizes, seed=st.integers(0, 2**31))
def test_linear_forward_is_affine(M, K, N, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((2, M, K)), rng.standard_normal((K, N)), rng.standard_normal(N)
    with backend.use("numpy"):
        out, _ = linear.forward(x, w, b)
    np.testing.assert_allclose(out, np.einsum("bmk,kn->bmn", x, w) + b, atol=1e-12)
