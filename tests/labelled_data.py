"""A small labelled set the fine-tuning tests build themselves (no download).

Three classes — which pronoun hides among filler words — so a classifier
must find one informative token anywhere in the text.
"""

import numpy as np

FILLER = "the of and in to was is as for on with that it by at from had an were but be this are not".split()
KEYS = {"she": ["she", "her"], "he": ["he", "his"], "you": ["you"]}


def make_dataset(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n texts of 4–12 words and their labels (classes in turn: she, he, you)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = list(KEYS)[i % 3]
        words = list(rng.choice(FILLER, size=rng.integers(3, 12)))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(KEYS[label])))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels
