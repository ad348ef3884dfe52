"""Fine-tuning a BERT encoder for text classification, and using the result.

    features = pool(encoder(ids, mask))            (B, C)   mean over real tokens | [CLS] | tanh pooler
    logits   = drop(features) · Wᵀ + b            (B, L)   ``classifier.weight`` (L, C), as HF
    loss     = cross_entropy(logits, labels)

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

from numformer.models.bert import BertConfig, BertModel, load_bert, param_shapes
from numformer.ops import cross_entropy, dense, dropout
from numformer.optim import AdamW, clip_grad_norm
from numformer.params import ParamLayout
from numformer.sentence import mean_pool_backward, mean_pool_forward
from numformer.tokenizers.wordpiece import WordPieceTokenizer, load_wordpiece

POOLINGS = ("mean", "cls", "pooler")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


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
            except json.JSONDecodeError as e:
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
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
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

class BertClassifier:
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
        self.flat = self.layout.zeros(dtype) if flat is None else flat
        if self.flat.shape != (self.layout.size,):
            raise ValueError(f"parameter buffer has {self.flat.size} values, the model needs {self.layout.size}")
        self.n_encoder = ParamLayout(enc_shapes).size
        self.encoder = BertModel(cfg, self.flat[:self.n_encoder], pooler=pooler)   # a view: shares memory
        self.params = self.layout.views(self.flat)

    @property
    def cfg(self) -> BertConfig:
        return self.encoder.cfg

    @property
    def dtype(self):
        return self.flat.dtype

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

    def forward(self, ids, mask, tt=None, labels=None, *, train=False, rng=None):
        f, feat_c = self.features(ids, mask, tt, train=train, rng=rng)
        logits, loss, head_c = self.head_forward(f, labels, train=train, rng=rng)
        return logits, loss, (feat_c, head_c)

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

    def predict_proba(self, ids, mask, tt=None) -> np.ndarray:
        logits, _, _ = self.forward(ids, mask, tt)
        z = logits - logits.max(axis=-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- save / load

def save_classifier(model: BertClassifier, folder: str | os.PathLike, tokenizer_from: str | None = None,
                    tokenizer: WordPieceTokenizer | None = None) -> None:
    """A ``BertForSequenceClassification`` folder: config.json, model.safetensors, tokenizer files."""
    from numformer import safetensors
    from numformer.fileio import atomic_open

    folder = os.fspath(folder)
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


def load_classifier(folder: str | os.PathLike, dtype=np.float32) -> tuple[BertClassifier, WordPieceTokenizer]:
    """Read a folder written by :func:`save_classifier` (or by transformers'
    ``BertForSequenceClassification``, which pools with the tanh pooler)."""
    from numformer import safetensors
    from numformer.tokenizers import load_tokenizer

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    encoder = load_bert(folder, dtype=dtype)
    with open(cfg_path, "rb") as f:
        raw = json.loads(f.read().decode("utf-8"))
    id2label = raw.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f"{cfg_path}: no id2label: not a sequence-classification model")
    try:
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise ValueError(f"{cfg_path}: id2label keys must be 0..N-1") from None
    pooling = (raw.get("numformer") or {}).get("pooling", "pooler")
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


# ----------------------------------------------------------------------------- training

@dataclass
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-5                 # encoder + head; a frozen encoder's head uses head_lr
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1        # linear warmup, then linear decay to 0 (as HF Trainer)
    max_length: int = 128
    pooling: str = "mean"
    freeze: bool = False
    patience: int = 2                # epochs without a better validation loss before stopping
    val_fraction: float = 0.2        # held out from the training file when no validation file is given
    clip: float = 1.0
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        for name in ("epochs", "batch_size", "max_length", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")
        return self


@dataclass
class FinetuneResult:
    model: BertClassifier
    report: dict                              # on the validation set, best weights
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def _encode(tokenizer, texts, max_length):
    return [tokenizer.encode(t, max_length=max_length) for t in texts]


def _pad(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def evaluate(model: BertClassifier, rows, y, pad_id, batch_size=32, features=None) -> tuple[float, dict]:
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


def finetune(encoder: BertModel, tokenizer: WordPieceTokenizer, train_texts, train_labels, val_texts=None,
             val_labels=None, cfg: FinetuneConfig | None = None, log=print) -> FinetuneResult:
    """Train a classifier on (text, label) pairs; returns the best model by validation loss."""
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
    max_length = min(cfg.max_length, encoder.cfg.max_position_embeddings)
    tr_rows, va_rows = _encode(tokenizer, train_texts, max_length), _encode(tokenizer, val_texts, max_length)
    model = BertClassifier.from_encoder(encoder, labels, cfg.pooling, seed=cfg.seed)
    pad = tokenizer.pad_id

    if cfg.freeze:                                   # the encoder is a fixed feature extractor
        def feats(rows):
            out = []
            for s in range(0, len(rows), 64):
                ids, mask = _pad(rows[s:s + 64], pad)
                out.append(model.features(ids, mask)[0])
            return np.concatenate(out)
        tr_feats, va_feats = feats(tr_rows), feats(va_rows)
        params = model.flat[model.n_encoder:]        # view: the head only
        opt = AdamW(params, lr=cfg.head_lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                    decay_mask=model.decay_mask()[model.n_encoder:])
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
                g = grads[model.n_encoder:]
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
                log(f"early stop: no better validation loss for {cfg.patience} epochs (best: epoch {best_epoch})")
                break
    model.flat[...] = best_flat
    _, report = evaluate(model, va_rows, y_va, pad, features=va_feats)
    return FinetuneResult(model, report, history, best_epoch, stopped, time.time() - t0)


def classify(model: BertClassifier, tokenizer: WordPieceTokenizer, texts: Sequence[str], batch_size: int = 32,
             max_length: int | None = None) -> tuple[list[str], np.ndarray]:
    """Predicted labels and class probabilities (N, L) for ``texts``."""
    max_length = min(max_length or tokenizer.max_length or model.cfg.max_position_embeddings,
                     model.cfg.max_position_embeddings)
    if isinstance(texts, str):
        raise TypeError("classify: texts must be a list of strings, not one string")
    rows = _encode(tokenizer, texts, max_length)
    probs = np.zeros((len(rows), len(model.labels)), dtype=np.float64)
    for s in range(0, len(rows), batch_size):
        ids, mask = _pad(rows[s:s + batch_size], tokenizer.pad_id)
        probs[s:s + batch_size] = model.predict_proba(ids, mask)
    return [model.labels[i] for i in probs.argmax(axis=1)], probs


def config_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)
