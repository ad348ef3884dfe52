"""GPT-2 inference with its weights and activations kept in GPU memory.

``NUMFORMER_BACKEND=cuda`` runs matmul, softmax and attention on the GPU
but copies each operation's NumPy operands in and its result out.
:class:`DeviceGPT2` instead copies the weights to the device once and keeps
every activation there from the token ids to the logits: per forward, the
ids go in and the logits come out (and, for ``last_only`` over several
positions, the last hidden row of each sequence makes one round trip).

The forward is :meth:`numformer.models.gpt2.GPT2.forward` (inference, no
dropout), one device kernel per line; rows r = b·T + t:

    x  = wte[ids] + wpe[t]                                 embedding_forward        (B·T, C)
    for each block:
        q, k, v = split(LN₁(x) · W_attn + b_attn)          layernorm, matmul, split_heads
        x += merge(attention(q, k, v)) · W_proj + b_proj    attention, merge_heads, matmul(accumulate)
        x += gelu(LN₂(x) · W_fc + b_fc) · W_mproj + b_mproj layernorm, matmul, gelu, matmul(accumulate)
    logits = LN_f(x) · wteᵀ                                 layernorm, matmul(trans_b)

The residual adds are the GEMM's accumulate form (C += A·B + bias), so
they need no kernel of their own. With a :class:`DeviceKVCache` the split
also appends k and v to the cache (split_heads_to_cache), and attention
reads the cache's filled prefix in place (attention_forward_cached):
:meth:`DeviceGPT2.generate` decodes one token per step, reading the logits
of the last position only.

``device`` is ``numformer._cuda`` (a GPU; the default) or
``numformer._cuda_emu``, which runs the same kernel source on the CPU: the
tests check the whole forward through the emulator against the NumPy model.
Not yet on the device: training (the backward kernels of LayerNorm, GELU
and the embedding, cross-entropy and AdamW) and padded batches (every
prompt of a batch has the same length).
"""

from __future__ import annotations

import numpy as np

from numformer.generate import sample_next, validate_sampling
from numformer.models.gpt2 import ACTIVATIONS, GPT2


def _gpu_module():
    """numformer._cuda with a device present, or a RuntimeError saying what is missing."""
    from numformer import backend

    module = backend._load_cuda()
    if module is None:
        raise RuntimeError(f"DeviceGPT2 needs a GPU: {backend._cuda_error}")
    return module


class DeviceKVCache:
    """Keys and values of past positions on the device, preallocated to ``max_len``.

    k[l], v[l]: (B, H, max_len, D) DeviceArrays; ``length`` positions are filled.
    """

    def __init__(self, model: "DeviceGPT2", batch: int, max_len: int):
        cfg = model.cfg
        if not 1 <= max_len <= cfg.n_positions:
            raise ValueError(f"KV cache of {max_len} positions: expected 1..{cfg.n_positions} (the context)")
        zeros = np.zeros((batch, cfg.n_head, max_len, cfg.head_dim), np.float32)
        self.k = [model.device.to_device(zeros) for _ in range(cfg.n_layer)]
        self.v = [model.device.to_device(zeros) for _ in range(cfg.n_layer)]
        self.batch, self.max_len, self.length = batch, max_len, 0


