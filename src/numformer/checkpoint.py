"""Checkpoints: one folder per save, written atomically.

    DIR/
      config.json           model shape (Hugging Face GPT-2 keys)
      model.safetensors     weights by Hugging Face name
      numformer_tokenizer.json  numformer tokenizer (HF's tokenizer.json is another format)
      optimizer.safetensors optimizer state (training checkpoints only)
      trainer_state.json    step, RNG state, training config, metrics so far
      manifest.json         written last: every file's size (the folder is complete)

The folder is assembled in a temporary sibling and renamed into place, so a
crash mid-save leaves the previous checkpoint intact — never a half-written one.
Replacing an existing folder takes two renames (old aside, new in place); a
kill between them leaves no ``checkpoint/`` but two complete copies beside it
(``.checkpoint.<random>.tmp``, the new one, and ``.checkpoint.old.<random>``).
:func:`resolve`, which every loader calls, finds the newest complete copy (by
its manifest) and says so; resuming training moves it back into place.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from numformer import fileio, jsonfile, safetensors
from numformer.fileio import atomic_directory
from numformer.models.gpt2 import GPT2, GPT2Config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "numformer_tokenizer.json"   # not HF's tokenizer.json format
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"       # written last; see fileio.atomic_directory
CHECKPOINT_DIR = "checkpoint"         # the checkpoint folder inside a training run's output folder


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupt or of another shape."""


def save(path: str, model: GPT2, tokenizer=None, optimizer_state: dict | None = None,
         trainer_state: dict | None = None) -> None:
    """Write a checkpoint folder at ``path`` atomically (replacing an older one)."""
    with atomic_directory(path, manifest=MANIFEST_FILE) as tmp:
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
    try:            # jsonfile: bad UTF-8, bad JSON, deep nesting -> CheckpointError naming the file
        return jsonfile.load(path, error=lambda file, problem: CheckpointError(f"checkpoint file {file!r}: {problem}"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing") from None


def _warn(message: str) -> None:
    print(f"numformer: warning: {message}", file=sys.stderr)


_REPORTED: set = set()          # copies already reported by this process (one warning, not one per loader call)


def resolve(path: str | os.PathLike, *, recover: bool = False, log=_warn) -> str:
    """Accept a checkpoint folder or a training output folder holding ``checkpoint/``.

    When the checkpoint folder is missing because a save was killed between
    its two renames, the newest complete copy left beside it is used instead
    and ``log`` is told which. ``recover=True`` (resuming training) also
    renames that copy back to ``checkpoint/``; loaders that only read leave
    the folder as it is.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MODEL_FILE)):
            return path
        inner = os.path.join(path, CHECKPOINT_DIR)
        if os.path.isdir(inner):
            return inner
        found = _complete_copy(inner, recover, log)       # a run folder whose checkpoint/ was lost mid-save
        return found or path
    found = _complete_copy(path, recover, log)            # the checkpoint folder itself was lost mid-save
    if found:
        return found
    raise CheckpointError(f"checkpoint folder {path!r} does not exist")


def _complete_copy(missing: str, recover: bool, log) -> str | None:
    """The newest complete copy of the missing folder ``missing`` (moved into place if ``recover``)."""
    if recover:
        copy = fileio.recover_directory(missing, MANIFEST_FILE)
        if copy is None:
            return None
        log(f"{missing} was missing (a save was interrupted between its two renames); "
            f"recovered it from the complete copy {copy}")
        return missing
    copies = fileio.complete_copies(missing, MANIFEST_FILE)
    if not copies:
        return None
    if copies[0] not in _REPORTED:
        _REPORTED.add(copies[0])
        log(f"{missing} is missing (a save was interrupted between its two renames); "
            f"loading the newest complete copy {copies[0]}")
    return copies[0]


def load_config(path: str) -> GPT2Config:
    """The model config of a (float) checkpoint folder, without reading the weights."""
    path = resolve(path)
    file = os.path.join(path, CONFIG_FILE)
    try:
        return GPT2Config.from_dict(_read_json(file))
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{file}: bad model config ({exc})") from None


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
    if not os.path.exists(os.path.join(path, MODEL_FILE)):
        raise CheckpointError(f"{path!r} holds no checkpoint (neither a {CHECKPOINT_DIR}/ folder, nor "
                              f"{MODEL_FILE}, nor a complete copy left by an interrupted save)")
    if not os.path.exists(opt_file):
        raise CheckpointError(f"{path!r} has no optimizer state ({OPTIMIZER_FILE}); it cannot be resumed")
    try:
        arrays = safetensors.load_file(opt_file)
        _, metadata = safetensors.read_header(opt_file)
    except safetensors.SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        scalars = jsonfile.loads((metadata or {}).get("scalars", "{}"), opt_file)
    except (jsonfile.JSONFileError, TypeError):       # TypeError: "scalars" is not a string
        raise CheckpointError(f"{opt_file!r}: corrupt optimizer metadata") from None
    state = dict(arrays)
    state.update(scalars)
    return state, _read_json(os.path.join(path, STATE_FILE))
