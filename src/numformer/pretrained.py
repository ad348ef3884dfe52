"""Pretrained checkpoints in Hugging Face layout: load, check, export.

    model = numformer.from_pretrained("path/to/gpt2")      # config.json + model.safetensors
    tok = numformer.load_tokenizer("path/to/gpt2")         # vocab.json + merges.txt (or .tiktoken)
    numformer.save_pretrained(model, "out/", tokenizer=tok)

A folder is recognised by its ``config.json`` (``model_type`` /
``architectures``). Weights are read from ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``); a folder that only has a
pickle (``pytorch_model.bin``) is refused -- unpickling runs arbitrary code.

GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``, any size)
    Names may carry the ``transformer.`` prefix or not. The causal-mask
    buffers ``attn.bias`` / ``attn.masked_bias`` are ignored.
    ``lm_head.weight`` must equal ``wte.weight`` (GPT-2 ties them); an untied
    head is reported, not silently dropped. Conv1D weights are stored
    (in, out) by Hugging Face, which is numformer's layout too, so tensors
    are copied as they are -- float32 ones straight from the file into the
    model's flat parameter buffer (no second copy of the weights in memory);
    F16/BF16/F64 ones are converted one tensor at a time.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from numformer import jsonfile, safetensors
from numformer.checkpoint import CheckpointError
from numformer.fileio import atomic_directory, atomic_write_json
from numformer.configcheck import check_keys
from numformer.models.gpt2 import ACTIVATIONS, GPT2, HF_GPT2_KEYS, GPT2Config, param_shapes
from numformer.params import ParamLayout

__all__ = ["PretrainedError", "from_pretrained", "load_gpt2", "save_pretrained", "load_tokenizer",
           "gpt2_config_from_hf"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")


class PretrainedError(CheckpointError):
    """A pretrained folder that cannot be loaded: names the file and the problem."""


def _pretrained_error(file: str, problem: str) -> PretrainedError:
    return PretrainedError(f"{file}: {problem}")


# ----------------------------------------------------------------------------- entry points


def read_config(path: str) -> dict:
    """The ``config.json`` of a pretrained folder, as a dict."""
    if not os.path.isdir(path):
        raise PretrainedError(f"pretrained folder {path!r} does not exist")
    file = os.path.join(path, CONFIG)
    if not os.path.exists(file):
        raise PretrainedError(f"{path}: no {CONFIG}; a Hugging Face model folder needs one")
    d = jsonfile.load(file, error=_pretrained_error)
    if not isinstance(d, dict):
        raise PretrainedError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def from_pretrained(path: str | os.PathLike, dtype=np.float32):
    """Load the model in a Hugging Face style folder (dispatch on ``model_type``)."""
    path = os.fspath(path)
    d = read_config(path)
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type == "gpt2" or any(a in GPT2_ARCHITECTURES for a in archs):
        return load_gpt2(path, dtype=dtype)
    loader = _OTHER_LOADERS.get(model_type)
    if loader is not None:
        return loader(path, dtype=dtype)
    raise PretrainedError(f"{os.path.join(path, CONFIG)}: unknown architecture (model_type={model_type!r}, "
                          f"architectures={archs!r}); numformer loads: gpt2 "
                          f"({', '.join(GPT2_ARCHITECTURES)}){''.join(', ' + k for k in _OTHER_LOADERS)}")


def _load_bert(path: str, dtype=np.float32):
    from numformer.models.bert import load_bert     # imported on use: GPT-2 users never need it

    return load_bert(path, dtype=dtype)


# Other model families register their loaders here: model_type -> loader(path, dtype=...).
_OTHER_LOADERS: dict = {"bert": _load_bert}


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a folder or a single file.

    Folder: numformer's own ``numformer_tokenizer.json``; Hugging Face
    ``vocab.json`` + ``merges.txt`` or a byte-level BPE ``tokenizer.json``
    (GPT-2); a WordPiece ``tokenizer.json`` or ``vocab.txt`` (BERT); one
    ``*.tiktoken`` rank file. File: a ``.tiktoken`` rank file, a Hugging Face
    ``tokenizer.json`` (BPE or WordPiece), a BERT ``vocab.txt``, or
    numformer's tokenizer JSON.
    """
    from numformer.tokenizers import load_tokenizer as load_own
    from numformer.tokenizers.gpt2 import load_gpt2_tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        own = os.path.join(path, "numformer_tokenizer.json")
        if os.path.exists(own):
            return load_own(own)
        hf_json = os.path.join(path, "tokenizer.json")
        if _is_wordpiece_json(hf_json) or (not os.path.exists(hf_json) and not os.path.exists(
                os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "vocab.txt"))):
            return _load_wordpiece(path)
        return load_gpt2_tokenizer(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist")
    if path.endswith(".txt"):
        return _load_wordpiece(path)
    if path.endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(4096)
        if b'"kind"' in head and b'"model"' not in head:
            return load_own(path)
        if _is_wordpiece_json(path):
            return _load_wordpiece(path)
    return load_gpt2_tokenizer(path)


def _is_wordpiece_json(file: str) -> bool:
    """Whether a Hugging Face ``tokenizer.json`` holds a WordPiece model (BERT)."""
    if not os.path.isfile(file):
        return False
    try:
        d = jsonfile.load(file)
    except (OSError, ValueError):
        return False                      # let the BPE reader report what is wrong with it
    model = d.get("model") if isinstance(d, dict) else None
    return isinstance(model, dict) and model.get("type") == "WordPiece"


def _load_wordpiece(path: str):
    from numformer.tokenizers.wordpiece import load_wordpiece

    return load_wordpiece(path)


# ----------------------------------------------------------------------------- GPT-2: config


def gpt2_config_from_hf(d: dict, source: str = CONFIG) -> GPT2Config:
    """A :class:`GPT2Config` from a Hugging Face GPT-2 ``config.json`` dict.

    Every key that is read is checked (type and range, :data:`HF_GPT2_KEYS`
    and the fields of :class:`GPT2Config`); the options that change the math
    in ways numformer's GPT-2 does not implement are refused, naming the key.
    """
    if not isinstance(d, dict):
        raise PretrainedError(f"{source}: expected a JSON object, got {type(d).__name__}")
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise PretrainedError(f"{source}: architectures must be a list of names, got {archs!r:.80}")
    unknown = [a for a in archs if a not in GPT2_ARCHITECTURES]
    if unknown:
        raise PretrainedError(f"{source}: unknown architecture {unknown[0]!r} (supported for gpt2: "
                              f"{', '.join(GPT2_ARCHITECTURES)})")
    if d.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{source}: model_type {d.get('model_type')!r} is not gpt2")
    try:
        extra = check_keys(d, HF_GPT2_KEYS, source)
    except ValueError as exc:
        raise PretrainedError(str(exc)) from None
    unsupported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "add_cross_attention": False, "tie_word_embeddings": True}
    for key, expected in unsupported.items():
        if key in extra and extra[key] != expected:
            raise PretrainedError(f"{source}: {key}={d[key]!r} is not supported (numformer's GPT-2 "
                                  f"implements {key}={expected!r})")
    act = d.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in ACTIVATIONS:     # a list is not even hashable
        raise PretrainedError(f"{source}: activation_function {act!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    kw = {"vocab_size": d.get("vocab_size", 50257), "n_positions": d.get("n_positions", d.get("n_ctx", 1024)),
          "n_embd": d.get("n_embd", 768), "n_layer": d.get("n_layer", 12), "n_head": d.get("n_head", 12),
          "layer_norm_epsilon": d.get("layer_norm_epsilon", 1e-5), "activation_function": act,
          "n_inner": d.get("n_inner"), "dropout": d.get("resid_pdrop", 0.0)}
    try:
        cfg = GPT2Config(**kw).validate()
    except (TypeError, ValueError) as exc:
        raise PretrainedError(f"{source}: bad GPT-2 config ({exc})") from None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if extra.get(key) is not None and extra[key] >= cfg.vocab_size:
            raise PretrainedError(f"{source}: {key} must be a token id below vocab_size ({cfg.vocab_size}) "
                                  f"or null, got {extra[key]!r}")
    return cfg


