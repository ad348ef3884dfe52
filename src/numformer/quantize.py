"""int8 weight-only quantization of GPT-2: quantize, save, load, run.

    numformer quantize --checkpoint IN --out OUT [--float-head]

Symmetric, per output channel. For a Conv1D weight ``w`` stored (in, out) —
column j is output channel j — ::

    s[j]    = max_i |w[i, j]| / 127                    (s[j] = 0 for an all-zero column)
    q[i, j] = round(w[i, j] / s[j])  ∈ [−127, 127]     (q = 0 where s = 0)
    w[i, j] ≈ s[j] · q[i, j],        |w − s·q| ≤ s[j] / 2 = max_i |w[i, j]| / 254

Quantized: every block's ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj`` weight (85 M of GPT-2 124M's 124 M parameters) and, by
default, the tied embedding ``wte`` (V, C), which is also the output head
``logits = x · wteᵀ``. The head's output channel v is row v of ``wte``, so it
gets one scale per vocabulary row — the same math applied to ``wteᵀ`` (C, V)::

    s[v] = max_c |wte[v, c]| / 127,   q_head[c, v] = round(wte[v, c] / s[v])
    logits[v] = s[v] · Σ_c x[c] q_head[c, v]             (the blocks' kernel, N = V)
    embedding(v) = s[v] · q_head[:, v]                    (only the looked-up rows)

One int8 copy serves both uses; the file stores it as ``wte.weight`` I8
(V, C) + ``wte.weight_scale`` F32 (V,). ``--float-head`` keeps ``wte``
float32 (measured quality and speed of both: docs/quantization.md). Float32
always: ``wpe``, the LayerNorms and all biases (small, and added in float
anyway).

The model is :class:`QuantizedGPT2`: a :class:`~numformer.models.gpt2.GPT2`
whose flat buffer holds only the float parameters and whose linear layers
run ``(x @ q) ⊙ s + b`` through :func:`numformer.backend.matmul_int8`. Each
int8 matrix is held once (:class:`Int8Weight`), in the kernel's packed
streaming layout (:func:`numformer.ops.linear.pack_int8`), packed when it
is quantized or loaded; ``q`` is rebuilt from it (``unpack_int8``) only to
save or dequantize. It is for inference: ``backward`` and ``decay_mask``
raise :class:`QuantizedModelError`.

Folder layout (written atomically)::

    OUT/config.json         the source's config + {"quantization": {..., "format_version": 2,
                                                                     "int8_head": true|false}}
    OUT/model.safetensors   float tensors as before; each quantized block weight as
                            "<name>" I8 (in, out) + "<name>_scale" F32 (out,); an int8
                            head as "wte.weight" I8 (V, C) + "wte.weight_scale" F32 (V,)
    OUT/<tokenizer files>   copied from the source

``checkpoint.load_model``, ``pretrained.from_pretrained`` and therefore
``numformer sample`` load such a folder transparently (they see the
``quantization`` entry and call :func:`load_quantized`). Folders of format
version 1 (before int8 heads: no ``int8_head``, float ``wte``) still load.

The measured error that ``numformer quantize`` reports (weights and logits,
float against int8) is :mod:`numformer.quantize_report`; its
``format_summary`` and ``probe_logits_error`` are re-exported here.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict

import numpy as np

from numformer import backend, safetensors
from numformer.checkpoint import CheckpointError
from numformer.fileio import atomic_directory, atomic_write_json
from numformer.intargs import int_array
from numformer.models.gpt2 import GPT2, GPT2Config, param_shapes
from numformer.ops import embedding, linear
from numformer.quantize_report import format_summary, measure_int8_copy, probe_logits_error  # re-exported

__all__ = ["QUANT_MODULES", "Int8Weight", "QuantizedGPT2", "QuantizedModelError", "quantize_weight",
           "dequantize_weight", "quantize_model", "save_quantized", "load_quantized", "quantize_checkpoint",
           "is_quantized", "format_summary", "probe_logits_error"]

#: The per-block Conv1D layers whose weights become int8.
QUANT_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
SCALE_SUFFIX = "_scale"          # "<name>.weight" (I8) + "<name>.weight_scale" (F32)
METHOD = "numformer-int8-weight-only"
FORMAT_VERSION = 2               # 2: the "int8_head" entry (version 1 folders, float wte, still load)
READ_VERSIONS = (1, 2)
HEAD_NAME = "wte.weight"         # the tied embedding / output head
QMAX = 127                       # symmetric: −127..127 (−128 unused, so negation is exact)
INT8_STREAM_ROWS = 64            # the kernel streams q up to this many rows (numformer._cpu.int8_stream_rows)
HEAD_SLICE_COLS = 3072           # an int8 head with more rows runs in slices of this many columns (× 64)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
# Tokenizer (and generation) files copied from the source folder when present.
TOKENIZER_FILES = ("numformer_tokenizer.json", "vocab.json", "merges.txt", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "added_tokens.json", "vocab.txt")


class QuantizedModelError(ValueError):
    """An operation that needs float weights (training) was asked of an int8 model."""


# ----------------------------------------------------------------------------- the math


def quantize_weight(w: np.ndarray, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization of a Conv1D weight.

    w: (in, out) float -> q: (in, out) int8, scale: (out,) float32 with
    ``w ≈ q * scale`` and ``|w − q·scale| ≤ scale / 2`` per column (rounding to
    nearest). A column of zeros gets scale 0 and q 0 (no division by zero).
    Raises ValueError for a non-finite weight (its scale would be inf/NaN).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (in, out) weight, got shape {w.shape}")
    w64 = w.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise ValueError(f"{name}: has non-finite values; cannot quantize")
    amax = np.max(np.abs(w64), axis=0) if w.shape[0] else np.zeros(w.shape[1])   # (out,)
    scale = (amax / QMAX).astype(np.float32)                                       # (out,) stored scale
    s64 = scale.astype(np.float64)
    # divide by the *stored* scale, so q·scale is what the kernel reconstructs
    ratio = np.divide(w64, s64, out=np.zeros_like(w64), where=s64 > 0)             # (in, out)
    q = np.clip(np.rint(ratio), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q: (in, out) int8, scale: (out,) -> float32 (in, out) = q ⊙ scale."""
    return q.astype(np.float32) * scale


# ----------------------------------------------------------------------------- the model


class Int8Weight:
    """One int8 matrix as a :class:`QuantizedGPT2` holds it: a single int8 copy.

    ``packed``: q (K, N) in the kernel's streaming layout
    (:func:`numformer.ops.linear.pack_int8`, (⌈N/64⌉, K, 64), the last block
    zero-padded); ``scale``: (N,) float32, one per output column. ``q`` itself
    is not kept: :meth:`unpack` rebuilds it (for saving, :meth:`dequantize`).
    """

    __slots__ = ("packed", "scale")

    def __init__(self, packed: np.ndarray, scale: np.ndarray):
        self.packed, self.scale = packed, scale

    @classmethod
    def from_q(cls, q: np.ndarray, scale: np.ndarray) -> "Int8Weight":
        """From q (K, N) int8 (any view: a transpose, say) and scale (N,)."""
        return cls(linear.pack_int8(q), np.array(scale, dtype=np.float32, copy=True))

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the matrix q it holds."""
        return (self.packed.shape[1], self.scale.shape[0])

    @property
    def size(self) -> int:
        return self.packed.shape[1] * self.scale.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes

    def unpack(self) -> np.ndarray:
        """q (K, N) int8, a new array."""
        return linear.unpack_int8(self.packed, self.scale.shape[0])

    def dequantize(self) -> np.ndarray:
        """float32 (K, N) = q ⊙ scale."""
        return dequantize_weight(self.unpack(), self.scale)


def quantized_names(cfg: GPT2Config) -> list[str]:
    """Names of the block weights that are int8 in a quantized model of shape ``cfg``."""
    return [f"h.{i}.{m}.weight" for i in range(cfg.n_layer) for m in QUANT_MODULES]


def float_shapes(cfg: GPT2Config, int8_head: bool = False) -> "OrderedDict[str, tuple[int, ...]]":
    """The parameter table of a quantized model's float part (everything else)."""
    skip = set(quantized_names(cfg)) | ({HEAD_NAME} if int8_head else set())
    return OrderedDict((n, s) for n, s in param_shapes(cfg).items() if n not in skip)


