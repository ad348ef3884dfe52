"""The ``numformer`` command line.

    numformer train [--config FILE] [--data FILE] [--out DIR] [--resume DIR] [--n-layer N ...]
    numformer sample --checkpoint DIR [--prompt TEXT ... | --prompts-file FILE] [--stream]
                     [--max-new-tokens N --temperature T --top-k K --top-p P --seed S --num-samples N]
    numformer quantize --checkpoint IN --out OUT [--float-head]
    numformer tokenize --tokenizer PATH TEXT
    numformer gradcheck
    numformer bench [--quick] [--filter TEXT] [--threads N] [--json PATH] [--out DIR]
    numformer tokenizer train [--data FILE] --vocab-size N --out FILE
    numformer embed --model DIR [--input FILE] [--output FILE.npy] [TEXT ...]
    numformer finetune --model DIR --train FILE [--val FILE] --out DIR [--freeze --epochs N ...]   (BERT or GPT-2)
    numformer classify --model DIR [--input FILE] [TEXT ...]
    numformer serve --checkpoint DIR [--host 127.0.0.1 --port 8000 --model-name NAME --api-key KEY]

User mistakes (bad flags, unreadable data, broken checkpoints) print one
``numformer: error: ...`` line and exit with status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import typing

from numformer.checkpoint import CheckpointError
from numformer.data import DataError

USER_ERRORS = (ValueError, DataError, CheckpointError, FileNotFoundError, IsADirectoryError,
               PermissionError, FloatingPointError)


class UserError(Exception):
    """A mistake in how the command was called."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (UserError, *USER_ERRORS) as exc:
        print(f"numformer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numformer: interrupted", file=sys.stderr)
        return 130


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default the
    help does not already state (argparse's ArgumentDefaultsHelpFormatter also adds
    "(default: None)" and repeats defaults written into the text)."""

    @staticmethod
    def _shows_default(action) -> bool:
        text = action.help or ""
        default = action.default
        return not ("(default" in text or "%(default)" in text or not action.option_strings
                    or text is argparse.SUPPRESS or default is None or default is False or default == []
                    or default is argparse.SUPPRESS)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text.strip() else "(default: %(default)s)"

    def _format_action(self, action):
        if not (action.help or "").strip() and self._shows_default(action):   # argparse skips empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Every numformer (sub)command parser: the same help formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="numformer",
                     description="numformer: Transformers in NumPy. Train and sample a small GPT, quantize, "
                                 "serve, embed and fine-tune; 'numformer COMMAND --help' for each command.")
    sub = parser.add_subparsers(metavar="COMMAND")
    _add_train(sub)
    _add_sample(sub)
    _add_quantize(sub)
    _add_bench(sub)
    _add_tokenize(sub)
    _add_embed(sub)
    _add_finetune(sub)
    _add_serve(sub)
    p = sub.add_parser("gradcheck", help="finite-difference checks of every backward pass (float64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_gradcheck)
    tok_parser = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_parser.set_defaults(run=lambda args: tok_parser.print_help() or 2)    # no ACTION: its own help
    tok = tok_parser.add_subparsers(metavar="ACTION")
    p = tok.add_parser("train", help="train a tokenizer on a text file (default: Python's docs)")
    p.add_argument("--data", help="UTF-8 text file (default: pydoc topics)")
    p.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary size (default: 512; a char tokenizer's is the data's characters)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.set_defaults(run=run_tokenizer_train)
    return parser


# ----------------------------------------------------------------------------- train


# One line per `numformer train` setting (the flag --NAME-WITH-DASHES); the default and the
# choices are appended from TrainConfig.
TRAIN_HELP = {
    "data": "UTF-8 text file to train on (default: Python's pydoc topics, no download)",
    "task": "a synthetic task instead of text (brings its own tokenizer, context and tuned settings)",
    "out": "output folder: checkpoint/, metrics.jsonl, loss.png",
    "tokenizer": "character-level or byte-level BPE trained on the data",
    "vocab_size": "BPE vocabulary size (BPE only)",
    "n_layer": "Transformer blocks",
    "n_head": "attention heads per block (must divide --n-embd)",
    "n_embd": "model width",
    "block_size": "context length in tokens",
    "dropout": "dropout rate on the embeddings and residual branches",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "train up to this step (with --resume: the total, counting the checkpoint's steps)",
    "schedule_steps": "length of the warmup + cosine learning-rate schedule; after it the rate stays at "
                      "--min-lr (default: --max-steps; a resumed run keeps its checkpoint's)",
    "optimizer": "AdamW or SGD with momentum",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "decoupled weight decay (matrices only)",
    "decay_embeddings": "also decay the embedding matrices",
    "beta1": "AdamW first-moment decay",
    "beta2": "AdamW second-moment decay",
    "momentum": "SGD momentum",
    "grad_clip": "global gradient-norm clip (0 disables it)",
    "eval_interval": "validate and save a checkpoint every this many steps",
    "eval_batches": "validation batches per evaluation",
    "val_fraction": "fraction of the tokens held out for validation",
    "seed": "random seed (initialization, batches, dropout)",
    "dtype": "floating-point type of the parameters",
    "num_samples": "texts to sample after training",
    "sample_tokens": "tokens per sample",
    "temperature": "sampling temperature",
    "top_k": "sample from the k most likely tokens",
    "progress": "draw a progress bar",
}


def _add_train(sub) -> None:
    from numformer.train import CHOICES, TrainConfig

    p = sub.add_parser("train", help="train a small GPT (default: on Python's own docs)",
                       description="Train a small GPT. Settings come from the defaults, then the saved run "
                                   "(--resume), then --config, then the flags.")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings, named as the flags "
                                                     "with underscores (n_layer = 2); flags override it")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run saved in DIR: its model shape, tokenizer, task, optimizer, seed "
                        "and learning-rate schedule are kept (a conflicting flag is an error)")
    p.add_argument("--extend-schedule", action="store_true",
                   help="with --resume and a larger --max-steps: stretch the warmup + cosine schedule to the "
                        "new --max-steps (the learning rate jumps to that longer schedule's value) instead of "
                        "training the extra steps at --min-lr")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = TRAIN_HELP[f.name]
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {'on' if f.default else 'off'})")
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        choices = CHOICES.get(f.name)
        if f.name == "task":
            from numformer.tasks import TASKS

            choices = tuple(TASKS)
        if f.default is not None and "(default:" not in text:
            text += f" (default: {f.default})"
        metavar = None if choices else {"data": "FILE", "out": "DIR", int: "N", float: "X"}.get(
            f.name, {int: "N", float: "X"}.get(base, "TEXT"))
        p.add_argument(flag, type=base, default=None, choices=choices, metavar=metavar, help=text)
    p.set_defaults(run=run_train)


def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            settings = tomllib.loads(raw.decode("utf-8"))
        else:
            settings = json.loads(raw)
    except Exception as exc:
        raise UserError(f"config file {path!r} could not be parsed: {exc}") from None
    if not isinstance(settings, dict):
        raise UserError(f"config file {path!r} must hold a table of settings (name: value), "
                        f"not a {type(settings).__name__}")
    return settings


def _train_config(args):
    """defaults < saved run (resume) < config file < explicit flags; returns a validated TrainConfig.

    An error about a setting names where its value came from (the flag, the
    config file, or the checkpoint's saved settings)."""
    from numformer.train import SettingError, TrainConfig, check_settings, resume_settings

    settings: dict = {}
    origin: dict = {}                                   # setting -> file its value came from (None: a flag)
    if args.resume and args.out is not None:
        raise UserError("--out cannot be combined with --resume (the run continues in its own folder)")
    if args.extend_schedule and not args.resume:
        raise UserError("--extend-schedule only applies with --resume")
    if args.extend_schedule and args.schedule_steps is not None:
        raise UserError("--extend-schedule stretches the schedule to --max-steps; leave --schedule-steps out")
    if args.resume:
        run_dir, saved = resume_settings(args.resume)
        check_settings({k: v for k, v in saved.items() if k != "out"},
                       os.path.join(run_dir, "checkpoint", "trainer_state.json"))
        settings.update(saved)
        origin.update(dict.fromkeys(saved, os.path.join(run_dir, "checkpoint", "trainer_state.json")))
        if args.extend_schedule:
            settings.pop("schedule_steps", None)
    explicit: dict = {}
    if args.config:
        from_file = _load_config_file(args.config)
        check_settings(from_file, args.config)
        if args.resume and "out" in from_file and os.path.abspath(from_file["out"]) != settings["out"]:
            raise UserError(f"{args.config}: 'out' cannot be combined with --resume (the run continues in "
                            f"its own folder, {settings['out']})")
        explicit.update(from_file)
        origin.update(dict.fromkeys(from_file, args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            explicit[f.name] = value
            origin[f.name] = None
    settings.update(explicit)
    if settings.get("task"):
        _check_task_settings(settings["task"], explicit, origin)
    elif explicit.get("vocab_size") is not None and settings.get("tokenizer", "char") == "char" \
            and not args.resume:
        where = "--vocab-size" if origin.get("vocab_size") is None else f"'vocab_size' in {origin['vocab_size']}"
        raise UserError(f"{where} applies to --tokenizer bpe only (a char tokenizer has one id per character "
                        "of the data); add --tokenizer bpe or leave it out")
    if settings.get("task") and not args.resume:        # a task brings its own tuned defaults
        from numformer.tasks import TASKS

        if settings["task"] in TASKS:
            settings = {**TASKS[settings["task"]].recommended_settings(), **settings}
    try:
        return TrainConfig.from_dict(settings, source=args.config or "settings").validate()
    except SettingError as exc:
        if exc.source is None and origin.get(exc.name):
            raise SettingError(exc.name, exc.problem, origin[exc.name]) from None
        raise


def _check_task_settings(task: str, explicit: dict, origin: dict) -> None:
    """A synthetic task brings its own data, tokenizer and context: refuse settings it would ignore."""
    from numformer.tasks import TASKS

    if task not in TASKS:
        return                                         # validate() names the valid tasks
    ignored = [n for n in ("data", "tokenizer", "vocab_size") if explicit.get(n) is not None]
    block = TASKS[task]().block_size
    if explicit.get("block_size") not in (None, block):
        ignored.append("block_size")
    if ignored:
        where = lambda n: f"--{n.replace('_', '-')}" if origin.get(n) is None else f"{n!r} in {origin[n]}"
        raise UserError(f"--task {task} brings its own data, tokenizer and context ({block} tokens); "
                        f"{', '.join(map(where, ignored))} would be ignored: leave them out")


def run_train(args) -> int:
    from numformer import backend
    from numformer.train import plot_losses, plural, train

    cfg = _train_config(args)
    print(f"numformer train: backend {backend.current()}, output in {cfg.out}")
    result = train(cfg, resume=bool(args.resume), extend_schedule=args.extend_schedule)
    if result.end_step == result.start_step:           # train() said why (the checkpoint is already there)
        return 0
    new = result.end_step - result.start_step
    print(f"trained {plural(new, 'step')} " + (f"(steps {result.start_step + 1}-{result.end_step}) "
                                               if result.start_step else "") + f"in {result.seconds:.1f} s")
    if result.val_losses:
        line = f"validation loss {result.val_losses[-1][1]:.4f} nats/token"
        if result.baseline is not None:
            line += f" (unigram baseline {result.baseline:.4f})"
        print(line)
    if plot_losses(result, os.path.join(cfg.out, "loss.png")):
        print(f"loss curve: {os.path.join(cfg.out, 'loss.png')}")
    _print_samples(cfg, result)
    print(f"checkpoint: {os.path.join(cfg.out, 'checkpoint')}  "
          f"(try: numformer sample --checkpoint {cfg.out} --prompt \"...\")")
    return 0


def _print_samples(cfg, result) -> None:
    import numpy as np

    from numformer.generate import generate

    model, tok = result.model, result.tokenizer
    if cfg.task is not None:
        from numformer.tasks import TASKS

        task = TASKS[cfg.task]()
        acc = task.accuracy(model, np.random.default_rng(cfg.seed + 2), n=500)
        print(f"{cfg.task}: exact-match accuracy {acc:.1%} on 500 fresh examples")
        return
    for i in range(cfg.num_samples):
        new = generate(model, [tok.eot_id], cfg.sample_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, seed=cfg.seed + 100 + i, eot_id=tok.eot_id)
        text = tok.decode([t for t in new if t != tok.eot_id])
        print(f"\n--- sample {i + 1} ---\n{text}")


# ----------------------------------------------------------------------------- sample


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint (several prompts are decoded as one batch)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a folder from 'numformer train' or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue; repeat the flag for several prompts (default: one empty prompt, "
                        "i.e. start a new document)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="UTF-8 file with one prompt per line ('-' for stdin), after any --prompt")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is produced; with several rows, one JSON object per line: "
                        '{"row", "text"} pieces, then {"row", "finish_reason"}')
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sample i of every prompt uses SEED + i")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.set_defaults(run=run_sample)


def _sample_prompts(args) -> list[str]:
    """The --prompt texts, then the lines of --prompts-file; [""] when neither is given."""
    texts = list(args.prompt or [])
    if args.prompts_file:
        if args.prompts_file == "-":
            raw = sys.stdin.buffer.read()
        else:
            if not os.path.isfile(args.prompts_file):
                raise UserError(f"--prompts-file {args.prompts_file!r} does not exist")
            with open(args.prompts_file, "rb") as f:
                raw = f.read()
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"--prompts-file {args.prompts_file!r} is not UTF-8 ({exc})") from None
        if not lines:
            raise UserError(f"--prompts-file {args.prompts_file!r} holds no prompts")
        texts.extend(lines)
    return texts or [""]


def run_sample(args) -> int:
    from numformer.generate import IncrementalDecoder, batch_stream, validate_sampling

    validate_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    texts = _sample_prompts(args)
    model, tok = _load_for_sampling(args.checkpoint)
    rows = [(p, i) for p in range(len(texts)) for i in range(args.num_samples)]   # (prompt, sample)
    start = [] if tok.eot_id is None else [tok.eot_id]
    ids = [start + tok.encode(texts[p]) for p, _ in rows]
    if not all(ids):
        raise UserError("an empty prompt needs an end-of-text token to start from, and this tokenizer has none")
    seeds = [None if args.seed is None else args.seed + i for _, i in rows]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eot_id=tok.eot_id)
    if max(map(len, ids)) + args.max_new_tokens <= model.cfg.n_positions:
        events = batch_stream(model, ids, args.max_new_tokens, seed=seeds, **sampling)
        reasons = events.finish_reason
    else:                   # beyond the context window: one row at a time, with the sliding window of stream()
        reasons = [None] * len(rows)
        events = _rows_one_at_a_time(model, ids, args.max_new_tokens, seeds, reasons, sampling)

    single = len(rows) == 1
    skip = [] if tok.eot_id is None else [tok.eot_id]
    decoders = [IncrementalDecoder(tok, skip_ids=skip) for _ in rows]
    pieces: list[list[str]] = [[] for _ in rows]
    closed: set[int] = set()

    def emit(row: int, piece: str) -> None:
        pieces[row].append(piece)
        if args.stream and piece:
            if single:
                sys.stdout.write(piece)
            else:
                print(json.dumps({"row": row, "text": piece}, ensure_ascii=False))
            sys.stdout.flush()

    def close(row: int) -> None:
        closed.add(row)
        emit(row, decoders[row].flush())               # an unfinished character becomes U+FFFD
        if args.stream and not single:
            print(json.dumps({"row": row, "prompt": rows[row][0], "sample": rows[row][1],
                              "finish_reason": reasons[row] or "length"}), flush=True)

    if single and args.stream:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    for row, token in events:
        emit(row, decoders[row].push(token))
        if reasons[row] is not None:                   # set before the row's last token is yielded
            close(row)
    for row in range(len(rows)):
        if row not in closed:
            close(row)
    if args.stream:
        if single:
            sys.stdout.write("\n")
        return 0
    for row, (p, i) in enumerate(rows):
        if not single:
            print(f"--- prompt {p + 1}, sample {i + 1} ---")
        sys.stdout.write(texts[p] + "".join(pieces[row]) + "\n")
    return 0


def _rows_one_at_a_time(model, ids, max_new_tokens, seeds, reasons, sampling):
    """(row, token) events like batch_stream's, from stream() row by row; ``reasons[row]``
    is set before the row's last token is yielded."""
    from numformer.generate import stream

    eot = sampling["eot_id"]
    for row, (prompt, seed) in enumerate(zip(ids, seeds)):
        count = 0
        for token in stream(model, prompt, max_new_tokens, seed=seed, **sampling):
            count += 1
            if eot is not None and token == eot:
                reasons[row] = "stop"
            elif count == max_new_tokens:
                reasons[row] = "length"
            yield row, token
        reasons[row] = reasons[row] or "length"


# ----------------------------------------------------------------------------- quantize


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="int8 weight-only copy of a GPT-2 checkpoint (inference only)")
    p.add_argument("--checkpoint", required=True, metavar="IN",
                   help="numformer checkpoint (or training output folder) or Hugging Face GPT-2 folder")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to write (replaced atomically)")
    p.add_argument("--float-head", action="store_true",
                   help="keep the tied embedding / output head (wte) float32; by default it is int8 too, "
                        "one scale per vocabulary row (see docs/quantization.md for the quality cost)")
    p.set_defaults(run=run_quantize)


