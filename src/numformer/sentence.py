"""Sentence embeddings from a BERT encoder, as ``sentence-transformers`` computes them.

    hidden = encoder(ids, mask)                            (B, T, C)
    e      = Σ_t mask[t] · hidden[t] / max(Σ_t mask[t], 1e-9)    mean over real tokens
    out    = e / max(‖e‖₂, 1e-12)                          unit length (cosine = dot product)

A model folder in sentence-transformers layout says how to pool
(``1_Pooling/config.json``: mean, CLS or max), whether to normalize
(a ``Normalize`` module in ``modules.json``) and the maximum sequence length
(``sentence_bert_config.json``, e.g. 256 for all-MiniLM-L6-v2). A plain
Hugging Face BERT folder gets mean pooling + normalization and the
tokenizer's maximum length.

Pooling and normalization have hand-written backward passes too, used when
fine-tuning on top of mean-pooled embeddings (:mod:`numformer.finetune`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from numformer import jsonfile
from numformer.configcheck import Bool, Int, check_keys, fail
from numformer.models.bert import BertModel, load_bert
from numformer.tokenizers.wordpiece import WordPieceTokenizer, load_wordpiece

POOLING_MODES = ("mean", "cls", "max")


# ----------------------------------------------------------------------------- the math

def mean_pool_forward(hidden: np.ndarray, mask: np.ndarray):
    """hidden: (B, T, C), mask: (B, T) 0/1 -> (B, C) mean over the real tokens, cache."""
    m = mask.astype(hidden.dtype)[..., None]                       # (B, T, 1)
    count = np.maximum(m.sum(axis=1), 1e-9)                        # (B, 1) number of real tokens
    return (hidden * m).sum(axis=1) / count, (m, count)


def mean_pool_backward(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (B, C) -> dhidden: (B, T, C).

    Forward line ``e = Σ_t m_t h_t / n``: each real position receives ``dout / n``,
    padding positions nothing.
    """
    m, count = cache
    return (dout / count)[:, None, :] * m                          # (B, 1, C) · (B, T, 1)


def l2_normalize_forward(x: np.ndarray, eps: float = 1e-12):
    """x: (B, C) -> x / max(‖x‖, eps) (B, C), cache."""
    norm = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)   # (B, 1)
    y = x / norm
    return y, (y, norm)