def _check_int8_weight(name: str, w, shape: tuple[int, int]) -> "Int8Weight":
    if not isinstance(w, Int8Weight):
        raise TypeError(f"{name}: expected an Int8Weight, got {type(w).__name__}")
    K, N = shape
    want = (-(-N // linear.PACK_COLS), K, linear.PACK_COLS)
    if w.packed.dtype != np.int8 or w.packed.shape != want or not w.packed.flags.c_contiguous \
            or w.scale.dtype != np.float32 or w.scale.shape != (N,):
        raise ValueError(f"{name}: need packed int8 {want} (C-contiguous) and float32 scale ({N},), "
                         f"got {w.packed.dtype} {w.packed.shape} and {w.scale.dtype} {w.scale.shape}")
    return w


class QuantizedGPT2(GPT2):
    """GPT-2 with int8 linear weights (and, by default, an int8 tied head); inference only.

    ``flat``/``params`` hold the float parameters (LayerNorms, biases, ``wpe``,
    and ``wte`` when the head is float); ``qweights[name]`` is an
    :class:`Int8Weight` for every name in :func:`quantized_names`; ``head`` is
    the :class:`Int8Weight` of the tied embedding — q_head (C, V) = the
    quantized ``wteᵀ``, one scale per vocabulary row — or None for a float
    head. Each int8 matrix is held once, in the packed layout.
    """

    def __init__(self, cfg: GPT2Config, flat: np.ndarray, qweights: dict, head: Int8Weight | None = None):
        from numformer.params import ParamLayout

        self.cfg = cfg.validate()
        self.layout = ParamLayout(float_shapes(cfg, int8_head=head is not None))
        if flat.dtype != np.float32 or flat.shape != (self.layout.size,):
            raise ValueError(f"float parameter buffer must be float32 ({self.layout.size},), "
                             f"got {flat.dtype} {flat.shape}")
        self.flat = flat
        self.params = self.layout.views(flat)
        shapes = param_shapes(cfg)
        self.qweights: dict[str, Int8Weight] = {
            name: _check_int8_weight(name, qweights[name], shapes[name]) for name in quantized_names(cfg)}
        self.head = None if head is None else \
            _check_int8_weight("head", head, (cfg.n_embd, cfg.vocab_size))

    @property
    def int8_head(self) -> bool:
        """Whether the tied embedding / output head is int8 (else float32 ``wte``)."""
        return self.head is not None

    @property
    def num_params(self) -> int:
        return self.layout.size + sum(w.size for w in self.qweights.values()) \
            + (self.head.size if self.head is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of every parameter array the model holds (float buffer, packed int8, scales)."""
        return self.flat.nbytes + sum(w.nbytes for w in self.qweights.values()) \
            + (self.head.nbytes if self.head is not None else 0)

    def _linear(self, x, module: str):
        """x (..., in) -> (x @ q) ⊙ scale + b (..., out); no backward cache."""
        w = self.qweights[module + ".weight"]
        return linear.forward_int8(x, w.packed, w.scale, self.params[module + ".bias"]), None

    def _embed(self, ids, pos0, positions):
        """wte[ids] + wpe: with an int8 head the rows ``s[v]·q_head[:, v]`` of the looked-up ids only."""
        if self.head is None:
            return super()._embed(ids, pos0, positions)
        ids = int_array(ids, "embedding", "ids")   # as embedding.forward: floats refused, not cast
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = linear.int8_columns(self.head.packed, uniq).astype(np.float32) \
            * self.head.scale[uniq][:, None]                                    # (U, C) = dequantized rows
        return embedding.forward(inv.reshape(ids.shape), rows, self.params["wpe.weight"], pos0, positions)

    def _head(self, x2):
        """logits (M, V) = x2 · (q_head ⊙ s) — the same int8 kernel as the blocks, N = V columns.

        Up to 64 rows (decoding, short prompts) stream the packed head. More rows
        (evaluation, a prefill without ``last_only``) run the kernel's GEMM
        path, which converts q to a float32 scratch of K×N that it keeps per
        thread: the whole head at once would leave a float copy of ``wte``
        (154 MB at GPT-2's vocabulary) allocated for good, so it runs in
        slices of :data:`HEAD_SLICE_COLS` columns (a packed slice of whole
        blocks is a view; at GPT-2 124M the scratch then stays 768 × 3072
        floats, what ``mlp.c_fc`` already needs).
        """
        h = self.head
        if h is None:
            return super()._head(x2)
        V = h.scale.shape[0]
        if x2.shape[0] <= INT8_STREAM_ROWS or V <= HEAD_SLICE_COLS:
            return backend.matmul_int8(x2, h.packed, h.scale)
        out = np.empty((x2.shape[0], V), np.float32)
        nblk = HEAD_SLICE_COLS // linear.PACK_COLS
        for b0 in range(0, h.packed.shape[0], nblk):
            c0, c1 = b0 * linear.PACK_COLS, min(V, (b0 + nblk) * linear.PACK_COLS)
            out[:, c0:c1] = backend.matmul_int8(x2, h.packed[b0:b0 + nblk], h.scale[c0:c1])
        return out

    def _refuse(self, what: str):
        raise QuantizedModelError(
            f"cannot {what}: this GPT-2 has int8 weights and is for inference only; train the float32 "
            f"checkpoint and quantize it again (or call .dequantize() for a float copy)")

    def backward(self, cache, grads=None, dloss: float = 1.0, **kwargs):
        self._refuse("compute gradients (backward)")

    def decay_mask(self, decay_embeddings: bool = False):
        self._refuse("build an optimizer (decay_mask)")

    def astype(self, dtype):
        if np.dtype(dtype) != np.float32:
            self._refuse(f"convert to {np.dtype(dtype)}")
        return self

    def dequantize(self) -> GPT2:
        """A float32 :class:`GPT2` with the weights ``q ⊙ scale`` (what the int8 model computes);
        with an int8 head ``wte[v] = s_head[v] · q_head[:, v]``."""
        model = GPT2(self.cfg)
        for name, view in model.params.items():
            if name in self.qweights:
                view[...] = self.qweights[name].dequantize()
            elif name == HEAD_NAME and self.head is not None:
                view[...] = self.head.dequantize().T
            else:
                view[...] = self.params[name]
        return model


def quantize_model(model: GPT2, int8_head: bool = True) -> QuantizedGPT2:
    """An int8 copy of a float GPT-2 (the source is not changed).

    ``int8_head``: also quantize the tied embedding / output head ``wte``,
    one scale per vocabulary row (the default); False keeps it float32.
    """
    if isinstance(model, QuantizedGPT2):
        raise QuantizedModelError("the model is already quantized")
    if not isinstance(model, GPT2):
        raise TypeError(f"quantize_model takes a GPT-2, got {type(model).__name__}")
    cfg = model.cfg
    qweights = {name: Int8Weight.from_q(*quantize_weight(model.params[name], name))
                for name in quantized_names(cfg)}
    head = None
    if int8_head:       # the head's output channel v is row v of wte: quantize wteᵀ (C, V) per column
        head = Int8Weight.from_q(*quantize_weight(model.params[HEAD_NAME].T, HEAD_NAME))
    from numformer.params import ParamLayout

    layout = ParamLayout(float_shapes(cfg, int8_head))
    flat = layout.pack({n: model.params[n] for n in layout}, dtype=np.float32)
    qmodel = QuantizedGPT2(cfg, flat, qweights, head)
    if hasattr(model, "hf_config"):
        qmodel.hf_config = model.hf_config
    return qmodel


def is_quantized(config: dict) -> bool:
    """Whether a ``config.json`` dict describes an int8 folder."""
    return isinstance(config, dict) and "quantization" in config


def _quant_entry(cfg: GPT2Config, int8_head: bool) -> dict:
    entry = {"method": METHOD, "format_version": FORMAT_VERSION, "bits": 8, "symmetric": True,
             "granularity": "per_output_channel", "modules": list(QUANT_MODULES),
             "scale_suffix": SCALE_SUFFIX, "int8_head": bool(int8_head)}
    if int8_head:
        entry["head_granularity"] = "per_vocabulary_row"
    entry["float"] = (["wpe", "layer norms", "biases"] if int8_head else ["wte", "wpe", "layer norms", "biases"])
    entry["num_quantized_weights"] = len(quantized_names(cfg)) + (1 if int8_head else 0)
    return entry


# ----------------------------------------------------------------------------- files


def save_quantized(model: QuantizedGPT2, path: str, config: dict | None = None,
                   copy_from: str | None = None) -> None:
    """Write ``model`` as an int8 folder at ``path``, atomically.

    config: the ``config.json`` dict to extend (default: the model's own);
    copy_from: a folder whose tokenizer files are copied along. The int8
    weights are written in the documented layouts — block weights (in, out),
    an int8 head as ``wte.weight`` (V, C) with ``wte.weight_scale`` (V,) —
    unpacked from the model's packed copies for the write.
    """
    base = dict(config if config is not None else model.cfg.to_dict())
    base["quantization"] = _quant_entry(model.cfg, model.int8_head)
    tensors: dict[str, np.ndarray] = dict(model.params)
    for name, w in model.qweights.items():
        tensors[name] = w.unpack()
        tensors[name + SCALE_SUFFIX] = w.scale
    if model.head is not None:
        tensors[HEAD_NAME] = np.ascontiguousarray(model.head.unpack().T)     # (V, C): row v, scale s[v]
        tensors[HEAD_NAME + SCALE_SUFFIX] = model.head.scale
    with atomic_directory(os.fspath(path)) as tmp:
        safetensors.save_file(tensors, os.path.join(tmp, MODEL_FILE),
                              metadata={"format": "np", "producer": "numformer", "quantization": METHOD})
        atomic_write_json(os.path.join(tmp, CONFIG_FILE), base)
        if copy_from is not None:
            for fname in TOKENIZER_FILES:
                src = os.path.join(copy_from, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, fname))
            for fname in sorted(os.listdir(copy_from)):
                if fname.endswith(".tiktoken"):
                    shutil.copyfile(os.path.join(copy_from, fname), os.path.join(tmp, fname))


def _check_entry(entry, where: str) -> bool:
    """Validate the ``quantization`` entry; returns whether the head is int8."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: 'quantization' must be an object, got {type(entry).__name__}")
    if entry.get("method") != METHOD:
        raise CheckpointError(f"{where}: unknown quantization method {entry.get('method')!r} "
                              f"(numformer reads {METHOD!r})")
    version, bits = entry.get("format_version"), entry.get("bits")
    if not _is_int(version) or version not in READ_VERSIONS or not _is_int(bits) or bits != 8:
        raise CheckpointError(f"{where}: unsupported quantization format_version={version!r}, "
                              f"bits={entry.get('bits')!r} (numformer reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))}, 8 bits)")
    if list(entry.get("modules", [])) != list(QUANT_MODULES) or entry.get("scale_suffix") != SCALE_SUFFIX:
        raise CheckpointError(f"{where}: quantized modules {entry.get('modules')!r} / scale suffix "
                              f"{entry.get('scale_suffix')!r} differ from {list(QUANT_MODULES)!r} / {SCALE_SUFFIX!r}")
    for key, want in (("symmetric", True), ("granularity", "per_output_channel")):
        if key in entry and (entry[key] != want or type(entry[key]) is not type(want)):
            raise CheckpointError(f"{where}: quantization {key!r} must be {want!r} (the only scheme "
                                  f"numformer reads), got {entry[key]!r}")
    if version == 1:                                   # before int8 heads: wte is float
        if "int8_head" in entry:
            raise CheckpointError(f"{where}: 'int8_head' needs format_version 2, the entry says version 1")
        return False
    int8_head = entry.get("int8_head")
    if not isinstance(int8_head, bool):
        raise CheckpointError(f"{where}: quantization 'int8_head' must be true or false, got {int8_head!r}")
    if int8_head and entry.get("head_granularity", "per_vocabulary_row") != "per_vocabulary_row":
        raise CheckpointError(f"{where}: quantization 'head_granularity' must be 'per_vocabulary_row' (the only "
                              f"scheme numformer reads), got {entry['head_granularity']!r}")
    return int8_head


def _is_int(value) -> bool:
    """An integer, not a bool and not a float that compares equal (``8.0 == 8``)."""
    return type(value) is int


def _check_int8_tensor(file: str, name: str, q: np.ndarray, scale: np.ndarray, dtypes: dict,
                       want: tuple[int, int], per: str) -> None:
    """An I8 tensor of shape ``want`` with an F32 ``<name>_scale``, one per ``per``
    (per output channel: a column of (in, out); per vocabulary row: a row of wte (V, C))."""
    if dtypes[name] != "I8":
        raise CheckpointError(f"{file}: tensor {name!r} is {dtypes[name]}, but config.json says it is "
                              f"int8-quantized (expected I8)")
    if q.shape != want:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {q.shape}, the config needs {want}")
    sname = name + SCALE_SUFFIX
    n = want[0] if per == "vocabulary row" else want[1]
    if dtypes[sname] != "F32" or scale.shape != (n,):
        raise CheckpointError(f"{file}: tensor {sname!r} must be F32 of shape ({n},) (one scale per "
                              f"{per}), got {dtypes[sname]} {scale.shape}")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise CheckpointError(f"{file}: tensor {sname!r} has a negative or non-finite scale")
    if np.any(q == -128):
        raise CheckpointError(f"{file}: tensor {name!r} holds -128, outside the symmetric range [-127, 127]")


def load_quantized(path: str, config: dict, dtype=np.float32) -> QuantizedGPT2:
    """Load the int8 folder ``path`` whose ``config.json`` is ``config``.

    Reads format versions 1 (float ``wte``) and 2 (``int8_head`` true or
    false). Every tensor is checked against the config: the quantized block
    weights must be I8 of the layer's shape with an F32 scale of (out,)
    finite values ≥ 0; an int8 head I8 (V, C) with an F32 scale of (V,);
    the others float of their shape; nothing missing or extra. Each problem
    is a :class:`CheckpointError` naming the file and the tensor. The int8
    tensors are read from a memory map and packed (one int8 copy in memory).
    """
    from numformer.pretrained import gpt2_config_from_hf

    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    int8_head = _check_entry(config.get("quantization"), cfg_file)
    if np.dtype(dtype) != np.float32:
        raise CheckpointError(f"{path}: an int8 checkpoint loads as float32 only, not {np.dtype(dtype)}")
    cfg = gpt2_config_from_hf(config, cfg_file)
    file = os.path.join(path, MODEL_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint file {file!r} is missing")
    try:
        header, _ = safetensors.read_header(file)
        tensors = safetensors.load_file(file, mmap=True)      # views: the packed copies are the only ones
    except safetensors.SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    strip = (lambda n: n[len("transformer."):] if n.startswith("transformer.") else n)
    dtypes = {strip(n): e["dtype"] for n, e in header.items()}
    tensors = {strip(n): v for n, v in tensors.items()}

    shapes = param_shapes(cfg)
    qnames = quantized_names(cfg)
    scaled = qnames + ([HEAD_NAME] if int8_head else [])
    expected = set(shapes) | {n + SCALE_SUFFIX for n in scaled}
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        head_note = "" if int8_head else " and a float head"
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r} for an int8 GPT-2 with "
                              f"n_layer={cfg.n_layer}{head_note}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name in list(shapes) + [n + SCALE_SUFFIX for n in scaled]:
        if name not in tensors:
            raise CheckpointError(f"{file}: missing tensor {name!r}")

    qweights = {}
    for name in qnames:
        q, scale = tensors[name], tensors[name + SCALE_SUFFIX]
        _check_int8_tensor(file, name, q, scale, dtypes, shapes[name], "output channel")
        qweights[name] = Int8Weight.from_q(q, scale)
    head = None
    if int8_head:
        q, scale = tensors[HEAD_NAME], tensors[HEAD_NAME + SCALE_SUFFIX]
        _check_int8_tensor(file, HEAD_NAME, q, scale, dtypes, shapes[HEAD_NAME], "vocabulary row")
        head = Int8Weight.from_q(q.T, scale)                  # q_head (C, V) = (wte's q)ᵀ

    from numformer.params import ParamLayout

    layout = ParamLayout(float_shapes(cfg, int8_head))
    for name in layout:
        if dtypes[name] not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtypes[name]}, not a float type")
    try:
        flat = layout.pack({n: tensors[n] for n in layout}, dtype=np.float32, source=file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    del tensors
    model = QuantizedGPT2(cfg, flat, qweights, head)
    model.hf_config = {k: v for k, v in config.items() if k != "quantization"}
    return model


def _load_source(path: str):
    """(float model, config dict to extend, folder with tokenizer files) of IN."""
    from numformer import checkpoint, pretrained

    folder = checkpoint.resolve(path)
    config = pretrained.read_config(folder)
    if is_quantized(config):
        raise CheckpointError(f"{os.path.join(folder, CONFIG_FILE)}: the checkpoint is already int8-quantized")
    if os.path.exists(os.path.join(folder, checkpoint.TOKENIZER_FILE)):
        model = checkpoint.load_model(folder)
        return model, model.cfg.to_dict(), folder
    model = pretrained.from_pretrained(folder)
    if not isinstance(model, GPT2):
        raise CheckpointError(f"{folder}: only GPT-2 models can be quantized, got {type(model).__name__}")
    return model, pretrained.gpt2_config_to_hf(model.cfg, config), folder


def quantize_checkpoint(src: str, dst: str, int8_head: bool = True) -> dict:
    """``numformer quantize``: read IN (numformer or Hugging Face GPT-2), write OUT as int8.

    ``int8_head=False`` (``--float-head``) keeps the tied embedding / head float32.
    Returns a summary: bytes of both weight files, parameter counts, and
    *measured* errors of the int8 copy as written (read back from OUT):

    - ``weight_error``: relative RMS reconstruction error ``‖w − q·s‖ / ‖w‖``
      of the block weights, over all of them and for the worst tensor, and
      the largest absolute element error (:func:`numformer.quantize_report.weight_errors`);
    - ``head_error``: the same for the int8 head (None with a float head);
    - ``logits_error``: the float and the int8 model's logits on a fixed
      probe input (:func:`numformer.quantize_report.probe_logits_error`).

    ``max_rel_error`` / ``head_max_rel_error`` (the per-channel
    ``max |w − q·s| / max|w|``) stay in the summary for compatibility; they
    sit at the rounding bound 1/254 for any real weights and measure nothing.
    """
    from numformer.pretrained import read_config

    model, config, folder = _load_source(src)
    if os.path.abspath(dst) == os.path.abspath(folder):
        raise CheckpointError(f"--out {dst!r} is the input folder; write the int8 copy elsewhere")
    qmodel = quantize_model(model, int8_head=int8_head)
    save_quantized(qmodel, dst, config=config, copy_from=folder)
    written = load_quantized(dst, read_config(dst))    # measure what is on disk, not in memory
    src_file = os.path.join(folder, MODEL_FILE)
    return {"source_bytes": os.path.getsize(src_file) if os.path.exists(src_file) else None,
            "int8_bytes": os.path.getsize(os.path.join(dst, MODEL_FILE)),
            "quantized_params": sum(w.size for w in written.qweights.values())
            + (written.head.size if written.head is not None else 0),
            "float_params": written.layout.size, "int8_head": written.int8_head,
            **measure_int8_copy(model, written, HEAD_NAME)}
