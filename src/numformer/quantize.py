"""int8 weight-only quantization of GPT-2: quantize, save, load, run.

    numformer quantize --checkpoint IN --out OUT

Symmetric, per output channel. For a Conv1D weight ``w`` stored (in, out) —
column j is output channel j — ::

    s[j]    = max_i |w[i, j]| / 127                    (s[j] = 0 for an all-zero column)
    q[i, j] = round(w[i, j] / s[j])  ∈ [−127, 127]     (q = 0 where s = 0)
    w[i, j] ≈ s[j] · q[i, j],        |w − s·q| ≤ s[j] / 2 = max_i |w[i, j]| / 254

Quantized: every block's ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj`` weight (85 M of GPT-2 124M's 124 M parameters). Float32: the
embeddings ``wte``/``wpe`` (``wte`` is also the output head, logits = x·wteᵀ;
its rows are looked up *and* multiplied, an error there shifts every logit
of every token, and at GPT-2's vocabulary it is a third of the model — see
docs/quantization.md for what quantizing it would cost and gain), the
LayerNorms and all biases (tiny, and added in float anyway).

The model is :class:`QuantizedGPT2`: a :class:`~numformer.models.gpt2.GPT2`
whose flat buffer holds only the float parameters and whose linear layers
run ``(x @ q) ⊙ s + b`` through :func:`numformer.backend.matmul_int8`. It is
for inference: ``backward`` and ``decay_mask`` raise
:class:`QuantizedModelError`.

Folder layout (written atomically)::

    OUT/config.json         the source's config + {"quantization": {...}}
    OUT/model.safetensors   float tensors as before; each quantized weight as
                            "<name>" I8 (in, out) + "<name>_scale" F32 (out,)
    OUT/<tokenizer files>   copied from the source

``checkpoint.load_model``, ``pretrained.from_pretrained`` and therefore
``numformer sample`` load such a folder transparently (they see the
``quantization`` entry and call :func:`load_quantized`).
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict

import numpy as np

from numformer import backend, safetensors
from numformer.checkpoint import CheckpointError
from numformer.fileio import atomic_directory, atomic_write_json
from numformer.models.gpt2 import GPT2, GPT2Config, param_shapes
from numformer.ops import linear

__all__ = ["QUANT_MODULES", "QuantizedGPT2", "QuantizedModelError", "quantize_weight", "dequantize_weight",
           "quantize_model", "save_quantized", "load_quantized", "quantize_checkpoint", "is_quantized"]

#: The per-block Conv1D layers whose weights become int8.
QUANT_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
SCALE_SUFFIX = "_scale"          # "<name>.weight" (I8) + "<name>.weight_scale" (F32)
METHOD = "numformer-int8-weight-only"
FORMAT_VERSION = 1
QMAX = 127                       # symmetric: −127..127 (−128 unused, so negation is exact)

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


def quantized_names(cfg: GPT2Config) -> list[str]:
    """Names of the weights that are int8 in a quantized model of shape ``cfg``."""
    return [f"h.{i}.{m}.weight" for i in range(cfg.n_layer) for m in QUANT_MODULES]


def float_shapes(cfg: GPT2Config) -> "OrderedDict[str, tuple[int, ...]]":
    """The parameter table of a quantized model's float part (everything else)."""
    skip = set(quantized_names(cfg))
    return OrderedDict((n, s) for n, s in param_shapes(cfg).items() if n not in skip)


