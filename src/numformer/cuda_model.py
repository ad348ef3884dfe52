"""GPT-2 inference with its weights and activations kept in GPU memory.

``NUMFORMER_BACKEND=cuda`` runs matmul, softmax and attention on the GPU
but copies each operation's NumPy operands in and its result out.
:class:`DeviceGPT2` instead copies the weights to the device once and keeps
every activation there from the token ids to the logits: per forward, the
ids go in and the logits come out, nothing else crosses the bus.

The forward is :meth:`numformer.models.gpt2.GPT2.forward` (inference, no
dropout), one device kernel per line; rows r = b·T + t:

    x  = wte[ids] + wpe[t]                                 embedding_forward        (B·T, C)
    for each block:
        q, k, v = split(LN₁(x) · W_attn + b_attn)          layernorm, matmul, split_heads
        x += merge(attention(q, k, v)) · W_proj + b_proj    attention, merge_heads, matmul(accumulate)
        x += gelu(LN₂(x) · W_fc + b_fc) · W_mproj + b_mproj layernorm, matmul, gelu, matmul(accumulate)
    logits = LN_f(x) · wteᵀ                                 layernorm, matmul(trans_b)

The residual adds are the GEMM's accumulate form (C += A·B + bias), so
they need no kernel of their own.

``device`` is ``numformer._cuda`` (a GPU; the default) or
``numformer._cuda_emu``, which runs the same kernel source on the CPU: the
tests check the whole forward through the emulator against the NumPy model.
Not yet on the device: a KV cache (so generation recomputes the prefix)
and training (the backward kernels of LayerNorm, GELU and the embedding,
cross-entropy and AdamW).
"""

from __future__ import annotations

import numpy as np

from numformer.models.gpt2 import ACTIVATIONS, GPT2


def _gpu_module():
    """numformer._cuda with a device present, or a RuntimeError saying what is missing."""
    from numformer import backend

    module = backend._load_cuda()
    if module is None:
        raise RuntimeError(f"DeviceGPT2 needs a GPU: {backend._cuda_error}")
    return module


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

    def forward(self, ids) -> np.ndarray:
        """ids: (B, T) integers in [0, vocab) -> logits (B, T, V) float32 (copied to the host)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got shape {ids.shape}")
        B, T = ids.shape
        if T > self.cfg.n_positions:
            raise ValueError(f"{T} tokens exceed the model's context of {self.cfg.n_positions} positions")
        d, w = self.device, self.weights
        x = d.embedding_forward(ids, w["wte.weight"], w["wpe.weight"], 0)       # (B·T, C)
        for i in range(self.cfg.n_layer):
            self._block(f"h.{i}.", x, B)
        xf = d.layernorm_forward(x, w["ln_f.weight"], w["ln_f.bias"], self.cfg.layer_norm_epsilon)
        logits = d.matmul(xf, w["wte.weight"], False, True)                      # (B·T, V)
        return np.asarray(logits).reshape(B, T, -1)

    def _block(self, h: str, x, B: int) -> None:
        """One pre-LN block, updating x (B·T, C) in place on the device."""
        d, w, eps = self.device, self.weights, self.cfg.layer_norm_epsilon
        a = d.layernorm_forward(x, w[h + "ln_1.weight"], w[h + "ln_1.bias"], eps)
        qkv = d.matmul(a, w[h + "attn.c_attn.weight"], bias=w[h + "attn.c_attn.bias"])   # (B·T, 3C)
        q, k, v = d.split_heads(qkv, B, self.cfg.n_head)                                   # (B, H, T, D)
        att, _ = d.attention_forward(q, k, v, causal=True)
        d.matmul(d.merge_heads(att), w[h + "attn.c_proj.weight"], bias=w[h + "attn.c_proj.bias"],
                 out=x, accumulate=True)                                                   # x += proj
        m = d.layernorm_forward(x, w[h + "ln_2.weight"], w[h + "ln_2.bias"], eps)
        f = d.gelu_tanh_forward(d.matmul(m, w[h + "mlp.c_fc.weight"], bias=w[h + "mlp.c_fc.bias"]))
        d.matmul(f, w[h + "mlp.c_proj.weight"], bias=w[h + "mlp.c_proj.bias"], out=x, accumulate=True)
