"""GPT-2: a decoder-only Transformer with pre-LayerNorm blocks and tied embeddings.

    x₀ = wte[ids] + wpe[pos]                              (B, T, C)
    for each block l:
        x = x + proj(attention(split(c_attn(ln_1(x)))))   causal self-attention
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))        MLP, n_inner = 4C hidden by default
    logits = ln_f(x) @ wteᵀ                               (B, T, V) — output tied to input embedding

Parameters use Hugging Face GPT-2 names and layouts (``Conv1D`` weights are
stored (in, out)), all in one flat buffer (:mod:`numformer.params`).
:meth:`GPT2.backward` calls the ops' backward functions in exact reverse
order of :meth:`GPT2.forward`. :meth:`GPT2.hidden` stops at ``ln_f`` (the
features a classification head reads) and ``backward(cache, dhidden=...)``
starts from a gradient of those hidden states instead of the LM loss.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from numformer import backend
from numformer.configcheck import (MAX_LAYERS, Bool, Choice, Epsilon, Float, Int, Prob, check_fields, check_keys,
                                   check_param_count, checked, fail, from_mapping)
from numformer.ops import attention, cross_entropy, dropout, embedding, gelu, layernorm, linear
from numformer.params import ParamLayout


# Hugging Face activation names -> the mode of numformer.ops.gelu. "gelu_new" and
# "gelu_pytorch_tanh" are the same tanh approximation; "gelu" is the exact erf form.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


# Hugging Face GPT-2 ``config.json`` keys that are not GPT2Config fields but are read,
# written back or change the math: each checked by type and range when present.
HF_GPT2_KEYS = {
    "n_ctx": Int(min=1), "resid_pdrop": Prob(), "embd_pdrop": Prob(), "attn_pdrop": Prob(),
    "summary_first_dropout": Prob(), "initializer_range": Float(ge=0.0),
    "bos_token_id": Int(min=0, optional=True), "eos_token_id": Int(min=0, optional=True),
    "pad_token_id": Int(min=0, optional=True),
    "scale_attn_weights": Bool(), "scale_attn_by_inverse_layer_idx": Bool(), "add_cross_attention": Bool(),
    "tie_word_embeddings": Bool(), "reorder_and_upcast_attn": Bool(), "use_cache": Bool(),
}


@dataclass
class GPT2Config:
    """Model shape; field names follow Hugging Face's ``GPT2Config``.

    Every field carries its check (:mod:`numformer.configcheck`);
    :meth:`validate` runs them and the cross-field rules.
    """

    vocab_size: int = checked(50257, Int(min=1))
    n_positions: int = checked(1024, Int(min=1))       # context length
    n_embd: int = checked(768, Int(min=1))
    n_layer: int = checked(12, Int(min=1, max=MAX_LAYERS))
    n_head: int = checked(12, Int(min=1))
    dropout: float = checked(0.0, Prob())              # applied to the embedding and both residual branches
    layer_norm_epsilon: float = checked(1e-5, Epsilon())
    activation_function: str = checked("gelu_new", Choice(tuple(ACTIVATIONS)))  # "gelu_new" (tanh) or "gelu" (erf)
    n_inner: int | None = checked(None, Int(min=1, optional=True))  # MLP width; None means 4 * n_embd (as in HF)

    def validate(self, source: str | None = None) -> "GPT2Config":
        """Check every field (type and range) and the cross-field rules.

        Raises :class:`~numformer.configcheck.ConfigFieldError` (a
        ValueError) naming ``source`` (the file, when known), the field and
        the value. Values are normalized to Python ints and floats.
        """
        check_fields(self, source)
        if self.n_embd % self.n_head:
            raise fail(source, "n_embd", self.n_embd, f"divisible by n_head ({self.n_head})")
        C, F = self.n_embd, self.inner
        count = (self.vocab_size + self.n_positions + 2) * C + self.n_layer * (4 * C * C + 2 * C * F + F + 9 * C)
        largest = max(("vocab_size", "n_positions", "n_embd", "n_layer"), key=lambda k: getattr(self, k))
        check_param_count(source, count, largest, getattr(self, largest))
        return self

    @property
    def inner(self) -> int:
        """The MLP's hidden width (``n_inner``, or 4·n_embd when it is None)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """A Hugging Face compatible ``config.json`` dictionary."""
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                 resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=0.0)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "GPT2Config":
        """Read our own or a Hugging Face ``config.json`` (unknown keys are ignored),
        validated (:meth:`validate`); errors name ``source``."""
        if isinstance(d, dict):
            check_keys(d, HF_GPT2_KEYS, source)
        return from_mapping(cls, d, source, rename={"resid_pdrop": "dropout"})


