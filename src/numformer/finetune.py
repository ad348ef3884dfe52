"""Fine-tuning a BERT encoder or GPT-2 for text classification, and using the result.

BERT (:class:`BertClassifier`, ``BertForSequenceClassification`` layout):

    features = pool(encoder(ids, mask))            (B, C)   mean over real tokens | [CLS] | tanh pooler
    logits   = drop(features) · Wᵀ + b            (B, L)   ``classifier.weight`` (L, C), as HF
    loss     = cross_entropy(logits, labels)

GPT-2 (:class:`GPT2Classifier`, ``GPT2ForSequenceClassification`` layout):

    features = ln_f(blocks(ids))[b, last[b]]       (B, C)   the last real token of each row
    logits   = features · Sᵀ                       (B, L)   ``score.weight`` (L, C), no bias, as HF

The gradient flows back through the head, the pooling and — unless the
encoder is frozen — every encoder layer (:meth:`BertModel.backward`). All
parameters, encoder and head, live in one flat buffer, so AdamW, clipping
and "keep the best weights" are one array operation each. With ``freeze``
the encoder runs once per text (no dropout) and only the head is trained.

Training stops early when the validation loss has not improved for
``patience`` epochs; the best weights are kept. The saved folder is a
Hugging Face ``BertForSequenceClassification`` layout (``bert.`` prefixed
encoder + ``classifier.*``, ``id2label`` in ``config.json``) plus the
tokenizer files, and :func:`load_classifier` / ``numformer classify`` read it.
For GPT-2 the folder is a ``GPT2ForSequenceClassification`` (``transformer.``
prefixed body + ``score.weight``, ``pad_token_id`` in ``config.json``).
:func:`load_backbone` reads the model to start from; everything after it
works the same for both families.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from numformer import intargs
from numformer.models.bert import BertConfig, BertModel, load_bert, param_shapes
from numformer.configcheck import classifier_settings
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.models.gpt2 import param_shapes as gpt2_param_shapes
from numformer.ops import cross_entropy, dense, dropout
from numformer.ops.softmax import softmax_reference
from numformer.optim import AdamW, clip_grad_norm
from numformer.params import ParamLayout
from numformer.sentence import mean_pool_backward, mean_pool_forward
from numformer.tokenizers.wordpiece import load_wordpiece

POOLINGS = ("mean", "cls", "pooler")            # BERT's; GPT-2 always reads its last token
GPT2_POOLINGS = ("last",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "numformer_tokenizer.json")


# ----------------------------------------------------------------------------- data

def read_labelled(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Texts and labels from a CSV with a header naming ``text`` and ``label``
    columns, or a JSONL file of ``{"text": ..., "label": ...}`` objects.

    Labels are kept as strings (``1`` and ``"1"`` are the same class). Raises
    ValueError naming the file and line for anything malformed.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    texts, labels = [], []
    if path.endswith((".jsonl", ".json", ".ndjson")):
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:          # RecursionError: a deeply nested line
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "label" not in obj \
                    or not isinstance(obj["label"], (str, int)) or isinstance(obj["label"], bool):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text' and a string/int 'label'")
            texts.append(obj["text"])
            labels.append(str(obj["label"]))
    else:
        rows = csv.reader(io.StringIO(data))
        header = next(rows, None)
        if header is None or "text" not in header or "label" not in header:
            raise ValueError(f"{path}:1: the CSV header must name a 'text' and a 'label' column, got {header}")
        ti, li = header.index("text"), header.index("label")
        for n, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            texts.append(row[ti])
            labels.append(row[li].strip())
    if not texts:
        raise ValueError(f"{path}: no labelled examples")
    return texts, labels


# ----------------------------------------------------------------------------- metrics

def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro F1 and the confusion
    matrix (rows: true class, columns: predicted class). An undefined ratio (0/0) is 0."""
    L = len(labels)
    y_true, y_pred = (intargs.int_array(y, "classification_report", name).astype(np.int64, copy=False)
                      for y, name in ((y_true, "y_true"), (y_pred, "y_pred")))   # 1.5 refused, not truncated
    cm = np.zeros((L, L), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    pred_n, true_n = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, pred_n, out=np.zeros(L), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros(L), where=true_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(L), where=(precision + recall) > 0)
    per_class = OrderedDict((lab, dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                                       support=int(true_n[i]))) for i, lab in enumerate(labels))
    return dict(accuracy=float(tp.sum() / max(len(y_true), 1)), macro_f1=float(f1.mean()) if L else 0.0,
                per_class=per_class, confusion_matrix=cm.tolist(), labels=list(labels))


