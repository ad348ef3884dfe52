"""Typed checks for model config fields: the one place every config uses.

A config value that loads but is nonsense (``layer_norm_epsilon: -1``,
``NaN``, ``"1e-5"``, ``n_layer: true``) must be refused when the file is
read, naming the file, the field and the value -- not turn into NaN logits
or a ``TypeError`` deep inside a forward pass. Config dataclasses declare
a check per field in the field's metadata::

    @dataclass
    class MyConfig:
        n_embd: int = checked(768, Int(min=1))
        eps: float = checked(1e-5, Float(gt=0.0))
        act: str = checked("gelu", Choice(("gelu", "relu")))

        def validate(self, source=None):
            check_fields(self, source)              # every declared field, in order
            ...                                     # then cross-field rules, via fail()
            return self

and loaders check the keys of a ``config.json`` that are not dataclass
fields with :func:`check_keys` and a table of the same checks.

Rules: an int field takes ``int`` or a NumPy integer, never ``bool`` (``True``
is an ``int`` in Python) and never a float, even ``12.0``; a float field
takes ``int``/``float``/NumPy numbers (not ``bool``) and only finite ones;
bool fields take ``bool`` only; strings must be one of the allowed names.
Sizes are bounded by :data:`MAX_SIZE` so that no product of two of them
silently overflows an index. Checked values are normalized to plain Python
types (``np.int64(12)`` -> ``12``), so ``to_dict`` stays JSON-serializable.

This module imports nothing of numformer: it sits below the models (next
to :mod:`numformer.jsonfile`), so model families, loaders and tokenizers
(which know no weights) all use it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["ConfigFieldError", "MAX_SIZE", "MAX_LAYERS", "MAX_PARAMS", "Int", "Float", "Prob", "Epsilon", "Bool", "Choice", "checked",
           "check_fields", "check_keys", "check_param_count", "fail", "from_mapping", "classifier_settings"]

MAX_SIZE = 2**31 - 1        # any size or count in a config: fits an int32 index
MAX_LAYERS = 100_000        # layer counts: far above any real model, low enough to build the layout
MAX_PARAMS = 2**38          # ~275 G parameters (1.1 TB of float32): beyond it a config is not a model


class ConfigFieldError(ValueError):
    """A config field with a bad value. ``str(e)`` names the file (if known), field and value."""

    def __init__(self, source: str | None, field: str, value: Any, expected: str):
        self.source, self.field, self.value, self.expected = source, field, value, expected
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} must be {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    """``repr`` of a bad value, cut short, with its type when the repr does not show it."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if not isinstance(value, (bool, int, float, type(None))) or isinstance(value, np.generic):
        text += f" ({type(value).__name__})"
    return text


def check_param_count(source: str | None, count: int, field: str, value: Any) -> None:
    """Refuse a config whose parameter count (exact, in Python ints) exceeds :data:`MAX_PARAMS`,
    before anything allocates or enumerates it; ``field``/``value`` name the largest size."""
    if count > MAX_PARAMS:
        raise ConfigFieldError(source, field, value, f"small enough for at most {MAX_PARAMS:,} parameters "
                               f"(the config describes {count:,})")


