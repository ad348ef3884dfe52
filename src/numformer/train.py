"""The training recipe in one page.

AdamW (or SGD with momentum) with decoupled weight decay on matrices only,
linear warmup then cosine decay, global-norm clipping, gradient
accumulation, periodic validation, atomic checkpoints, JSON-lines metrics,
and exact resume: the optimizer moments, the step and the random
generator's state are all saved, so a resumed run repeats the
uninterrupted one loss for loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from numformer import checkpoint
from numformer.data import DataError, TokenSplits, default_corpus, read_text_file, unigram_baseline
from numformer.fileio import atomic_write_text
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.optim import SGD, AdamW, clip_grad_norm, cosine_schedule
from numformer.tokenizers import EOT_TOKEN, ByteBPETokenizer, CharTokenizer

METRICS_FILE = "metrics.jsonl"


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
        """Raise ValueError naming the first nonsensical setting."""
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                    "max_steps", "eval_interval", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_samples", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"--tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"--vocab-size must be at least 257 for byte-level BPE, got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.task is not None:
            from numformer.tasks import TASKS
            if self.task not in TASKS:
                raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    model: GPT2
    tokenizer: object
    losses: list = field(default_factory=list)        # (step, train loss)
    val_losses: list = field(default_factory=list)    # (step, val loss)
    baseline: float | None = None                     # unigram validation cross-entropy
    seconds: float = 0.0


# ----------------------------------------------------------------------------- data


def build_data(cfg: TrainConfig, tokenizer=None, log=print):
    """-> (tokenizer, data source with ``.batch(rng, B, split)``, unigram baseline or None)."""
    if cfg.task is not None:
        from numformer.tasks import TASKS

        task = TASKS[cfg.task]()
        return task.tokenizer, task, None
    if cfg.data is None:
        docs = default_corpus()
        text = EOT_TOKEN.join(docs)
    else:
        text = read_text_file(cfg.data)
    if tokenizer is None:
        if cfg.tokenizer == "char":
            tokenizer = CharTokenizer.train(text)
        else:
            log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) ...")
            tokenizer = ByteBPETokenizer.train(text, cfg.vocab_size, progress=cfg.progress)
    try:
        tokens = np.array(tokenizer.encode(text, allowed_special=True), dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"the data cannot be encoded with this checkpoint's tokenizer: {exc}") from None
    splits = TokenSplits(tokens, cfg.block_size, cfg.val_fraction)
    baseline = unigram_baseline(splits.train, splits.val, tokenizer.vocab_size)
    return tokenizer, splits, baseline


def model_config(cfg: TrainConfig, vocab_size: int, block_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout).validate()


def make_optimizer(cfg: TrainConfig, model: GPT2):
    mask = model.decay_mask(cfg.decay_embeddings)
    if cfg.optimizer == "adamw":
        return AdamW(model.flat, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                     weight_decay=cfg.weight_decay, decay_mask=mask)
    return SGD(model.flat, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               decay_mask=mask)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Warmup + cosine; a warmup longer than the run is cut to the run's length."""
    return cosine_schedule(step, max_lr=cfg.lr, min_lr=cfg.min_lr,
                           warmup_steps=min(cfg.warmup_steps, cfg.max_steps), total_steps=cfg.max_steps)


