"""The training recipe in one page.

AdamW (or SGD with momentum) with decoupled weight decay on matrices only,
linear warmup then cosine decay, global-norm clipping, gradient
accumulation, periodic validation, atomic checkpoints, JSON-lines metrics,
and exact resume: the optimizer moments, the step, the random
generator's state and the learning-rate schedule's horizon are all saved,
so a resumed run repeats the uninterrupted one loss for loss.

Resume semantics: the model's shape, tokenizer, task, optimizer and seed
come from the checkpoint (a conflicting setting is refused, not ignored);
the schedule keeps its saved horizon (``schedule_steps``), so resuming with
a larger ``max_steps`` trains the extra steps at ``min_lr`` unless
``extend_schedule`` stretches the cosine to the new ``max_steps``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from numformer import checkpoint
from numformer.data import DataError, TokenSplits, default_corpus, read_text_file, unigram_baseline
from numformer.fileio import atomic_write_text
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.optim import SGD, AdamW, clip_grad_norm, cosine_schedule
from numformer.tokenizers import EOT_TOKEN, ByteBPETokenizer, CharTokenizer
# The settings live in train_settings; these names stay importable from here.
from numformer.train_settings import (CHOICES, SettingError, TrainConfig,  # noqa: F401
                                       check_settings, check_type)

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    model: GPT2
    tokenizer: object
    losses: list = field(default_factory=list)        # (step, train loss)
    val_losses: list = field(default_factory=list)    # (step, val loss)
    baseline: float | None = None                     # unigram validation cross-entropy
    seconds: float = 0.0
    start_step: int = 0                               # the checkpoint's step (0 for a new run)
    end_step: int = 0                                 # the step reached; == start_step: nothing was trained


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


def schedule_horizon(cfg: TrainConfig) -> int:
    """Steps of the warmup + cosine schedule: ``schedule_steps``, by default ``max_steps``."""
    return cfg.schedule_steps if cfg.schedule_steps is not None else cfg.max_steps


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Warmup + cosine over ``schedule_horizon(cfg)`` steps, then ``min_lr``; a warmup longer
    than the schedule is cut to the schedule's length."""
    horizon = schedule_horizon(cfg)
    return cosine_schedule(step, max_lr=cfg.lr, min_lr=cfg.min_lr,
                           warmup_steps=min(cfg.warmup_steps, horizon), total_steps=horizon)


