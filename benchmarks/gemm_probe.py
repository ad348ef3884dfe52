"""Quick GEMM / softmax probe: numformer._cpu against NumPy (OpenBLAS), interleaved.

The machine is shared and noisy, so absolute times swing by 2-4x; what is
meaningful is the ratio of two implementations timed *alternately* in the
same process. Each shape runs ours, NumPy, ours, NumPy, ... and we report
the minimum of each (the run least disturbed by neighbours).

    python benchmarks/gemm_probe.py --threads 2            # GPT-2 GEMM shapes
    python benchmarks/gemm_probe.py --threads 1 --quick    # a subset
    python benchmarks/gemm_probe.py --softmax              # softmax rows
    python benchmarks/gemm_probe.py --peak                 # FMA peak, copy bandwidth

Thread counts must be fixed before NumPy loads OpenBLAS, hence the argument
parsing before the imports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--reps", type=int, default=5)
parser.add_argument("--quick", action="store_true", help="a few representative shapes")
parser.add_argument("--softmax", action="store_true", help="softmax forward/backward instead of GEMM")
parser.add_argument("--torch", action="store_true", help="also time torch (softmax)")
parser.add_argument("--peak", action="store_true", help="FMA peak and copy bandwidth only")
parser.add_argument("--only", default="", help="substring filter on the shape label")
args = parser.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMFORMER_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402

from numformer import _cpu  # noqa: E402
from numformer.bench.timing import wait_until_idle  # noqa: E402


def interleaved(fns, reps):
    """Min seconds of each callable, calling them round-robin `reps` times (after one warm-up).

    Before each sample we wait until the process is idle: OpenBLAS's workers
    spin ~0.1 s after a call and would otherwise take a core from whatever
    runs next (see numformer.bench.timing.wait_until_idle).
    """
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            wait_until_idle()
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def gemm_cases(quick):
    """(label, M, K, N, trans_a, trans_b) for the GPT-2 124M training products.

    Linear layer y = x·W (W stored K×N): forward A·B; dX = dY·Wᵀ (trans_b);
    dW = Xᵀ·dY (trans_a). The LM head is logits = x·wteᵀ with wte stored V×C.
    """
    cases = []
    ms = [4096] if quick else [2048, 4096]
    kns = [(768, 3072)] if quick else [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    for m in ms:
        for k, n in kns:
            cases.append((f"fwd  {m}x{k}x{n}", m, k, n, False, False))
            cases.append((f"dX   {m}x{n}x{k}", m, n, k, False, True))
            cases.append((f"dW   {k}x{m}x{n}", k, m, n, True, False))
    v = 50257
    cases.append((f"lm   4096x768x{v} (x·wteT)", 4096, 768, v, False, True))
    if not quick:
        cases.append((f"lmdX 4096x{v}x768", 4096, v, 768, False, False))
        cases.append((f"lmdW {v}x4096x768 (dlogitsT·x)", v, 4096, 768, True, False))
    return cases


def run_gemm(reps, only, quick):
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} isa={_cpu.isa()}  (min of {reps}, interleaved)")
    print(f"{'shape':34s} {'ours GF/s':>10s} {'numpy GF/s':>10s} {'ratio':>6s}")
    ratios = []
    for label, m, k, n, ta, tb in gemm_cases(quick):
        if only and only not in label:
            continue
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        a_op = a.T if ta else a
        b_op = b.T if tb else b
        flops = 2.0 * m * n * k
        big = flops > 1e11
        t_ours, t_np = interleaved(
            [lambda: _cpu.matmul(a, b, ta, tb, out=out), lambda: np.matmul(a_op, b_op, out=out)],
            max(2, reps // 2) if big else reps,
        )
        r = t_np / t_ours
        ratios.append(r)
        print(f"{label:34s} {flops / t_ours / 1e9:10.1f} {flops / t_np / 1e9:10.1f} {r:6.3f}", flush=True)
    if ratios:
        print(f"min ratio {min(ratios):.3f}  geomean {np.exp(np.mean(np.log(ratios))):.3f}")


def run_softmax(reps, use_torch):
    torch = None
    if use_torch:
        import torch

        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    from numformer.ops.softmax import softmax_backward_reference, softmax_reference

    print(f"threads={args.threads}  (min of {reps}; GB/s counts one read + one write, bwd two reads + one write)")
    for shape in [(49152, 1024), (4096, 50257), (48 * 1024, 256)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        y = _cpu.softmax_forward(x)
        fns = [lambda: _cpu.softmax_forward(x), lambda: softmax_reference(x)]
        bfns = [lambda: _cpu.softmax_backward(dy, y), lambda: softmax_backward_reference(dy, y)]
        if torch is not None:
            tx, tdy, ty = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(y)
            fns.append(lambda: torch.softmax(tx, -1))
            bfns.append(lambda: torch._softmax_backward_data(tdy, ty, -1, torch.float32))
        tf = interleaved(fns, reps)
        tb = interleaved(bfns, reps)
        nbytes = x.nbytes
        line = f"{str(shape):16s} fwd ours {tf[0]*1e3:7.1f} ms ({2*nbytes/tf[0]/1e9:5.1f} GB/s) x{tf[1]/tf[0]:.2f} numpy"
        if torch is not None:
            line += f" x{tf[2]/tf[0]:.2f} torch"
        line += f" | bwd ours {tb[0]*1e3:7.1f} ms ({3*nbytes/tb[0]/1e9:5.1f} GB/s) x{tb[1]/tb[0]:.2f} numpy"
        if torch is not None:
            line += f" x{tb[2]/tb[0]:.2f} torch"
        print(line, flush=True)


if __name__ == "__main__":
    if args.peak:
        for t in sorted({1, args.threads}):
            print(f"threads={t}: FMA peak {_cpu.measure_fma_peak(0.5, t):.1f} GFLOP/s, "
                  f"copy {_cpu.measure_copy_bandwidth(256 << 20, t):.1f} GB/s")
        sys.exit(0)
    if args.softmax:
        run_softmax(args.reps, args.torch)
    else:
        run_gemm(args.reps, args.only, args.quick)
