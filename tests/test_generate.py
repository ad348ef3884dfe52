"""Sampling: filters, determinism, stopping, and the context window."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numformer.generate import filter_logits, generate, sample_next, stream
from numformer.models.gpt2 import GPT2, GPT2Config

CFG = GPT2Config(vocab_size=13, n_positions=12, n_embd=16, n_layer=2, n_head=2)


@given(V=st.integers(2, 30), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_top_k_keeps_exactly_the_k_largest(V, k, seed):
    logits = np.random.default_rng(seed).permutation(V).astype(float)[None]   # distinct values
    kept = np.isfinite(filter_logits(logits, top_k=k))[0]
    assert kept.sum() == min(k, V)
    assert np.all(logits[0, kept] >= logits[0, ~kept].max(initial=-np.inf))


@given(V=st.integers(1, 30), p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_top_p_keeps_the_smallest_set_reaching_p(V, p, seed):
    logits = np.random.default_rng(seed).standard_normal((1, V)) * 3
    kept = np.isfinite(filter_logits(logits, top_p=p))[0]
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    assert kept.any()
    assert probs[kept].sum() >= p - 1e-12 or kept.all()
    # minimal: dropping the least likely kept token falls below p
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < p + 1e-12
    # kept tokens are the most likely ones
    assert probs[kept].min() >= probs[~kept].max(initial=0)


def test_greedy_and_sampling_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.6, 0.3]]))
    assert sample_next(logits, rng, temperature=0)[0] == 1
    draws = np.array([sample_next(logits, rng)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 4000, [0.1, 0.6, 0.3], atol=0.03)


def test_same_seed_same_tokens_and_stop_at_eot():
    model = GPT2.init(CFG, seed=0)
    a = generate(model, [1, 2, 3], 8, temperature=1.0, seed=7)
    b = generate(model, [1, 2, 3], 8, temperature=1.0, seed=7)
    assert a == b and len(a) == 8
    first = a[0]
    stopped = generate(model, [1, 2, 3], 8, temperature=1.0, seed=7, eot_id=first)
    assert stopped == [first]


def test_cached_generation_equals_uncached_greedy_loop():
    model = GPT2.init(CFG, seed=1).astype(np.float64)
    ids = [4, 5]
    expected = []
    for _ in range(8):                                  # recompute the whole prefix every step
        nxt = int(np.argmax(model.forward(np.array([ids]))[0][0, -1]))
        expected.append(nxt)
        ids.append(nxt)
    assert generate(model, [4, 5], 8, temperature=0) == expected


def test_generation_continues_past_the_context_window():
    model = GPT2.init(CFG, seed=2)
    out = generate(model, [1] * 10, 30, temperature=1.0, seed=0)
    assert len(out) == 30 and all(0 <= t < 13 for t in out)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(stream(GPT2.init(CFG), [1], 3, **kwargs))


def test_empty_prompt_raises():
    with pytest.raises(ValueError, match="empty"):
        generate(GPT2.init(CFG), [], 3)