def format_report(report: dict) -> str:
    """The report as a small text table plus the confusion matrix."""
    labels = report["labels"]
    w = max([len(x) for x in labels] + [5])
    lines = [f"accuracy {report['accuracy']:.4f}   macro F1 {report['macro_f1']:.4f}", "",
             f"{'class':<{w}}  precision  recall      f1  support"]
    for lab, m in report["per_class"].items():
        lines.append(f"{lab:<{w}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * w + "  " + " ".join(f"{lab[:8]:>8}" for lab in labels)]
    for lab, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{lab:<{w}}  " + " ".join(f"{v:>8d}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the model

class _Classifier:
    """What both classifiers share: a linear head on a pretrained body, all
    parameters in one flat buffer ``self.flat``. Subclasses define
    ``features`` (body + pooling) and ``head_forward`` / ``head_backward``."""

    @property
    def dtype(self):
        return self.flat.dtype

    def forward(self, ids, mask=None, tt=None, labels=None, *, train=False, rng=None):
        """ids: (B, T) -> logits (B, L), loss (with labels) or None, cache for ``backward``."""
        f, feat_c = self.features(ids, mask, tt, train=train, rng=rng)
        logits, loss, head_c = self.head_forward(f, labels, train=train, rng=rng)
        return logits, loss, (feat_c, head_c)

    def predict_proba(self, ids, mask=None, tt=None) -> np.ndarray:
        """Class probabilities (B, L)."""
        return softmax_reference(self.forward(ids, mask, tt)[0])


class BertClassifier(_Classifier):
    """Encoder + linear head in one flat buffer: ``[encoder params | classifier.weight | classifier.bias]``."""

    def __init__(self, cfg: BertConfig, labels: Sequence[str], pooling: str = "mean",
                 flat: np.ndarray | None = None, dtype=np.float32, pooler: bool = True):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and not pooler:
            raise ValueError("pooling='pooler' needs an encoder with a pooler")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"need at least two distinct labels, got {list(labels)}")
        self.labels, self.pooling = list(labels), pooling
        L, C = len(labels), cfg.hidden_size
        enc_shapes = param_shapes(cfg, pooler)
        self.layout = ParamLayout(OrderedDict([*enc_shapes.items(), ("classifier.weight", (L, C)),
                                               ("classifier.bias", (L,))]))
        self.flat = self.layout.buffer(flat, dtype)
        self.n_encoder = ParamLayout(enc_shapes).size
        self.encoder = BertModel(cfg, self.flat[:self.n_encoder], pooler=pooler)   # a view: shares memory
        self.params = self.layout.views(self.flat)

    @property
    def cfg(self) -> BertConfig:
        return self.encoder.cfg

    @property
    def n_body(self) -> int:
        """Values of the pretrained part at the front of ``flat`` (the head follows)."""
        return self.n_encoder

    @property
    def max_positions(self) -> int:
        return self.cfg.max_position_embeddings

    @staticmethod
    def encode_texts(tokenizer, texts, max_length: int) -> list[list[int]]:
        """[CLS] ids [SEP], truncated to ``max_length`` by the WordPiece tokenizer."""
        return [tokenizer.encode(t, max_length=max_length) for t in texts]

    def pad_id(self, tokenizer) -> int:
        return tokenizer.pad_id

    def decay_mask(self) -> np.ndarray:
        mask = self.layout.zeros(self.dtype)
        mask[:self.n_encoder] = self.encoder.decay_mask()
        self.layout.views(mask)["classifier.weight"][...] = 1.0
        return mask

    @classmethod
    def from_encoder(cls, encoder: BertModel, labels: Sequence[str], pooling: str = "mean",
                     seed: int = 0) -> "BertClassifier":
        """A fresh head (N(0, initializer_range), zero bias) on a copy of ``encoder``'s weights."""
        model = cls(encoder.cfg, labels, pooling, dtype=encoder.dtype, pooler=encoder.has_pooler)
        model.flat[:model.n_encoder] = encoder.flat
        rng = np.random.default_rng(seed)
        w = model.params["classifier.weight"]
        w[...] = rng.normal(0.0, encoder.cfg.initializer_range, size=w.shape)
        return model

    def features(self, ids, mask, tt=None, *, train=False, rng=None):
        """Pooled encoder output (B, C) and the cache to differentiate it."""
        hidden, pooled, enc_c = self.encoder.forward(ids, mask, tt, train=train, rng=rng)
        if self.pooling == "mean":
            f, pool_c = mean_pool_forward(hidden, mask)
        elif self.pooling == "cls":
            f, pool_c = hidden[:, 0], None
        else:
            f, pool_c = pooled, None
        return f, (enc_c, pool_c, hidden.shape)

    def head_forward(self, f, labels=None, *, train=False, rng=None):
        """features (B, C) -> logits (B, L), loss or None, cache."""
        f, drop_c = dropout.forward(f, self.cfg.hidden_dropout_prob if train else 0.0, rng, train)
        logits, head_c = dense.forward(f, self.params["classifier.weight"], self.params["classifier.bias"])
        loss, ce_c = (None, None) if labels is None else cross_entropy.forward(logits, np.asarray(labels))
        return logits, loss, (drop_c, head_c, ce_c)

    def head_backward(self, cache, grads: np.ndarray) -> np.ndarray:
        """Gradient of the loss w.r.t. the features (B, C); head gradients are added to ``grads``."""
        drop_c, head_c, ce_c = cache
        g = self.layout.views(grads)
        dlogits = cross_entropy.backward(1.0, ce_c)                               # (B, L)
        df, _, _ = dense.backward(dlogits, head_c, grads=(g["classifier.weight"], g["classifier.bias"]))
        return dropout.backward(df, drop_c)                                       # (B, C)

    def backward(self, cache, grads: np.ndarray | None = None) -> np.ndarray:
        """Full backward: head, pooling, then every encoder layer (in reverse)."""
        (enc_c, pool_c, hshape), head_c = cache
        grads = self.layout.zeros(self.dtype) if grads is None else grads
        df = self.head_backward(head_c, grads)
        enc_grads = grads[:self.n_encoder]                                        # view: encoder part
        if self.pooling == "mean":
            self.encoder.backward(enc_c, dhidden=mean_pool_backward(df, pool_c), grads=enc_grads)
        elif self.pooling == "cls":
            dh = np.zeros(hshape, self.dtype)
            dh[:, 0] = df                                                         # f = hidden[:, 0]
            self.encoder.backward(enc_c, dhidden=dh, grads=enc_grads)
        else:
            self.encoder.backward(enc_c, dpooled=df, grads=enc_grads)
        return grads



