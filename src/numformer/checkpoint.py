"""Checkpoints: one folder per save, written atomically.

    DIR/
      config.json           model shape (Hugging Face GPT-2 keys)
      model.safetensors     weights by Hugging Face name
      numformer_tokenizer.json  numformer tokenizer (HF's tokenizer.json is another format)
      optimizer.safetensors optimizer state (training checkpoints only)
      trainer_state.json    step, RNG state, training config, metrics so far

The folder is assembled in a temporary sibling and renamed into place, so a
crash mid-save leaves the previous checkpoint intact — never a half-written one.
"""

from __future__ import annotations

import json
import os

import numpy as np

from numformer import safetensors
from numformer.fileio import atomic_directory
from numformer.models.gpt2 import GPT2, GPT2Config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "numformer_tokenizer.json"   # not HF's tokenizer.json format
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupt or of another shape."""


def save(path: str, model: GPT2, tokenizer=None, optimizer_state: dict | None = None,
         trainer_state: dict | None = None) -> None:
    """Write a checkpoint folder at ``path`` atomically (replacing an older one)."""
    with atomic_directory(path) as tmp:
        safetensors.save_file(dict(model.params), os.path.join(tmp, MODEL_FILE),
                              metadata={"format": "np", "producer": "numformer"})
        _write_json(os.path.join(tmp, CONFIG_FILE), model.cfg.to_dict())
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
        if optimizer_state is not None:
            arrays = {k: np.asarray(v) for k, v in optimizer_state.items() if isinstance(v, np.ndarray)}
            scalars = {k: v for k, v in optimizer_state.items() if not isinstance(v, np.ndarray)}
            safetensors.save_file(arrays, os.path.join(tmp, OPTIMIZER_FILE),
                                  metadata={"scalars": json.dumps(scalars)})
        if trainer_state is not None:
            _write_json(os.path.join(tmp, STATE_FILE), trainer_state)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path!r} is not valid JSON ({exc})") from None


def resolve(path: str) -> str:
    """Accept a checkpoint folder or a training output folder holding ``checkpoint/``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist")
    if not os.path.exists(os.path.join(path, MODEL_FILE)) and os.path.isdir(os.path.join(path, "checkpoint")):
        return os.path.join(path, "checkpoint")
    return path


def load_model(path: str, dtype=np.float32) -> GPT2:
    """Load a GPT-2 from a checkpoint folder, checking every tensor's name and shape.

    An int8 folder written by ``numformer quantize`` loads as a
    :class:`numformer.quantize.QuantizedGPT2` (inference only)."""
    path = resolve(path)
    raw_cfg = _read_json(os.path.join(path, CONFIG_FILE))
    if isinstance(raw_cfg, dict) and "quantization" in raw_cfg:      # an int8 folder (numformer quantize)
        from numformer.quantize import load_quantized

        return load_quantized(path, raw_cfg, dtype=dtype)
    try:
        cfg = GPT2Config.from_dict(raw_cfg)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: bad model config ({exc})") from None
    weights_path = os.path.join(path, MODEL_FILE)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"checkpoint file {weights_path!r} is missing")
    try:
        tensors = safetensors.load_file(weights_path)
    except safetensors.SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    tensors = {_strip_prefix(k): v for k, v in tensors.items() if not k.endswith(".attn.bias")
               and k != "lm_head.weight"}
    from numformer.params import ParamLayout
    from numformer.models.gpt2 import param_shapes

    try:
        flat = ParamLayout(param_shapes(cfg)).pack(tensors, dtype=dtype, source=weights_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return GPT2(cfg, flat)


def _strip_prefix(name: str) -> str:
    """Hugging Face ``GPT2LMHeadModel`` files prefix names with ``transformer.``."""
    return name[len("transformer."):] if name.startswith("transformer.") else name


def load_tokenizer(path: str):
    """The tokenizer saved with a checkpoint."""
    from numformer.tokenizers import load_tokenizer as _load

    file = os.path.join(resolve(path), TOKENIZER_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint file {file!r} is missing")
    try:
        return _load(file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def load_training_state(path: str):
    """(optimizer_state dict, trainer_state dict) of a training checkpoint."""
    path = resolve(path)
    opt_file = os.path.join(path, OPTIMIZER_FILE)
    if not os.path.exists(opt_file):
        raise CheckpointError(f"{path!r} has no optimizer state ({OPTIMIZER_FILE}); it cannot be resumed")
    try:
        arrays = safetensors.load_file(opt_file)
        _, metadata = safetensors.read_header(opt_file)
    except safetensors.SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        scalars = json.loads((metadata or {}).get("scalars", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{opt_file!r}: corrupt optimizer metadata") from None
    state = dict(arrays)
    state.update(scalars)
    return state, _read_json(os.path.join(path, STATE_FILE))