def run_quantize(args) -> int:
    from numformer.quantize import format_summary, quantize_checkpoint

    info = quantize_checkpoint(args.checkpoint, args.out, int8_head=not args.float_head)
    print(format_summary(info, args.out))       # measured weight and logits errors
    return 0


# ----------------------------------------------------------------------------- bench


def _add_bench(sub) -> None:
    from numformer.bench.runner import add_arguments, run

    p = sub.add_parser("bench", help="benchmark the kernels and GPT-2 against NumPy and PyTorch")
    add_arguments(p)
    p.set_defaults(run=run)


def _load_for_sampling(path: str):
    """(model, tokenizer) of a numformer checkpoint or a Hugging Face GPT-2 folder."""
    from numformer import checkpoint

    if os.path.isdir(path) and not os.path.exists(os.path.join(checkpoint.resolve(path), checkpoint.TOKENIZER_FILE)):
        from numformer import pretrained

        return pretrained.from_pretrained(path), pretrained.load_tokenizer(path)
    return checkpoint.load_model(path), checkpoint.load_tokenizer(path)


# ----------------------------------------------------------------------------- tokenize


def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="print the token ids of TEXT")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a folder (a 'numformer train' run, vocab.json + merges.txt, tokenizer.json, "
                        "numformer_tokenizer.json) "
                        "or a file (.tiktoken rank file, tokenizer.json)")
    p.add_argument("--allow-special", action="store_true",
                   help="turn literal special tokens such as <|endoftext|> into their ids")
    p.add_argument("text", nargs="+", help="text to encode (several words are joined by spaces)")
    p.set_defaults(run=run_tokenize)