def last_token_index(ids: np.ndarray, pad_token_id: int, mask: np.ndarray | None = None) -> np.ndarray:
    """(B,) position of each row's last real token in right-padded ids (B, T).

    With ``mask`` (B, T) of 1 for real tokens: ``Σ_t mask[b, t] − 1``. Without,
    Hugging Face's rule for ``GPT2ForSequenceClassification``: the last position
    whose id is not ``pad_token_id`` (0 when the whole row is padding). The two
    agree unless a text itself ends with the pad id; numformer never encodes
    one (end-of-text in a text is plain characters unless explicitly allowed).
    """
    ids = np.asarray(ids)
    B, T = ids.shape
    if mask is not None:
        last = np.asarray(mask).sum(axis=1) - 1                                  # (B,)
        if np.any(last < 0):
            raise ValueError("every row needs at least one real token (mask row of zeros)")
        return last
    real = ids != pad_token_id                                                   # (B, T)
    last = T - 1 - np.argmax(real[:, ::-1], axis=1)                             # rightmost True
    return np.where(real.any(axis=1), last, 0)


class GPT2Classifier(_Classifier):
    """GPT-2 + linear head in one flat buffer: ``[GPT-2 params | score.weight]``.

        hidden = ln_f(blocks(wte[ids] + wpe[pos]))      (B, T, C)   :meth:`GPT2.hidden`
        f[b]   = hidden[b, last[b]]                     (B, C)      the last real token of row b
        logits = f · Sᵀ                                 (B, L)      S = ``score.weight`` (L, C), no bias

    Why the last token: in a causal model position t sees positions ≤ t only,
    so the last token's state is the one that has read the whole text (BERT's
    mean or [CLS] sees every token from every position; GPT-2 has no such place).

    Padding: rows are right-padded with ``pad_token_id`` (GPT-2 has no padding
    token; like Hugging Face we use end-of-text). No attention mask is needed:
    the causal mask already stops every real token from attending to the
    padding after it, and positions count from 0 exactly as without padding,
    so the hidden state at ``last[b]`` is that of the unpadded text. The
    padded positions compute garbage that nothing reads (and get zero gradient).
    """

    pooling = "last"

    def __init__(self, cfg: GPT2Config, labels: Sequence[str], pad_token_id: int,
                 flat: np.ndarray | None = None, dtype=np.float32):
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"need at least two distinct labels, got {list(labels)}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) \
                or not 0 <= pad_token_id < cfg.vocab_size:
            raise ValueError(f"pad_token_id must be a token id in [0, {cfg.vocab_size}), got {pad_token_id!r}")
        self.labels, self.pad_token_id = list(labels), int(pad_token_id)
        body_shapes = gpt2_param_shapes(cfg)
        self.layout = ParamLayout(OrderedDict([*body_shapes.items(), ("score.weight", (len(labels), cfg.n_embd))]))
        self.flat = self.layout.buffer(flat, dtype)
        self.n_body = ParamLayout(body_shapes).size
        self.body = GPT2(cfg, self.flat[:self.n_body])             # a view: shares memory
        self.params = self.layout.views(self.flat)
        self.hf_config: dict = {}          # the base model's config.json, written back on save
        self.max_length: int | None = None   # truncation used in training; classify's default

    @property
    def cfg(self) -> GPT2Config:
        return self.body.cfg

    @property
    def max_positions(self) -> int:
        return self.cfg.n_positions

    def pad_id(self, tokenizer=None) -> int:
        return self.pad_token_id

    def encode_texts(self, tokenizer, texts, max_length: int) -> list[list[int]]:
        """Token ids of each text, the first ``max_length`` kept (the end is cut off).

        An empty text becomes ``[pad]`` (end-of-text), so every row has a
        last token; Hugging Face's rule reads position 0 of such a row too.
        """
        return [tokenizer.encode(t)[:max_length] or [self.pad_token_id] for t in texts]

    def decay_mask(self) -> np.ndarray:
        mask = self.layout.zeros(self.dtype)
        mask[:self.n_body] = self.body.decay_mask()
        self.layout.views(mask)["score.weight"][...] = 1.0
        return mask

    @classmethod
    def from_body(cls, body: GPT2, labels: Sequence[str], pad_token_id: int, seed: int = 0,
                  std: float | None = None) -> "GPT2Classifier":
        """A fresh head, N(0, std²) with Hugging Face's ``initializer_range`` (0.02)
        by default, on a copy of ``body``'s weights."""
        model = cls(body.cfg, labels, pad_token_id, dtype=body.dtype)
        model.flat[:model.n_body] = body.flat
        model.hf_config = dict(getattr(body, "hf_config", None) or {})
        if std is None:
            std = float(model.hf_config.get("initializer_range", 0.02))
        w = model.params["score.weight"]
        w[...] = np.random.default_rng(seed).normal(0.0, std, size=w.shape)
        return model

    def features(self, ids, mask=None, tt=None, *, train=False, rng=None):
        """ids (B, T), mask (B, T) or None -> last-token hidden states (B, C), cache.

        ``tt`` (token types) is accepted for the common interface and must be None.
        """
        if tt is not None:
            raise ValueError("GPT-2 has no token types")
        hidden, body_c = self.body.hidden(ids, train=train, rng=rng)              # (B, T, C)
        last = last_token_index(ids, self.pad_token_id, mask)                      # (B,)
        f = hidden[np.arange(hidden.shape[0]), last]                               # (B, C) gather
        return f, (body_c, last, hidden.shape)

    def head_forward(self, f, labels=None, *, train=False, rng=None):
        """features (B, C) -> logits (B, L), loss or None, cache. (No dropout here,
        as in Hugging Face; the body's own dropout acts in training.)"""
        logits, head_c = dense.forward(f, self.params["score.weight"], None)       # f · Sᵀ
        loss, ce_c = (None, None) if labels is None else cross_entropy.forward(logits, np.asarray(labels))
        return logits, loss, (head_c, ce_c)

    def head_backward(self, cache, grads: np.ndarray) -> np.ndarray:
        """Gradient of the loss w.r.t. the features (B, C); dS is added to ``grads``."""
        head_c, ce_c = cache
        dlogits = cross_entropy.backward(1.0, ce_c)                                # (B, L)
        # logits = f · Sᵀ  ⇒  df = dlogits · S,  dS += dlogitsᵀ · f
        df, _, _ = dense.backward(dlogits, head_c, grads=(self.layout.views(grads)["score.weight"], None))
        return df

    def backward(self, cache, grads: np.ndarray | None = None) -> np.ndarray:
        """Full backward: head, the last-token gather, then GPT-2 from ``ln_f`` down."""
        (body_c, last, hshape), head_c = cache
        grads = self.layout.zeros(self.dtype) if grads is None else grads
        df = self.head_backward(head_c, grads)                                     # (B, C)
        # f[b] = hidden[b, last[b]]: the gradient goes back to that one position of each row
        dh = np.zeros(hshape, self.dtype)                                          # (B, T, C)
        dh[np.arange(hshape[0]), last] = df
        self.body.backward(body_c, grads[:self.n_body], dhidden=dh)               # view: body part
        return grads