class QuantizedGPT2(GPT2):
    """GPT-2 with int8 linear weights; inference only.

    ``flat``/``params`` hold the float parameters (embeddings, LayerNorms,
    biases); ``qweights[name] = (q (in, out) int8, scale (out,) float32)`` for
    every name in :func:`quantized_names`.
    """

    def __init__(self, cfg: GPT2Config, flat: np.ndarray, qweights: dict):
        from numformer.params import ParamLayout

        self.cfg = cfg.validate()
        self.layout = ParamLayout(float_shapes(cfg))
        if flat.dtype != np.float32 or flat.shape != (self.layout.size,):
            raise ValueError(f"float parameter buffer must be float32 ({self.layout.size},), "
                             f"got {flat.dtype} {flat.shape}")
        self.flat = flat
        self.params = self.layout.views(flat)
        shapes = param_shapes(cfg)
        self.qweights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in quantized_names(cfg):
            q, scale = qweights[name]
            if q.dtype != np.int8 or q.shape != shapes[name] or scale.dtype != np.float32 \
                    or scale.shape != (shapes[name][1],):
                raise ValueError(f"{name}: need int8 {shapes[name]} and float32 scale ({shapes[name][1]},), "
                                 f"got {q.dtype} {q.shape} and {scale.dtype} {scale.shape}")
            self.qweights[name] = (np.ascontiguousarray(q), np.ascontiguousarray(scale))
        # ops.linear.pack_int8 copies for the compiled kernel, made on first use on the cpu
        # backend (a second copy of the int8 weights: 2 × 85 MB at 124M, against 340 MB float32)
        self._packed: dict[str, np.ndarray] = {}

    @property
    def num_params(self) -> int:
        return self.layout.size + sum(q.size for q, _ in self.qweights.values())

    def _linear(self, x, module: str):
        """x (..., in) -> (x @ q) ⊙ scale + b (..., out); no backward cache."""
        name = module + ".weight"
        q, scale = self.qweights[name]
        packed = None
        if backend.int8_packing():               # the kernel's sequential layout, made once per weight
            packed = self._packed.get(name)
            if packed is None:
                packed = self._packed[name] = linear.pack_int8(q)
        return linear.forward_int8(x, q, scale, self.params[module + ".bias"], packed=packed), None

    def _refuse(self, what: str):
        raise QuantizedModelError(
            f"cannot {what}: this GPT-2 has int8 weights and is for inference only; train the float32 "
            f"checkpoint and quantize it again (or call .dequantize() for a float copy)")

    def backward(self, cache, grads=None, dloss: float = 1.0):
        self._refuse("compute gradients (backward)")

    def decay_mask(self, decay_embeddings: bool = False):
        self._refuse("build an optimizer (decay_mask)")

    def astype(self, dtype):
        if np.dtype(dtype) != np.float32:
            self._refuse(f"convert to {np.dtype(dtype)}")
        return self

    def dequantize(self) -> GPT2:
        """A float32 :class:`GPT2` with the weights ``q ⊙ scale`` (what the int8 model computes)."""
        model = GPT2(self.cfg)
        for name, view in model.params.items():
            if name in self.qweights:
                view[...] = dequantize_weight(*self.qweights[name])
            else:
                view[...] = self.params[name]
        return model


def quantize_model(model: GPT2) -> QuantizedGPT2:
    """An int8 copy of a float GPT-2 (the source is not changed)."""
    if isinstance(model, QuantizedGPT2):
        raise QuantizedModelError("the model is already quantized")
    if not isinstance(model, GPT2):
        raise TypeError(f"quantize_model takes a GPT-2, got {type(model).__name__}")
    cfg = model.cfg
    qweights = {name: quantize_weight(model.params[name], name) for name in quantized_names(cfg)}
    from numformer.params import ParamLayout

    layout = ParamLayout(float_shapes(cfg))
    flat = layout.pack({n: model.params[n] for n in layout}, dtype=np.float32)
    qmodel = QuantizedGPT2(cfg, flat, qweights)
    if hasattr(model, "hf_config"):
        qmodel.hf_config = model.hf_config
    return qmodel


def is_quantized(config: dict) -> bool:
    """Whether a ``config.json`` dict describes an int8 folder."""
    return isinstance(config, dict) and "quantization" in config


def _quant_entry(cfg: GPT2Config) -> dict:
    return {"method": METHOD, "format_version": FORMAT_VERSION, "bits": 8, "symmetric": True,
            "granularity": "per_output_channel", "modules": list(QUANT_MODULES),
            "scale_suffix": SCALE_SUFFIX,
            "float": ["wte", "wpe", "layer norms", "biases"],
            "num_quantized_weights": len(quantized_names(cfg))}


# ----------------------------------------------------------------------------- files


def save_quantized(model: QuantizedGPT2, path: str, config: dict | None = None,
                   copy_from: str | None = None) -> None:
    """Write ``model`` as an int8 folder at ``path``, atomically.

    config: the ``config.json`` dict to extend (default: the model's own);
    copy_from: a folder whose tokenizer files are copied along.
    """
    base = dict(config if config is not None else model.cfg.to_dict())
    base["quantization"] = _quant_entry(model.cfg)
    tensors: dict[str, np.ndarray] = dict(model.params)
    for name, (q, scale) in model.qweights.items():
        tensors[name] = q
        tensors[name + SCALE_SUFFIX] = scale
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


