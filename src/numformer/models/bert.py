"""BERT: a bidirectional Transformer encoder with post-LayerNorm blocks.

    x₀ = LN_emb(word[ids] + position[0..T) + token_type[tt])         (B, T, C)
    for each layer l:
        a = attention.output.dense(self_attention(x, key_mask))         bidirectional, padding masked
        x = LN_attn(x + a)                                              post-LN: normalize *after* the add
        m = output.dense(gelu(intermediate.dense(x)))                    MLP, I hidden (exact-erf GELU)
        x = LN_out(x + m)
    hidden = x                                                          (B, T, C)
    pooled = tanh(pooler.dense(x[:, 0]))                                (B, C), optional

Parameters use Hugging Face ``BertModel`` names and layouts; ``nn.Linear``
weights are stored (out, in) and used through :mod:`numformer.ops.dense`
(the A·Bᵀ matmul form), so a checkpoint loads by name without transposes.
All tensors live in one flat buffer (:mod:`numformer.params`). The layout
puts each layer's query, key and value weights next to each other (and
their biases), so one (3C, C) view of the buffer is the fused QKV
projection: one matmul forward, and its gradient lands in the right named
views for free.

:meth:`BertModel.backward` calls the ops' backward functions in exact reverse
order of :meth:`BertModel.forward`. Hidden dropout (``hidden_dropout_prob``)
is applied in training mode after the embedding LayerNorm and on both
residual branches; dropout on attention probabilities is not implemented
(it is ignored: fine-tuning works without it).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from numformer import backend, jsonfile
from numformer.configcheck import (MAX_LAYERS, Bool, Choice, Epsilon, Float, Int, Prob, check_fields, check_keys,
                                   check_param_count, checked, fail, from_mapping)
from numformer.intargs import int_array
from numformer.ops import attention, dense, dropout, embedding, gelu, layernorm
from numformer.params import ParamLayout

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    """Model shape; field names follow Hugging Face's ``BertConfig``.

    Every field carries its check (:mod:`numformer.configcheck`);
    :meth:`validate` runs them and the cross-field rules.
    """

    vocab_size: int = checked(30522, Int(min=1))
    hidden_size: int = checked(768, Int(min=1))
    num_hidden_layers: int = checked(12, Int(min=1, max=MAX_LAYERS))
    num_attention_heads: int = checked(12, Int(min=1))
    intermediate_size: int = checked(3072, Int(min=1))
    hidden_act: str = checked("gelu", Choice(tuple(_GELU)))     # "gelu" = exact erf; "gelu_new" = tanh form
    max_position_embeddings: int = checked(512, Int(min=1))
    type_vocab_size: int = checked(2, Int(min=1))
    layer_norm_eps: float = checked(1e-12, Epsilon())
    hidden_dropout_prob: float = checked(0.1, Prob())           # used only in training mode
    attention_probs_dropout_prob: float = checked(0.1, Prob())  # read and written back, not applied (module doc)
    pad_token_id: int | None = checked(0, Int(min=0, optional=True))  # its row gets no gradient, as in HF
    initializer_range: float = checked(0.02, Float(ge=0.0))
    position_embedding_type: str = checked("absolute", Choice(("absolute",)))  # the only one implemented

    def validate(self, source: str = "config") -> "BertConfig":
        """Raise ValueError (:class:`~numformer.configcheck.ConfigFieldError`)
        naming ``source``, the first bad field and its value."""
        check_fields(self, source)
        if self.hidden_size % self.num_attention_heads:
            raise fail(source, "hidden_size", self.hidden_size,
                       f"divisible by num_attention_heads ({self.num_attention_heads})")
        C, I = self.hidden_size, self.intermediate_size
        count = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size + 3) * C + C * C \
            + self.num_hidden_layers * (4 * C * C + 2 * C * I + I + 9 * C)
        largest = max(("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                       "num_hidden_layers"), key=lambda k: getattr(self, k))
        check_param_count(source, count, largest, getattr(self, largest))
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise fail(source, "pad_token_id", self.pad_token_id, f"a token id below vocab_size ({self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """A Hugging Face compatible ``config.json`` dictionary."""
        d = asdict(self)
        d.update(model_type="bert", architectures=["BertModel"])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "BertConfig":
        """Read a Hugging Face ``config.json`` dict (unknown keys are ignored).

        Refuses other architectures by ``model_type`` with a ValueError naming ``source``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{source}: unknown architecture model_type={model_type!r} "
                             "(this loader reads BERT encoders, model_type 'bert')")
        extra = check_keys(d, HF_KEYS, source)
        for key in ("is_decoder", "add_cross_attention"):
            if extra.get(key):
                raise ValueError(f"{source}: {key}=true is not supported (numformer's BERT is a "
                                 "bidirectional encoder without cross-attention)")
        return from_mapping(cls, d, source)


