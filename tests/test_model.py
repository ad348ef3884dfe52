"""GPT-2 model: layout, initialization, dtypes, KV cache, masks."""

import math

import numpy as np
import pytest

from numformer import backend
from numformer.models.gpt2 import GPT2, GPT2Config, KVCache, param_shapes

SMALL = GPT2Config(vocab_size=17, n_positions=16, n_embd=16, n_layer=2, n_head=4)


def test_parameter_names_and_shapes_follow_hugging_face():
    cfg = GPT2Config()                                   # GPT-2 124M
    shapes = param_shapes(cfg)
    assert shapes["wte.weight"] == (50257, 768)
    assert shapes["h.0.attn.c_attn.weight"] == (768, 2304)      # Conv1D: (in, out)
    assert shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 124_439_808                                 # the published count (tied head)


def test_params_are_views_of_one_flat_buffer():
    model = GPT2.init(SMALL, seed=0)
    model.flat[:] = 0
    assert all(np.all(v == 0) for v in model.params.values())
    model.params["ln_f.bias"][...] = 7
    assert np.count_nonzero(model.flat == 7) == SMALL.n_embd


def test_gpt2_initialization_statistics():
    cfg = GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    p = GPT2.init(cfg, seed=0).params
    assert abs(p["wte.weight"].std() - 0.02) < 1e-3
    assert abs(p["h.0.attn.c_attn.weight"].std() - 0.02) < 1e-3
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(p["h.1.mlp.c_proj.weight"].std() - scaled) < 0.1 * scaled
    assert abs(p["h.1.attn.c_proj.weight"].std() - scaled) < 0.1 * scaled
    assert np.all(p["h.0.ln_1.weight"] == 1) and np.all(p["h.0.attn.c_attn.bias"] == 0)


def test_same_seed_same_model_and_decay_mask():
    a, b = GPT2.init(SMALL, seed=5), GPT2.init(SMALL, seed=5)
    np.testing.assert_array_equal(a.flat, b.flat)
    mask = a.layout.views(a.decay_mask())
    assert np.all(mask["h.0.mlp.c_fc.weight"] == 1)
    assert np.all(mask["h.0.mlp.c_fc.bias"] == 0) and np.all(mask["ln_f.weight"] == 0)
    assert np.all(mask["wte.weight"] == 0)
    assert np.all(a.layout.views(a.decay_mask(decay_embeddings=True))["wte.weight"] == 1)


def test_initial_loss_is_about_log_vocab():
    model = GPT2.init(SMALL, seed=0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 17, (2, 4, 16))
    _, loss, _ = model.forward(ids, targets)
    assert abs(loss - math.log(17)) < 0.1


def test_float32_and_float64_agree():
    m32 = GPT2.init(SMALL, seed=1)
    m64 = m32.astype(np.float64)
    ids = np.random.default_rng(0).integers(0, 17, (2, 12))
    logits32, loss32, c32 = m32.forward(ids, ids)
    logits64, loss64, c64 = m64.forward(ids, ids)
    assert logits32.dtype == np.float32 and logits64.dtype == np.float64
    np.testing.assert_allclose(logits32, logits64, atol=1e-5)
    g32, g64 = m32.backward(c32), m64.backward(c64)
    assert g32.dtype == np.float32 and g64.dtype == np.float64
    np.testing.assert_allclose(g32, g64, atol=1e-5 * np.abs(g64).max())


def test_kv_cache_logits_equal_full_recompute():
    """Feeding tokens one (or a few) at a time through the cache gives the same logits."""
    model = GPT2.init(SMALL, seed=2).astype(np.float64)
    ids = np.random.default_rng(1).integers(0, 17, (3, 14))
    full = model.forward(ids)[0]
    cache = KVCache(SMALL, batch=3, max_len=16, dtype=np.float64)
    pieces = [model.forward(ids[:, :5], kv_cache=cache)[0]]
    for t in range(5, 14):
        pieces.append(model.forward(ids[:, t:t + 1], kv_cache=cache)[0])
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-12)
    assert cache.length == 14


def test_gradient_accumulates_into_given_buffer():
    model = GPT2.init(SMALL, seed=3)
    ids = np.random.default_rng(2).integers(0, 17, (2, 8))
    _, _, cache = model.forward(ids, ids)
    once = model.backward(cache)
    _, _, cache = model.forward(ids, ids)
    twice = model.backward(cache, grads=once.copy())
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)


def test_padding_mask_hides_padded_keys():
    """Changing tokens at masked positions must not change the other positions' logits."""
    model = GPT2.init(SMALL, seed=4).astype(np.float64)
    ids = np.random.default_rng(3).integers(0, 17, (1, 8))
    mask = np.ones((1, 8), bool)
    mask[0, 2] = False
    other = ids.copy()
    other[0, 2] = (ids[0, 2] + 1) % 17
    a = model.forward(ids, key_mask=mask)[0]
    b = model.forward(other, key_mask=mask)[0]
    keep = [t for t in range(8) if t != 2]
    np.testing.assert_allclose(a[0, keep], b[0, keep], atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3).validate()
    with pytest.raises(ValueError, match="positive"):
        GPT2Config(n_layer=-1).validate()
    model = GPT2.init(SMALL)
    with pytest.raises(ValueError, match="token id"):
        model.forward(np.array([[0, 17]]))
    with pytest.raises(ValueError, match="exceeds the context"):
        model.forward(np.zeros((1, 17), int))
    with pytest.raises(ValueError, match="targets"):
        model.backward(model.forward(np.zeros((1, 3), int))[2])


def test_config_round_trips_through_hugging_face_dict():
    d = SMALL.to_dict()
    assert d["model_type"] == "gpt2" and d["n_ctx"] == 16
    assert GPT2Config.from_dict(d) == SMALL


@pytest.mark.skipif(not backend.cpu_available(), reason="numformer._cpu not built")
def test_model_gives_same_loss_and_grads_on_both_backends():
    model = GPT2.init(SMALL, seed=6)
    ids = np.random.default_rng(4).integers(0, 17, (3, 16))
    with backend.use("numpy"):
        loss_np, g_np = model.loss_and_grads(ids, ids)
    with backend.use("cpu"):
        loss_cpu, g_cpu = model.loss_and_grads(ids, ids)
    assert loss_cpu == pytest.approx(loss_np, rel=1e-5)
    np.testing.assert_allclose(g_cpu, g_np, atol=1e-5 * np.abs(g_np).max())