def gpt2_config_to_hf(cfg: GPT2Config, base: dict | None = None) -> dict:
    """A ``config.json`` dict that ``transformers.GPT2LMHeadModel`` loads."""
    d = dict(base or {})
    d.update({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "activation_function": cfg.activation_function, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": d.get("attn_pdrop", 0.0),
        "tie_word_embeddings": True,
    })
    d.setdefault("initializer_range", 0.02)
    d.setdefault("bos_token_id", cfg.vocab_size - 1)
    d.setdefault("eos_token_id", cfg.vocab_size - 1)
    return d


# ----------------------------------------------------------------------------- GPT-2: weights


def _weight_files(path: str) -> list[str]:
    single = os.path.join(path, WEIGHTS)
    if os.path.exists(single):
        return [single]
    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.exists(index):
        try:
            weight_map = jsonfile.load(index, error=_pretrained_error)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise PretrainedError(f"{index}: not a valid safetensors index ({exc})") from None
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise PretrainedError(f"{index}: shard name {name!r} must be a plain file name")
        return [os.path.join(path, name) for name in files]
    pickles = [p for p in PICKLES if os.path.exists(os.path.join(path, p))]
    if pickles:
        raise PretrainedError(
            f"{os.path.join(path, pickles[0])}: numformer does not load pickle/framework checkpoints "
            f"(unpickling can run arbitrary code). Convert it to {WEIGHTS} first, e.g. with transformers: "
            f"GPT2LMHeadModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)")
    raise PretrainedError(f"{path}: no {WEIGHTS} (or {WEIGHTS_INDEX}) in the folder")