# Hugging Face ``config.json`` keys that are not BertConfig fields but change the
# math when set: checked by type, then refused when they ask for what is not implemented.
HF_KEYS = {"is_decoder": Bool(), "add_cross_attention": Bool()}


def param_shapes(cfg: BertConfig, pooler: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """The ``name -> shape`` table in Hugging Face ``BertModel`` naming.

    Order matters in one place: query/key/value weights are consecutive (and
    so are their biases) so that :meth:`BertModel._qkv` can view them as one
    fused (3C, C) matrix.
    """
    C, I = cfg.hidden_size, cfg.intermediate_size
    e = "embeddings."
    shapes = OrderedDict([
        (e + "word_embeddings.weight", (cfg.vocab_size, C)),
        (e + "position_embeddings.weight", (cfg.max_position_embeddings, C)),
        (e + "token_type_embeddings.weight", (cfg.type_vocab_size, C)),
        (e + "LayerNorm.weight", (C,)),
        (e + "LayerNorm.bias", (C,)),
    ])
    for i in range(cfg.num_hidden_layers):
        h = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes[h + f"attention.self.{part}.weight"] = (C, C)
        for part in ("query", "key", "value"):
            shapes[h + f"attention.self.{part}.bias"] = (C,)
        shapes[h + "attention.output.dense.weight"] = (C, C)
        shapes[h + "attention.output.dense.bias"] = (C,)
        shapes[h + "attention.output.LayerNorm.weight"] = (C,)
        shapes[h + "attention.output.LayerNorm.bias"] = (C,)
        shapes[h + "intermediate.dense.weight"] = (I, C)
        shapes[h + "intermediate.dense.bias"] = (I,)
        shapes[h + "output.dense.weight"] = (C, I)
        shapes[h + "output.dense.bias"] = (C,)
        shapes[h + "output.LayerNorm.weight"] = (C,)
        shapes[h + "output.LayerNorm.bias"] = (C,)
    if pooler:
        shapes["pooler.dense.weight"] = (C, C)
        shapes["pooler.dense.bias"] = (C,)
    return shapes


class BertModel:
    """A BERT encoder whose parameters are views into ``self.flat``."""

    def __init__(self, cfg: BertConfig, flat: np.ndarray | None = None, dtype=np.float32,
                 pooler: bool = True):
        self.cfg = cfg.validate()
        self.has_pooler = pooler
        self.layout = ParamLayout(param_shapes(cfg, pooler))
        self.flat = self.layout.buffer(flat, dtype)
        self.params = self.layout.views(self.flat)

    @property
    def dtype(self):
        return self.flat.dtype

    @property
    def num_params(self) -> int:
        return self.layout.size

    @classmethod
    def init(cls, cfg: BertConfig, seed: int = 0, dtype=np.float32, pooler: bool = True) -> "BertModel":
        """BERT initialization: N(0, initializer_range) weights and embeddings, zero
        biases, LayerNorm gains 1 and shifts 0."""
        model = cls(cfg, dtype=dtype, pooler=pooler)
        rng = np.random.default_rng(seed)
        for name, view in model.params.items():
            if "LayerNorm.weight" in name:
                view[...] = 1.0
            elif name.endswith(".bias"):
                view[...] = 0.0
            else:
                view[...] = rng.normal(0.0, cfg.initializer_range, size=view.shape)
        return model

    def astype(self, dtype) -> "BertModel":
        """A copy with parameters in ``dtype`` (e.g. float64 for gradchecks)."""
        return BertModel(self.cfg, self.flat.astype(dtype), pooler=self.has_pooler)

    def decay_mask(self) -> np.ndarray:
        """Flat mask: 1 for weight matrices that get weight decay; 0 for biases,
        LayerNorm parameters and embedding tables."""
        mask = self.layout.zeros(self.dtype)
        views = self.layout.views(mask)
        for name, shape in self.layout.shapes.items():
            if len(shape) == 2 and not name.startswith("embeddings."):
                views[name][...] = 1.0
        return mask

    def _qkv(self, flat: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Fused (3C, C) weight and (3C,) bias views of layer ``i`` in ``flat``
        (the parameters or a gradient buffer of this layout)."""
        h, C = f"encoder.layer.{i}.attention.self.", self.cfg.hidden_size
        wb, _ = self.layout.offsets[h + "query.weight"]
        _, we = self.layout.offsets[h + "value.weight"]
        bb, _ = self.layout.offsets[h + "query.bias"]
        _, be = self.layout.offsets[h + "value.bias"]
        return flat[wb:we].reshape(3 * C, C), flat[bb:be]

    # --------------------------------------------------------------- forward
    @backend.pinned()                 # one backend for the whole pass (backend.pinned)
    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None,
                token_type_ids: np.ndarray | None = None, *, train: bool = False,
                rng: np.random.Generator | None = None):
        """ids: (B, T) int; attention_mask: (B, T) 0/1 or bool (1 = real token), default
        all ones; token_type_ids: (B, T) int, default zeros
        -> hidden (B, T, C), pooled (B, C) or None, cache for :meth:`backward`."""
        cfg, p = self.cfg, self.params
        ids = int_array(ids, "BertModel.forward", "ids")          # 1.5 refused, not truncated
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got shape {ids.shape}")
        B, T = ids.shape
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id outside [0, {cfg.vocab_size})")
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings}); truncate it")
        tt = (np.zeros_like(ids) if token_type_ids is None
              else int_array(token_type_ids, "BertModel.forward", "token_type_ids"))
        if tt.shape != ids.shape:
            raise ValueError(f"token_type_ids {tt.shape} do not match ids {ids.shape}")
        if tt.size and (tt.min() < 0 or tt.max() >= cfg.type_vocab_size):
            raise ValueError(f"token type id outside [0, {cfg.type_vocab_size})")
        key_mask = None
        if attention_mask is not None:
            key_mask = np.asarray(attention_mask).astype(bool)
            if key_mask.shape != ids.shape:
                raise ValueError(f"attention_mask {key_mask.shape} does not match ids {ids.shape}")
            if key_mask.all():
                key_mask = None                     # nothing to hide: skip the masking work
        drop = cfg.hidden_dropout_prob if train else 0.0
        act = _GELU[cfg.hidden_act]

        e = "embeddings."
        x, emb_c = embedding.forward(ids, p[e + "word_embeddings.weight"],
                                     p[e + "position_embeddings.weight"])          # (B, T, C)
        x = x + p[e + "token_type_embeddings.weight"][tt]                          # + token_type[tt]
        x, eln_c = layernorm.forward(x, p[e + "LayerNorm.weight"], p[e + "LayerNorm.bias"], cfg.layer_norm_eps)
        x, edrop_c = dropout.forward(x, drop, rng, train)
        layers = []
        for i in range(cfg.num_hidden_layers):
            x, layer_c = self._layer_forward(i, x, key_mask, drop, rng, train, act)
            layers.append(layer_c)
        pooled, pool_c = None, None
        if self.has_pooler:
            pz, pdense_c = dense.forward(x[:, 0], p["pooler.dense.weight"], p["pooler.dense.bias"])  # (B, C)
            pooled = np.tanh(pz)
            pool_c = (pdense_c, pooled)
        cache = (ids.shape, tt, emb_c, eln_c, edrop_c, layers, pool_c)
        return x, pooled, cache

    def _layer_forward(self, i, x, key_mask, drop, rng, train, act):
        """One post-LN layer. x: (B, T, C) -> x: (B, T, C), cache."""
        cfg, h, p = self.cfg, f"encoder.layer.{i}.", self.params
        C, H = cfg.hidden_size, cfg.num_attention_heads
        eps = cfg.layer_norm_eps
        # --- attention: x = LN(x + drop(dense(attn(q, k, v))))
        w_qkv, b_qkv = self._qkv(self.flat, i)
        qkv, qkv_c = dense.forward(x, w_qkv, b_qkv)                          # (B, T, 3C)
        q = attention.split_heads(qkv[..., :C], H)                           # (B, H, T, D)
        k = attention.split_heads(qkv[..., C:2 * C], H)
        v = attention.split_heads(qkv[..., 2 * C:], H)
        att, att_c = attention.forward(q, k, v, causal=False, key_mask=key_mask)  # (B, H, T, D)
        att = attention.merge_heads(att)                                     # (B, T, C)
        a, ao_c = dense.forward(att, p[h + "attention.output.dense.weight"], p[h + "attention.output.dense.bias"])
        a, drop1_c = dropout.forward(a, drop, rng, train)
        x, ln1_c = layernorm.forward(x + a, p[h + "attention.output.LayerNorm.weight"],
                                     p[h + "attention.output.LayerNorm.bias"], eps)
        # --- MLP: x = LN(x + drop(output.dense(gelu(intermediate.dense(x)))))
        f, fi_c = dense.forward(x, p[h + "intermediate.dense.weight"], p[h + "intermediate.dense.bias"])  # (B,T,I)
        g, gelu_c = gelu.forward(f, act)
        m, fo_c = dense.forward(g, p[h + "output.dense.weight"], p[h + "output.dense.bias"])  # (B, T, C)
        m, drop2_c = dropout.forward(m, drop, rng, train)
        x, ln2_c = layernorm.forward(x + m, p[h + "output.LayerNorm.weight"], p[h + "output.LayerNorm.bias"], eps)
        return x, (qkv_c, att_c, ao_c, drop1_c, ln1_c, fi_c, gelu_c, fo_c, drop2_c, ln2_c)

    # -------------------------------------------------------------- backward
    @backend.pinned()                 # one backend for the whole pass (backend.pinned)
    def backward(self, cache, dhidden: np.ndarray | None = None, dpooled: np.ndarray | None = None,
                 grads: np.ndarray | None = None) -> np.ndarray:
        """Gradients of a scalar loss given its gradients w.r.t. the outputs.

        dhidden: (B, T, C) or None (zero), dpooled: (B, C) or None (zero).
        Returns a flat buffer of the parameter layout; with ``grads`` given the
        gradients are *added* to it (gradient accumulation).
        """
        shape, tt, emb_c, eln_c, edrop_c, layers, pool_c = cache
        cfg = self.cfg
        B, T = shape
        C = cfg.hidden_size
        grads = self.layout.zeros(self.dtype) if grads is None else grads
        g = self.layout.views(grads)
        dx = np.zeros((B, T, C), self.dtype) if dhidden is None else np.array(dhidden, dtype=self.dtype)
        if dpooled is not None:
            if pool_c is None:
                raise ValueError("dpooled given but the model has no pooler")
            pdense_c, pooled = pool_c
            # pooled = tanh(pz)  ⇒  dpz = dpooled ⊙ (1 − pooled²)
            dpz = dpooled * (1.0 - pooled * pooled)
            dcls, _, _ = dense.backward(dpz, pdense_c, grads=(g["pooler.dense.weight"], g["pooler.dense.bias"]))
            dx[:, 0] += dcls                                           # pooler reads x[:, 0]
        for i in reversed(range(cfg.num_hidden_layers)):
            dx = self._layer_backward(i, dx, layers[i], g, grads)
        e = "embeddings."
        dx = dropout.backward(dx, edrop_c)
        dx, dgam, dbet = layernorm.backward(dx, eln_c)
        g[e + "LayerNorm.weight"] += dgam
        g[e + "LayerNorm.bias"] += dbet
        # x = word[ids] + position[:T] + token_type[tt]: scatter-add each lookup's gradient
        np.add.at(g[e + "token_type_embeddings.weight"], tt.reshape(-1), dx.reshape(-1, C))
        dword, dpos = embedding.backward(dx, emb_c)
        if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size:
            dword[cfg.pad_token_id] = 0.0     # nn.Embedding(padding_idx=pad): the padding row gets no gradient
        g[e + "word_embeddings.weight"] += dword
        g[e + "position_embeddings.weight"] += dpos
        return grads

    def _layer_backward(self, i, dx, layer_c, g, grads):
        """Reverse of :meth:`_layer_forward`. dx: (B, T, C) gradient of the layer output."""
        h, H = f"encoder.layer.{i}.", self.cfg.num_attention_heads
        qkv_c, att_c, ao_c, drop1_c, ln1_c, fi_c, gelu_c, fo_c, drop2_c, ln2_c = layer_c
        # --- MLP, reversed. x_out = LN(x + m): the LN gradient flows to both x and m.
        ds, dgam, dbet = layernorm.backward(dx, ln2_c)
        g[h + "output.LayerNorm.weight"] += dgam
        g[h + "output.LayerNorm.bias"] += dbet
        dm = dropout.backward(ds, drop2_c)
        dg, _, _ = dense.backward(dm, fo_c, grads=(g[h + "output.dense.weight"], g[h + "output.dense.bias"]))
        df = gelu.backward(dg, gelu_c)
        dxi, _, _ = dense.backward(df, fi_c, grads=(g[h + "intermediate.dense.weight"],
                                                    g[h + "intermediate.dense.bias"]))
        dx = ds + dxi                                                    # residual + MLP input path
        # --- attention, reversed. x_mid = LN(x + a).
        ds, dgam, dbet = layernorm.backward(dx, ln1_c)
        g[h + "attention.output.LayerNorm.weight"] += dgam
        g[h + "attention.output.LayerNorm.bias"] += dbet
        da = dropout.backward(ds, drop1_c)
        datt, _, _ = dense.backward(da, ao_c, grads=(g[h + "attention.output.dense.weight"],
                                                     g[h + "attention.output.dense.bias"]))
        dq, dk, dv = attention.backward(attention.split_heads(datt, H), att_c)   # (B, H, T, D) each
        dqkv = np.concatenate([attention.merge_heads(dq), attention.merge_heads(dk),
                               attention.merge_heads(dv)], axis=-1)          # (B, T, 3C)
        gw, gb = self._qkv(grads, i)                                         # fused views of the grad buffer
        dxa, _, _ = dense.backward(dqkv, qkv_c, grads=(gw, gb))
        return ds + dxa


# ---------------------------------------------------------------------------- loading


def _read_json(path: str) -> dict:
    return jsonfile.load(path)          # a JSONFileError (ValueError) naming the file for any bad JSON


def _checkpoint_names(names, source: str) -> dict[str, str]:
    """Map our parameter names to the file's names: strip a ``bert.`` prefix
    (``BertFor...`` checkpoints) and accept old ``LayerNorm.gamma/beta``."""
    table = {}
    prefixed = any(n.startswith("bert.") for n in names)
    for n in names:
        ours = n
        if prefixed:
            if not n.startswith("bert."):
                continue                           # task heads (cls.*, classifier.*) are not ours
            ours = n[len("bert."):]
        if ours.endswith("LayerNorm.gamma"):
            ours = ours[: -len("gamma")] + "weight"
        elif ours.endswith("LayerNorm.beta"):
            ours = ours[: -len("beta")] + "bias"
        table[ours] = n
    return table


def load_bert(path: str | os.PathLike, dtype=np.float32, pooler: bool | None = None) -> BertModel:
    """Load a Hugging Face BERT folder (``config.json`` + ``model.safetensors``).

    Tensors may carry a ``bert.`` prefix; extra tensors (``position_ids``,
    task heads) are ignored. ``pooler=None`` uses the pooler when the file
    has one. Raises ValueError naming the file and the tensor for an unknown
    architecture, a missing tensor or a wrong shape; a ``pytorch_model.bin``
    alone is refused (it is a pickle and is never loaded).
    """
    from numformer import safetensors

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (a Hugging Face model folder needs config.json)")
    cfg = BertConfig.from_dict(_read_json(cfg_path), cfg_path)
    st_path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(st_path):
        if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
            raise ValueError(f"{folder}: only pytorch_model.bin (a pickle) is present; numformer never "
                             "unpickles files — convert it to model.safetensors")
        raise FileNotFoundError(f"{st_path} not found")
    header, _ = safetensors.read_header(st_path)
    table = _checkpoint_names(header, st_path)
    if pooler is None:
        pooler = "pooler.dense.weight" in table
    shapes = param_shapes(cfg, pooler)          # checked before the buffer is allocated (a huge
    for name, shape in shapes.items():          # config.json next to a small file fails here)
        if name not in table:
            raise ValueError(f"{st_path}: missing tensor {name!r} (config.json describes "
                             f"{cfg.num_hidden_layers} layers of width {cfg.hidden_size})")
        got = tuple(header[table[name]]["shape"])
        if got != shape:
            raise ValueError(f"{st_path}: tensor {table[name]!r} has shape {got}, config.json implies {shape}")
        if header[table[name]]["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{st_path}: tensor {table[name]!r} has dtype {header[table[name]]['dtype']}, "
                             "expected a float type")
    model = BertModel(cfg, dtype=dtype, pooler=pooler)
    tensors = safetensors.load_file(st_path, names=[table[n] for n in model.layout.shapes], mmap=True)
    for name, view in model.params.items():
        view[...] = tensors[table[name]]
    return model


def save_bert(model: BertModel, folder: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` (HF ``BertModel`` names)."""
    from numformer import safetensors
    from numformer.fileio import atomic_open

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with atomic_open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    safetensors.save_file(dict(model.params), os.path.join(folder, "model.safetensors"))
