"""The device-resident GPT-2 forward (numformer.cuda_model) through the CUDA
emulator: the layer kernels of csrc/cuda/layers.cu (embedding, LayerNorm,
GELU, head split/merge) against the NumPy references, and the whole
:class:`DeviceGPT2` forward against :meth:`GPT2.forward` on NumPy.

The emulator runs every CUDA thread as an OS thread (see tests/test_cuda_emu.py),
so shapes are small. Outputs start as NaN in the emulator: an element a kernel
forgets to write shows up. The module name contains ``emu``: ``pytest -k emu`` selects it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hypothesis")
emu = pytest.importorskip("numformer._cuda_emu", reason="numformer._cuda_emu (the CUDA emulator) is not built")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numformer import backend  # noqa: E402
from numformer.cuda_model import DeviceGPT2  # noqa: E402
from numformer.generate import generate_batch  # noqa: E402
from numformer.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from numformer.ops import gelu, layernorm  # noqa: E402

from test_cuda_emu import EPS, few  # noqa: E402  (the example caps of the kernel tests)

# Row lengths around the 32-lane warp of the LayerNorm kernel.
WIDTH = st.one_of(st.sampled_from([1, 31, 32, 33, 64, 65]), st.integers(1, 100))


@few(30)
@given(rows=st.integers(1, 9), C=WIDTH, offset=st.sampled_from([0.0, 1e3]), spread=st.sampled_from([1e-3, 1.0, 30.0]),
       seed=st.integers(0, 2**31))
def test_emu_layernorm_matches_reference(rows, C, offset, spread, seed):
    """Error bound: x̂ = (x − μ)·ρ loses ~C·eps·|x|/σ to the rounding of x and
    μ (a large mean over a small spread is the hard case), times |γ|."""
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.standard_normal((rows, C))).astype(np.float32)
    g, b = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
    got = emu.layernorm_forward(x, g, b, 1e-5)
    want, _ = layernorm.forward_reference(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), 1e-5)
    sigma = np.sqrt(x.astype(np.float64).var(-1, keepdims=True) + 1e-5)
    bound = 8 * (C + 4) * EPS * (np.abs(x) / sigma + 1) * np.abs(g) + 4 * EPS * np.abs(b)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@few(20)
@given(n=st.integers(0, 600), scale=st.sampled_from([1.0, 5.0, 100.0]), seed=st.integers(0, 2**31))
def test_emu_gelu_matches_reference(n, scale, seed):
    """Large |x| included: σ(2u) saturates to exactly 0 or 1 there, no NaN."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal(n)).astype(np.float32)
    got = emu.gelu_tanh_forward(x)
    want, _ = gelu.forward_reference(x.astype(np.float64), "tanh")
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=16 * EPS, atol=16 * EPS)