def gpt2_pad_token_id(body: GPT2, tokenizer=None) -> int:
    """The id GPT-2 rows are padded with: GPT-2 has none, so (as Hugging Face
    users do) end-of-text: config.json's ``pad_token_id`` if set, else its
    ``eos_token_id`` (50256 for OpenAI's GPT-2), else the tokenizer's EOT."""
    V = body.cfg.vocab_size
    hf = getattr(body, "hf_config", None) or {}
    for key in ("pad_token_id", "eos_token_id"):
        v = hf.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < V:
            return v
    eot = getattr(tokenizer, "eot_id", None)
    if isinstance(eot, int) and 0 <= eot < V:
        return eot
    raise ValueError(f"no padding id for GPT-2: config.json has no pad_token_id/eos_token_id in [0, {V}) "
                     f"and the tokenizer has no <|endoftext|> token")


# ----------------------------------------------------------------------------- save / load

def save_classifier(model: BertClassifier | GPT2Classifier, folder: str | os.PathLike,
                    tokenizer_from: str | None = None, tokenizer=None) -> None:
    """A ``BertForSequenceClassification`` or ``GPT2ForSequenceClassification``
    folder: config.json, model.safetensors, tokenizer files (copied from
    ``tokenizer_from``, else written from ``tokenizer``)."""
    from numformer import safetensors
    from numformer.fileio import atomic_open

    folder = os.fspath(folder)
    if isinstance(model, GPT2Classifier):
        return _save_gpt2_classifier(model, folder, tokenizer_from, tokenizer)
    os.makedirs(folder, exist_ok=True)
    cfg = model.cfg.to_dict()
    cfg.update(architectures=["BertForSequenceClassification"], num_labels=len(model.labels),
               id2label={str(i): lab for i, lab in enumerate(model.labels)},
               label2id={lab: i for i, lab in enumerate(model.labels)},
               numformer={"pooling": model.pooling})
    with atomic_open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {("bert." + k if not k.startswith("classifier.") else k): v for k, v in model.params.items()}
    safetensors.save_file(tensors, os.path.join(folder, "model.safetensors"))
    copied = False
    if tokenizer_from and os.path.isdir(tokenizer_from):
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_from, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))
                copied = True
    if not copied and tokenizer is not None:
        tokenizer.save(os.path.join(folder, "tokenizer.numformer.json"))