def run_tokenize(args) -> int:
    from numformer import checkpoint
    from numformer.pretrained import load_tokenizer

    path = args.tokenizer
    if not os.path.isfile(path):                       # a numformer run folder keeps it in checkpoint/
        try:
            folder = checkpoint.resolve(path)
        except checkpoint.CheckpointError:
            folder = path
        if os.path.exists(os.path.join(folder, checkpoint.TOKENIZER_FILE)):
            path = folder
    tok = load_tokenizer(path)
    ids = tok.encode(" ".join(args.text), allowed_special=args.allow_special)
    print(" ".join(map(str, ids)))
    return 0


# ----------------------------------------------------------------------------- embed


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings from a BERT / sentence-transformers folder")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face folder (config.json, model.safetensors, tokenizer.json or vocab.txt)")
    p.add_argument("--input", metavar="FILE", help="UTF-8 text file, one text per line ('-' for stdin)")
    p.add_argument("--output", metavar="FILE.npy", help="write a (N, dim) float32 .npy (default: JSON to stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (after those of --input)")
    p.set_defaults(run=run_embed)


def run_embed(args) -> int:
    import numpy as np

    from numformer.fileio import atomic_open
    from numformer.sentence import embed, load_sentence_encoder

    texts = _texts_from(args, "nothing to embed")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be >= 2, got {args.max_length}")
    encoder = load_sentence_encoder(args.model)
    vectors = embed(encoder, None, texts, batch_size=args.batch_size, max_length=args.max_length)
    if args.output:
        with atomic_open(args.output, "wb") as f:
            np.save(f, vectors.astype(np.float32))
        print(f"wrote {args.output}: {vectors.shape[0]} embeddings of dimension {vectors.shape[1]}",
              file=sys.stderr)
    else:
        json.dump(vectors.astype(np.float64).tolist(), sys.stdout)        # exact float32 values
        sys.stdout.write("\n")
    return 0