class DeviceGPT2:
    """A :class:`GPT2`'s weights on the device, and a forward that stays there.

    model: a float32 GPT2 (or any dtype: it is converted) with the tanh GELU;
    device: ``numformer._cuda`` (default) or ``numformer._cuda_emu``.
    """

    def __init__(self, model: GPT2, device=None):
        act = ACTIVATIONS[model.cfg.activation_function]
        if act != "tanh":
            raise ValueError(f"DeviceGPT2 has the tanh GELU only; this model uses "
                             f"activation_function={model.cfg.activation_function!r}")
        self.cfg = model.cfg
        self.device = device if device is not None else _gpu_module()
        self.weights = {name: self.device.to_device(np.ascontiguousarray(p, dtype=np.float32))
                        for name, p in model.params.items()}

    def forward(self, ids, cache: DeviceKVCache | None = None, *, last_only: bool = False) -> np.ndarray:
        """ids: (B, T) integers in [0, vocab) -> logits (B, T, V) float32, copied to the host
        ((B, 1, V) with ``last_only``). With ``cache`` the ids continue its sequences
        at position ``cache.length``, and their keys and values are appended to it."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got shape {ids.shape}")
        B, T = ids.shape
        pos0 = 0 if cache is None else cache.length
        if cache is not None and (B != cache.batch or pos0 + T > cache.max_len):
            raise ValueError(f"{B} rows of {T} tokens after {pos0} do not fit the KV cache "
                             f"({cache.batch} rows of {cache.max_len} positions)")
        if pos0 + T > self.cfg.n_positions:
            raise ValueError(f"{pos0 + T} tokens exceed the model's context of {self.cfg.n_positions} positions")
        d, w = self.device, self.weights
        x = d.embedding_forward(ids, w["wte.weight"], w["wpe.weight"], pos0)    # (B·T, C)
        for i in range(self.cfg.n_layer):
            self._block(i, x, B, cache, pos0)
        if cache is not None:
            cache.length = pos0 + T
        if last_only and T > 1:   # the head on the last rows only, picked on the host (x is B·T×C: small)
            last = np.asarray(x).reshape(B, T, -1)[:, -1]
            x, T = d.to_device(np.ascontiguousarray(last)), 1
        xf = d.layernorm_forward(x, w["ln_f.weight"], w["ln_f.bias"], self.cfg.layer_norm_epsilon)
        logits = d.matmul(xf, w["wte.weight"], False, True)                      # (B·T, V)
        return np.asarray(logits).reshape(B, T, -1)

    def _block(self, i: int, x, B: int, cache: DeviceKVCache | None, pos0: int) -> None:
        """Block i (pre-LN), updating x (B·T, C) in place on the device."""
        d, w, eps, h = self.device, self.weights, self.cfg.layer_norm_epsilon, f"h.{i}."
        a = d.layernorm_forward(x, w[h + "ln_1.weight"], w[h + "ln_1.bias"], eps)
        qkv = d.matmul(a, w[h + "attn.c_attn.weight"], bias=w[h + "attn.c_attn.bias"])   # (B·T, 3C)
        if cache is None:
            q, k, v = d.split_heads(qkv, B, self.cfg.n_head)                               # (B, H, T, D)
            att, _ = d.attention_forward(q, k, v, causal=True)
        else:
            q = d.split_heads_to_cache(qkv, B, cache.k[i], cache.v[i], pos0)               # (B, H, T, D)
            length = pos0 + qkv.shape[0] // B
            att, _ = d.attention_forward_cached(q, cache.k[i], cache.v[i], length, causal=True)
        d.matmul(d.merge_heads(att), w[h + "attn.c_proj.weight"], bias=w[h + "attn.c_proj.bias"],
                 out=x, accumulate=True)                                                   # x += proj
        m = d.layernorm_forward(x, w[h + "ln_2.weight"], w[h + "ln_2.bias"], eps)
        f = d.gelu_tanh_forward(d.matmul(m, w[h + "mlp.c_fc.weight"], bias=w[h + "mlp.c_fc.bias"]))
        d.matmul(f, w[h + "mlp.c_proj.weight"], bias=w[h + "mlp.c_proj.bias"], out=x, accumulate=True)

    def new_cache(self, batch: int, max_len: int) -> DeviceKVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions."""
        return DeviceKVCache(self, batch, max_len)

    def generate(self, prompts, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> np.ndarray:
        """prompts: (B, P) ids, every row the same length -> new ids (B, max_new_tokens).

        One prefill of the prompts, then one (B, 1) step per token with the KV
        cache; only the last position's logits come back to the host, where
        :func:`numformer.generate.sample_next` picks the token (temperature 0:
        greedy). Rows do not stop early.
        """
        validate_sampling(temperature, top_k, top_p)
        prompts = np.asarray(prompts)
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompts must be (B, P) with P >= 1 (equal lengths), got shape {prompts.shape}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        B, P = prompts.shape
        out = np.zeros((B, max_new_tokens), np.int64)
        if max_new_tokens == 0:
            return out
        cache = self.new_cache(B, P + max_new_tokens - 1)   # the last token is never fed back
        rng = np.random.default_rng(seed)
        logits = self.forward(prompts, cache, last_only=True)[:, -1]               # (B, V)
        for n in range(max_new_tokens):
            out[:, n] = sample_next(logits, rng, temperature, top_k, top_p)
            if n + 1 < max_new_tokens:
                logits = self.forward(out[:, n:n + 1], cache)[:, -1]
        return out
