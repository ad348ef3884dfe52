"""GPT-2 in Hugging Face layout: parity with transformers and tokenizer throughput.

    python benchmarks/gpt2_pretrained.py [--out DIR] [--size 124M|tiny] [--repeat N]

Needs torch + transformers + tiktoken (no downloads: the model is a random-init
GPT2LMHeadModel of the chosen config; the real GPT-2 rank file comes from the
openai-whisper sdist, see tests/test_gpt2_tokenizer.py, or --ranks FILE).
Writes DIR/gpt2_pretrained.json and DIR/gpt2_pretrained.md.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

SIZES = {"124M": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
         "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=500)}


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def parity(size: str, seq: int) -> dict:
    import torch
    import transformers

    import numformer

    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SIZES[size])).eval()
    folder = tempfile.mkdtemp()
    ref.save_pretrained(folder, safe_serialization=True)
    before = current_rss_mb()
    t = time.perf_counter()
    ours = numformer.from_pretrained(folder)
    load_s = time.perf_counter() - t
    weights_mb = ours.flat.nbytes / 2 ** 20
    growth = current_rss_mb() - before
    ids = np.random.default_rng(0).integers(0, SIZES[size]["vocab_size"], size=(2, seq))
    out = ref(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), -100)], axis=1)
    logits, loss, cache = ours.forward(ids, targets)
    grads = ours.layout.views(ours.backward(cache))
    params = dict(ref.named_parameters())
    diffs = {n: (float(np.abs(g - params["transformer." + n].grad.numpy()).max()),
                 float(np.abs(params["transformer." + n].grad.numpy()).max())) for n, g in grads.items()}
    ref_logits = out.logits.detach().numpy()
    return {"size": size, "params": int(ours.num_params), "seq": seq, "load_seconds": round(load_s, 3),
            "weights_MiB": round(weights_mb, 1), "rss_growth_after_load_MiB": round(growth, 1),
            "logits_max_abs_diff": float(np.abs(logits - ref_logits).max()),
            "logits_max_abs": float(np.abs(ref_logits).max()),
            "loss_diff": abs(loss - out.loss.item()),
            "grad_max_abs_diff": max(d for d, _ in diffs.values()),
            "grad_max_rel_diff_per_tensor": max(d / (m + 1e-30) for d, m in diffs.values())}


def throughput(ranks_file: str, repeat: int) -> dict:
    import tiktoken
    from pydoc_data.topics import topics

    from numformer.tokenizers.gpt2 import GPT2_PATTERN, GPT2Tokenizer

    text = "\n".join(topics.values()) * repeat
    nbytes = len(text.encode("utf-8"))
    ours = GPT2Tokenizer.from_tiktoken(ranks_file)
    python = GPT2Tokenizer.from_tiktoken(ranks_file, use_extension=False)
    enc = tiktoken.Encoding(name="gpt2-bench", pat_str=GPT2_PATTERN, mergeable_ranks=ours.ranks,
                            special_tokens=ours.special_tokens)
    rows = {}
    for name, fn in (("numformer (C++)", ours.encode), ("numformer (pure Python)", python.encode),
                     ("tiktoken", enc.encode_ordinary)):
        fn(text[:10000])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            ids = fn(text)
            best = min(best, time.perf_counter() - t)
        rows[name] = {"MB_per_s": round(nbytes / 1e6 / best, 2), "tokens": len(ids)}
    assert rows["numformer (C++)"]["tokens"] == rows["tiktoken"]["tokens"]
    return {"text_MB": round(nbytes / 1e6, 2), "single_thread": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--size", default="124M", choices=sorted(SIZES))
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--ranks", default=os.path.join(tempfile.gettempdir(), "numformer-test-cache", "gpt2.tiktoken"))
    ap.add_argument("--repeat", type=int, default=8, help="copies of the pydoc topics (~0.47 MB each)")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    result = {"python": sys.version.split()[0]}
    if os.path.exists(args.ranks):
        result["tokenizer"] = throughput(args.ranks, args.repeat)
    if not args.skip_parity:
        result["parity"] = parity(args.size, args.seq)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpt2_pretrained.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = []
    if "parity" in result:
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in result["parity"].items()]
    if "tokenizer" in result:
        lines += ["", f"Tokenizer, {result['tokenizer']['text_MB']} MB of pydoc topics, one thread:", "",
                  "| encoder | MB/s | tokens |", "|---|---|---|"]
        lines += [f"| {k} | {v['MB_per_s']} | {v['tokens']} |" for k, v in result["tokenizer"]["single_thread"].items()]
    with open(os.path.join(args.out, "gpt2_pretrained.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