def _save_gpt2_classifier(model: GPT2Classifier, folder: str, tokenizer_from, tokenizer) -> None:
    from numformer import safetensors
    from numformer.checkpoint import resolve
    from numformer.fileio import atomic_open
    from numformer.pretrained import gpt2_config_to_hf

    os.makedirs(folder, exist_ok=True)
    cfg = gpt2_config_to_hf(model.cfg, model.hf_config)
    cfg.update(architectures=["GPT2ForSequenceClassification"], num_labels=len(model.labels),
               id2label={str(i): lab for i, lab in enumerate(model.labels)},
               label2id={lab: i for i, lab in enumerate(model.labels)},
               pad_token_id=model.pad_token_id,
               numformer={"pooling": "last", "max_length": model.max_length})
    with atomic_open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {(k if k == "score.weight" else "transformer." + k): v for k, v in model.params.items()}
    safetensors.save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    copied = False
    if tokenizer_from and os.path.isdir(tokenizer_from):
        src_dir = resolve(tokenizer_from)            # a numformer run folder keeps it in checkpoint/
        names = [*GPT2_TOKENIZER_FILES, *(n for n in sorted(os.listdir(src_dir)) if n.endswith(".tiktoken"))]
        for name in names:
            src = os.path.join(src_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))
                copied = True
    if not copied and tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):    # GPT-2 BPE: vocab.json + merges.txt
            tokenizer.save_pretrained(folder)
        else:                                        # numformer's own byte-level BPE / char tokenizers
            tokenizer.save(os.path.join(folder, "numformer_tokenizer.json"))