def _check_entry(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: 'quantization' must be an object, got {type(entry).__name__}")
    if entry.get("method") != METHOD:
        raise CheckpointError(f"{where}: unknown quantization method {entry.get('method')!r} "
                              f"(numformer reads {METHOD!r})")
    if entry.get("format_version") != FORMAT_VERSION or entry.get("bits") != 8:
        raise CheckpointError(f"{where}: unsupported quantization format_version={entry.get('format_version')!r}, "
                              f"bits={entry.get('bits')!r} (numformer reads version {FORMAT_VERSION}, 8 bits)")
    if list(entry.get("modules", [])) != list(QUANT_MODULES) or entry.get("scale_suffix") != SCALE_SUFFIX:
        raise CheckpointError(f"{where}: quantized modules {entry.get('modules')!r} / scale suffix "
                              f"{entry.get('scale_suffix')!r} differ from {list(QUANT_MODULES)!r} / {SCALE_SUFFIX!r}")


def load_quantized(path: str, config: dict, dtype=np.float32) -> QuantizedGPT2:
    """Load the int8 folder ``path`` whose ``config.json`` is ``config``.

    Every tensor is checked against the config: the quantized weights must be
    I8 of the layer's shape with an F32 scale of (out,) finite values ≥ 0;
    the others float of their shape; nothing missing or extra. Each problem is
    a :class:`CheckpointError` naming the file and the tensor.
    """
    from numformer.pretrained import gpt2_config_from_hf

    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    _check_entry(config.get("quantization"), cfg_file)
    if np.dtype(dtype) != np.float32:
        raise CheckpointError(f"{path}: an int8 checkpoint loads as float32 only, not {np.dtype(dtype)}")
    cfg = gpt2_config_from_hf(config, cfg_file)
    file = os.path.join(path, MODEL_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint file {file!r} is missing")
    try:
        header, _ = safetensors.read_header(file)
        tensors = safetensors.load_file(file)
    except safetensors.SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    strip = (lambda n: n[len("transformer."):] if n.startswith("transformer.") else n)
    dtypes = {strip(n): e["dtype"] for n, e in header.items()}
    tensors = {strip(n): v for n, v in tensors.items()}

    shapes = param_shapes(cfg)
    qnames = quantized_names(cfg)
    expected = set(shapes) | {n + SCALE_SUFFIX for n in qnames}
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r} for an int8 GPT-2 with "
                              f"n_layer={cfg.n_layer}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name in list(shapes) + [n + SCALE_SUFFIX for n in qnames]:
        if name not in tensors:
            raise CheckpointError(f"{file}: missing tensor {name!r}")

    qweights = {}
    for name in qnames:
        q, scale = tensors[name], tensors[name + SCALE_SUFFIX]
        want = shapes[name]
        if dtypes[name] != "I8":
            raise CheckpointError(f"{file}: tensor {name!r} is {dtypes[name]}, but config.json says it is "
                                  f"int8-quantized (expected I8)")
        if q.shape != want:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {q.shape}, the config needs {want}")
        sname = name + SCALE_SUFFIX
        if dtypes[sname] != "F32" or scale.shape != (want[1],):
            raise CheckpointError(f"{file}: tensor {sname!r} must be F32 of shape ({want[1]},) (one scale per "
                                  f"output channel), got {dtypes[sname]} {scale.shape}")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise CheckpointError(f"{file}: tensor {sname!r} has a negative or non-finite scale")
        if np.any(q == -128):
            raise CheckpointError(f"{file}: tensor {name!r} holds -128, outside the symmetric range [-127, 127]")
        qweights[name] = (q, scale)

    from numformer.params import ParamLayout

    layout = ParamLayout(float_shapes(cfg))
    for name in layout:
        if dtypes[name] not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtypes[name]}, not a float type")
    try:
        flat = layout.pack({n: tensors[n] for n in layout}, dtype=np.float32, source=file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model = QuantizedGPT2(cfg, flat, qweights)
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


def quantize_checkpoint(src: str, dst: str) -> dict:
    """``numformer quantize``: read IN (numformer or Hugging Face GPT-2), write OUT as int8.

    Returns a summary: bytes of both weight files and the largest relative
    reconstruction error ``max |w − q·s| / max|w|`` per column (≤ 1/254).
    """
    model, config, folder = _load_source(src)
    qmodel = quantize_model(model)
    if os.path.abspath(dst) == os.path.abspath(folder):
        raise CheckpointError(f"--out {dst!r} is the input folder; write the int8 copy elsewhere")
    save_quantized(qmodel, dst, config=config, copy_from=folder)
    worst = 0.0
    for name, (q, scale) in qmodel.qweights.items():
        w = model.params[name]
        amax = np.max(np.abs(w), axis=0)
        err = np.max(np.abs(w - dequantize_weight(q, scale)), axis=0)
        worst = max(worst, float(np.max(np.divide(err, amax, out=np.zeros_like(err), where=amax > 0))))
    src_file = os.path.join(folder, MODEL_FILE)
    return {"source_bytes": os.path.getsize(src_file) if os.path.exists(src_file) else None,
            "int8_bytes": os.path.getsize(os.path.join(dst, MODEL_FILE)),
            "quantized_params": sum(q.size for q, _ in qmodel.qweights.values()),
            "float_params": qmodel.layout.size, "max_rel_error": worst}