def fail(source: str | None, field: str, value: Any, expected: str) -> ConfigFieldError:
    """The error for a cross-field rule (``n_embd`` divisible by ``n_head``, ...)."""
    return ConfigFieldError(source, field, value, expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer in ``[min, max]`` (``None`` allowed when ``optional``)."""

    min: int | None = 1
    max: int | None = MAX_SIZE
    optional: bool = False

    def describe(self) -> str:
        if self.min in (0, 1):
            text = ("a positive" if self.min == 1 else "a non-negative") + " integer" \
                + ("" if self.max is None else f" (at most {self.max})")
        else:
            lo = "" if self.min is None else f" >= {self.min}"
            hi = "" if self.max is None else f"{' and' if lo else ''} <= {self.max}"
            text = f"an integer{lo}{hi}"
        return text + (" or null" if self.optional else "")

    def __call__(self, source: str | None, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        if not _is_int(value) or (self.min is not None and value < self.min) \
                or (self.max is not None and value > self.max):
            raise ConfigFieldError(source, name, value, self.describe())
        return int(value)


@dataclasses.dataclass(frozen=True)
class Float:
    """A finite number with optional bounds (``gt``/``ge`` below, ``lt``/``le`` above)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    optional: bool = False

    def describe(self) -> str:
        parts = [f"{op} {v}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        if self.ge is not None and self.lt is not None and self.gt is None and self.le is None:
            text = f"a number in [{self.ge}, {self.lt})"
        else:
            text = "a finite number" + (" " + " and ".join(parts) if parts else "")
        return text + (" or null" if self.optional else "")

    def __call__(self, source: str | None, name: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        ok = _is_number(value)
        if ok:
            try:
                v = float(value)
            except OverflowError:                    # an int beyond float range
                ok = False
        ok = ok and math.isfinite(v) \
            and (self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge) \
            and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le)
        if not ok:
            raise ConfigFieldError(source, name, value, self.describe())
        return v


def Prob(optional: bool = False) -> Float:
    """A dropout probability: in ``[0, 1)`` (1 would drop everything)."""
    return Float(ge=0.0, lt=1.0, optional=optional)


def Epsilon(optional: bool = False) -> Float:
    """A normalization epsilon: finite and at least float32's smallest normal number
    (a smaller one is 0 in float32, and a constant row then divides by 0)."""
    return Float(ge=float(np.finfo(np.float32).tiny), optional=optional)


@dataclasses.dataclass(frozen=True)
class Bool:
    """``true`` or ``false`` -- not ``1``, ``0`` or ``"false"``."""

    optional: bool = False

    def __call__(self, source: str | None, name: str, value: Any) -> bool | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigFieldError(source, name, value, "true or false" + (" or null" if self.optional else ""))
        return bool(value)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a fixed set of names (activation functions, position embedding kinds, ...)."""

    values: tuple
    optional: bool = False

    def __call__(self, source: str | None, name: str, value: Any):
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in self.values:
            raise ConfigFieldError(source, name, value, "one of " + ", ".join(map(repr, self.values))
                                   + (" or null" if self.optional else ""))
        return value


Check = Callable[[Any, str, Any], Any]


def checked(default: Any, check: Check) -> Any:
    """A dataclass field with ``default`` whose value :func:`check_fields` checks with ``check``."""
    return dataclasses.field(default=default, metadata={"check": check})


def check_fields(cfg: Any, source: str | None = None) -> None:
    """Run every field's declared check on the dataclass ``cfg``; store the normalized values.

    Raises :class:`ConfigFieldError` (a ValueError) at the first bad field,
    in declaration order, naming ``source``, the field and the value.
    """
    for f in dataclasses.fields(cfg):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(cfg, f.name, check(source, f.name, getattr(cfg, f.name)))


def check_keys(d: Mapping[str, Any], table: Mapping[str, Check], source: str | None = None) -> dict:
    """Check the keys of ``d`` that appear in ``table`` (absent keys are fine).

    For a ``config.json``'s keys that are not dataclass fields but are read
    (or written back). Returns the normalized values of the keys present.
    """
    return {k: table[k](source, k, d[k]) for k in table if k in d}


def from_mapping(cls, d: Any, source: str | None = None, rename: Mapping[str, str] | None = None):
    """``cls(**known keys of d)`` validated: ``d`` must be a JSON object; unknown keys are
    ignored (Hugging Face configs carry many); ``rename`` maps a file key to a field
    used when the field itself is absent (``resid_pdrop`` -> ``dropout``)."""
    if not isinstance(d, Mapping):
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}expected a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in known}
    for key, name in (rename or {}).items():
        if name not in d and key in d:
            kwargs[name] = d[key]
    return cls(**kwargs).validate(source)


# ----------------------------------------------------------------------------- shared config blocks


def classifier_settings(raw: Mapping[str, Any], source: str | None, poolings: tuple,
                        default_pooling: str) -> dict:
    """The sequence-classification keys of a classifier's ``config.json``, checked.

    ``num_labels`` (when present) must be a positive integer equal to the
    number of ``id2label`` entries, whose values must be strings or integers;
    numformer's own ``"numformer"`` block must be an object whose
    ``pooling`` is one of ``poolings`` and whose ``max_length`` is a positive
    integer or null. Returns ``{"pooling": ..., "max_length": ...}``.
    """
    id2label = raw.get("id2label")
    if isinstance(id2label, Mapping):
        for key, label in id2label.items():
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ConfigFieldError(source, f"id2label[{key!r}]", label, "a label name (a string)")
        if "num_labels" in raw:
            n = Int(min=1)(source, "num_labels", raw["num_labels"])
            if n != len(id2label):
                raise fail(source, "num_labels", n, f"the number of id2label entries ({len(id2label)})")
    own = raw.get("numformer")
    if own is None:
        own = {}
    if not isinstance(own, Mapping):
        raise ConfigFieldError(source, "numformer", own, "an object (numformer's classifier settings)")
    return {"pooling": Choice(tuple(poolings))(source, "numformer.pooling", own.get("pooling", default_pooling)),
            "max_length": Int(min=1, optional=True)(source, "numformer.max_length", own.get("max_length"))}
