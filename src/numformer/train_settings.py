"""The settings of ``numformer train``: one dataclass, its defaults and its checks.

``TrainConfig`` names every setting with its default; ``validate`` checks the
ranges and the combinations; ``check_settings`` refuses unknown names and
wrongly typed values from a settings file or a checkpoint, naming the setting
and the file (``SettingError``). The training loop itself is in
:mod:`numformer.train`.
"""

from __future__ import annotations

import difflib
import numbers
import typing
from dataclasses import dataclass, fields

import numpy as np

@dataclass
class TrainConfig:
    """Every knob of a run; each is also a ``numformer train`` flag (``--n-layer`` ...)."""

    data: str | None = None           # UTF-8 text file; None = Python's pydoc topics
    task: str | None = None           # a synthetic task instead of text ("sort")
    out: str = "runs/numformer"
    tokenizer: str = "char"           # "char" or "bpe"
    vocab_size: int = 512             # BPE only
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1500
    schedule_steps: int | None = None # length of the warmup + cosine schedule (None: max_steps)
    optimizer: str = "adamw"          # "adamw" or "sgd"
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9             # SGD only
    grad_clip: float = 1.0            # 0 disables clipping
    eval_interval: int = 250
    eval_batches: int = 16
    val_fraction: float = 0.1
    seed: int = 1337
    dtype: str = "float32"
    num_samples: int = 3
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise :class:`SettingError` naming the first setting of the wrong type or range."""
        for name in (f.name for f in fields(self)):
            check_type(name, getattr(self, name))
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                    "max_steps", "eval_interval", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingError(name, f"must be positive, got {getattr(self, name)}")
        if self.schedule_steps is not None and self.schedule_steps <= 0:
            raise SettingError("schedule_steps", f"must be positive, got {self.schedule_steps}")
        if self.top_k is not None and self.top_k <= 0:
            raise SettingError("top_k", f"must be positive, got {self.top_k}")
        for name in ("warmup_steps", "num_samples", "sample_tokens"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise SettingError("n_embd", f"({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if not self.lr > 0:
            raise SettingError("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise SettingError("min_lr", f"must be in [0, lr], got min-lr={self.min_lr}, lr={self.lr}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SettingError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise SettingError("vocab_size", f"must be at least 257 for byte-level BPE, got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise SettingError("dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("grad_clip", "weight_decay", "momentum"):
            if not getattr(self, name) >= 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise SettingError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.val_fraction < 1:
            raise SettingError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.task is not None:
            from numformer.tasks import TASKS
            if self.task not in TASKS:
                raise SettingError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a settings dict, refusing unknown names (with the nearest valid
        ones suggested) and values of the wrong type, naming the setting and ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a table of settings (name = value), got {type(d).__name__}")
        check_settings(d, source)
        return cls(**d)


CHOICES = {"tokenizer": ("char", "bpe"), "optimizer": ("adamw", "sgd"), "dtype": ("float32", "float64")}


class SettingError(ValueError):
    """A training setting of the wrong type or out of range: ``name`` is the setting,
    ``source`` the file it came from (None: a command-line flag)."""

    def __init__(self, name: str, problem: str, source: str | None = None):
        self.name, self.problem, self.source = name, problem, source
        where = f"--{name.replace('_', '-')}" if source is None else f"{source}: setting {name!r}"
        super().__init__(f"{where} {problem}")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_type(name: str, value) -> None:
    """Raise SettingError unless ``value`` has the type of TrainConfig's field ``name``
    (an int is a valid float; a bool is not a number)."""
    kind = _FIELD_TYPES[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((t for t in args if t is not type(None)), kind)
    if value is None and optional:
        return
    if base is float:                # numbers.Real/Integral: NumPy scalars count too
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    elif base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, base)
    if not ok:
        expected = _TYPE_NAMES.get(base, base.__name__) + (" or null" if optional else "")
        raise SettingError(name, f"must be {expected}, got {value!r} ({type(value).__name__})")


def check_settings(d: dict, source: str) -> None:
    """Refuse unknown names (suggesting the nearest) and wrongly typed values in ``d``."""
    known = [f.name for f in fields(TrainConfig)]
    for name in d:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid settings: {', '.join(known)}"
            raise ValueError(f"{source}: unknown setting {name!r}{hint}")
    for name, value in d.items():
        try:
            check_type(name, value)
        except SettingError as exc:
            raise SettingError(name, exc.problem, source) from None


_FIELD_TYPES = typing.get_type_hints(TrainConfig)
