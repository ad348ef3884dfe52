"""End-to-end cases: a GPT-2 training step and KV-cache generation.

* ``ours``  — :class:`numformer.models.gpt2.GPT2` on the ``cpu`` backend,
* ``numpy`` — the same model on the ``numpy`` backend,
* ``torch`` — Hugging Face ``transformers.GPT2LMHeadModel`` (random init from
  ``GPT2Config``, nothing downloaded), when ``transformers`` is installed.

A training step is what ``numformer train`` does per step: zero the gradient
buffer, forward with targets, backward, clip the global norm to 1, AdamW
(the PyTorch step does the same with ``torch.optim.AdamW``). Dropout is 0
in both models so that they do the same arithmetic. Generation is greedy,
batch ``B`` (1 and 8 by default), random ``P``-token prompts and ``N`` new
tokens per row with the KV cache, through the public batched API
(:func:`numformer.generate.generate_batch`); the rate counts new tokens
(B·N) per second, prefill included, and the time to first token (prefill +
the first sampled token of every row) is reported beside it. Batch 8 runs
fewer new tokens per row (``Sizes.gen_new_batched`` = 16: the same 128
tokens in all as batch 1) to keep the suite short.
"""

from __future__ import annotations

import time

import numpy as np

from numformer import backend
from numformer.bench.cases import Case, Sizes, _numpy, _ours
from numformer.bench.threads import cpu_module, torch_module


def transformers_module():
    """``transformers`` when it imports, else None (it is an optional extra)."""
    if torch_module() is None:
        return None
    try:
        import transformers
    except Exception:
        return None
    try:
        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    return transformers


def _config(sizes: Sizes):
    from numformer.models.gpt2 import GPT2Config

    return GPT2Config(**sizes.gpt2)


def num_params(sizes: Sizes) -> int:
    from numformer.models.gpt2 import param_shapes

    return int(sum(int(np.prod(s)) for s in param_shapes(_config(sizes)).values()))


def _hf_model(cfg):
    """A randomly initialized ``GPT2LMHeadModel`` of the same shape, dropout off."""
    transformers = transformers_module()
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions,
                                     n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     layer_norm_epsilon=cfg.layer_norm_epsilon,
                                     activation_function=cfg.activation_function)
    return transformers.GPT2LMHeadModel(hf_cfg)


def _describe(sizes: Sizes) -> str:
    cfg = _config(sizes)
    if not sizes.gpt2:
        return "GPT-2 124M"
    return f"GPT-2 {cfg.n_layer}L/{cfg.n_embd}"


# ----------------------------------------------------------------------------- training


def train_case(sizes: Sizes, use_torch: bool = True) -> Case:
    B, T = sizes.train_bt
    want_numpy = sizes.train_numpy

    def setup():
        from numformer.bench.profile import OpProfiler
        from numformer.models.gpt2 import GPT2
        from numformer.optim import AdamW, clip_grad_norm

        cfg = _config(sizes)
        model = GPT2.init(cfg, seed=0)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
        x, y = ids[:, :-1], ids[:, 1:]
        grads = model.layout.zeros(np.float32)
        opt = AdamW(model.flat, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                    decay_mask=model.decay_mask())

        def step(prof=None):
            section = prof.section if prof is not None else _null_section
            grads[...] = 0
            _, loss, cache = model.forward(x, y, train=True, reuse_logits=True)
            model.backward(cache, grads=grads)
            with section("optimizer"):
                clip_grad_norm(grads, 1.0)
                opt.step(grads)
            return loss

        impls: dict = {}
        if cpu_module() is not None:
            impls["ours"] = _ours(step)

            def profile():
                with backend.use("cpu"), OpProfiler() as prof:
                    t0 = time.perf_counter()
                    step(prof)
                    total = time.perf_counter() - t0
                return prof.breakdown(total, f"{_describe(sizes)}, B={B}, T={T}, AdamW, cpu backend")
            impls["_profile"] = profile
        if want_numpy:
            impls["numpy"] = _numpy(step)
        if use_torch and transformers_module() is not None:
            import torch

            hf = _hf_model(cfg)
            hf.train()
            params = [p for p in hf.parameters() if p.requires_grad]
            opt_t = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
            xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

            def torch_step():
                opt_t.zero_grad(set_to_none=True)
                logits = hf(input_ids=xt).logits
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), yt.reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt_t.step()
                return loss
            impls["torch"] = torch_step
        return impls

    notes = "AdamW + clip; torch = HF GPT2LMHeadModel" if use_torch else "AdamW + clip"
    return Case("gpt2_train_step", _describe(sizes), [B, T], "step", "tokens/s", float(B * T), setup,
                "roofline", min_runs=sizes.model_runs, max_runs=sizes.model_runs, kind="model",
                notes=notes, extra={"params": num_params(sizes)})


