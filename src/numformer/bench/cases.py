"""The kernel cases: GEMM, softmax forward/backward, causal attention.

A :class:`Case` knows its row's description and how to build its inputs and
implementations (``setup``), so that cases skipped by ``--filter`` cost
nothing and each case's arrays are freed before the next one is built.

Work counted per call (every implementation is credited with the same work,
so rates compare like times do):

* GEMM ``op(A)·op(B)`` with ``op(A)``: (M, K), ``op(B)``: (K, N): ``2·M·K·N`` FLOP.
* softmax forward: one read of x + one write of y = ``8·n`` bytes (float32);
  backward: reads dy and y, writes dx = ``12·n`` bytes.
* causal attention, B·H heads of T queries, T keys, head size D: the pairs
  (i, j ≤ i) number ``T(T+1)/2`` per head and each matmul over them costs
  ``2·D`` FLOP per pair, so one "causal matmul" is ``B·H·T(T+1)·D`` FLOP.
  Forward = 2 of them (QKᵀ, PV); forward + backward = 7 (2 forward, the
  recomputation of QKᵀ that flash attention does, and dV, dP, dQ, dK).
  Implementations that skip the recomputation still get credited 7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from numformer import backend
from numformer.bench.threads import cpu_module, torch_module


@dataclass
class Case:
    op: str
    label: str
    shape: list
    form: str
    unit: str
    work: float
    setup: Callable[[], dict]          # -> {impl: callable}; may also hold "_notes": [str]
    peak_kind: str | None = None       # "fma" | "bandwidth" | "roofline" | None
    threads: int | None = None         # None: the run's thread count
    dtype: str = "float32"
    min_runs: int = 5
    max_runs: int = 25
    warmup: int = 1
    budget: float | None = None        # seconds for the timed rounds; None: the run's default
    notes: str = ""
    kind: str = "kernel"               # "kernel" | "model" (for grouping in the output)
    extra: dict = field(default_factory=dict)
    # When NumPy's BLAS cannot be limited to ``threads`` in this process (no
    # threadpoolctl): runs -> seconds per call, measured in a subprocess.
    numpy_subprocess: Callable[[int], list] | None = None

    @property
    def name(self) -> str:
        shape = "×".join(str(s) for s in self.shape)
        return " ".join(filter(None, [self.op, self.label, self.form, shape]))


@dataclass
class Sizes:
    """Every size the suite uses; presets: ``default`` (< 10 min on 2 cores), ``full``
    (default + the LM head's backward forms and the NumPy-backend model rows),
    ``quick`` (~1 min) and ``tiny`` (for tests)."""

    gemm_m: tuple = (2048, 4096)
    gemm_kn: tuple = (("qkv", 768, 2304), ("attn proj", 768, 768), ("mlp up", 768, 3072),
                      ("mlp down", 3072, 768))
    gemm_backward_m: tuple = (4096,)          # the dX / dW forms are measured at these M
    gemm_backward_kn: tuple | None = None     # None: all of gemm_kn
    lm_head: tuple | None = (4096, 768, 50257)  # (B·T, C, V)
    lm_head_backward: bool = False            # its dX and dW forms too (--full: ~100 s more)
    gemm_1thread: int | None = 1024
    softmax_shapes: tuple = ((196608, 256), (98304, 512), (49152, 1024), (4096, 50257))
    attn_bhd: tuple = (4, 12, 64)
    attn_t: tuple = (256, 1024, 2048)
    gpt2: dict = field(default_factory=dict)  # GPT2Config overrides ({} = GPT-2 124M)
    train: bool = True                        # the training-step row (and its breakdown)
    train_bt: tuple = (4, 256)
    train_numpy: bool = False                 # also time the training step on the NumPy backend (--full)
    gen_prompt: int = 16
    gen_new: int = 128
    gen_batches: tuple = (1, 8)
    gen_new_batched: int = 16                 # new tokens per row at batch > 1: 8 × 16 = the 128 of batch 1
    gen_numpy: bool = False                   # also time generation on the NumPy backend (--full)
    model_runs: int = 3                       # timed steps / generations after the warm-up (3: one disturbed sample cannot move the median)
    budget: float = 1.5                       # seconds of timed rounds per kernel case
    fma_seconds: float = 0.3
    copy_bytes: int = 256 << 20
    sgemm_n: int = 2048

    @classmethod
    def default(cls) -> "Sizes":
        return cls()

    @classmethod
    def full(cls) -> "Sizes":
        return cls(lm_head_backward=True, train_numpy=True, gen_numpy=True)

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(gemm_m=(4096,), gemm_kn=(("qkv", 768, 2304), ("mlp down", 3072, 768)),
                   gemm_backward_kn=(("mlp up", 768, 3072),), lm_head=None,
                   softmax_shapes=((49152, 1024), (4096, 50257)), attn_t=(1024,),
                   train=False, gen_new=32, gen_new_batched=16, model_runs=1, budget=0.6, fma_seconds=0.15,
                   copy_bytes=128 << 20)

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(gemm_m=(64,), gemm_kn=(("qkv", 32, 96), ("mlp down", 128, 32)), gemm_backward_m=(64,),
                   lm_head_backward=True, train_numpy=True, gen_numpy=True,
                   gemm_backward_kn=(("qkv", 32, 96),), lm_head=(64, 32, 500),
                   gemm_1thread=64, softmax_shapes=((64, 32), (8, 500)), attn_bhd=(1, 2, 16), attn_t=(16,),
                   gpt2=dict(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2),
                   train_bt=(2, 16), gen_prompt=4, gen_new=4, gen_new_batched=3, gen_batches=(1, 2),
                   model_runs=2, budget=0.02,
                   fma_seconds=0.01, copy_bytes=1 << 20, sgemm_n=64)


def _rng():
    return np.random.default_rng(0)


def _ours(fn):
    """Wrap ``fn`` to run on the ``cpu`` backend (``numformer._cpu``)."""
    def run():
        with backend.use("cpu"):
            return fn()
    return run


def _numpy(fn):
    def run():
        with backend.use("numpy"):
            return fn()
    return run


# ----------------------------------------------------------------------------- GEMM

FORMS = {"A·B": (False, False), "A·Bᵀ": (False, True), "Aᵀ·B": (True, False)}


def gemm_case(M: int, K: int, N: int, form: str, label: str = "", threads: int | None = None,
              use_torch: bool = True, notes: str = "") -> Case:
    """``op(A)·op(B)`` with op(A): (M, K), op(B): (K, N); ``form`` says which operand
    is stored transposed (as the backward pass stores it: dX = dY·Wᵀ, dW = Xᵀ·dY)."""
    ta, tb = FORMS[form]

    def setup():
        rng = _rng()
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        a_np = a.T if ta else a                    # views: OpenBLAS reads them transposed, no copy
        b_np = b.T if tb else b
        # Kernel against kernel: each implementation writes into its own
        # output, allocated and touched once here, so no row pays (or, with
        # our output cache, skips) the OS zeroing fresh pages.
        out_ours, out_np = np.zeros((M, N), np.float32), np.zeros((M, N), np.float32)
        impls = {}
        if cpu_module() is not None:
            impls["ours"] = _ours(lambda: backend.matmul(a, b, trans_a=ta, trans_b=tb, out=out_ours))
        impls["numpy"] = lambda: np.matmul(a_np, b_np, out=out_np)
        torch = torch_module() if use_torch else None
        if torch is not None:
            ta_t, tb_t = torch.from_numpy(a), torch.from_numpy(b)
            ta_t = ta_t.T if ta else ta_t
            tb_t = tb_t.T if tb else tb_t
            out_t = torch.zeros((M, N), dtype=torch.float32)

            def run_torch():
                with torch.no_grad():
                    return torch.matmul(ta_t, tb_t, out=out_t)
            impls["torch"] = run_torch
        return impls

    sub = None
    if threads is not None and form == "A·B":
        from numformer.bench.machine import numpy_sgemm_subprocess

        sub = lambda runs: numpy_sgemm_subprocess(M, K, N, runs, threads)  # noqa: E731
    return Case("gemm", label, [M, K, N], form, "GFLOP/s", 2.0 * M * K * N, setup, "fma",
                threads=threads, notes=notes, numpy_subprocess=sub)


def gemm_cases(sizes: Sizes, use_torch: bool = True) -> list[Case]:
    cases = []
    for M in sizes.gemm_m:
        for label, K, N in sizes.gemm_kn:
            cases.append(gemm_case(M, K, N, "A·B", label, use_torch=use_torch))
    back_kn = sizes.gemm_kn if sizes.gemm_backward_kn is None else sizes.gemm_backward_kn
    for M in sizes.gemm_backward_m if back_kn else ():
        for label, K, N in back_kn:
            # y = x·W, x: (M, K), W: (K, N)  ⇒  dX = dY·Wᵀ: (M, N)·(N, K);  dW = Xᵀ·dY: (K, M)·(M, N)
            cases.append(gemm_case(M, N, K, "A·Bᵀ", f"{label} dX", use_torch=use_torch))
            cases.append(gemm_case(K, M, N, "Aᵀ·B", f"{label} dW", use_torch=use_torch))
    if sizes.lm_head:
        BT, C, V = sizes.lm_head
        # logits = x·wteᵀ (wte stored (V, C)); dx = dlogits·wte; dwte = dlogitsᵀ·x
        cases.append(gemm_case(BT, C, V, "A·Bᵀ", "LM head", use_torch=use_torch))
        if sizes.lm_head_backward:
            cases.append(gemm_case(BT, V, C, "A·B", "LM head dX", use_torch=use_torch))
            cases.append(gemm_case(V, BT, C, "Aᵀ·B", "LM head dW", use_torch=use_torch))
    if sizes.gemm_1thread:
        n = sizes.gemm_1thread
        cases.append(gemm_case(n, n, n, "A·B", "", threads=1, use_torch=use_torch))
    return cases


# ----------------------------------------------------------------------------- softmax


def softmax_cases(sizes: Sizes, use_torch: bool = True) -> list[Case]:
    from numformer.ops.softmax import softmax_backward_reference, softmax_reference

    cases = []
    for rows, n in sizes.softmax_shapes:
        count = rows * n

        def setup_fwd(rows=rows, n=n):
            x = (_rng().standard_normal((rows, n), dtype=np.float32) * 3).astype(np.float32)
            impls = {}
            if cpu_module() is not None:
                impls["ours"] = _ours(lambda: backend.softmax(x))
            impls["numpy"] = lambda: softmax_reference(x)
            torch = torch_module() if use_torch else None
            if torch is not None:
                xt = torch.from_numpy(x)
                impls["torch"] = lambda: torch.softmax(xt, dim=-1)
            return impls

        def setup_bwd(rows=rows, n=n):
            rng = _rng()
            y = softmax_reference((rng.standard_normal((rows, n), dtype=np.float32) * 3).astype(np.float32))
            dy = rng.standard_normal((rows, n), dtype=np.float32)
            impls = {}
            if cpu_module() is not None:
                impls["ours"] = _ours(lambda: backend.softmax_backward(dy, y))
            impls["numpy"] = lambda: softmax_backward_reference(dy, y)
            torch = torch_module() if use_torch else None
            if torch is not None:
                yt, dyt = torch.from_numpy(y), torch.from_numpy(dy)
                # the op autograd runs for softmax's backward: dx = y ⊙ (dy − Σ dy⊙y)
                aten = torch.ops.aten._softmax_backward_data
                impls["torch"] = lambda: aten(dyt, yt, -1, torch.float32)
            return impls

        cases.append(Case("softmax", "", [rows, n], "fwd", "GB/s", 8.0 * count, setup_fwd, "bandwidth"))
        cases.append(Case("softmax", "", [rows, n], "bwd", "GB/s", 12.0 * count, setup_bwd, "bandwidth"))
    return cases


# ----------------------------------------------------------------------------- attention


def attention_flops(B: int, H: int, T: int, D: int, matmuls: int) -> float:
    """Causal attention FLOPs: ``matmuls`` × 2·D per (query, key ≤ query) pair."""
    return float(matmuls) * B * H * T * (T + 1) * D


def attention_cases(sizes: Sizes, use_torch: bool = True) -> list[Case]:
    from numformer.ops import attention

    B, H, D = sizes.attn_bhd
    cases = []
    for T in sizes.attn_t:
        def make_inputs(T=T):
            rng = _rng()
            q, k, v, do = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4))
            return q, k, v, do

        def setup_fwd(T=T):
            q, k, v, _ = make_inputs(T)
            fwd = lambda: attention.forward(q, k, v, causal=True)[0]  # noqa: E731
            impls = {}
            if cpu_module() is not None:
                impls["ours"] = _ours(fwd)
            impls["numpy"] = _numpy(fwd)
            torch = torch_module() if use_torch else None
            if torch is not None:
                import torch.nn.functional as F

                qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))

                def run_torch():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                impls["torch"] = run_torch
            return impls

        def setup_fwd_bwd(T=T):
            q, k, v, do = make_inputs(T)

            def fwd_bwd():
                out, cache = attention.forward(q, k, v, causal=True)
                return attention.backward(do, cache)
            impls = {}
            if cpu_module() is not None:
                impls["ours"] = _ours(fwd_bwd)
            impls["numpy"] = _numpy(fwd_bwd)
            torch = torch_module() if use_torch else None
            if torch is not None:
                import torch.nn.functional as F

                qt, kt, vt = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
                dot = torch.from_numpy(do)

                def run_torch():
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                    return torch.autograd.grad(out, (qt, kt, vt), dot)
                impls["torch"] = run_torch
            return impls

        shape = [B, H, T, D]
        cases.append(Case("attention", "causal", shape, "fwd", "GFLOP/s",
                          attention_flops(B, H, T, D, 2), setup_fwd, "fma"))
        cases.append(Case("attention", "causal", shape, "fwd+bwd", "GFLOP/s",
                          attention_flops(B, H, T, D, 7), setup_fwd_bwd, "fma"))
    return cases


def kernel_cases(sizes: Sizes, use_torch: bool = True) -> list[Case]:
    return gemm_cases(sizes, use_torch) + softmax_cases(sizes, use_torch) + attention_cases(sizes, use_torch)
