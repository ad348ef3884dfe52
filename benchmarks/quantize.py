"""int8 weight-only quantization: size, speed and quality, in one script.

    python benchmarks/quantize.py --checkpoint runs/numformer        # a `numformer train` output
    python benchmarks/quantize.py --skip-quality --new-tokens 32     # sizes and speed only

What it measures (see docs/quantization.md for the numbers and their context):

Every int8 figure is given twice: with the tied embedding / LM head int8
(``numformer quantize``'s default) and float32 (``--float-head``).

1. **Checkpoint size**: ``model.safetensors`` of the float32 checkpoint and of
   its ``numformer quantize`` outputs, for the trained model (or the default
   ``numformer train`` shape) and for a GPT-2 124M configuration (random
   weights: the size does not depend on the values).
2. **Generation speed at batch 1**, GPT-2 124M shape, float32 vs int8 with the
   KV cache (``numformer.generate.generate``, greedy), the three interleaved in
   one loop, median of ``--runs``. Both wall time and process CPU time are
   reported: on a shared machine the wall clock measures the other tenants as
   much as us; CPU time (one thread) is the robust comparison. Plus the
   matrix products alone (the 48 linear layers of one token) and the LM head,
   float32 vs int8, for the Amdahl argument.
3. **Quality**: validation loss and perplexity of the trained checkpoint and of
   its int8 copies (written and read back through the files) on the *same*
   validation batches — the ones ``numformer train`` evaluates
   (``numformer.train.evaluate``), ``--eval-batches`` of them.

Writes ``--out/quantize.json`` and ``quantize.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from numformer import backend, checkpoint
from numformer.generate import generate
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.quantize import quantize_checkpoint, quantize_model


def _mb(n: int) -> float:
    return n / 1e6


def sizes(ckpt: str | None, tmp: str) -> list[dict]:
    """Float32 vs int8 ``model.safetensors`` bytes for the trained/default model and GPT-2 124M."""
    from numformer.train import TrainConfig, build_data, model_config

    rows = []
    if ckpt is not None:
        src = checkpoint.resolve(ckpt)
        label = "trained (`numformer train`)"
    else:
        cfg = TrainConfig()
        tok, _, _ = build_data(cfg, log=lambda *a: None)
        src = os.path.join(tmp, "default-float")
        checkpoint.save(src, GPT2.init(model_config(cfg, tok.vocab_size, cfg.block_size)), tok)
        label = "default `numformer train` shape"
    models = [(label, src)]
    big = os.path.join(tmp, "gpt2-124m-float")
    checkpoint.save(big, GPT2.init(GPT2Config(), seed=0), _tiny_tokenizer())
    models.append(("GPT-2 124M config", big))
    for label, path in models:
        f32 = os.path.getsize(os.path.join(path, "model.safetensors"))
        row = {"model": label, "params": checkpoint.load_model(path).num_params, "float32_bytes": f32}
        for key, int8_head in (("int8", True), ("int8_float_head", False)):
            out = os.path.join(tmp, os.path.basename(path) + "-" + key)
            info = quantize_checkpoint(path, out, int8_head=int8_head)
            i8 = os.path.getsize(os.path.join(out, "model.safetensors"))
            row[key] = {"bytes": i8, "ratio": i8 / f32, "quantized_params": info["quantized_params"],
                        "float_params": info["float_params"], "max_rel_error": info["max_rel_error"],
                        "head_max_rel_error": info["head_max_rel_error"]}
            shutil.rmtree(out)
        rows.append(row)
        print(f"size  {label}: {_mb(f32):.2f} MB -> {_mb(row['int8']['bytes']):.2f} MB int8 "
              f"(x{row['int8']['ratio']:.3f}), {_mb(row['int8_float_head']['bytes']):.2f} MB with a float head "
              f"(x{row['int8_float_head']['ratio']:.3f})", file=sys.stderr)
    return rows


def _tiny_tokenizer():
    from numformer.tokenizers.char import CharTokenizer

    return CharTokenizer.train("abc")


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def speed(new_tokens: int, prompt: int, runs: int, threads: int | None) -> dict:
    """Batch-1 greedy generation, GPT-2 124M shape, float32 vs int8 (int8 / float head), interleaved."""
    cpu = backend._load_cpu()
    if threads is not None and cpu is not None:
        cpu.set_num_threads(threads)
    model = GPT2.init(GPT2Config(), seed=0)
    models = {"float32": model, "int8": quantize_model(model),
              "int8_float_head": quantize_model(model, int8_head=False)}
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=prompt).tolist()
    impls = {k: (lambda m=m: generate(m, ids, new_tokens, temperature=0.0)) for k, m in models.items()}
    first = {k: (lambda m=m: generate(m, ids, 1, temperature=0.0)) for k, m in models.items()}
    for f in impls.values():                       # warm-up (page faults, scratch buffers)
        f()
    wall = {k: [] for k in impls}
    cput = {k: [] for k in impls}
    prefill = {k: [] for k in impls}
    for r in range(runs):
        for k in (impls if r % 2 == 0 else reversed(list(impls))):   # alternate the order
            w, c = _timed(impls[k])
            wall[k].append(w)
            cput[k].append(c)
            prefill[k].append(_timed(first[k])[1])
    out = {"new_tokens": new_tokens, "prompt": prompt, "runs": runs,
           "threads": cpu.num_threads() if cpu is not None else 1}
    for k in impls:
        # decode rate: new tokens over (time − time of a prefill + 1 token), CPU time
        dec_cpu = np.median(np.array(cput[k]) - np.array(prefill[k]))
        out[k] = {"wall_s": float(np.median(wall[k])), "cpu_s": float(np.median(cput[k])),
                  "tokens_per_s_wall": new_tokens / float(np.median(wall[k])),
                  "tokens_per_s_cpu": new_tokens / float(np.median(cput[k])),
                  "decode_tokens_per_s_cpu": (new_tokens - 1) / float(dec_cpu) if dec_cpu > 0 else None}
    for k in ("int8", "int8_float_head"):
        sfx = "" if k == "int8" else "_float_head"
        out["speedup_wall" + sfx] = out["float32"]["wall_s"] / out[k]["wall_s"]
        out["speedup_cpu" + sfx] = out["float32"]["cpu_s"] / out[k]["cpu_s"]
        if out["float32"]["decode_tokens_per_s_cpu"] and out[k]["decode_tokens_per_s_cpu"]:
            out["speedup_decode_cpu" + sfx] = (out[k]["decode_tokens_per_s_cpu"]
                                               / out["float32"]["decode_tokens_per_s_cpu"])
    print(f"speed 124M batch 1: float32 {out['float32']['tokens_per_s_wall']:.1f} tok/s wall "
          f"({out['float32']['tokens_per_s_cpu']:.1f} CPU), int8 {out['int8']['tokens_per_s_wall']:.1f} wall "
          f"({out['int8']['tokens_per_s_cpu']:.1f} CPU): x{out['speedup_wall']:.2f} wall, "
          f"x{out['speedup_cpu']:.2f} CPU; float head x{out['speedup_wall_float_head']:.2f} wall, "
          f"x{out['speedup_cpu_float_head']:.2f} CPU", file=sys.stderr)
    out["products"] = _products(model, models["int8"], runs)
    return out


def _products(model: GPT2, qmodel, runs: int) -> dict:
    """CPU time of one token's 48 linear products (M = 1) and of the LM head, float vs int8."""
    cpu = backend._load_cpu()
    if cpu is None:
        return {}
    C = model.cfg.n_embd
    x = np.random.default_rng(1).standard_normal((1, C)).astype(np.float32)
    names = [n for n in qmodel.qweights]
    xs = {n: np.random.default_rng(2).standard_normal((1, model.params[n].shape[0])).astype(np.float32)
          for n in names}

    def float_linears():
        for n in names:
            cpu.matmul(xs[n], model.params[n])

    plain = {n: qmodel.qweights[n].unpack() for n in names}

    def int8_linears_plain():                     # q in the file's (K, N) layout
        for n in names:
            cpu.matmul_int8(xs[n], plain[n], qmodel.qweights[n].scale)

    def int8_linears():                           # the packed layout the model holds
        for n in names:
            cpu.matmul_int8(xs[n], qmodel.qweights[n].packed, qmodel.qweights[n].scale)

    wte = model.params["wte.weight"]

    def float_head():
        cpu.matmul(x, wte, False, True)

    def int8_head():                              # q_head (C, V) packed, one scale per vocabulary row
        cpu.matmul_int8(x, qmodel.head.packed, qmodel.head.scale)

    fns = {"linears_float32": float_linears, "linears_int8": int8_linears, "linears_int8_unpacked": int8_linears_plain,
           "head_float32": float_head, "head_int8": int8_head}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(max(runs, 5)):
        for k, f in fns.items():
            times[k].append(_timed(f)[1])
    res = {k: float(np.median(v)) for k, v in times.items()}
    res["linear_bytes_float32"] = int(sum(model.params[n].nbytes for n in names))
    res["linear_bytes_int8"] = int(sum(qmodel.qweights[n].packed.nbytes for n in names))
    res["head_bytes_float32"] = int(wte.nbytes)
    res["head_bytes_int8"] = int(qmodel.head.packed.nbytes)
    print(f"products (CPU ms): linears f32 {res['linears_float32'] * 1e3:.1f}, int8 {res['linears_int8'] * 1e3:.1f} "
          f"(not packed {res['linears_int8_unpacked'] * 1e3:.1f}); "
          f"head f32 {res['head_float32'] * 1e3:.1f}, int8 {res['head_int8'] * 1e3:.1f}", file=sys.stderr)
    return res


