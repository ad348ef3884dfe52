"""Benchmark numformer._cuda's kernels against the device's ceilings and cuBLAS/PyTorch.

    python benchmarks/cuda_kernels.py [--quick] [--json out.json]

Reports, per kernel, time, TFLOP/s (GEMM, attention) or GB/s (softmax), and
the targets of docs/kernels.md:

* GEMM float32 ≥ 70 % of cuBLAS SGEMM at 4096³ (cuBLAS through torch.matmul
  with TF32 off; without torch only our TFLOP/s is shown);
* softmax ≥ 80 % of the measured device bandwidth (device-to-device copy,
  bytes read + written; softmax moves one read and one write per element);
* attention forward faster than the composition cuBLAS Q·Kᵀ → softmax → P·V
  at T ≥ 1024 (ours composed from _cuda.matmul/_cuda.softmax_forward, and
  torch's when installed; torch SDPA shown for reference);

and a GPT-2 124M kept on the device (numformer.cuda_model.DeviceGPT2): a
4×256 forward and greedy generation tokens/s at batch 1 and 8 (no target).

Without a GPU (or without numformer._cuda) it prints why and exits 0.
Timing: operations run asynchronously (``set_synchronous(False)``), a
warm-up call, then the median of ``reps`` timed batches, each ending in a
device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _load():
    try:
        from numformer import _cuda
    except ImportError as exc:
        return None, f"numformer._cuda is not built ({exc}); install with nvcc on PATH"
    if _cuda.device_count() == 0:
        return None, "no CUDA device on this machine"
    return _cuda, ""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


_INNER = 3  # calls per timed batch (1 with --smoke)


def timed(fn, sync, reps=5, inner=None):
    """Median seconds per call of fn() over `reps` batches of `inner` calls."""
    inner = inner or _INNER
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def gpt2_rows(cu, args, reps):
    """A GPT-2 kept on the device (numformer.cuda_model.DeviceGPT2): one
    training-sized forward, and greedy generation at batch 1 and 8."""
    from numformer.cuda_model import DeviceGPT2
    from numformer.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=1, n_head=2) if args.smoke else GPT2Config()
    dm = DeviceGPT2(GPT2.init(cfg, seed=0), device=cu)
    rng = np.random.default_rng(0)
    B, T = (1, 8) if args.smoke else (4, 256)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    fwd = timed(lambda: dm.forward(ids), cu.synchronize, reps)   # logits come back to the host: synchronous
    rows = [dict(kernel="gpt2", what="forward", B=B, T=T, ms=fwd * 1e3,
                 tokens_per_s=B * T / fwd)]
    print(f"\nGPT-2 on the device ({'tiny' if args.smoke else '124M'}, random weights)")
    print(f"  forward {B}×{T} (logits to the host)   {fwd * 1e3:8.2f} ms   {B * T / fwd:10.0f} tokens/s")
    P, N = (4, 2) if args.smoke else (16, 32 if args.quick else 128)
    for batch in ((1,) if args.smoke else (1, 8)):
        prompts = rng.integers(0, cfg.vocab_size, (batch, P))
        t = timed(lambda: dm.generate(prompts, N, temperature=0), cu.synchronize, max(1, reps // 3), inner=1)
        rows.append(dict(kernel="gpt2", what="generate", B=batch, prompt=P, new=N, s=t, tokens_per_s=batch * N / t))
        print(f"  generate batch {batch}, {P}-token prompt + {N} new   {t:8.3f} s    {batch * N / t:10.1f} tokens/s")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, one repetition: checks the script runs (the tests use it with the emulator)")
    args = ap.parse_args(argv)
    global _INNER
    _INNER = 1 if args.smoke else 3

    cu, why = _load()
    if cu is None:
        print(f"cuda_kernels: skipped: {why}")
        return 0
    torch = _torch()
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False   # compare FP32 with FP32 SGEMM
    cu.set_synchronous(False)
    sync = cu.synchronize
    tsync = torch.cuda.synchronize if torch is not None else (lambda: None)
    reps = 1 if args.smoke else 3 if args.quick else 7
    rng = np.random.default_rng(0)
    rows = []
    print(f"device: {cu.device_name()}   build: {cu.build_info()}   torch: {torch.__version__ if torch else 'absent'}")

    bw = cu.measure_copy_bandwidth(1 << 16 if args.smoke else 1 << 28 if args.quick else 1 << 30)
    print(f"device-to-device copy bandwidth: {bw:.0f} GB/s")
    rows.append(dict(kernel="copy", gbps=bw))
    peak = cu.measure_fma_peak(1 << 8 if args.smoke else 1 << 16)
    print(f"FP32 FMA peak (CUDA cores): {peak:.1f} TFLOP/s")
    rows.append(dict(kernel="fma_peak", tflops=peak))

    # ---- GEMM ---------------------------------------------------------------
    print("\nGEMM float32                       ours TFLOP/s   cuBLAS TFLOP/s   ratio   % of FMA peak")
    sizes = [(40, 36, 24)] if args.smoke else [(1024, 1024, 1024), (4096, 4096, 4096)] if args.quick else \
        [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 768, 3072), (768, 8192, 3072)]
    for (M, N, K) in sizes:
        for ta, tb in [(False, False), (False, True), (True, False)]:
            a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
            b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
            da, db = cu.to_device(a), cu.to_device(b)
            out = cu.empty((M, N))
            t = timed(lambda: cu.matmul(da, db, ta, tb, out=out), sync, reps)
            flops = 2.0 * M * N * K
            row = dict(kernel="gemm", M=M, N=N, K=K, trans_a=ta, trans_b=tb, ms=t * 1e3, tflops=flops / t / 1e12)
            if torch is not None:
                ta_, tb_ = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
                ref = timed(lambda: (ta_.T if ta else ta_) @ (tb_.T if tb else tb_), tsync, reps)
                row.update(cublas_tflops=flops / ref / 1e12, ratio=ref / t)
            rows.append(row)
            form = ("Aᵀ" if ta else "A") + "·" + ("Bᵀ" if tb else "B")
            print(f"  {M:5d}×{N:5d}×{K:5d} {form:6s} {row['tflops']:12.2f} "
                  f"{row.get('cublas_tflops', float('nan')):16.2f} {row.get('ratio', float('nan')):8.2f} "
                  f"{100 * row['tflops'] / peak:10.1f}")

    # ---- softmax ------------------------------------------------------------
    print("\nsoftmax                            fwd GB/s  (% of copy)   bwd GB/s  (% of copy)   torch fwd GB/s")
    for shape in ([(8, 64), (4, 37)] if args.smoke else [(4096, 1024), (4096, 50257)] if args.quick else
                  [(16384, 1024), (65536, 256), (4096, 50257), (4 * 12 * 1024, 1024)]):
        x = cu.to_device((rng.standard_normal(shape) * 3).astype(np.float32))
        nbytes = 4.0 * shape[0] * shape[1]
        tf = timed(lambda: cu.softmax_forward(x), sync, reps)
        y = cu.softmax_forward(x)
        tb = timed(lambda: cu.softmax_backward(x, y), sync, reps)
        row = dict(kernel="softmax", shape=shape, fwd_gbps=2 * nbytes / tf / 1e9, bwd_gbps=3 * nbytes / tb / 1e9)
        if torch is not None:
            tx = torch.from_numpy(x.numpy()).cuda()
            row["torch_fwd_gbps"] = 2 * nbytes / timed(lambda: torch.softmax(tx, -1), tsync, reps) / 1e9
        rows.append(row)
        print(f"  {str(shape):30s} {row['fwd_gbps']:9.0f} ({100 * row['fwd_gbps'] / bw:5.1f} %) "
              f"{row['bwd_gbps']:10.0f} ({100 * row['bwd_gbps'] / bw:5.1f} %) "
              f"{row.get('torch_fwd_gbps', float('nan')):12.0f}")

    # ---- attention ----------------------------------------------------------
    print("\nattention fwd (causal, D=64)       ours ms  TFLOP/s   composed ms (ours / torch)   SDPA ms   bwd ms")
    B, H, D = (1, 1, 32) if args.smoke else (1, 12, 64) if args.quick else (4, 12, 64)
    for T in ([40] if args.smoke else [1024, 2048] if args.quick else [512, 1024, 2048, 4096]):
        q, k, v = (cu.to_device(rng.standard_normal((B, H, T, D)).astype(np.float32)) for _ in range(3))
        tf = timed(lambda: cu.attention_forward(q, k, v, causal=True), sync, reps)
        out, lse = cu.attention_forward(q, k, v, causal=True)
        tb = timed(lambda: cu.attention_backward(q, q, k, v, out, lse, causal=True), sync, reps)
        flops = 4.0 * B * H * T * T * D / 2                       # causal half
        q3, k3, v3 = (cu.to_device(x.numpy().reshape(B * H, T, D)) for x in (q, k, v))

        def composed():
            s = cu.matmul(q3, k3, False, True)                    # (BH, T, T)
            p = cu.softmax_forward(s, scale=1 / np.sqrt(D), causal=True)
            return cu.matmul(p, v3)

        tc = timed(composed, sync, reps)
        row = dict(kernel="attention", B=B, H=H, T=T, D=D, fwd_ms=tf * 1e3, bwd_ms=tb * 1e3,
                   fwd_tflops=flops / tf / 1e12, composed_ms=tc * 1e3)
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x.numpy()).cuda() for x in (q, k, v))
            mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()

            def torch_composed():
                s = (tq @ tk.transpose(-1, -2)) / np.sqrt(D)
                return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ tv

            row["torch_composed_ms"] = timed(torch_composed, tsync, reps) * 1e3
            row["sdpa_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, is_causal=True), tsync, reps) * 1e3
        rows.append(row)
        print(f"  T={T:5d}                        {row['fwd_ms']:8.2f} {row['fwd_tflops']:8.2f}   "
              f"{row['composed_ms']:8.2f} / {row.get('torch_composed_ms', float('nan')):8.2f}      "
              f"{row.get('sdpa_ms', float('nan')):8.2f} {row['bwd_ms']:8.2f}")

    rows.extend(gpt2_rows(cu, args, reps))

    cu.set_synchronous(True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=cu.device_name(), build=cu.build_info(), rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