def l2_normalize_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Forward line ``y = x / ‖x‖``. With ``∂‖x‖/∂x = y``:

        dx = (dout − y (y · dout)) / ‖x‖

    (the component of dout along y is removed: scaling x does not change y).
    """
    y, norm = cache
    return (dout - y * np.sum(y * dout, axis=-1, keepdims=True)) / norm


# ----------------------------------------------------------------------------- the encoder

@dataclass
class SentenceEncoder:
    """A BERT encoder, its tokenizer and the sentence-transformers head settings."""

    model: BertModel
    tokenizer: WordPieceTokenizer
    max_seq_length: int
    pooling: str = "mean"
    normalize: bool = True

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return embed(self, None, texts, batch_size=batch_size)


def _json(path: str):
    return jsonfile.load(path)          # a JSONFileError (ValueError) naming the file for any bad JSON


def load_sentence_encoder(path: str | os.PathLike, dtype=np.float32) -> SentenceEncoder:
    """Load a sentence-transformers (or plain Hugging Face BERT) folder."""
    folder = os.fspath(path)
    model = load_bert(folder, dtype=dtype)
    tokenizer = load_wordpiece(folder)
    pooling, normalize = "mean", True
    modules_path = os.path.join(folder, "modules.json")
    if os.path.isfile(modules_path):
        modules = _json(modules_path)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError(f"{modules_path}: expected a list of module objects")
        types = [str(m.get("type", "")) for m in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                sub = m.get("path", "")
                if not isinstance(sub, str) or os.path.isabs(sub) or ".." in sub.replace("\\", "/").split("/"):
                    raise ValueError(f"{modules_path}: module path {sub!r} must be a folder inside {folder}")
                pool_cfg_path = os.path.join(folder, sub, "config.json")
                if os.path.isfile(pool_cfg_path):
                    pooling = _pooling_mode(_json(pool_cfg_path), pool_cfg_path, model.cfg.hidden_size)
            elif not str(m.get("type", "")).endswith((".Transformer", ".Normalize")):
                raise ValueError(f"{modules_path}: module type {m.get('type')!r} is not supported "
                                 "(Transformer, Pooling and Normalize are)")
    max_len = tokenizer.max_length or model.cfg.max_position_embeddings
    max_len = min(max_len, model.cfg.max_position_embeddings)
    return SentenceEncoder(model, tokenizer, max_len, pooling, normalize)


def _pooling_mode(cfg, source: str, hidden_size: int | None = None) -> str:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object")
    # flags are true/false (bool("false") is True); the width, when given, is the encoder's
    check_keys(cfg, {k: Bool() for k in cfg if k.startswith("pooling_mode_")}, source)
    if "word_embedding_dimension" in cfg:
        dim = Int(min=1)(source, "word_embedding_dimension", cfg["word_embedding_dimension"])
        if hidden_size is not None and dim != hidden_size:
            raise fail(source, "word_embedding_dimension", dim, f"the encoder's hidden_size ({hidden_size})")
    modes = [m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and
              k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens")]
    if len(modes) != 1 or others:
        raise ValueError(f"{source}: exactly one of mean / cls / max pooling is supported, "
                         f"got {modes + others or 'none'}")
    return modes[0]


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str = "mean") -> np.ndarray:
    """(B, T, C), (B, T) -> (B, C) by ``mode`` (mean over real tokens, the first token, or max)."""
    if mode == "mean":
        return mean_pool_forward(hidden, mask)[0]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(mask.astype(bool)[..., None], hidden, -1e9).max(axis=1)   # as sentence-transformers
    raise ValueError(f"unknown pooling mode {mode!r} (known: {', '.join(POOLING_MODES)})")


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of at most ``batch_size``; a batch
    also ends where the next text is under half as long as the batch's longest, so
    padding never more than doubles the work. (Results do not depend on batching.)"""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and 2 * lengths[i] >= lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def embed(model, tokenizer: WordPieceTokenizer | None = None, texts: Sequence[str] = (), *,
          batch_size: int = 32, max_length: int | None = None, normalize: bool | None = None,
          pooling: str | None = None) -> np.ndarray:
    """Sentence embeddings (N, C) for ``texts``.

    ``model`` is a :class:`SentenceEncoder`, a folder path (loaded with
    :func:`load_sentence_encoder`) or a :class:`BertModel` (then ``tokenizer``
    is required, pooling is mean and the output normalized unless told otherwise).
    Texts are truncated to ``max_length`` tokens (default: the model's
    ``max_seq_length``) and run longest-first in batches of up to ``batch_size``
    texts of similar length, so little work goes to padding; the output is in
    input order.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_sentence_encoder(model)
    if isinstance(model, SentenceEncoder):
        enc = model
        tokenizer = tokenizer or enc.tokenizer
        max_length = max_length or enc.max_seq_length
        normalize = enc.normalize if normalize is None else normalize
        pooling = pooling or enc.pooling
        bert = enc.model
    elif isinstance(model, BertModel):
        if tokenizer is None:
            raise ValueError("embed: a BertModel needs a tokenizer")
        bert = model
        max_length = max_length or tokenizer.max_length or bert.cfg.max_position_embeddings
        normalize = True if normalize is None else normalize
        pooling = pooling or "mean"
    else:
        raise TypeError(f"embed: expected a SentenceEncoder, BertModel or folder path, got {type(model).__name__}")
    if isinstance(texts, str):
        raise TypeError("embed: texts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = min(max_length, bert.cfg.max_position_embeddings)
    rows = [tokenizer.encode(t, max_length=max_length) for t in texts]
    out = np.zeros((len(rows), bert.cfg.hidden_size), dtype=bert.dtype)
    for idx in _length_batches([len(r) for r in rows], batch_size):
        T = len(rows[idx[0]])
        ids = np.full((len(idx), T), tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), T), dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :len(rows[i])] = rows[i]
            mask[r, :len(rows[i])] = 1
        hidden, _, _ = bert.forward(ids, mask)
        e = pool(hidden, mask, pooling)
        if normalize:
            e = l2_normalize_forward(e)[0]
        out[idx] = e
    return out