def _hf_name(name: str) -> str | None:
    """A file's tensor name -> numformer's name; None for buffers that are not weights."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None          # causal-mask buffers of older transformers versions
    return name


def _read_tensor(f, file: str, name: str, entry: dict, data_start: int) -> np.ndarray:
    """One tensor's values (any float dtype) as an array; the header is already validated."""
    begin, end = entry["data_offsets"]
    raw = np.empty(end - begin, dtype=np.uint8)
    f.seek(data_start + begin)
    if raw.size and f.readinto(memoryview(raw)) != raw.size:
        raise PretrainedError(f"{file}: tensor {name!r}: short read (file changed while reading?)")
    return safetensors._finish(raw, entry, name, file, data_start + begin)


def load_gpt2(path: str | os.PathLike, dtype=np.float32) -> GPT2:
    """Load a Hugging Face GPT-2 folder (or a numformer checkpoint folder) into a :class:`GPT2`
    (an int8 folder from ``numformer quantize``: a :class:`numformer.quantize.QuantizedGPT2`)."""
    path = os.fspath(path)
    raw_cfg = read_config(path)
    if "quantization" in raw_cfg:                     # an int8 folder written by numformer quantize
        from numformer.quantize import load_quantized

        return load_quantized(path, raw_cfg, dtype=dtype)
    cfg = gpt2_config_from_hf(raw_cfg, os.path.join(path, CONFIG))
    flat, lm_head = read_gpt2_weights(path, cfg, ParamLayout(param_shapes(cfg)), dtype)
    model = GPT2(cfg, flat)
    if lm_head is not None:
        _check_tied(model, *lm_head)
    model.hf_config = raw_cfg           # kept so save_pretrained can write the other keys back
    return model


def read_gpt2_weights(path: str, cfg: GPT2Config, layout: ParamLayout, dtype=np.float32):
    """Fill a flat buffer of ``layout`` from the folder's safetensors file(s).

    ``layout`` is GPT-2's own table, or one that extends it (a classifier adds
    ``score.weight``); file names may carry the ``transformer.`` prefix. Every
    name of the layout must be present, nothing else may be. Returns the
    buffer and where an ``lm_head.weight`` was found (or None), for
    :func:`_check_tied`.
    """
    files = _weight_files(path)
    # Pass 1: every header, checked against the layout, before anything is allocated -- a
    # config.json that claims a huge model next to a small file fails here, not in np.empty.
    plan = []                           # (file, data_start, [(fname, name, entry), ...])
    filled: set[str] = set()
    lm_head = None                      # (file, entry, data_start) of an lm_head.weight, checked at the end
    for file in files:
        if not os.path.exists(file):
            raise PretrainedError(f"{file}: weight file is missing")
        try:
            entries, _ = safetensors.read_header(file)
        except safetensors.SafetensorsError as exc:
            raise PretrainedError(str(exc)) from None
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        todo = []
        for fname, e in entries.items():
            name = _hf_name(fname)
            if name is None:
                continue
            if name == "lm_head.weight":
                lm_head = (file, fname, e, data_start)
                continue
            if name not in layout:
                raise PretrainedError(f"{file}: unexpected tensor {fname!r}; a GPT-2 with {CONFIG}'s "
                                      f"n_layer={cfg.n_layer} has no such weight")
            if name in filled:
                raise PretrainedError(f"{file}: tensor {fname!r} appears twice (with and without prefix?)")
            want = layout.shapes[name]
            if tuple(e["shape"]) != want:
                raise PretrainedError(f"{file}: tensor {fname!r} has shape {tuple(e['shape'])}, but "
                                      f"{CONFIG} (n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, "
                                      f"n_positions={cfg.n_positions}, n_inner={cfg.inner}) needs {want}")
            if e["dtype"] not in ("F32", "F16", "BF16", "F64"):
                raise PretrainedError(f"{file}: tensor {fname!r} has dtype {e['dtype']}, not a float type")
            filled.add(name)
            todo.append((fname, name, e))
        plan.append((file, data_start, todo))
    missing = [n for n in layout if n not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PretrainedError(f"{', '.join(files)}: missing tensor {missing[0]!r}{more} "
                              f"(also looked for 'transformer.{missing[0]}')")
    # Pass 2: the values (every tensor of the layout is in a file, so the buffer is needed).
    flat = np.empty(layout.size, dtype=dtype)
    direct = np.dtype(dtype) == np.float32 and sys.byteorder == "little"
    for file, data_start, todo in plan:
        with open(file, "rb") as f:
            for fname, name, e in todo:
                begin, end = layout.offsets[name]
                if direct and e["dtype"] == "F32":
                    # straight from the file into the flat buffer
                    target = flat[begin:end].view(np.uint8)
                    f.seek(data_start + e["data_offsets"][0])
                    if target.size and f.readinto(memoryview(target)) != target.size:
                        raise PretrainedError(f"{file}: tensor {fname!r}: short read (file changed while reading?)")
                else:
                    flat[begin:end] = _read_tensor(f, file, fname, e, data_start).reshape(-1)
    return flat, lm_head


_TIE_BLOCK_BYTES = 4 << 20


def _check_tied(model: GPT2, file: str, fname: str, entry: dict, data_start: int) -> None:
    """lm_head.weight must equal wte (GPT-2 ties them); compared in blocks of rows."""
    wte = model.params["wte.weight"]
    if tuple(entry["shape"]) != wte.shape:
        raise PretrainedError(f"{file}: tensor {fname!r} has shape {tuple(entry['shape'])}, "
                              f"wte.weight is {wte.shape}; numformer's GPT-2 ties the output head to wte")
    V, C = wte.shape
    itemsize = safetensors.DTYPES[entry["dtype"]].itemsize
    rows = max(1, _TIE_BLOCK_BYTES // max(1, C * itemsize))   # a few MB at a time, not a second wte
    differs, diff = False, 0.0
    with open(file, "rb") as f:
        for r0 in range(0, V, rows):
            r1 = min(V, r0 + rows)
            begin = entry["data_offsets"][0] + r0 * C * itemsize
            block = {"dtype": entry["dtype"], "shape": [r1 - r0, C],
                     "data_offsets": [begin, begin + (r1 - r0) * C * itemsize]}
            head = _read_tensor(f, file, fname, block, data_start)
            ref = wte[r0:r1]
            if not np.array_equal(head.astype(model.dtype, copy=False), ref, equal_nan=True):
                differs = True
                diff = max(diff, float(np.max(np.abs(head.astype(np.float64) - ref.astype(np.float64)))))
    if differs:
        raise PretrainedError(f"{file}: {fname!r} differs from wte.weight (max |diff| {diff:.3g}); numformer's "
                              f"GPT-2 ties the output head to the input embedding and cannot load an untied head")


# ----------------------------------------------------------------------------- export


def save_pretrained(model: GPT2, path: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder, atomically.

    ``config.json`` + ``model.safetensors`` with ``GPT2LMHeadModel`` names
    (``transformer.`` prefix, the tied ``lm_head`` left out as
    transformers itself does), float32; plus ``vocab.json`` +
    ``merges.txt`` when a GPT-2 tokenizer is given.
    Loading the folder back gives bit-identical parameters.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"save_pretrained writes GPT-2 models, got {type(model).__name__}")
    with atomic_directory(os.fspath(path)) as tmp:
        tensors = {"transformer." + name: view for name, view in model.params.items()}
        safetensors.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(os.path.join(tmp, CONFIG), gpt2_config_to_hf(model.cfg, getattr(model, "hf_config", None)))
        if tokenizer is not None:
            if not hasattr(tokenizer, "save_pretrained"):
                raise TypeError(f"{type(tokenizer).__name__} cannot be written in Hugging Face layout")
            tokenizer.save_pretrained(tmp)