def evaluate(model: GPT2, data, cfg: TrainConfig) -> float:
    """Mean validation loss over ``eval_batches`` batches that are the same at every evaluation."""
    rng = np.random.default_rng(cfg.seed + 1)
    losses = [model.forward(*data.batch(rng, cfg.batch_size, "val"))[1] for _ in range(cfg.eval_batches)]
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, log=print, stop_after: int | None = None) -> TrainResult:
    """Train (or resume training) a GPT as ``cfg`` says; returns the model and its losses.

    ``stop_after`` ends the run early after that step, as an interruption
    would (the schedule still runs to ``max_steps``): it lets tests check
    that a resumed run repeats the uninterrupted one.
    """
    cfg.validate()
    dtype = np.dtype(cfg.dtype)
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    metrics_path = os.path.join(cfg.out, METRICS_FILE)
    start_step, rng, metrics = 0, np.random.default_rng(cfg.seed), []

    if resume:
        model = checkpoint.load_model(ckpt_dir, dtype=dtype)
        tokenizer, data, baseline = build_data(cfg, checkpoint.load_tokenizer(ckpt_dir), log)
        opt_state, state = checkpoint.load_training_state(ckpt_dir)
        optimizer = make_optimizer(cfg, model)
        optimizer.load_state_dict(opt_state)
        start_step = int(state["step"])
        rng.bit_generator.state = state["rng_state"]
        metrics = _read_metrics(metrics_path, up_to_step=start_step)
        log(f"resuming from step {start_step} of {cfg.max_steps} ({ckpt_dir})")
    else:
        tokenizer, data, baseline = build_data(cfg, None, log)
        block = data.block_size if cfg.task else cfg.block_size
        model = GPT2.init(model_config(cfg, tokenizer.vocab_size, block), seed=cfg.seed, dtype=dtype)
        optimizer = make_optimizer(cfg, model)
        os.makedirs(cfg.out, exist_ok=True)
    _write_metrics(metrics_path, metrics)

    log(f"model: {model.num_params:,} parameters, {cfg.n_layer} layers, {cfg.n_head} heads, "
        f"width {cfg.n_embd}, context {model.cfg.n_positions}, vocab {tokenizer.vocab_size}")
    if baseline is not None:
        log(f"unigram baseline (validation cross-entropy): {baseline:.4f} nats/token")

    result = TrainResult(model, tokenizer, baseline=baseline)
    result.losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    result.val_losses = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model.cfg.n_positions
    bar = _progress_bar(cfg, start_step)
    t_start = time.perf_counter()
    grads = model.layout.zeros(dtype)
    last_step = cfg.max_steps if stop_after is None else min(stop_after, cfg.max_steps)
    for step in range(start_step, last_step):
        t0 = time.perf_counter()
        lr = learning_rate(cfg, step)
        grads[...] = 0
        loss = 0.0
        for _ in range(cfg.grad_accum):          # average of micro-batch gradients
            x, y = data.batch(rng, cfg.batch_size, "train")
            _, micro_loss, cache = model.forward(x, y, train=True, rng=rng, reuse_logits=True)
            model.backward(cache, grads=grads, dloss=1.0 / cfg.grad_accum)
            loss += micro_loss / cfg.grad_accum
        norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip > 0 else float(np.linalg.norm(grads))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"training diverged at step {step + 1} (loss {loss}, gradient norm "
                                     f"{norm}); lower --lr or resume from the last checkpoint")
        optimizer.step(grads, lr=lr)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
               "tokens_per_s": round(tokens_per_step / dt, 1)}
        result.losses.append((step + 1, loss))
        done = step + 1 == last_step
        if (step + 1) % cfg.eval_interval == 0 or done:
            row["val_loss"] = evaluate(model, data, cfg)
            result.val_losses.append((step + 1, row["val_loss"]))
        _append_metric(metrics_path, row)
        if bar is not None:
            post = {"loss": f"{loss:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if result.val_losses:
                post["val"] = f"{result.val_losses[-1][1]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if "val_loss" in row:
            _save(cfg, model, tokenizer, optimizer, rng, step + 1, ckpt_dir)
            if bar is None:
                log(f"step {step + 1}: train loss {loss:.4f}, val loss {row['val_loss']:.4f}")
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t_start
    return result


def _save(cfg, model, tokenizer, optimizer, rng, step, ckpt_dir):
    state = {"step": step, "rng_state": rng.bit_generator.state, "train_config": asdict(cfg)}
    checkpoint.save(ckpt_dir, model, tokenizer, optimizer.state_dict(), state)


def _progress_bar(cfg: TrainConfig, start_step: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- metrics


def _read_metrics(path: str, up_to_step: int) -> list[dict]:
    """Rows of an earlier run up to the checkpoint's step (later rows were never saved)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("step", 0) <= up_to_step:
                    rows.append(row)
    return rows


def _write_metrics(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _append_metric(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(result: TrainResult, path: str) -> bool:
    """Write a loss-curve PNG if matplotlib is installed; return whether it did."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if result.losses:
        steps, losses = zip(*result.losses)
        ax.plot(steps, losses, lw=0.8, label="train")
    if result.val_losses:
        steps, losses = zip(*result.val_losses)
        ax.plot(steps, losses, "o-", label="validation")
    if result.baseline is not None:
        ax.axhline(result.baseline, ls="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