def quality(ckpt: str, eval_batches: int, tmp: str) -> dict:
    """Validation loss / perplexity, float32 vs int8 (through the files), same batches."""
    from numformer.train import TrainConfig, build_data, evaluate

    src = checkpoint.resolve(ckpt)
    _, state = checkpoint.load_training_state(src)
    cfg = TrainConfig.from_dict(state["train_config"])
    cfg.eval_batches = eval_batches
    tok = checkpoint.load_tokenizer(src)
    _, data, baseline = build_data(cfg, tok, log=lambda *a: None)
    res = {"checkpoint": ckpt, "step": state.get("step"), "max_steps": cfg.max_steps,
           "eval_batches": eval_batches, "batch_size": cfg.batch_size, "block_size": cfg.block_size,
           "tokens": eval_batches * cfg.batch_size * cfg.block_size, "unigram_baseline": baseline}
    paths = {"float32": src}
    for key, int8_head in (("int8", True), ("int8_float_head", False)):
        paths[key] = os.path.join(tmp, "trained-" + key)
        quantize_checkpoint(src, paths[key], int8_head=int8_head)
    for label, path in paths.items():
        model = checkpoint.load_model(path)
        loss = evaluate(model, data, cfg)
        res[label] = {"val_loss": loss, "perplexity": math.exp(loss)}
    for key in ("int8", "int8_float_head"):
        res[key]["relative_perplexity_change"] = res[key]["perplexity"] / res["float32"]["perplexity"] - 1
    res["relative_perplexity_change"] = res["int8"]["relative_perplexity_change"]
    print(f"quality: val loss {res['float32']['val_loss']:.5f} -> {res['int8']['val_loss']:.5f} int8, "
          f"{res['int8_float_head']['val_loss']:.5f} with a float head; perplexity "
          f"{res['float32']['perplexity']:.4f} -> {res['int8']['perplexity']:.4f} "
          f"({100 * res['int8']['relative_perplexity_change']:+.3f} %), {res['int8_float_head']['perplexity']:.4f} "
          f"({100 * res['int8_float_head']['relative_perplexity_change']:+.3f} %)", file=sys.stderr)
    return res


