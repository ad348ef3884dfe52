"""Finite-difference checks of every backward pass, in float64.

For an op ``out = f(x₁, x₂, …)`` we pick a random upstream gradient ``R``
and the scalar ``L = Σ out ⊙ R``. The backward given ``dout = R`` returns
``∂L/∂xᵢ``; central differences estimate the same thing:

    ∂L/∂x[j] ≈ (L(x + h e_j) − L(x − h e_j)) / 2h,   error O(h²)

With h = 1e-6 in float64 the estimate is good to ~1e-9 relative, so a
correct backward shows errors around 1e-8 and a wrong one around 1e-1.
The error reported per input is ``‖analytic − numeric‖ / max(‖analytic‖, ‖numeric‖)``
over the checked entries (a norm ratio, so entries near zero do not blow up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from numformer.ops import (attention, cross_entropy, dense, dropout, embedding, gelu, layernorm, linear, residual,
                           softmax)

TOLERANCE = 1e-6
STEP = 1e-6


@dataclass
class CheckResult:
    name: str
    max_rel_error: float
    checked: int           # number of entries compared

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= TOLERANCE


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    denom = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def numeric_grad(loss: Callable[[], float], x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Central differences of ``loss()`` w.r.t. the flat entries ``idx`` of ``x`` (modified in place, restored)."""
    flat = x.reshape(-1)
    out = np.empty(len(idx))
    for n, j in enumerate(idx):
        old = flat[j]
        flat[j] = old + STEP
        plus = loss()
        flat[j] = old - STEP
        minus = loss()
        flat[j] = old
        out[n] = (plus - minus) / (2 * STEP)
    return out


def check(name: str, fwd: Callable, bwd: Callable, inputs: list[np.ndarray], rng: np.random.Generator,
          max_entries: int = 60) -> CheckResult:
    """Compare ``bwd`` with finite differences of ``fwd`` for each array in ``inputs``.

    fwd(*inputs) -> (out, cache);  bwd(dout, cache) -> tuple of grads, one per input.
    """
    out, cache = fwd(*inputs)
    R = rng.standard_normal(np.shape(out))
    grads = bwd(R, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)

    def loss() -> float:
        return float(np.sum(fwd(*inputs)[0] * R))

    worst, checked = 0.0, 0
    for x, g in zip(inputs, grads):
        idx = rng.choice(x.size, size=min(x.size, max_entries), replace=False)
        numeric = numeric_grad(loss, x, idx)
        worst = max(worst, relative_error(np.asarray(g).reshape(-1)[idx], numeric))
        checked += len(idx)
    return CheckResult(name, worst, checked)


