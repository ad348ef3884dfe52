"""Integer arguments: token ids, targets, labels, positions, offsets.

These index rows, so a float such as 1.5 must be refused rather than
truncated to 1 (what ``astype(np.int64)`` or ``int()`` would do). Used by the
ops, the models, the backend's kernel wrappers and the callers that take ids
from users. Depends on NumPy only.
"""

from __future__ import annotations

import operator

import numpy as np


def int_array(a, fn: str, name: str) -> np.ndarray:
    """``a`` as a NumPy integer array, or TypeError naming ``fn``, ``name`` and the dtype.

    Token ids, targets, labels and positions index rows: a float such as 1.5
    must be refused, not truncated to 1 (what ``astype(np.int64)`` would do),
    and a bool array is refused too (NumPy would read it as a mask). An empty
    list arrives as float64 from ``np.asarray([])`` and has no value to
    truncate, so an empty array of any numeric dtype passes, as int64.
    """
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return a
    if a.size == 0 and a.dtype.kind in "f":
        return a.astype(np.int64)
    raise TypeError(f"{fn}: {name} has dtype {a.dtype}; expected integers (no truncation of non-integer {name})")


def int_scalar(value, fn: str, name: str) -> int:
    """``value`` as a Python int (int or NumPy integer), or TypeError: ``int(1.5)`` would truncate."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
