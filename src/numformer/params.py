"""Parameters as one flat buffer with named views.

A model declares an ordered table ``name -> shape``; all tensors live
back to back in a single 1-D array and each name is a reshaped *view* into
it. Gradients and optimizer state use buffers of the same layout, so
AdamW, gradient clipping, checkpointing and an all-reduce each touch one
contiguous array.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np


class ParamLayout:
    """An ordered ``name -> shape`` table and each tensor's offset in the flat buffer."""

    def __init__(self, shapes: "OrderedDict[str, tuple[int, ...]]"):
        self.shapes = OrderedDict((name, tuple(int(d) for d in shape)) for name, shape in shapes.items())
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            self.offsets[name] = (offset, offset + n)
            offset += n
        self.size = offset

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def zeros(self, dtype=np.float32) -> np.ndarray:
        """A fresh flat buffer of this layout, all zeros."""
        return np.zeros(self.size, dtype=dtype)

    def buffer(self, flat: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
        """``flat`` checked against this layout, or a fresh zero buffer when None.

        A model built on an existing buffer (a slice of a larger one, say)
        shares its memory: nothing is copied.
        """
        if flat is None:
            return self.zeros(dtype)
        if flat.shape != (self.size,):
            raise ValueError(f"parameter buffer has {flat.size} values, the model needs {self.size}")
        return flat

    def views(self, flat: np.ndarray) -> "OrderedDict[str, np.ndarray]":
        """Named views into ``flat``; writing through a view writes the buffer."""
        if flat.ndim != 1 or flat.size != self.size:
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.size},)")
        return OrderedDict(
            (name, flat[begin:end].reshape(self.shapes[name]))
            for name, (begin, end) in self.offsets.items()
        )

    def pack(self, tensors: dict[str, np.ndarray], dtype=np.float32, source: str = "tensors") -> np.ndarray:
        """Copy named tensors into a new flat buffer, checking names and shapes.

        Raises ValueError naming every missing, unexpected or mis-shaped tensor.
        """
        missing = [n for n in self.shapes if n not in tensors]
        unexpected = [n for n in tensors if n not in self.shapes]
        wrong = [f"{n}: expected {self.shapes[n]}, got {tuple(tensors[n].shape)}"
                 for n in self.shapes if n in tensors and tuple(tensors[n].shape) != self.shapes[n]]
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append("unexpected " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        if wrong:
            problems.append("wrong shape " + "; ".join(wrong[:5]))
        if problems:
            raise ValueError(f"{source} do not match the model: " + " | ".join(problems))
        flat = self.zeros(dtype)
        views = self.views(flat)
        for name in self.shapes:
            views[name][...] = tensors[name]
        return flat