def op_checks(seed: int = 0) -> list[CheckResult]:
    """One check per op (and per variant: masks, GELU forms, ignore index)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape)          # noqa: E731
    B, T, C, V, H = 2, 5, 8, 11, 2
    results = []

    ids = rng.integers(0, V, (B, T))
    ids[0, :3] = 7                                          # repeated ids must accumulate
    results.append(check("embedding (token + position)",
                         lambda wte, wpe: embedding.forward(ids, wte, wpe),
                         embedding.backward, [r(V, C), r(T + 2, C)], rng))
    results.append(check("linear (x·w + b)", linear.forward, linear.backward, [r(B, T, C), r(C, 3), r(3)], rng))
    results.append(check("dense (x·wᵀ + b, weight (out, in))", dense.forward, dense.backward,
                         [r(B, T, C), r(3, C), r(3)], rng))
    results.append(check("layernorm", layernorm.forward, layernorm.backward, [r(B, T, C), r(C), r(C)], rng))
    results.append(check("gelu (tanh)", lambda x: gelu.forward(x, "tanh"), gelu.backward, [r(B, T, C)], rng))
    results.append(check("gelu (erf)", lambda x: gelu.forward(x, "none"), gelu.backward, [r(B, T, C)], rng))
    results.append(check("softmax", softmax.forward, softmax.backward, [3 * r(B, T, V)], rng))
    q, k, v = r(B, H, T, 4), r(B, H, T, 4), r(B, H, T, 4)
    results.append(check("attention (causal)", attention.forward, attention.backward, [q, k, v], rng))
    pad = np.ones((B, T), bool)
    pad[1, -2:] = False                                       # the last two keys of row 1 are padding
    results.append(check("attention (causal + padding mask)",
                         lambda q, k, v: attention.forward(q, k, v, True, pad),
                         attention.backward, [r(B, H, T, 4), r(B, H, T, 4), r(B, H, T, 4)], rng))
    results.append(check("attention (cross, Tq != Tk)",
                         lambda q, k, v: attention.forward(q, k, v, False),
                         attention.backward, [r(B, H, 3, 4), r(B, H, 7, 4), r(B, H, 7, 4)], rng))
    drop_rng_seed = int(rng.integers(1 << 30))
    results.append(check("dropout (p = 0.3, fixed mask)",
                         lambda x: dropout.forward(x, 0.3, np.random.default_rng(drop_rng_seed), True),
                         dropout.backward, [r(B, T, C)], rng))
    results.append(check("residual", residual.forward, residual.backward, [r(B, T, C), r(B, T, C)], rng))
    targets = rng.integers(0, V, (B, T))
    targets[0, 0] = -100                                      # ignored position
    results.append(check("cross-entropy (with ignore index)",
                         lambda z: cross_entropy.forward(z, targets),
                         cross_entropy.backward, [r(B, T, V)], rng))
    return results


def model_check(seed: int = 0, max_entries: int | None = None) -> CheckResult:
    """The whole GPT-2 (2 layers, tied embeddings, padding-free causal LM) in float64."""
    from numformer.models.gpt2 import GPT2, GPT2Config

    rng = np.random.default_rng(seed)
    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    model = GPT2.init(cfg, seed=seed, dtype=np.float64)
    model.flat += rng.normal(0, 0.1, model.flat.shape)        # move off the symmetric init
    ids = rng.integers(0, 13, (2, 7))
    targets = rng.integers(0, 13, (2, 7))
    targets[1, 2] = -100
    _, _, cache = model.forward(ids, targets)
    analytic = model.backward(cache)
    n = model.flat.size if max_entries is None else min(model.flat.size, max_entries)
    idx = rng.choice(model.flat.size, size=n, replace=False)
    numeric = numeric_grad(lambda: model.forward(ids, targets)[1], model.flat, idx)
    what = "every parameter" if n == model.flat.size else f"{n} random parameters"
    return CheckResult(f"GPT-2 model (2 layers, {what})", relative_error(analytic[idx], numeric), len(idx))


def bert_model_check(seed: int = 0, max_entries: int | None = None) -> CheckResult:
    """The whole BERT encoder (2 post-LN layers, token types, a padding mask, pooler) in float64.

    The scalar is ``L = Σ hidden ⊙ R₁ + Σ pooled ⊙ R₂`` for fixed random R₁, R₂,
    so every output (and every parameter, the pooler included) is exercised.
    """
    from numformer.models.bert import BertConfig, BertModel

    rng = np.random.default_rng(seed)
    cfg = BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=9, type_vocab_size=2, layer_norm_eps=1e-5)
    model = BertModel.init(cfg, seed=seed, dtype=np.float64)
    model.flat += rng.normal(0, 0.3, model.flat.shape)        # move off the symmetric init (LN gains 1, biases 0)
    ids = rng.integers(1, 13, (2, 7))                          # id 0 is padding (its row gets no gradient)
    ids[0, :3] = 5                                             # repeated ids must accumulate
    tt = (np.arange(7) >= 4).astype(int)[None].repeat(2, 0)    # two segments
    mask = np.ones((2, 7), int)
    mask[1, 5:] = 0                                            # row 1 has two padding positions
    R1 = rng.standard_normal((2, 7, 8))
    R2 = rng.standard_normal((2, 8))

    def loss() -> float:
        hidden, pooled, _ = model.forward(ids, mask, tt)
        return float(np.sum(hidden * R1) + np.sum(pooled * R2))

    _, _, cache = model.forward(ids, mask, tt)
    analytic = model.backward(cache, R1, R2)
    n = model.flat.size if max_entries is None else min(model.flat.size, max_entries)
    idx = rng.choice(model.flat.size, size=n, replace=False)
    numeric = numeric_grad(loss, model.flat, idx)
    what = "every parameter" if n == model.flat.size else f"{n} random parameters"
    return CheckResult(f"BERT encoder (2 layers, padding, pooler, {what})",
                       relative_error(analytic[idx], numeric), len(idx))


def run_all(seed: int = 0) -> list[CheckResult]:
    """Every op check followed by the whole-model checks (GPT-2, BERT, the GPT-2 classifier), all on
    the NumPy backend. The classifier row samples 600 of its ~1,950 parameters (~0.4 s; every
    parameter is checked by ``gpt2_classifier_check()`` and in tests/test_finetune_gpt2.py)."""
    from numformer import backend

    with backend.use("numpy"):
        return op_checks(seed) + [model_check(seed), bert_model_check(seed),
                                  gpt2_classifier_check(seed, max_entries=600)]


def format_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'op':<{width}}  {'max rel. error':>14}  {'entries':>7}  result",
             f"{'-' * width}  {'-' * 14}  {'-' * 7}  ------"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.max_rel_error:>14.2e}  {r.checked:>7}  "
                     f"{'pass' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def gpt2_classifier_check(seed: int = 0, max_entries: int | None = None) -> CheckResult:
    """GPT-2 + a last-token classification head (2 layers, right padding), cross-entropy, float64.

    The gradient goes score → the gather of each row's last real token → ln_f
    → both blocks → the tied embedding; the padded row checks that padding
    positions neither change the loss nor receive gradient they should not.
    """
    from numformer.finetune import GPT2Classifier
    from numformer.models.gpt2 import GPT2, GPT2Config

    rng = np.random.default_rng(seed)
    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    body = GPT2.init(cfg, seed=seed, dtype=np.float64)
    body.flat += rng.normal(0, 0.1, body.flat.shape)          # move off the symmetric init
    model = GPT2Classifier.from_body(body, ["a", "b", "c"], pad_token_id=12, seed=seed, std=0.5)
    ids = rng.integers(0, 12, (3, 6))
    ids[1, 4:] = 12                                            # row 1: four real tokens, then padding
    ids[2, 1:] = 12                                            # row 2: one real token
    y = np.array([0, 2, 1])
    _, _, cache = model.forward(ids, None, None, y)            # last token by the pad id, as Hugging Face
    analytic = model.backward(cache)
    n = model.flat.size if max_entries is None else min(model.flat.size, max_entries)
    idx = rng.choice(model.flat.size, size=n, replace=False)
    numeric = numeric_grad(lambda: model.forward(ids, None, None, y)[1], model.flat, idx)
    what = "every parameter" if n == model.flat.size else f"{n} random parameters"
    return CheckResult(f"GPT-2 classifier (last token, padding, {what})",
                       relative_error(analytic[idx], numeric), len(idx))