def evaluate(model: GPT2, data, cfg: TrainConfig) -> float:
    """Mean validation loss over ``eval_batches`` batches that are the same at every evaluation."""
    rng = np.random.default_rng(cfg.seed + 1)
    losses = [model.forward(*data.batch(rng, cfg.batch_size, "val"))[1] for _ in range(cfg.eval_batches)]
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, log=print, stop_after: int | None = None,
          extend_schedule: bool = False) -> TrainResult:
    """Train (or resume training) a GPT as ``cfg`` says; returns the model and its losses.

    Resuming continues the run in ``cfg.out`` exactly: the model's shape, the
    tokenizer, the task, the optimizer and the seed are the checkpoint's (a
    ``cfg`` that differs in any of them is refused with :class:`ResumeError`),
    and the learning-rate schedule keeps its saved horizon. So a run resumed
    to the ``max_steps`` it was started with equals the uninterrupted run
    bit for bit; a larger ``max_steps`` trains the extra steps at ``min_lr``,
    unless ``extend_schedule`` stretches the schedule to the new ``max_steps``
    (``cfg.schedule_steps`` must then be None or equal to it). A checkpoint
    already at ``max_steps`` or beyond trains nothing and says so
    (``result.end_step == result.start_step``).

    ``stop_after`` ends the run early after that step, as an interruption
    would (the schedule still runs to ``max_steps``): it lets tests check
    that a resumed run repeats the uninterrupted one.
    """
    cfg = replace(cfg).validate()                    # a copy: the schedule horizon is filled in below
    dtype = np.dtype(cfg.dtype)
    ckpt_dir = os.path.join(cfg.out, checkpoint.CHECKPOINT_DIR)
    metrics_path = os.path.join(cfg.out, METRICS_FILE)
    start_step, rng, metrics = 0, np.random.default_rng(cfg.seed), []

    if resume:
        checkpoint.resolve(ckpt_dir, recover=True, log=log)     # a save killed mid-swap: put the newest copy back
        opt_state, state = checkpoint.load_training_state(ckpt_dir)
        model = checkpoint.load_model(ckpt_dir, dtype=dtype)
        saved = state.get("train_config") or {}
        _check_resume(cfg, model.cfg, saved, ckpt_dir, extend_schedule, log)
        start_step = int(state["step"])
        if start_step >= cfg.max_steps:
            log(f"nothing to train: the checkpoint {ckpt_dir} is already at step {start_step} "
                f"and --max-steps is {cfg.max_steps}; give a larger --max-steps to train further")
            result = TrainResult(model, checkpoint.load_tokenizer(ckpt_dir), start_step=start_step,
                                 end_step=start_step)
            return _with_history(result, _read_metrics(metrics_path, up_to_step=start_step, log=log))
        metrics = _read_metrics(metrics_path, up_to_step=start_step, log=log)
        tokenizer, data, baseline = build_data(cfg, checkpoint.load_tokenizer(ckpt_dir), log)
        if cfg.dropout != model.cfg.dropout:                      # the one model setting a resume may change
            model.cfg = replace(model.cfg, dropout=cfg.dropout)
        optimizer = make_optimizer(cfg, model)
        optimizer.load_state_dict(opt_state)
        rng.bit_generator.state = state["rng_state"]
        log(f"resuming from step {start_step} of {cfg.max_steps} ({ckpt_dir})")
    else:
        if extend_schedule:
            raise ResumeError("extend_schedule (--extend-schedule) only applies when resuming a run")
        tokenizer, data, baseline = build_data(cfg, None, log)
        if cfg.task:                     # the task fixes the context length; record the one used
            cfg.block_size = data.block_size
        if cfg.schedule_steps is None:
            cfg.schedule_steps = cfg.max_steps
        model = GPT2.init(model_config(cfg, tokenizer.vocab_size, cfg.block_size), seed=cfg.seed, dtype=dtype)
        optimizer = make_optimizer(cfg, model)
        os.makedirs(cfg.out, exist_ok=True)
    _write_metrics(metrics_path, metrics)

    log(f"model: {model.num_params:,} parameters, {plural(model.cfg.n_layer, 'layer')}, "
        f"{plural(model.cfg.n_head, 'head')}, width {model.cfg.n_embd}, context {model.cfg.n_positions}, "
        f"vocab {tokenizer.vocab_size}")
    if baseline is not None:
        log(f"unigram baseline (validation cross-entropy): {baseline:.4f} nats/token")

    result = _with_history(TrainResult(model, tokenizer, baseline=baseline, start_step=start_step,
                                       end_step=start_step), metrics)
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
        result.end_step = step + 1
        if bar is not None:
            post = {"loss": f"{loss:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if result.val_losses:
                post["val"] = f"{result.val_losses[-1][1]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if "val_loss" in row:
            _save(cfg, model, tokenizer, optimizer, rng, step + 1, ckpt_dir)
            line = f"step {step + 1}: train loss {loss:.4f}, val loss {row['val_loss']:.4f}"
            if bar is None:
                log(line)
            else:                    # a line of its own too (a redirected log has no bar), drawn above the bar
                with bar.external_write_mode():
                    log(line)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t_start
    return result


def plural(n: int, noun: str) -> str:
    """'1 layer', '2 layers'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class ResumeError(ValueError):
    """A resume whose settings conflict with the checkpoint it continues."""


# settings a resumed run takes from its checkpoint's saved training settings
_FROM_CHECKPOINT = ("tokenizer", "vocab_size", "task", "optimizer", "seed")


def _checkpoint_shape(model_cfg, task) -> dict:
    """The shape settings a checkpoint's model config fixes (a task's context is the task's)."""
    shape = {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd}
    if not task:
        shape["block_size"] = model_cfg.n_positions
    return shape


def _check_resume(cfg: TrainConfig, model_cfg, saved: dict, ckpt_dir: str, extend_schedule: bool, log) -> None:
    """Refuse settings that a resumed run cannot honour; fix the schedule's horizon.

    The shape comes from the checkpoint's model config (the truth, even if an
    older trainer_state.json recorded a flag that was never applied); the
    tokenizer, task, optimizer and seed from its saved training settings.
    """
    shape = _checkpoint_shape(model_cfg, cfg.task or saved.get("task"))
    conflicts = [(name, getattr(cfg, name), value) for name, value in shape.items() if getattr(cfg, name) != value]
    for name in _FROM_CHECKPOINT:
        if name in saved and getattr(cfg, name) != saved[name]:
            if name == "vocab_size" and saved.get("tokenizer") != "bpe":
                continue                                       # only a BPE tokenizer has a trained vocab size
            conflicts.append((name, getattr(cfg, name), saved[name]))
    if conflicts:
        listed = "; ".join(f"--{n.replace('_', '-')} {mine!r} but the checkpoint has {theirs!r}"
                           for n, mine, theirs in conflicts)
        raise ResumeError(f"cannot resume {ckpt_dir} with different settings: {listed}. A resumed run keeps "
                          "the checkpoint's model shape, tokenizer, task, optimizer and seed; leave these "
                          "flags out (or give the checkpoint's values), or start a new run with --out")
    for name, value in shape.items():                          # record the shape actually trained
        setattr(cfg, name, value)
    horizon = saved.get("schedule_steps") or saved.get("max_steps") or cfg.max_steps
    if extend_schedule:
        if cfg.schedule_steps is not None and cfg.schedule_steps != cfg.max_steps:
            raise ResumeError(f"--extend-schedule stretches the schedule to --max-steps ({cfg.max_steps}); "
                              f"--schedule-steps {cfg.schedule_steps} contradicts it (leave it out)")
        if cfg.max_steps != horizon:
            log(f"extending the learning-rate schedule from {horizon} to {cfg.max_steps} steps "
                f"(warmup + cosine recomputed over {cfg.max_steps} steps; the run no longer matches "
                f"an uninterrupted {horizon}-step run)")
        cfg.schedule_steps = cfg.max_steps
        return
    if cfg.schedule_steps is not None and cfg.schedule_steps != horizon:
        raise ResumeError(f"--schedule-steps {cfg.schedule_steps} conflicts with the checkpoint's schedule of "
                          f"{horizon} steps; a resumed run continues its schedule (use --extend-schedule "
                          "to stretch it to --max-steps)")
    cfg.schedule_steps = horizon
    if cfg.max_steps > horizon:
        log(f"note: the learning-rate schedule ends at step {horizon} (the checkpoint's); steps "
            f"{horizon + 1}-{cfg.max_steps} train at --min-lr {cfg.min_lr:g} (add --extend-schedule to "
            f"stretch the schedule to {cfg.max_steps} steps instead)")


def resume_settings(path: str, log=None) -> tuple[str, dict]:
    """(run folder, saved settings) of the run to resume at ``path`` (a run folder or its
    ``checkpoint/``). A checkpoint lost mid-save is recovered first. The model's shape is
    taken from its config.json, which is what the weights have."""
    kwargs = {} if log is None else {"log": log}
    folder = checkpoint.resolve(path, recover=True, **kwargs)
    if not os.path.exists(os.path.join(folder, checkpoint.MODEL_FILE)):
        raise checkpoint.CheckpointError(f"{path!r} holds no checkpoint to resume (neither a "
                                         f"{checkpoint.CHECKPOINT_DIR}/ folder nor {checkpoint.MODEL_FILE})")
    if os.path.basename(os.path.normpath(os.path.abspath(folder))) != checkpoint.CHECKPOINT_DIR:
        raise checkpoint.CheckpointError(f"{folder!r} is not a training run's {checkpoint.CHECKPOINT_DIR}/ "
                                         "folder; resume the run folder that holds it")
    _, state = checkpoint.load_training_state(folder)
    saved = dict(state.get("train_config") or {})
    saved.update(_checkpoint_shape(checkpoint.load_config(folder), saved.get("task")))
    if "schedule_steps" not in saved and "max_steps" in saved:      # saved before the horizon was stored
        saved["schedule_steps"] = saved["max_steps"]
    run_dir = os.path.dirname(os.path.abspath(folder))
    saved["out"] = run_dir
    return run_dir, saved


def _save(cfg, model, tokenizer, optimizer, rng, step, ckpt_dir):
    state = {"step": step, "rng_state": rng.bit_generator.state, "train_config": asdict(cfg)}
    checkpoint.save(ckpt_dir, model, tokenizer, optimizer.state_dict(), state)


def _progress_bar(cfg: TrainConfig, start_step: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- metrics


def _read_metrics(path: str, up_to_step: int, log=print) -> list[dict]:
    """Rows of an earlier run up to the checkpoint's step (later rows were never saved).

    A last line without its newline that is not valid JSON was cut short by a
    kill mid-write: it is dropped and reported. Any other malformed line is a
    :class:`~numformer.checkpoint.CheckpointError` naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)                  # the last line has no newline after it
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as exc:    # bad UTF-8 or JSON, huge ints, deep nesting
            if torn:
                log(f"warning: {path}, line {number}: dropped a half-written last line "
                    f"({len(line)} bytes; the run was stopped while writing it)")
                break
            raise checkpoint.CheckpointError(f"{path}, line {number}: not a valid JSON line ({exc}); "
                                             "fix or delete that line to resume") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)):
            raise checkpoint.CheckpointError(f"{path}, line {number}: expected an object with an integer "
                                             f"\"step\", got {line[:80].decode('utf-8', 'replace')!r}")
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows


def _with_history(result: TrainResult, rows: list[dict]) -> TrainResult:
    """``result`` with the (step, loss) and (step, val_loss) pairs of the metrics ``rows``."""
    result.losses = [(m["step"], m["loss"]) for m in rows if "loss" in m]
    result.val_losses = [(m["step"], m["val_loss"]) for m in rows if "val_loss" in m]
    return result


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