def param_shapes(cfg: GPT2Config) -> "OrderedDict[str, tuple[int, ...]]":
    """The ``name -> shape`` table, in Hugging Face ``GPT2Model`` naming."""
    C, V, P, F = cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.inner
    shapes = OrderedDict([("wte.weight", (V, C)), ("wpe.weight", (P, C))])
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        shapes[h + "ln_1.weight"] = (C,)
        shapes[h + "ln_1.bias"] = (C,)
        shapes[h + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[h + "attn.c_attn.bias"] = (3 * C,)
        shapes[h + "attn.c_proj.weight"] = (C, C)
        shapes[h + "attn.c_proj.bias"] = (C,)
        shapes[h + "ln_2.weight"] = (C,)
        shapes[h + "ln_2.bias"] = (C,)
        shapes[h + "mlp.c_fc.weight"] = (C, F)
        shapes[h + "mlp.c_fc.bias"] = (F,)
        shapes[h + "mlp.c_proj.weight"] = (F, C)
        shapes[h + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def _accumulate(grads: dict, module: str, dweight: np.ndarray, dbias: np.ndarray) -> None:
    """Add a layer's weight and bias gradients into the named gradient views."""
    grads[module + ".weight"] += dweight
    grads[module + ".bias"] += dbias


def _linear_backward(dout: np.ndarray, cache, grads: dict, module: str) -> np.ndarray:
    """linear.backward with dW and db added straight into the gradient buffer; returns dx."""
    dx, _, _ = linear.backward(dout, cache, grads=(grads[module + ".weight"], grads[module + ".bias"]))
    return dx


class KVCache:
    """Keys and values of past positions, preallocated to ``max_len``.

    k[l], v[l]: (B, H, max_len, D); ``length`` positions are filled.
    Memory: 2 · n_layer · B · max_len · n_embd values (:attr:`nbytes`) —
    72 KiB per position and row for GPT-2 124M in float32.
    """

    def __init__(self, cfg: GPT2Config, batch: int, max_len: int, dtype=np.float32):
        if max_len > cfg.n_positions:
            raise ValueError(f"KV cache of {max_len} positions exceeds the context of {cfg.n_positions}")
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        self.k = [np.zeros(shape, dtype) for _ in range(cfg.n_layer)]
        self.v = [np.zeros(shape, dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values of all layers."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


class GPT2:
    """A GPT-2 language model whose parameters are views into ``self.flat``."""

    def __init__(self, cfg: GPT2Config, flat: np.ndarray | None = None, dtype=np.float32):
        self.cfg = cfg.validate()
        self.layout = ParamLayout(param_shapes(cfg))
        self.flat = self.layout.buffer(flat, dtype)
        self.params = self.layout.views(self.flat)

    @property
    def dtype(self):
        return self.flat.dtype

    @property
    def num_params(self) -> int:
        return self.layout.size

    # ------------------------------------------------------------------ init
    @classmethod
    def init(cls, cfg: GPT2Config, seed: int = 0, dtype=np.float32) -> "GPT2":
        """GPT-2 initialization: N(0, 0.02) weights, zero biases, unit LayerNorm gains,
        and the two residual projections per block scaled by 1/√(2·n_layer), so the
        residual stream's variance does not grow with depth."""
        model = cls(cfg, dtype=dtype)
        rng = np.random.default_rng(seed)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, view in model.params.items():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                view[...] = 1.0
            elif name.endswith(".bias"):
                view[...] = 0.0
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                view[...] = rng.normal(0.0, std, size=view.shape)
        return model

    def decay_mask(self, decay_embeddings: bool = False) -> np.ndarray:
        """Flat mask: 1 for matrices that get weight decay, 0 for biases, LayerNorm (and embeddings)."""
        mask = self.layout.zeros(self.dtype)
        views = self.layout.views(mask)
        for name, shape in self.layout.shapes.items():
            is_embedding = name in ("wte.weight", "wpe.weight")
            if len(shape) == 2 and (decay_embeddings or not is_embedding):
                views[name][...] = 1.0
        return mask

    # --------------------------------------------------------------- forward
    @backend.pinned()                 # one backend for the whole pass (backend.pinned)
    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None, *, train: bool = False,
                rng: np.random.Generator | None = None, kv_cache: KVCache | None = None,
                key_mask: np.ndarray | None = None, reuse_logits: bool = False,
                positions: np.ndarray | None = None, last_only: bool = False):
        """ids: (B, T) int, targets: (B, T) int or None (−100 = ignore)
        -> logits (B, T, V), loss (float or None), cache for :meth:`backward`.

        With ``kv_cache`` the ids continue the cached sequence (inference only).
        ``key_mask``: (B, T_total) bool, False for padded positions (T_total
        counts the cached positions too when there is a cache).
        ``positions``: (B, T) int or None — the position of every token, for
        batches whose rows start at different positions (left-padded
        generation, see :mod:`numformer.generate`); None means
        ``cache length + t`` for token t, as in training.
        ``last_only=True`` computes the logits of the last position only,
        (B, 1, V) (generation needs no more; saves the (B·T, V) head on a
        long prompt); it cannot be combined with ``targets``.
        ``reuse_logits=True`` lets :meth:`backward` overwrite the returned
        logits with their gradient (saves a (B·T, V) buffer — 400 MB at GPT-2's
        vocabulary and B·T = 2048); pass it only when the logits are not used.
        """
        cfg = self.cfg
        if last_only and targets is not None:
            raise ValueError("last_only=True computes one position's logits; the loss needs all of them")
        pos0 = kv_cache.length if kv_cache is not None else 0
        xf, body_c = self._body_forward(ids, train, rng, kv_cache, key_mask, positions, last_only)  # (B, T, C)
        B, T, C = xf.shape
        logits = self._head(xf.reshape(B * T, C)).reshape(B, T, cfg.vocab_size)   # (BT, V) = x·wteᵀ
        if kv_cache is not None:
            kv_cache.length = pos0 + np.shape(ids)[1]          # every input position, even with last_only
        loss, ce_c = None, None
        if targets is not None:
            loss, ce_c = cross_entropy.forward(logits, np.asarray(targets), reuse_logits=reuse_logits)
        cache = (*body_c, xf, ce_c)
        return logits, loss, cache

    @backend.pinned()                 # one backend for the whole pass (backend.pinned)
    def hidden(self, ids: np.ndarray, *, train: bool = False, rng: np.random.Generator | None = None,
               key_mask: np.ndarray | None = None):
        """The final hidden states, after ``ln_f`` and before the tied LM head.

        ids: (B, T) int -> hidden (B, T, C), cache. ``backward(cache, dhidden=...)``
        differentiates any function of them (a classification head, say) without
        ever forming the (B, T, V) logits.
        """
        xf, body_c = self._body_forward(ids, train, rng, None, key_mask)
        return xf, (*body_c, xf, None)

    def _body_forward(self, ids, train, rng, kv_cache, key_mask, positions=None, last_only=False):
        """Embeddings, every block and ``ln_f``. ids: (B, T) -> xf (B, T, C), or (B, 1, C)
        with ``last_only``; cache."""
        cfg, p = self.cfg, self.params
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id outside [0, {cfg.vocab_size})")
        pos0 = kv_cache.length if kv_cache is not None else 0
        act = ACTIVATIONS[cfg.activation_function]
        drop = cfg.dropout if train else 0.0

        x, emb_c = self._embed(ids, pos0, positions)                         # (B, T, C)
        x, emb_drop_c = dropout.forward(x, drop, rng, train)
        layers = []
        for i in range(cfg.n_layer):
            x, layer_c = self._block_forward(i, x, drop, rng, train, kv_cache, pos0, act, key_mask)
            layers.append(layer_c)
        if last_only:
            x = x[:, -1:]                                                    # (B, 1, C)
        xf, lnf_c = layernorm.forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.layer_norm_epsilon)
        return xf, (emb_c, emb_drop_c, layers, lnf_c)

    def _block_forward(self, i, x, drop, rng, train, kv_cache, pos0, act, key_mask):
        """One pre-LN block. x: (B, T, C) -> x: (B, T, C), cache."""
        cfg, h = self.cfg, f"h.{i}."
        p = self.params
        C = cfg.n_embd
        # --- attention branch: x = x + drop(c_proj(attn(c_attn(ln_1(x)))))
        a_in, ln1_c = layernorm.forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv, qkv_c = self._linear(a_in, h + "attn.c_attn")                     # (B, T, 3C)
        q = attention.split_heads(qkv[..., :C], cfg.n_head)                   # (B, H, T, D)
        k = attention.split_heads(qkv[..., C:2 * C], cfg.n_head)
        v = attention.split_heads(qkv[..., 2 * C:], cfg.n_head)
        if kv_cache is not None:                                              # append, attend to all
            T = x.shape[1]
            kv_cache.k[i][:, :, pos0:pos0 + T] = k
            kv_cache.v[i][:, :, pos0:pos0 + T] = v
            k = kv_cache.k[i][:, :, :pos0 + T]
            v = kv_cache.v[i][:, :, :pos0 + T]
        att, att_c = attention.forward(q, k, v, causal=True, key_mask=key_mask)  # (B, H, T, D)
        att = attention.merge_heads(att)                                       # (B, T, C)
        a_out, proj_c = self._linear(att, h + "attn.c_proj")                   # (B, T, C)
        a_out, drop1_c = dropout.forward(a_out, drop, rng, train)
        x = x + a_out
        # --- MLP branch: x = x + drop(c_proj(gelu(c_fc(ln_2(x)))))
        m_in, ln2_c = layernorm.forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], cfg.layer_norm_epsilon)
        f, fc_c = self._linear(m_in, h + "mlp.c_fc")                           # (B, T, n_inner)
        g, gelu_c = gelu.forward(f, act)
        m_out, mproj_c = self._linear(g, h + "mlp.c_proj")                     # (B, T, C)
        m_out, drop2_c = dropout.forward(m_out, drop, rng, train)
        x = x + m_out
        return x, (ln1_c, qkv_c, att_c, proj_c, drop1_c, ln2_c, fc_c, gelu_c, mproj_c, drop2_c)

    def _embed(self, ids, pos0, positions):
        """wte[ids] + wpe[positions]: (B, T) -> (B, T, C), cache.
        (numformer.quantize.QuantizedGPT2 overrides this to look up int8 rows.)"""
        return embedding.forward(ids, self.params["wte.weight"], self.params["wpe.weight"], pos0, positions)

    def _head(self, x2):
        """The tied LM head: x2 (N, C) -> logits (N, V) = x2 · wteᵀ.
        (numformer.quantize.QuantizedGPT2 overrides this to run an int8 head.)"""
        return backend.matmul(x2, self.params["wte.weight"], trans_b=True)

    def _linear(self, x, module: str):
        """The Conv1D layer ``module`` (e.g. ``"h.0.mlp.c_fc"``): x (..., in) -> (..., out), cache.
        (numformer.quantize.QuantizedGPT2 overrides this to run int8 weights.)"""
        return linear.forward(x, self.params[module + ".weight"], self.params[module + ".bias"])

    # -------------------------------------------------------------- backward
    @backend.pinned()                 # one backend for the whole pass (backend.pinned)
    def backward(self, cache, grads: np.ndarray | None = None, dloss: float = 1.0, *,
                 dhidden: np.ndarray | None = None) -> np.ndarray:
        """Gradient of the loss with respect to every parameter.

        Returns a flat buffer of the parameter layout. If ``grads`` is given,
        the gradients are *added* to it (gradient accumulation).
        ``dhidden``: (B, T, C), the gradient of some other scalar with respect
        to the final hidden states (:meth:`hidden`); it is added to what the LM
        loss sends back, or used alone when the forward had no targets.
        """
        emb_c, emb_drop_c, layers, lnf_c, xf, ce_c = cache
        if ce_c is None and dhidden is None:
            raise ValueError("backward needs a forward pass that was given targets, or dhidden")
        cfg, p = self.cfg, self.params
        grads = self.layout.zeros(self.dtype) if grads is None else grads
        g = self.layout.views(grads)
        B, T, C = xf.shape

        if ce_c is not None:
            dlogits = cross_entropy.backward(dloss, ce_c).reshape(B * T, cfg.vocab_size)   # (BT, V)
            # logits = xf · wteᵀ  ⇒  dxf = dlogits · wte,  dwte += dlogitsᵀ · xf
            dxf = backend.matmul(dlogits, p["wte.weight"]).reshape(B, T, C)
            backend.matmul(dlogits, xf.reshape(B * T, C), trans_a=True, out=g["wte.weight"], accumulate=True)
            if dhidden is not None:
                dxf = dxf + dhidden
        else:
            if np.shape(dhidden) != (B, T, C):
                raise ValueError(f"dhidden must have the hidden states' shape {(B, T, C)}, got {np.shape(dhidden)}")
            dxf = np.asarray(dhidden, dtype=self.dtype)
        # xf = ln_f(x)
        dx, dgam, dbet = layernorm.backward(dxf, lnf_c)
        _accumulate(g, "ln_f", dgam, dbet)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(i, dx, layers[i], g)
        dx = dropout.backward(dx, emb_drop_c)
        # tied: the input lookup adds into the same wte gradient as the output head
        embedding.backward(dx, emb_c, dwte=g["wte.weight"], dwpe=g["wpe.weight"])
        return grads

    def _block_backward(self, i, dx, layer_c, g):
        """Reverse of :meth:`_block_forward`. dx: (B, T, C) gradient of the block output."""
        cfg, h = self.cfg, f"h.{i}."
        (ln1_c, qkv_c, att_c, proj_c, drop1_c, ln2_c, fc_c, gelu_c, mproj_c, drop2_c) = layer_c
        # --- MLP branch, reversed. x = x + m_out: the residual passes dx through unchanged.
        dm = dropout.backward(dx, drop2_c)
        dgelu = _linear_backward(dm, mproj_c, g, h + "mlp.c_proj")
        df = gelu.backward(dgelu, gelu_c)
        dm_in = _linear_backward(df, fc_c, g, h + "mlp.c_fc")
        dres, dgam, dbet = layernorm.backward(dm_in, ln2_c)
        _accumulate(g, h + "ln_2", dgam, dbet)
        dx = dx + dres
        # --- attention branch, reversed. x = x + a_out.
        da = dropout.backward(dx, drop1_c)
        datt = _linear_backward(da, proj_c, g, h + "attn.c_proj")
        datt = attention.split_heads(datt, cfg.n_head)                    # (B, H, T, D)
        dq, dk, dv = attention.backward(datt, att_c)
        dqkv = np.concatenate([attention.merge_heads(dq), attention.merge_heads(dk),
                               attention.merge_heads(dv)], axis=-1)        # (B, T, 3C)
        da_in = _linear_backward(dqkv, qkv_c, g, h + "attn.c_attn")
        dres, dgam, dbet = layernorm.backward(da_in, ln1_c)
        _accumulate(g, h + "ln_1", dgam, dbet)
        return dx + dres

    # ------------------------------------------------------------ utilities
    def loss_and_grads(self, ids, targets, *, train=False, rng=None):
        """Convenience: (loss, flat gradient buffer) for one batch."""
        _, loss, cache = self.forward(ids, targets, train=train, rng=rng, reuse_logits=True)
        return loss, self.backward(cache)

    def astype(self, dtype) -> "GPT2":
        """A copy of the model with parameters in ``dtype`` (e.g. float64 for gradchecks)."""
        return GPT2(self.cfg, self.flat.astype(dtype))