def markdown(doc: dict) -> str:
    lines = [f"# int8 weight-only quantization ({doc['date']}, {doc['machine']})", ""]
    lines += ["| model | params | float32 file | int8 file (int8 head) | ratio | int8 file (float head) | ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["sizes"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {_mb(r['float32_bytes']):.2f} MB | "
                     f"{_mb(r['int8']['bytes']):.2f} MB | {r['int8']['ratio']:.3f} | "
                     f"{_mb(r['int8_float_head']['bytes']):.2f} MB | {r['int8_float_head']['ratio']:.3f} |")
    sp = doc.get("speed")
    if sp:
        f32, i8, fh = sp["float32"], sp["int8"], sp["int8_float_head"]
        lines += ["", f"Generation, GPT-2 124M config, batch 1, greedy, {sp['prompt']}-token prompt + "
                  f"{sp['new_tokens']} new, {sp['threads']} thread(s), median of {sp['runs']}:", "",
                  "| | float32 | int8 | int8 / float32 | int8, float head | / float32 |", "|---|---|---|---|---|---|",
                  f"| tokens/s (wall) | {f32['tokens_per_s_wall']:.1f} | {i8['tokens_per_s_wall']:.1f} "
                  f"| {sp['speedup_wall']:.2f} | {fh['tokens_per_s_wall']:.1f} | {sp['speedup_wall_float_head']:.2f} |",
                  f"| tokens/s (CPU time) | {f32['tokens_per_s_cpu']:.1f} | {i8['tokens_per_s_cpu']:.1f} "
                  f"| {sp['speedup_cpu']:.2f} | {fh['tokens_per_s_cpu']:.1f} | {sp['speedup_cpu_float_head']:.2f} |"]
        if sp.get("speedup_decode_cpu") and sp.get("speedup_decode_cpu_float_head"):
            lines.append(f"| decode tokens/s (CPU time) | {f32['decode_tokens_per_s_cpu']:.1f} | "
                         f"{i8['decode_tokens_per_s_cpu']:.1f} | {sp['speedup_decode_cpu']:.2f} | "
                         f"{fh['decode_tokens_per_s_cpu']:.1f} | {sp['speedup_decode_cpu_float_head']:.2f} |")
        p = sp.get("products")
        if p:
            lines += [f"| 48 linear products, M = 1 (CPU ms) | {p['linears_float32'] * 1e3:.2f} | "
                      f"{p['linears_int8'] * 1e3:.2f} | {p['linears_float32'] / p['linears_int8']:.2f} | | |",
                      f"| the same, q not packed (K, N) (CPU ms) | | {p['linears_int8_unpacked'] * 1e3:.2f} | "
                      f"{p['linears_float32'] / p['linears_int8_unpacked']:.2f} | | |",
                      f"| LM head x·wteᵀ, M = 1 (CPU ms) | {p['head_float32'] * 1e3:.2f} | "
                      f"{p['head_int8'] * 1e3:.2f} | {p['head_float32'] / p['head_int8']:.2f} | | |"]
    q = doc.get("quality")
    if q:
        lines += ["", f"Quality: `{q['checkpoint']}` (step {q['step']} of {q['max_steps']}), "
                  f"{q['eval_batches']} validation batches × {q['batch_size']} × {q['block_size']} tokens:", "",
                  "| | val loss | perplexity | change |", "|---|---|---|---|",
                  f"| float32 | {q['float32']['val_loss']:.5f} | {q['float32']['perplexity']:.4f} | |"]
        for key, label in (("int8_float_head", "int8, float head"), ("int8", "int8, int8 head")):
            lines.append(f"| {label} | {q[key]['val_loss']:.5f} | {q[key]['perplexity']:.4f} | "
                         f"{100 * q[key]['relative_perplexity_change']:+.3f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a `numformer train` output (quality + its size)")
    ap.add_argument("--eval-batches", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="kernel threads (default 1: CPU time is then the robust measure on a shared machine)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    cpu = backend._load_cpu()
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
           f"load average {os.getloadavg()[0]:.1f}", "build": cpu.build_info() if cpu else "numpy only"}
    with tempfile.TemporaryDirectory(prefix="numformer-quant-") as tmp:
        doc["sizes"] = sizes(args.checkpoint, tmp)
        if not args.skip_speed:
            doc["speed"] = speed(args.new_tokens, args.prompt, args.runs, args.threads)
        if args.checkpoint and not args.skip_quality:
            doc["quality"] = quality(args.checkpoint, args.eval_batches, tmp)
    doc["load_average_end"] = os.getloadavg()[0]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantize.json"), "w") as f:
        json.dump(doc, f, indent=2)
    md = markdown(doc)
    with open(os.path.join(args.out, "quantize.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