@few(20)
@given(B=st.integers(1, 3), T=st.integers(1, 6), C=st.integers(1, 40), V=st.integers(1, 30),
       spare=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_emu_embedding_is_exact(B, T, C, V, spare, seed):
    rng = np.random.default_rng(seed)
    wte = rng.standard_normal((V, C)).astype(np.float32)
    wpe = rng.standard_normal((T + spare, C)).astype(np.float32)
    ids = rng.integers(0, V, (B, T)).astype(rng.choice([np.int64, np.int32, np.uint16]))
    pos0 = int(rng.integers(0, spare + 1))
    got = emu.embedding_forward(ids, wte, wpe, pos0)
    np.testing.assert_array_equal(got, (wte[ids] + wpe[pos0:pos0 + T]).reshape(B * T, C))


@few(20)
@given(B=st.integers(1, 3), T=st.integers(1, 7), H=st.integers(1, 4), D=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_emu_split_and_merge_heads_are_exact(B, T, H, D, seed):
    """split(qkv) is numformer.ops.attention.split_heads of each third; merge inverts it."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B * T, 3 * H * D)).astype(np.float32)
    q, k, v = emu.split_heads(qkv, B, H)
    parts = qkv.reshape(B, T, 3, H, D)
    for i, got in enumerate((q, k, v)):
        np.testing.assert_array_equal(got, parts[:, :, i].transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(emu.merge_heads(k), qkv[:, H * D:2 * H * D])


@few(15)
@given(B=st.integers(1, 2), H=st.integers(1, 3), D=st.integers(1, 9), T=st.integers(1, 4), spare=st.integers(0, 5),
       seed=st.integers(0, 2**31))
def test_emu_split_heads_to_cache_writes_only_its_positions(B, H, D, T, spare, seed):
    rng = np.random.default_rng(seed)
    Tmax = T + spare
    pos0 = int(rng.integers(0, spare + 1))
    qkv = rng.standard_normal((B * T, 3 * H * D)).astype(np.float32)
    kc, vc = (rng.standard_normal((B, H, Tmax, D)).astype(np.float32) for _ in range(2))
    k_before, v_before = kc.copy(), vc.copy()
    q = emu.split_heads_to_cache(qkv, B, kc, vc, pos0)
    parts = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)             # (3, B, H, T, D)
    np.testing.assert_array_equal(q, parts[0])
    for got, before, part in ((kc, k_before, parts[1]), (vc, v_before, parts[2])):
        np.testing.assert_array_equal(got[:, :, pos0:pos0 + T], part)
        np.testing.assert_array_equal(np.delete(got, np.s_[pos0:pos0 + T], axis=2),
                                      np.delete(before, np.s_[pos0:pos0 + T], axis=2))


@few(15)
@given(B=st.integers(1, 2), H=st.integers(1, 2), Tq=st.integers(1, 5), Tmax=st.integers(1, 40),
       D=st.sampled_from([1, 8, 32, 33, 64]), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_emu_attention_over_a_cache_prefix_equals_the_dense_prefix(B, H, Tq, Tmax, D, causal, seed):
    """Reading the first `length` rows of each head in place (head stride
    Tmax·D) gives bit for bit what the dense kernel gives on a copy of them;
    the rows past `length` (NaN here) are never read."""
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, Tmax + 1))     # causal with length < Tq: the first queries see no key
    q = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    kc, vc = (np.full((B, H, Tmax, D), np.nan, np.float32) for _ in range(2))
    kc[:, :, :length], vc[:, :, :length] = (rng.standard_normal((B, H, length, D)) for _ in range(2))
    got, got_lse = emu.attention_forward_cached(q, kc, vc, length, causal=causal)
    want, want_lse = emu.attention_forward(q, np.ascontiguousarray(kc[:, :, :length]),
                                           np.ascontiguousarray(vc[:, :, :length]), causal=causal)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_lse, want_lse)


def test_emu_layer_kernels_reject_bad_input():
    f32 = np.zeros((4, 6), np.float32)
    wte, wpe = np.zeros((5, 3), np.float32), np.zeros((4, 3), np.float32)
    cache = np.zeros((1, 2, 4, 2), np.float32)                  # (B, H, Tmax, D): qkv rows of 12
    frozen = cache.copy()
    frozen.flags.writeable = False
    q1 = np.zeros((1, 2, 1, 2), np.float32)
    cases = [
        (lambda: emu.embedding_forward(np.array([[5]]), wte, wpe), ValueError, r"token id 5 at position \(0, 0\)"),
        (lambda: emu.embedding_forward(np.array([[0, -1]]), wte, wpe), ValueError, r"token id -1 at position \(0, 1\)"),
        (lambda: emu.embedding_forward(np.array([[2**40]]), wte, wpe), ValueError, "outside"),
        (lambda: emu.embedding_forward(np.array([[1.0]]), wte, wpe), TypeError, "expected integers"),
        (lambda: emu.embedding_forward(np.array([1]), wte, wpe), ValueError, r"\(B, T\)"),
        (lambda: emu.embedding_forward(np.zeros((1, 3), int), wte, wpe, 2), ValueError, "outside the 4 rows of wpe"),
        (lambda: emu.embedding_forward(np.zeros((1, 1), int), wte, wpe, -1), ValueError, "outside"),
        (lambda: emu.embedding_forward(np.zeros((1, 1), int), wte, np.zeros((4, 2), np.float32)), ValueError, "equal C"),
        (lambda: emu.layernorm_forward(f32, np.zeros(5, np.float32), np.zeros(6, np.float32)), ValueError, "gamma"),
        (lambda: emu.layernorm_forward(f32, np.zeros(6, np.float32), np.zeros(6, np.float32), 0.0), ValueError, "eps"),
        (lambda: emu.layernorm_forward(f32.astype(np.float64), f32[0], f32[0]), TypeError, "float32"),
        (lambda: emu.gelu_tanh_forward(f32.T), ValueError, "C-contiguous"),
        (lambda: emu.split_heads(np.zeros((6, 9), np.float32), 4, 1), ValueError, "does not divide"),
        (lambda: emu.split_heads(np.zeros((6, 9), np.float32), 2, 2), ValueError, "3 \\* heads"),
        (lambda: emu.split_heads(np.zeros(6, np.float32), 1, 1), ValueError, "2-D"),
        (lambda: emu.merge_heads(np.zeros((2, 3, 4), np.float32)), ValueError, "4-D"),
        (lambda: emu.split_heads_to_cache(np.zeros((2, 12), np.float32), 1, cache, cache.copy(), 3), ValueError,
         r"positions 3..4 are outside the cache's 4"),
        (lambda: emu.split_heads_to_cache(np.zeros((2, 9), np.float32), 1, cache, cache.copy(), 0), ValueError,
         "does not fit"),
        (lambda: emu.split_heads_to_cache(np.zeros((2, 12), np.float32), 1, cache, cache, 0), ValueError, "overlap"),
        (lambda: emu.split_heads_to_cache(np.zeros((2, 12), np.float32), 1, frozen, cache, 0), ValueError,
         "read-only"),
        (lambda: emu.attention_forward_cached(q1, cache, cache, 5), ValueError, r"length = 5 is outside 1..4"),
        (lambda: emu.attention_forward_cached(q1, cache, cache, 0), ValueError, "length = 0"),
        (lambda: emu.attention_forward_cached(q1, cache[:, :, :3].copy(), cache, 2), ValueError, "differ"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def tiny_gpt2(seed: int = 1, **kw) -> GPT2:
    cfg = GPT2Config(vocab_size=53, n_positions=16, n_embd=32, n_layer=2, n_head=4, **kw)
    return GPT2.init(cfg, seed=seed)


@pytest.mark.parametrize("B, T", [(1, 1), (2, 7), (1, 16)])
def test_emu_device_gpt2_forward_matches_the_numpy_model(B, T):
    """The whole device-resident forward (embedding → 2 blocks → LM head), run
    by the emulator, against GPT2.forward on the NumPy backend."""
    model = tiny_gpt2()
    ids = np.random.default_rng(T).integers(0, 53, (B, T))
    got = DeviceGPT2(model, device=emu).forward(ids)
    with backend.use("numpy"):
        want = model.forward(ids)[0]
    assert got.shape == want.shape == (B, T, 53) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_emu_device_gpt2_with_a_kv_cache_equals_the_full_forward():
    """Three chunks through a device KV cache give the full forward's logits
    bit for bit (same kernels, same sums); last_only gives the last row."""
    dm = DeviceGPT2(tiny_gpt2(), device=emu)
    ids = np.random.default_rng(1).integers(0, 53, (2, 9))
    full = dm.forward(ids)
    cache = dm.new_cache(2, 9)
    first, middle = dm.forward(ids[:, :4], cache), dm.forward(ids[:, 4:7], cache)
    last = dm.forward(ids[:, 7:], cache, last_only=True)
    assert cache.length == 9 and last.shape == (2, 1, 53)
    np.testing.assert_array_equal(np.concatenate([first, middle], axis=1), full[:, :7])
    np.testing.assert_array_equal(last[:, 0], full[:, -1])
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        dm.forward(ids[:, :1], cache)


def test_emu_device_gpt2_generates_what_the_numpy_model_generates():
    """Greedy decoding with the device KV cache, token for token against
    numformer.generate on NumPy (weights scaled up so that the tiny random
    model's argmax is not the same token every step)."""
    model = tiny_gpt2()
    model.flat *= 30
    prompts = np.random.default_rng(0).integers(0, 53, (2, 3))
    got = DeviceGPT2(model, device=emu).generate(prompts, 5, temperature=0)
    with backend.use("numpy"):
        want = generate_batch(model, prompts.tolist(), 5, temperature=0)
    assert got.tolist() == want


def test_emu_device_gpt2_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="tanh GELU"):
        DeviceGPT2(tiny_gpt2(activation_function="gelu"), device=emu)
    dm = DeviceGPT2(tiny_gpt2(), device=emu)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        dm.forward(np.arange(3))
    with pytest.raises(ValueError, match="context of 16"):
        dm.forward(np.zeros((1, 17), int))
    with pytest.raises(ValueError, match="token id 53"):
        dm.forward(np.array([[1, 53]]))
    with pytest.raises(ValueError, match="equal lengths"):
        dm.generate(np.arange(3), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dm.generate(np.zeros((1, 2), int), -1)
    with pytest.raises(ValueError, match="KV cache of 17 positions"):
        dm.generate(np.zeros((1, 10), int), 8)
    assert dm.generate(np.zeros((1, 2), int), 0).shape == (1, 0)


def test_device_gpt2_without_a_gpu_says_what_is_missing():
    if backend.cuda_available():
        pytest.skip("a GPU is present: tests/test_cuda_gpu.py covers DeviceGPT2 there")
    with pytest.raises(RuntimeError, match="DeviceGPT2 needs a GPU: numformer._cuda"):
        DeviceGPT2(tiny_gpt2())