# ----------------------------------------------------------------------------- finetune / classify


def _add_finetune(sub) -> None:
    from numformer.finetune import GPT2_POOLINGS, POOLINGS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="train a text classifier on a BERT encoder or GPT-2's last token "
                                        "(CSV/JSONL of text,label)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face BERT / sentence-transformers or GPT-2 folder, or a numformer GPT-2 checkpoint")
    p.add_argument("--train", required=True, metavar="FILE", help="CSV with text,label header, or JSONL")
    p.add_argument("--val", metavar="FILE", help="validation file (default: hold out --val-fraction of --train)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the classifier")
    p.add_argument("--freeze", action="store_true", help="train only the head (the encoder is a fixed feature extractor)")
    p.add_argument("--pooling", choices=POOLINGS + GPT2_POOLINGS, default=d.pooling,
                   help="BERT: mean (default), cls or pooler; GPT-2: last (its only choice)")
    for name in ("epochs", "batch_size", "max_length", "patience", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "head_lr", "weight_decay", "warmup_ratio", "val_fraction", "clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.set_defaults(run=run_finetune)
    p = sub.add_parser("classify", help="label texts with a classifier saved by 'numformer finetune'")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--input", metavar="FILE", help="UTF-8 text file, one text per line ('-' for stdin)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.set_defaults(run=run_classify)


def _texts_from(args, empty: str = "no texts") -> list:
    """Lines of --input (a file or '-' for stdin), then the TEXT arguments."""
    texts = []
    if args.input:
        if args.input == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.input, "rb") as f:
                raw = f.read()
        try:
            texts.extend(raw.decode("utf-8").splitlines())
        except UnicodeDecodeError as exc:
            raise UserError(f"--input {args.input!r} is not UTF-8 ({exc})") from None
    texts.extend(args.texts)
    if not texts:
        raise UserError(f"{empty}: give TEXT arguments or --input FILE")
    return texts


