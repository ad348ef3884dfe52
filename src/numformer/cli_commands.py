"""What each ``numformer`` command does, given its parsed arguments (``run_*``).

The arguments themselves are defined in :mod:`numformer.cli`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from numformer.cli_errors import UserError
from numformer.cli_settings import train_config


# ----------------------------------------------------------------------------- train


def run_train(args) -> int:
    from numformer import backend
    from numformer.train import plot_losses, plural, train

    cfg = train_config(args)
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

def _load_for_sampling(path: str):
    """(model, tokenizer) of a numformer checkpoint or a Hugging Face GPT-2 folder."""
    from numformer import checkpoint

    if os.path.isdir(path) and not os.path.exists(os.path.join(checkpoint.resolve(path), checkpoint.TOKENIZER_FILE)):
        from numformer import pretrained

        return pretrained.from_pretrained(path), pretrained.load_tokenizer(path)
    return checkpoint.load_model(path), checkpoint.load_tokenizer(path)

# ----------------------------------------------------------------------------- quantize


def run_quantize(args) -> int:
    from numformer.quantize import format_summary, quantize_checkpoint

    info = quantize_checkpoint(args.checkpoint, args.out, int8_head=not args.float_head)
    print(format_summary(info, args.out))       # measured weight and logits errors
    return 0

# ----------------------------------------------------------------------------- tokenize


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
