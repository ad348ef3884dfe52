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


# ----------------------------------------------------------------------------- batched generation

from numformer import backend  # noqa: E402
from numformer.generate import IncrementalDecoder, TokenEvent, batch_stream, generate_batch  # noqa: E402

BCFG = GPT2Config(vocab_size=37, n_positions=40, n_embd=24, n_layer=2, n_head=3)
BACKENDS = ["numpy"] + (["cpu"] if backend.cpu_available() else [])


def ragged_prompts(seed, B=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, BCFG.vocab_size, size=int(n)).tolist() for n in rng.integers(1, 12, size=B)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_greedy_equals_one_prompt_at_a_time(name, seed):
    """Left padding, per-row positions and the key mask change nothing for a row."""
    model = GPT2.init(BCFG, seed=seed).astype(np.float64)       # float64: no near-ties of the argmax
    prompts = ragged_prompts(seed)
    assert len({len(p) for p in prompts}) > 1
    with backend.use(name):
        batched = generate_batch(model, prompts, 15, temperature=0)
        alone = [generate(model, p, 15, temperature=0) for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("name", BACKENDS)
def test_batched_sampling_with_row_seeds_equals_one_prompt_at_a_time(name):
    model = GPT2.init(BCFG, seed=3).astype(np.float64)
    prompts = ragged_prompts(3)
    seeds = [11, 12, 13, 14]
    with backend.use(name):
        batched = generate_batch(model, prompts, 12, temperature=0.9, top_k=20, top_p=0.95, seed=seeds)
        alone = [generate(model, p, 12, temperature=0.9, top_k=20, top_p=0.95, seed=s)
                 for p, s in zip(prompts, seeds)]
    assert batched == alone
    # one int seeds the rows seed, seed + 1, ...; the same seed gives the same tokens
    assert generate_batch(model, prompts, 12, temperature=0.9, seed=11) == \
        generate_batch(model, prompts, 12, temperature=0.9, seed=seeds)


def test_padded_forward_matches_each_row_alone():
    model = GPT2.init(BCFG, seed=4).astype(np.float64)
    prompts = ragged_prompts(4)
    T = max(map(len, prompts))
    pads = np.array([T - len(p) for p in prompts])
    ids = np.array([[0] * (T - len(p)) + p for p in prompts])
    positions = np.maximum(np.arange(T)[None] - pads[:, None], 0)
    key_mask = np.arange(T)[None] >= pads[:, None]
    logits = model.forward(ids, key_mask=key_mask, positions=positions)[0]
    for b, p in enumerate(prompts):
        alone = model.forward(np.array([p]))[0][0]
        np.testing.assert_allclose(logits[b, pads[b]:], alone, rtol=1e-10, atol=1e-10)
    last = model.forward(ids, key_mask=key_mask, positions=positions, last_only=True)[0]
    np.testing.assert_allclose(last[:, 0], logits[:, -1], rtol=1e-12, atol=1e-12)
    # positions equal to the default ones change nothing
    np.testing.assert_array_equal(model.forward(ids, positions=np.broadcast_to(np.arange(T), ids.shape))[0],
                                  model.forward(ids)[0])


def test_position_embedding_gradient_with_per_row_positions():
    """Per-row positions scatter-add into wpe; equal positions reduce to the pos0 form."""
    from numformer.ops import embedding

    rng = np.random.default_rng(0)
    wte, wpe = rng.standard_normal((7, 3)), rng.standard_normal((9, 3))
    ids = rng.integers(0, 7, (2, 4))
    positions = np.array([[0, 0, 1, 2], [3, 4, 5, 6]])
    out, cache = embedding.forward(ids, wte, wpe, positions=positions)
    np.testing.assert_array_equal(out, wte[ids] + wpe[positions])
    dout = rng.standard_normal(out.shape)
    _, dwpe = embedding.backward(dout, cache)
    eps, num = 1e-6, np.zeros_like(wpe)
    for i in np.ndindex(wpe.shape):                      # finite differences of sum(out * dout)
        w = wpe.copy()
        w[i] += eps
        up = np.sum(embedding.forward(ids, wte, w, positions=positions)[0] * dout)
        w[i] -= 2 * eps
        down = np.sum(embedding.forward(ids, wte, w, positions=positions)[0] * dout)
        num[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(dwpe, num, atol=1e-6)
    _, c2 = embedding.forward(ids, wte, wpe, 2)
    _, c3 = embedding.forward(ids, wte, wpe, positions=np.broadcast_to(np.arange(2, 6), ids.shape).copy())
    np.testing.assert_allclose(embedding.backward(dout, c2)[1], embedding.backward(dout, c3)[1], atol=1e-12)
    with pytest.raises(ValueError, match="context"):
        embedding.forward(ids, wte, wpe, positions=positions + 3)


def test_rows_stop_on_their_own():
    model = GPT2.init(BCFG, seed=5)
    prompts = ragged_prompts(5)
    free = generate_batch(model, prompts, 10, temperature=0)
    stop = free[1][2]                                   # row 1's third token ends it
    bs = batch_stream(model, prompts, [10, 10, 4, 10], temperature=0, eot_id=[stop])
    events = list(bs)
    assert all(isinstance(e, TokenEvent) for e in events)
    per_row = [[t for r, t in events if r == b] for b in range(4)]
    assert per_row == bs.tokens
    for b, toks in enumerate(free):
        cut = toks.index(stop) + 1 if stop in toks else len(toks)
        limit = 4 if b == 2 else 10
        assert bs.tokens[b] == toks[:min(cut, limit)]
        assert bs.finish_reason[b] == ("stop" if cut <= limit and stop in toks[:limit] else "length")
    # events come step by step: the k-th events of the rows before the (k+1)-th of any row
    steps = [sum(1 for r2, _ in events[:i] if r2 == r) for i, (r, _) in enumerate(events)]
    assert steps == sorted(steps)
    assert bs.cache.max_len == max(map(len, prompts)) + 10


def test_the_caller_can_stop_a_row():
    model = GPT2.init(BCFG, seed=6)
    prompts = ragged_prompts(6, B=3)
    bs = batch_stream(model, prompts, 8, temperature=1.0, seed=0)
    seen = []
    for row, token in bs:
        seen.append(row)
        if row == 0 and len(bs.tokens[0]) == 2:
            bs.finish(0)                                 # e.g. a stop string appeared in its text
    assert seen.count(0) == 2 and seen.count(1) == 8 and seen.count(2) == 8
    assert bs.finish_reason == ["stop", "length", "length"]
    with pytest.raises(IndexError):
        bs.finish(3)


def test_batched_bad_input():
    model = GPT2.init(BCFG)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        batch_stream(model, [[1] * 30, [2]], 11)
    batch_stream(model, [[1] * 30, [2]], 10)            # exactly fits
    for prompts, kw, exc, match in [
            ([], {}, ValueError, "no prompts"), ([[1], []], {}, ValueError, "prompt 1 is empty"),
            (["text"], {}, TypeError, "encode it"), ([[1]], {"max_new_tokens": -1}, ValueError, ">= 0"),
            ([[1], [2]], {"seed": [1]}, ValueError, "seed"), ([[1], [2]], {"max_new_tokens": [3]}, ValueError,
                                                               "max_new_tokens"),
            ([[1]], {"temperature": -1}, ValueError, "temperature")]:
        kw = {"max_new_tokens": 3, **kw}
        with pytest.raises(exc, match=match):
            list(batch_stream(model, prompts, **kw))
    with pytest.raises(ValueError, match="token id"):
        list(batch_stream(model, [[1, 99]], 3))


def test_zero_new_tokens_and_one_row():
    model = GPT2.init(BCFG, seed=7)
    bs = batch_stream(model, [[1, 2], [3]], [0, 3], temperature=0)
    assert [r for r, _ in bs] == [1, 1, 1] and bs.tokens[0] == [] and bs.finish_reason == ["length"] * 2
    assert generate_batch(model, [[1, 2, 3]], 5, temperature=0) == [generate(model, [1, 2, 3], 5, temperature=0)]


@pytest.fixture(scope="module")
def gpt2_tok():
    import os

    import numformer

    return numformer.load_tokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2"))


@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_incremental_decoding_never_splits_a_character(gpt2_tok, text):
    ids = gpt2_tok.encode(text)
    dec = IncrementalDecoder(gpt2_tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_incremental_decoding_of_bytes_that_never_form_a_character(gpt2_tok):
    ids = [gpt2_tok.ranks[b"\xe2"], gpt2_tok.ranks[b"\x82"], gpt2_tok.ranks[b"a"]]   # "€" cut short, then a
    dec = IncrementalDecoder(gpt2_tok, skip_ids=[gpt2_tok.eot_id])
    assert dec.push(ids[0]) == "" and dec.push(ids[1]) == ""     # held back: may still become a character
    assert dec.push(gpt2_tok.eot_id) == ""
    assert dec.push(ids[2]) == "\ufffda" and dec.flush() == ""
    assert gpt2_tok.decode(ids) == "\ufffda"


def test_batched_prompts_may_be_an_array_and_limits_must_be_integers():
    model = GPT2.init(BCFG, seed=8)
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    assert generate_batch(model, prompts, 3, temperature=0) == generate_batch(model, prompts.tolist(), 3,
                                                                              temperature=0)
    for bad in (2.5, [2.0, 3.0], "3"):
        with pytest.raises(TypeError, match="max_new_tokens"):
            batch_stream(model, prompts, bad)
    with pytest.raises(TypeError, match="prompt 0"):
        batch_stream(model, [1, 2, 3], 3)                  # one flat prompt instead of a list of prompts
