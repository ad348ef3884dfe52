"""Live oracle: our hand-written forward and backward against PyTorch autograd (float64).

Runs only when the optional ``torch`` extra is installed (``pip install ".[torch]"``,
which pins the CPU build ``torch==2.13.0``).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from numformer import backend  # noqa: E402
from numformer.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from numformer.ops import attention, cross_entropy, gelu, layernorm  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-12)   # float64 on both sides: only summation order differs


def grads_of(fn, *arrays):
    """Run ``fn`` on torch tensors; return (out, grads w.r.t. each array for Σ out ⊙ R, R)."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    R = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (out * R).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts], R.numpy()


def test_layernorm_and_gelu_match_torch():
    rng = np.random.default_rng(0)
    x, g, b = rng.standard_normal((2, 5, 8)), rng.standard_normal(8), rng.standard_normal(8)
    out_t, grads_t, R = grads_of(lambda x, g, b: F.layer_norm(x, (8,), g, b, 1e-5), x, g, b)
    out, cache = layernorm.forward(x, g, b)
    np.testing.assert_allclose(out, out_t, **TOL)
    for ours, theirs in zip(layernorm.backward(R, cache), grads_t):
        np.testing.assert_allclose(ours, theirs, **TOL)
    for ours_mode, torch_mode in (("tanh", "tanh"), ("none", "none")):
        out_t, (dx_t,), R = grads_of(lambda x: F.gelu(x, approximate=torch_mode), x)
        out, cache = gelu.forward(x, ours_mode)
        np.testing.assert_allclose(out, out_t, **TOL)
        np.testing.assert_allclose(gelu.backward(R, cache), dx_t, **TOL)


@pytest.mark.parametrize("causal, masked, Tq, Tk", [(True, False, 6, 6), (True, True, 6, 6), (False, False, 3, 7)])
def test_attention_matches_torch_sdpa(causal, masked, Tq, Tk):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 3, Tq, 4)), rng.standard_normal((2, 3, Tk, 4)), rng.standard_normal((2, 3, Tk, 4))
    key_mask = np.ones((2, Tk), bool)
    if masked:
        key_mask[1, -2:] = False
    allowed = attention.build_mask(Tq, Tk, causal, key_mask if masked else None)
    torch_mask = None if allowed is None else torch.tensor(np.broadcast_to(allowed, (2, 1, Tq, Tk)).copy())
    out_t, grads_t, R = grads_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask),
                                 q, k, v)
    with backend.use("numpy"):
        out, cache = attention.forward(q, k, v, causal, key_mask if masked else None)
        ours = attention.backward(R, cache)
    np.testing.assert_allclose(out, out_t, **TOL)
    for a, b in zip(ours, grads_t):
        np.testing.assert_allclose(a, b, **TOL)


def test_cross_entropy_matches_torch_with_ignore_index():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4, 6, 11)) * 3
    y = rng.integers(0, 11, (4, 6))
    y[0, :2] = -100
    zt = torch.tensor(z, requires_grad=True)
    loss_t = F.cross_entropy(zt.reshape(-1, 11), torch.tensor(y).reshape(-1), ignore_index=-100)
    loss_t.backward()
    loss, cache = cross_entropy.forward(z, y)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    np.testing.assert_allclose(cross_entropy.backward(1.0, cache), zt.grad.numpy(), **TOL)


def torch_gpt2(params, cfg, ids):
    """A literal PyTorch transcription of GPT-2 over our parameter dict (HF Conv1D layout)."""
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    B, T = ids.shape
    C, H = cfg.n_embd, cfg.n_head
    x = p["wte.weight"][torch.tensor(ids)] + p["wpe.weight"][:T]
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv = a @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + att @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]
        m = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], cfg.layer_norm_epsilon)
        m = F.gelu(m @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], cfg.layer_norm_epsilon)
    return x @ p["wte.weight"].T, p


def test_whole_gpt2_loss_and_every_gradient_match_torch():
    cfg = GPT2Config(vocab_size=23, n_positions=10, n_embd=12, n_layer=2, n_head=3)
    model = GPT2.init(cfg, seed=0, dtype=np.float64)
    model.flat += np.random.default_rng(0).normal(0, 0.05, model.flat.shape)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 23, (2, 3, 9))
    with backend.use("numpy"):
        logits, loss, cache = model.forward(ids, targets)
        grads = model.layout.views(model.backward(cache))
    logits_t, p = torch_gpt2(model.params, cfg, ids)
    loss_t = F.cross_entropy(logits_t.reshape(-1, 23), torch.tensor(targets).reshape(-1))
    loss_t.backward()
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), **TOL)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(g, p[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    assert math.isfinite(loss)
