"""Corpora and the seeded batch sampler.

The default corpus is Python's own reference documentation,
``pydoc_data.topics`` (≈465 k characters, shipped with CPython), so the
main job needs no download. Topics are joined by the end-of-text token.
"""

from __future__ import annotations

import os

import numpy as np


class DataError(ValueError):
    """A problem with the user's data (missing file, wrong encoding, too short)."""


def default_corpus() -> list[str]:
    """Python's reference documentation topics, in a fixed (sorted) order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise DataError("this Python has no pydoc_data.topics; pass --data FILE") from exc
    return [topics[key] for key in sorted(topics)]


def read_text_file(path: str) -> str:
    """Read a UTF-8 text file, with a clear error for each way it can be unusable."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory, not a text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"data file {path!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path!r} is not UTF-8 text (bad byte at offset {exc.start})") from None


class TokenSplits:
    """A token stream split into a training part and a validation tail.

    The last ``val_fraction`` of the stream is held out, so validation text is
    never seen in training (a random split of overlapping windows would leak).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, val_fraction: float = 0.1):
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" and tokens.size:   # astype(int64) would truncate 1.5 to 1
            raise TypeError(f"TokenSplits: tokens has dtype {tokens.dtype}; expected integer ids")
        tokens = tokens.astype(np.int64, copy=False)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(len(tokens) * val_fraction)
        self.train = tokens[: len(tokens) - n_val]
        self.val = tokens[len(tokens) - n_val:]
        self.block_size = block_size
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < block_size + 1:
                raise DataError(
                    f"the data is too short: its {name} split has {len(part)} tokens but a "
                    f"block of {block_size} needs at least {block_size + 1}; "
                    "use more text or a smaller --block-size")

    def batch(self, rng: np.random.Generator, batch_size: int, split: str = "train"):
        """Random windows: x (B, T) and y (B, T) = x shifted left by one token."""
        data = self.train if split == "train" else self.val
        T = self.block_size
        starts = rng.integers(0, len(data) - T, size=batch_size)       # inclusive of the last full window
        x = np.stack([data[s:s + T] for s in starts])
        y = np.stack([data[s + 1:s + T + 1] for s in starts])
        return x, y


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Validation cross-entropy (nats/token) of the best context-free model.

    The model predicts every token with the training split's token frequencies
    (add-one smoothed so unseen tokens cost a finite amount):
    ``H = −mean_{t ∈ val} log p(t)``. A language model whose validation loss
    is well below this has learned to use context.
    """
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val)].mean())