def run_finetune(args) -> int:
    from numformer.finetune import (FinetuneConfig, finetune, format_report, load_backbone, read_labelled,
                                    save_classifier)
    from numformer.fileio import atomic_open
    from numformer.models.gpt2 import GPT2
    from numformer.train import plural

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}).validate()
    texts, labels = read_labelled(args.train)
    val_texts, val_labels = read_labelled(args.val) if args.val else (None, None)
    classes = set(labels) | set(val_labels or ())
    if len(classes) < 2:
        files = args.train + (f" and {args.val}" if args.val else "")
        raise UserError(f"{files}: every example has the label {next(iter(classes))!r}; "
                        f"a classifier needs at least two classes")
    encoder, tokenizer = load_backbone(args.model)
    kind, pooling = ("GPT-2", "last") if isinstance(encoder, GPT2) else ("encoder", cfg.pooling or "mean")
    print(f"numformer finetune: {plural(len(texts), 'training example')}, {kind} {encoder.num_params:,} parameters"
          f" ({'frozen' if cfg.freeze else 'trained'}), pooling {pooling}")
    result = finetune(encoder, tokenizer, texts, labels, val_texts, val_labels, cfg)
    save_classifier(result.model, args.out, tokenizer_from=args.model, tokenizer=tokenizer)
    settings = dict(dataclasses.asdict(cfg), pooling=result.model.pooling)
    report = dict(result.report, best_epoch=result.best_epoch, stopped_early=result.stopped_early,
                  history=result.history, seconds=result.seconds, settings=settings)
    with atomic_open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nvalidation, best epoch {result.best_epoch} ({result.seconds:.1f} s):\n" + format_report(result.report))
    print(f"\nsaved to {args.out} (try: numformer classify --model {args.out} \"some text\")")
    return 0


