"""Synthetic tasks generated in code: a model should learn them exactly.

``sort``: the prompt is n random digits and ``=``; the answer is the same
digits sorted, then the end-of-text token::

    5 2 9 2 = 2 2 5 9 <eot>

Only the answer positions are scored (prompt targets are ``ignore_index``),
and accuracy is exact match of the greedy answer. Sorting needs every
answer token to attend over the whole prompt and to count, so it is a real
test of attention, yet small models learn it in well under a minute.
"""

from __future__ import annotations

import numpy as np

from numformer.tokenizers import CharTokenizer

IGNORE = -100


class SortTask:
    """Sort ``n_digits`` random digits. Token ids: '0'..'9', '=', then EOT."""

    name = "sort"

    def __init__(self, n_digits: int = 6):
        if n_digits < 1:
            raise ValueError(f"n_digits must be positive, got {n_digits}")
        self.n_digits = n_digits
        self.tokenizer = CharTokenizer.train("0123456789=")
        self.equals = self.tokenizer.encode("=")[0]
        self.eot = self.tokenizer.eot_id
        self.block_size = 2 * n_digits + 1           # input length: digits, '=', answer (without last)

    @staticmethod
    def recommended_settings() -> dict:
        """Training settings that reach 100 % exact match in well under a minute on 2 cores."""
        return dict(n_layer=2, n_head=4, n_embd=64, batch_size=64, max_steps=600, lr=3e-3,
                    min_lr=3e-4, warmup_steps=30, weight_decay=0.0, dropout=0.0,
                    eval_interval=200, eval_batches=2)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def sequences(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """(B, 2n + 2) full sequences: digits, '=', sorted digits, EOT."""
        digits = rng.integers(0, 10, size=(batch_size, self.n_digits))
        digit_ids = np.array(self.tokenizer.encode("0123456789"))[digits]
        answer = np.sort(digit_ids, axis=1)          # ids of '0'..'9' are in digit order
        eq = np.full((batch_size, 1), self.equals)
        eot = np.full((batch_size, 1), self.eot)
        return np.concatenate([digit_ids, eq, answer, eot], axis=1)

    def batch(self, rng: np.random.Generator, batch_size: int, split: str = "train"):
        """x (B, 2n+1) and y (B, 2n+1), the prompt's targets ignored."""
        seq = self.sequences(rng, batch_size)
        x, y = seq[:, :-1], seq[:, 1:].copy()
        y[:, : self.n_digits] = IGNORE               # predicting the random prompt is impossible
        return x, y

    def accuracy(self, model, rng: np.random.Generator, n: int = 500) -> float:
        """Exact-match accuracy of greedy decoding (the whole answer must be right)."""
        seq = self.sequences(rng, n)
        prompt_len = self.n_digits + 1
        ids = seq[:, :prompt_len]
        for _ in range(self.n_digits + 1):           # the digits and the EOT
            logits = model.forward(ids)[0][:, -1]    # (n, V)
            ids = np.concatenate([ids, np.argmax(logits, axis=-1)[:, None]], axis=1)
        return float(np.mean(np.all(ids[:, prompt_len:] == seq[:, prompt_len:], axis=1)))


TASKS = {"sort": SortTask}