def _labels_from_config(raw: dict, cfg_path: str) -> list[str]:
    id2label = raw.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f"{cfg_path}: no id2label: not a sequence-classification model")
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise ValueError(f"{cfg_path}: id2label keys must be 0..N-1") from None


def _is_gpt2_config(raw: dict) -> bool:
    archs = raw.get("architectures") or []
    return raw.get("model_type") == "gpt2" or any(isinstance(a, str) and a.startswith("GPT2") for a in archs)


def load_classifier(folder: str | os.PathLike, dtype=np.float32):
    """(model, tokenizer) from a folder written by :func:`save_classifier` or by
    transformers' ``BertForSequenceClassification`` (which pools with the tanh
    pooler) or ``GPT2ForSequenceClassification``; dispatches on ``model_type``."""
    from numformer import safetensors
    from numformer.pretrained import read_config
    from numformer.tokenizers import load_tokenizer

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if _is_gpt2_config(read_config(folder)):
        return _load_gpt2_classifier(folder, dtype)
    encoder = load_bert(folder, dtype=dtype)
    raw = read_config(folder)
    labels = _labels_from_config(raw, cfg_path)
    pooling = classifier_settings(raw, cfg_path, POOLINGS, default_pooling="pooler")["pooling"]
    model = BertClassifier(encoder.cfg, labels, pooling, dtype=dtype, pooler=encoder.has_pooler)
    model.flat[:model.n_encoder] = encoder.flat
    st_path = os.path.join(folder, "model.safetensors")
    header, _ = safetensors.read_header(st_path)
    for name in ("classifier.weight", "classifier.bias"):
        if name not in header:
            raise ValueError(f"{st_path}: missing tensor {name!r}")
        if tuple(header[name]["shape"]) != model.layout.shapes[name]:
            raise ValueError(f"{st_path}: tensor {name!r} has shape {tuple(header[name]['shape'])}, "
                             f"{len(labels)} labels imply {model.layout.shapes[name]}")
    head = safetensors.load_file(st_path, names=["classifier.weight", "classifier.bias"])
    for name, arr in head.items():
        model.params[name][...] = arr
    own = os.path.join(folder, "tokenizer.numformer.json")
    tokenizer = load_tokenizer(own) if os.path.isfile(own) else load_wordpiece(folder)
    return model, tokenizer


def _load_gpt2_classifier(folder: str, dtype=np.float32) -> tuple[GPT2Classifier, object]:
    """A ``GPT2ForSequenceClassification`` folder: body + ``score.weight`` + pad_token_id + tokenizer."""
    from numformer import pretrained

    raw = pretrained.read_config(folder)
    cfg_path = os.path.join(folder, "config.json")
    labels = _labels_from_config(raw, cfg_path)
    archs = raw.get("architectures") or []
    if archs and "GPT2ForSequenceClassification" not in archs:
        raise ValueError(f"{cfg_path}: architectures {archs} is not a GPT2ForSequenceClassification")
    # the body's config: the same keys, checked as for any GPT-2 folder
    cfg = pretrained.gpt2_config_from_hf({**raw, "architectures": ["GPT2Model"]}, cfg_path)
    pad = raw.get("pad_token_id")
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < cfg.vocab_size:
        raise ValueError(f"{cfg_path}: pad_token_id must be a token id in [0, {cfg.vocab_size}) "
                         f"(it marks where each row's last real token is), got {pad!r}")
    model = GPT2Classifier(cfg, labels, pad, dtype=dtype)
    flat, _ = pretrained.read_gpt2_weights(folder, cfg, model.layout, dtype)   # checks every name and shape
    model.flat[...] = flat
    model.hf_config = raw
    model.max_length = classifier_settings(raw, cfg_path, GPT2_POOLINGS, default_pooling="last")["max_length"]
    return model, pretrained.load_tokenizer(folder)


def load_backbone(path: str | os.PathLike, dtype=np.float32):
    """(model, tokenizer) to fine-tune: a BERT-family folder (:func:`load_bert`),
    a Hugging Face GPT-2 folder, or a numformer GPT-2 checkpoint / run folder."""
    from numformer import pretrained
    from numformer.checkpoint import resolve

    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        path = resolve(path)                       # a `numformer train` output folder holds checkpoint/
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) \
            and _is_gpt2_config(pretrained.read_config(path)):
        return pretrained.load_gpt2(path, dtype=dtype), pretrained.load_tokenizer(path)
    return load_bert(path, dtype=dtype), load_wordpiece(path)


# ----------------------------------------------------------------------------- training