def run_classify(args) -> int:
    from numformer.finetune import classify, load_classifier

    texts = _texts_from(args)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = load_classifier(args.model)
    labels, probs = classify(model, tokenizer, texts, batch_size=args.batch_size)
    for text, label, p in zip(texts, labels, probs):
        print(json.dumps({"text": text, "label": label,
                          "probabilities": {lab: round(float(x), 6) for lab, x in zip(model.labels, p)}},
                         ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------- serve


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (needs the serve extra)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="numformer checkpoint, Hugging Face GPT-2 folder (completions) or BERT / "
                        "sentence-transformers folder (embeddings)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: only this machine)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key; "
                        "$NUMFORMER_API_KEY is used when set)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences one batch gathers from waiting requests")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive in full within this time after its headers (408 otherwise)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this time (from the connection's opening or "
                        "the previous response); the connection is closed otherwise")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"numformer serve needs the server stack ({exc.name} is not installed): "
                        "pip install \"numformer[serve]\" (or pip install \".[serve]\" in a checkout)") from None
    from numformer.serve import Limits, load_served_model
    from numformer.serve.server import serve_forever

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1 or args.max_body_bytes < 1024:
        raise UserError("--max-batch must be >= 1 and --max-body-bytes >= 1024")
    for flag, value in (("--body-timeout", args.body_timeout), ("--header-timeout", args.header_timeout)):
        if not 0 < value < float("inf"):
            raise UserError(f"{flag} must be a positive number of seconds, got {value}")
    api_key = args.api_key or os.environ.get("NUMFORMER_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"numformer serve: warning: listening on {args.host} without an API key; anyone who can "
              "reach this address can use the model", file=sys.stderr)
    served = load_served_model(args.checkpoint, args.model_name)
    route = "/v1/completions" if served.kind == "completion" else "/v1/embeddings"
    print(f"numformer serve: model '{served.name}' ({served.kind}, context {served.context_length} tokens) "
          f"on http://{args.host}:{args.port}{route}", file=sys.stderr)
    try:
        serve_forever(served, args.host, args.port, log_level=args.log_level, api_key=api_key,
                      max_batch_rows=args.max_batch,
                      limits=Limits(max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                                    header_timeout=args.header_timeout))
    except KeyboardInterrupt:          # uvicorn shut down cleanly, then re-raised Ctrl-C: the normal way to stop
        pass
    print("numformer serve: stopped", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- other commands


def run_gradcheck(args) -> int:
    from numformer.gradcheck import format_table, run_all

    results = run_all(args.seed)
    print(format_table(results))
    failed = [r.name for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks pass (tolerance 1e-6, float64)")
    return 1 if failed else 0


def run_tokenizer_train(args) -> int:
    from numformer.data import default_corpus, read_text_file
    from numformer.tokenizers import EOT_TOKEN, ByteBPETokenizer, CharTokenizer

    text = read_text_file(args.data) if args.data else EOT_TOKEN.join(default_corpus())
    if args.kind == "char":
        if args.vocab_size is not None:
            raise UserError("--vocab-size applies to --kind bpe only (a char tokenizer has one id per "
                            "character of the data)")
        tok = CharTokenizer.train(text)
    else:
        args.vocab_size = 512 if args.vocab_size is None else args.vocab_size
        if args.vocab_size < 257:
            raise UserError(f"--vocab-size must be at least 257 for byte-level BPE, got {args.vocab_size}")
        tok = ByteBPETokenizer.train(text, args.vocab_size, progress=True)
    tok.save(args.out)
    n = len(tok.encode(text, allowed_special=True))
    print(f"wrote {args.out}: {tok.kind} tokenizer, vocab {tok.vocab_size}, "
          f"{len(text.encode('utf-8')) / max(n, 1):.2f} bytes/token on its training text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
