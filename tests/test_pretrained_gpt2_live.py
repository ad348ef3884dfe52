"""Live oracle: numformer vs transformers.GPT2LMHeadModel on random-init models built in code.

Runs only when torch and transformers are importable (no downloads: configs are built here).
Checks logits, loss, greedy generation, and the gradient of *every* parameter against
PyTorch autograd; and that transformers loads what numformer exports.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numformer  # noqa: E402
from numformer.generate import generate  # noqa: E402

CONFIGS = {
    "gelu_new": dict(n_layer=2, n_embd=48, n_head=4, n_positions=24, vocab_size=211),
    "n_inner+exact-gelu": dict(n_layer=3, n_embd=32, n_head=2, n_positions=20, vocab_size=97, n_inner=40,
                               activation_function="gelu", layer_norm_epsilon=1e-6),
    "pytorch_tanh": dict(n_layer=1, n_embd=64, n_head=8, n_positions=16, vocab_size=300,
                         activation_function="gelu_pytorch_tanh"),
}


def hf_model(kw, seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    kw = CONFIGS[name]
    ref = hf_model(kw, seed=len(name))
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = numformer.from_pretrained(tmp_path / "hf")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, kw["vocab_size"], size=(3, kw["n_positions"]))
    out = ref(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    targets = np.concatenate([ids[:, 1:], np.full((3, 1), -100)], axis=1)
    logits, loss, cache = ours.forward(ids, targets)
    ref_logits = out.logits.detach().numpy()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert abs(loss - out.loss.item()) < 1e-5

    grads = ours.layout.views(ours.backward(cache))
    ref_params = dict(ref.named_parameters())
    assert len(grads) == len(ref_params)          # every parameter (lm_head is tied to wte)
    for pname, g in grads.items():
        rg = ref_params["transformer." + pname].grad.numpy()
        np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5 * np.abs(rg).max(), err_msg=pname)

    prompt = ids[0, :4]
    want = ref.generate(torch.tensor(prompt[None]), max_new_tokens=kw["n_positions"] - 4, do_sample=False,
                        pad_token_id=0, eos_token_id=None)[0, 4:].tolist()
    assert generate(ours, prompt.tolist(), len(want), temperature=0) == want


def test_transformers_loads_numformer_export(tmp_path):
    kw = CONFIGS["n_inner+exact-gelu"]
    ours = numformer.from_pretrained(_saved(hf_model(kw, seed=5), tmp_path / "src"))
    numformer.save_pretrained(ours, tmp_path / "export")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    ids = np.arange(12)[None] % kw["vocab_size"]
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours.forward(ids)[0], ref, rtol=1e-5, atol=1e-5)


def _saved(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return os.fspath(path)