@dataclass
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-5                 # encoder + head; a frozen encoder's head uses head_lr
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1        # linear warmup, then linear decay to 0 (as HF Trainer)
    max_length: int = 128            # tokens per text; longer texts keep their first max_length tokens
    pooling: str | None = None       # BERT: mean | cls | pooler (None: mean); GPT-2: last (the only one)
    freeze: bool = False
    patience: int = 2                # epochs without a better validation loss before stopping
    val_fraction: float = 0.2        # held out from the training file when no validation file is given
    clip: float = 1.0
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        for name in ("epochs", "batch_size", "max_length", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pooling is not None and self.pooling not in POOLINGS + GPT2_POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS + GPT2_POOLINGS)}, got {self.pooling!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")
        return self


@dataclass
class FinetuneResult:
    model: BertClassifier | GPT2Classifier
    report: dict                              # on the validation set, best weights
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def _pad(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def evaluate(model: BertClassifier | GPT2Classifier, rows, y, pad_id, batch_size=32, features=None) -> tuple[float, dict]:
    """Mean cross-entropy and :func:`classification_report` over encoded rows."""
    losses, preds = [], []
    for s in range(0, len(rows), batch_size):
        if features is not None:
            f = features[s:s + batch_size]
        else:
            ids, mask = _pad(rows[s:s + batch_size], pad_id)
            f, _ = model.features(ids, mask)
        logits, loss, _ = model.head_forward(f, y[s:s + batch_size])
        losses.append(loss * len(f))
        preds.append(logits.argmax(axis=-1))
    pred = np.concatenate(preds)
    return float(sum(losses) / len(rows)), classification_report(y, pred, model.labels)


def new_classifier(encoder: BertModel | GPT2, tokenizer, labels: Sequence[str], pooling: str | None = None,
                   seed: int = 0) -> BertClassifier | GPT2Classifier:
    """A fresh head on a copy of ``encoder``: a BERT encoder pools (mean by
    default), GPT-2 reads its last token and pads with end-of-text."""
    if isinstance(encoder, GPT2):
        if pooling not in (None, *GPT2_POOLINGS):
            raise ValueError(f"GPT-2 classifies from its last token (pooling 'last'); pooling {pooling!r} "
                             f"is for BERT encoders")
        return GPT2Classifier.from_body(encoder, labels, gpt2_pad_token_id(encoder, tokenizer), seed=seed)
    if not isinstance(encoder, BertModel):
        raise TypeError(f"finetune needs a BertModel or a GPT2, got {type(encoder).__name__}")
    if pooling in GPT2_POOLINGS:
        raise ValueError(f"pooling {pooling!r} is GPT-2's; a BERT encoder pools with one of {', '.join(POOLINGS)}")
    return BertClassifier.from_encoder(encoder, labels, pooling or "mean", seed=seed)


def finetune(encoder: BertModel | GPT2, tokenizer, train_texts, train_labels, val_texts=None,
             val_labels=None, cfg: FinetuneConfig | None = None, log=print) -> FinetuneResult:
    """Train a classifier on (text, label) pairs; returns the best model by validation loss.

    ``encoder``: a :class:`BertModel` (with its WordPiece tokenizer) or a
    :class:`GPT2` (with its byte-level BPE tokenizer); see :func:`load_backbone`.
    Texts longer than ``cfg.max_length`` tokens (or the model's context) keep
    their first tokens.
    """
    cfg = (cfg or FinetuneConfig()).validate()
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    train_texts, train_labels = list(train_texts), [str(x) for x in train_labels]
    if val_texts is None:
        order = rng.permutation(len(train_texts))
        n_val = max(1, int(round(cfg.val_fraction * len(train_texts))))
        if n_val >= len(train_texts):
            raise ValueError(f"{len(train_texts)} examples are too few to hold out a validation set")
        val_idx, tr_idx = order[:n_val], order[n_val:]
        val_texts, val_labels = [train_texts[i] for i in val_idx], [train_labels[i] for i in val_idx]
        train_texts, train_labels = [train_texts[i] for i in tr_idx], [train_labels[i] for i in tr_idx]
    val_labels = [str(x) for x in val_labels]
    labels = sorted(set(train_labels) | set(val_labels))
    if len(labels) < 2:
        raise ValueError(f"need at least two classes, got {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    y_tr = np.array([index[x] for x in train_labels])
    y_va = np.array([index[x] for x in val_labels])
    model = new_classifier(encoder, tokenizer, labels, cfg.pooling, seed=cfg.seed)
    max_length = min(cfg.max_length, model.max_positions)
    if isinstance(model, GPT2Classifier):
        model.max_length = max_length                 # saved, so classify truncates the same way
    tr_rows = model.encode_texts(tokenizer, train_texts, max_length)
    va_rows = model.encode_texts(tokenizer, val_texts, max_length)
    pad = model.pad_id(tokenizer)

    if cfg.freeze:                                   # the pretrained body is a fixed feature extractor
        def feats(rows):
            out = []
            for s in range(0, len(rows), 64):
                ids, mask = _pad(rows[s:s + 64], pad)
                out.append(model.features(ids, mask)[0])
            return np.concatenate(out)
        tr_feats, va_feats = feats(tr_rows), feats(va_rows)
        params = model.flat[model.n_body:]        # view: the head only
        opt = AdamW(params, lr=cfg.head_lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                    decay_mask=model.decay_mask()[model.n_body:])
        max_lr = cfg.head_lr
    else:
        tr_feats = va_feats = None
        opt = AdamW(model.flat, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                    decay_mask=model.decay_mask())
        max_lr = cfg.lr
    steps_per_epoch = math.ceil(len(tr_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)

    def lr_at(step):
        if step < warmup:
            return max_lr * (step + 1) / warmup
        return max_lr * max(0.0, (total - step) / max(1, total - warmup))

    best_loss, best_flat, best_epoch, bad, step = math.inf, model.flat.copy(), 0, 0, 0
    history, stopped = [], False
    grads = model.layout.zeros(model.dtype)
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(tr_rows))
        tr_loss, seen = 0.0, 0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            grads[...] = 0.0
            if cfg.freeze:
                _, loss, head_c = model.head_forward(tr_feats[idx], y_tr[idx], train=True, rng=rng)
                model.head_backward(head_c, grads)
                g = grads[model.n_body:]
            else:
                ids, mask = _pad([tr_rows[i] for i in idx], pad)
                _, loss, cache = model.forward(ids, mask, None, y_tr[idx], train=True, rng=rng)
                model.backward(cache, grads)
                g = grads
            if cfg.clip:
                clip_grad_norm(g, cfg.clip)
            opt.step(g, lr=lr_at(step))
            step += 1
            tr_loss += loss * len(idx)
            seen += len(idx)
        va_loss, report = evaluate(model, va_rows, y_va, pad, features=va_feats)
        history.append(dict(epoch=epoch, train_loss=tr_loss / seen, val_loss=va_loss, val_accuracy=report["accuracy"]))
        improved = va_loss < best_loss - 1e-6
        log(f"epoch {epoch}: train loss {tr_loss / seen:.4f}  val loss {va_loss:.4f}  "
            f"val accuracy {report['accuracy']:.4f}" + ("  *" if improved else ""))
        if improved:
            best_loss, best_epoch, bad = va_loss, epoch, 0
            best_flat[...] = model.flat
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped = epoch < cfg.epochs
                log(f"early stop: no better validation loss for {cfg.patience} epoch{'s' if cfg.patience != 1 else ''} "
                    f"(best: epoch {best_epoch})")
                break
    model.flat[...] = best_flat
    _, report = evaluate(model, va_rows, y_va, pad, features=va_feats)
    return FinetuneResult(model, report, history, best_epoch, stopped, time.time() - t0)


def classify(model: BertClassifier | GPT2Classifier, tokenizer, texts: Sequence[str], batch_size: int = 32,
             max_length: int | None = None) -> tuple[list[str], np.ndarray]:
    """Predicted labels and class probabilities (N, L) for ``texts``.

    Truncation (first tokens kept) defaults to the tokenizer's limit for BERT
    and to the training ``max_length`` saved with a GPT-2 classifier.
    """
    default = model.max_length if isinstance(model, GPT2Classifier) else tokenizer.max_length
    max_length = min(max_length or default or model.max_positions, model.max_positions)
    if isinstance(texts, str):
        raise TypeError("classify: texts must be a list of strings, not one string")
    rows = model.encode_texts(tokenizer, texts, max_length)
    probs = np.zeros((len(rows), len(model.labels)), dtype=np.float64)
    for s in range(0, len(rows), batch_size):
        ids, mask = _pad(rows[s:s + batch_size], model.pad_id(tokenizer))
        probs[s:s + batch_size] = model.predict_proba(ids, mask)
    return [model.labels[i] for i in probs.argmax(axis=1)], probs


def config_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)
