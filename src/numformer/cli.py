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

This module is the entry point and the arguments of every command; what a
command does is in :mod:`numformer.cli_commands`, the train settings (--config
and the flags, layered) in :mod:`numformer.cli_settings`, the help formatter in
:mod:`numformer.cli_help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from numformer.cli_commands import (_load_for_sampling, run_classify, run_embed, run_finetune,  # noqa: F401
                                    run_gradcheck, run_quantize, run_sample, run_serve, run_tokenize,
                                    run_tokenizer_train, run_train)
from numformer.cli_errors import USER_ERRORS, UserError
from numformer.cli_help import Parser

__all__ = ["main", "build_parser", "UserError", "USER_ERRORS"]


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

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="numformer",
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
    from numformer.train_settings import CHOICES, TrainConfig

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

# ----------------------------------------------------------------------------- bench


def _add_bench(sub) -> None:
    from numformer.bench.runner import add_arguments, run

    p = sub.add_parser("bench", help="benchmark the kernels and GPT-2 against NumPy and PyTorch")
    add_arguments(p)
    p.set_defaults(run=run)

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


if __name__ == "__main__":
    sys.exit(main())
