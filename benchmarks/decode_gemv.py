"""Bandwidth of the few-rows GEMM path on GPT-2 124M's decoding products.

While sampling one sequence, every linear layer multiplies one row by its
weight matrix: the product reads the whole matrix once and is bound by
memory. This prints the bytes of B read per second for the four block
products (12 distinct weight matrices each, as in the model, so B comes
from memory and not from cache) and the tied LM head (x·wteᵀ).

    python benchmarks/decode_gemv.py                 # all cores
    NUMFORMER_NUM_THREADS=1 python benchmarks/decode_gemv.py
    python benchmarks/decode_gemv.py --rows 8        # batch-8 decoding
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from numformer import _cpu

SHAPES = (("qkv", 768, 2304, False), ("mlp up", 768, 3072, False), ("mlp down", 3072, 768, False),
          ("attn proj", 768, 768, False), ("lm head", 768, 50257, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="M, rows multiplied at once (default 1)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"threads={_cpu.num_threads()} rows={args.rows} isa={_cpu.isa()}  (best of {args.reps})")
    for name, K, N, trans_b in SHAPES:
        layers = 1 if trans_b else 12
        weights = [rng.standard_normal((N, K) if trans_b else (K, N), dtype=np.float32) for _ in range(layers)]
        x = rng.standard_normal((args.rows, K), dtype=np.float32)

        def run():
            for w in weights:
                _cpu.matmul(x, w, trans_b=trans_b)

        run()
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:10s} {K}x{N}{'ᵀ' if trans_b else ' '}  {best / layers * 1e6:8.0f} us/product  "
              f"{layers * K * N * 4 / best / 1e9:6.1f} GB/s of B")


if __name__ == "__main__":
    main()