class _NullSection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _null_section(_name):
    return _NullSection()


# ----------------------------------------------------------------------------- generation


def _greedy(model, prompts: np.ndarray, new: int) -> list:
    """Greedy decoding of a (B, P) batch with one preallocated KV cache -> B lists of ``new`` ids."""
    from numformer.generate import generate_batch

    return generate_batch(model, prompts.tolist(), new, temperature=0.0)


def generate_case(sizes: Sizes, batch: int = 1, use_torch: bool = True, int8: bool = False) -> Case:
    """``int8=True``: ours runs the same model with int8 linear weights and int8 tied head
    (numformer.quantize's default)."""
    P = sizes.gen_prompt
    N = sizes.gen_new if batch == 1 else sizes.gen_new_batched

    def setup():
        from numformer.models.gpt2 import GPT2

        cfg = _config(sizes)
        model = GPT2.init(cfg, seed=0)
        if int8:
            from numformer.quantize import quantize_model

            model = quantize_model(model)
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, P))
        impls: dict = {}
        first: dict = {}
        if cpu_module() is not None:
            impls["ours"] = _ours(lambda: _greedy(model, prompts, N))
            first["ours"] = _ours(lambda: _greedy(model, prompts, 1))
        if sizes.gen_numpy and not int8:
            impls["numpy"] = _numpy(lambda: _greedy(model, prompts, N))
            first["numpy"] = _numpy(lambda: _greedy(model, prompts, 1))
        if use_torch and transformers_module() is not None:
            import torch

            hf = _hf_model(cfg).eval()
            pt = torch.from_numpy(prompts.copy())
            mask = torch.ones_like(pt)

            def hf_generate(n):
                with torch.no_grad():
                    return hf.generate(pt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, use_cache=True, pad_token_id=0)
            impls["torch"] = lambda: hf_generate(N)
            first["torch"] = lambda: hf_generate(1)
        for fn in first.values():                           # warm-up, cheaper than a full run
            fn()
        impls["_first_token"] = first
        return impls

    return Case("gpt2_generate_int8" if int8 else "gpt2_generate", _describe(sizes), [batch, P, N], "greedy",
                "tokens/s", float(batch * N),
                setup, None, min_runs=sizes.model_runs, max_runs=sizes.model_runs, warmup=0, kind="model",
                notes=f"KV cache, batch {batch}, {P}-token prompt + {N} new; torch = HF generate()"
                      + ("; ours = int8 weight-only, int8 head (numformer quantize), torch float32" if int8 else ""),
                extra={"params": num_params(sizes)})


def model_cases(sizes: Sizes, use_torch: bool = True) -> list[Case]:
    cases = [train_case(sizes, use_torch)] if sizes.train else []
    gen = [generate_case(sizes, b, use_torch) for b in sizes.gen_batches]
    # int8 at batch 1 only: that is where weight traffic bounds the speed (and
    # a second batch-8 row with HF generate() would cost the suite a minute)
    return cases + gen + [generate_case(sizes, 1, use_torch, int8=True)]
