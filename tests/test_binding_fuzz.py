"""Extreme integers into every integer argument of every compiled binding (issue 15, defect 1).

A bounds check written ``pos0 + T > n`` wraps for a huge ``pos0`` and lets a
kernel write outside its array. Here every integer argument of every function
of ``numformer._cpu`` and ``numformer._cuda_emu`` gets the values that break
such arithmetic (0, ±1, 2**31 ± 1, 2**32, 2**63 - 1, -2**63, values past 64
bits, and "the limit minus the size" for each argument that has one), alone
(a fixed grid) and together (hypothesis). Each call must either raise a
Python exception (TypeError / ValueError / OverflowError) or return the
correct result with the memory around its output arrays untouched (canary
values before and after each array).

The calls run in a child process (this file run as a script), one per module
and mode, so a segfault fails a test instead of killing the suite; the child
prints each call before making it, and the failure names the call it died in.

Coverage: ``test_every_integer_argument_is_fuzzed`` reads the signature of
every function in ``dir(module)`` and fails when a binding has an integer
argument that no case below feeds (add a case to ``CASES``).

Longer run: ``NUMFORMER_FUZZ_EXAMPLES=2000 pytest tests/test_binding_fuzz.py``
(hypothesis examples per function; the default follows the profile: 20 under
``ci``, 5 under ``dev``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from numformer.ops.softmax import softmax_reference

EXTREMES = (0, 1, -1, 2, 2**31 - 1, 2**31, 2**31 + 1, -2**31, -2**31 - 1, 2**32, 2**32 + 1,
            2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 2**64 + 1)
REFUSALS = (TypeError, ValueError, OverflowError)
CANARY = np.float32(-123456.75)


# ----------------------------------------------------------------------------- helpers

class Guarded:
    """A C-contiguous float32 array with canary values just before and after it."""

    PAD = 16

    def __init__(self, shape, values=None):
        n = int(np.prod(shape))
        self.buf = np.full(n + 2 * self.PAD, CANARY, np.float32)
        self.a = self.buf[self.PAD:self.PAD + n].reshape(shape)   # contiguous view inside buf
        self.a[...] = 0.0 if values is None else values

    def check(self, name: str):
        pad = np.concatenate([self.buf[:self.PAD], self.buf[-self.PAD:]])
        assert np.all(pad == CANARY), f"memory around {name} was overwritten: {pad}"


def fits(start: int, count: int, n: int) -> bool:
    return 0 <= start and 0 <= count <= n and start <= n - count


# ----------------------------------------------------------------------------- _cpu cases

def cpu_embedding_backward(m, pos0=0):
    B, T, C, V, P = 2, 3, 4, 5, 7
    r = np.random.default_rng(1)
    dout = r.standard_normal((B, T, C)).astype(np.float32)
    ids = r.integers(0, V, (B, T))
    dwte, dwpe = Guarded((V, C)), Guarded((P, C))
    try:
        m.embedding_backward(dout, ids, dwte.a, dwpe.a, pos0)
    finally:
        dwte.check("dwte")
        dwpe.check("dwpe")
    assert fits(pos0, T, P), f"pos0 = {pos0} was accepted for T = {T}, P = {P}"
    ref_wte, ref_wpe = np.zeros((V, C), np.float32), np.zeros((P, C), np.float32)
    np.add.at(ref_wte, ids.reshape(-1), dout.reshape(-1, C))
    ref_wpe[pos0:pos0 + T] += dout.sum(axis=0)
    np.testing.assert_allclose(dwte.a, ref_wte, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dwpe.a, ref_wpe, rtol=1e-6, atol=1e-6)


def _xent_inputs():
    r = np.random.default_rng(2)
    z = r.standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 2], np.int64)
    return z, y


def _xent_reference(z, y, ignore):
    counted = y != ignore
    lse = np.log(np.exp(z.astype(np.float64)).sum(axis=1))
    total = sum(lse[n] - z[n, y[n]] for n in range(len(y)) if counted[n])
    return total, lse, counted


def cpu_cross_entropy_forward(m, ignore_index=-100):
    z, y = _xent_inputs()
    total, lse = m.cross_entropy_forward(z, y, ignore_index)
    ref_total, ref_lse, _ = _xent_reference(z, y, ignore_index)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-5)


def cpu_cross_entropy_backward(m, ignore_index=-100):
    z, y = _xent_inputs()
    _, lse, counted = _xent_reference(z, y, ignore_index)
    out = Guarded(z.shape)
    try:
        m.cross_entropy_backward(z, y, lse.astype(np.float32), 0.5, ignore_index, out=out.a)
    finally:
        out.check("out")
    ref = softmax_reference(z.astype(np.float64))
    ref[np.arange(len(y)), y] -= 1.0
    ref *= 0.5 * counted[:, None]
    np.testing.assert_allclose(out.a, ref, rtol=1e-5, atol=1e-6)


def cpu_adamw_step(m, step=1):
    r = np.random.default_rng(3)
    n = 9
    p0, g = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    p, mm, vv = Guarded(n, p0), Guarded(n), Guarded(n)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    try:
        m.adamw_step(p.a, g, mm.a, vv.a, None, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=0.0, step=step)
    finally:
        for name, a in (("params", p), ("m", mm), ("v", vv)):
            a.check(name)
    assert step >= 1, f"step = {step} was accepted"
    m1, v1 = (1 - b1) * g.astype(np.float64), (1 - b2) * g.astype(np.float64) ** 2
    bc1, bc2 = 1 - b1 ** min(step, 10**6), 1 - b2 ** min(step, 10**6)
    ref = p0 - lr / bc1 * m1 / (np.sqrt(v1) / np.sqrt(bc2) + eps)
    np.testing.assert_allclose(p.a, ref, rtol=1e-4, atol=1e-6)


def cpu_set_num_threads(m, n=1):
    before = m.num_threads()
    try:
        m.set_num_threads(n)
        assert n >= 1, f"n = {n} was accepted"
        assert m.num_threads() == min(n, 1024)
    finally:
        m.set_num_threads(before)


def cpu_measure_fma_peak(m, threads=1):
    gflops = m.measure_fma_peak(0.001, threads)
    assert 1 <= threads <= 1024, f"threads = {threads} was accepted"
    assert gflops > 0


def cpu_measure_copy_bandwidth(m, nbytes=1 << 16, threads=1):
    gbs = m.measure_copy_bandwidth(nbytes, threads)
    assert 1 <= nbytes <= 2**36 and 1 <= threads <= 1024, f"nbytes = {nbytes}, threads = {threads} accepted"
    assert gbs > 0


def copy_bandwidth_expensive(nbytes=1 << 16, threads=1):
    # Valid, but a correct run needs 2 * nbytes of memory (up to 128 GiB), and
    # hundreds of threads are slow on 2 cores; the refusals around them still run.
    valid = 1 <= nbytes <= 2**36 and 1 <= threads <= 1024
    return valid and (nbytes > 1 << 26 or threads > 16)


def fma_peak_expensive(threads=1):
    return 16 < threads <= 1024        # valid, but hundreds of OpenMP threads on a 2-core machine


def cpu_bpe_byte_id(m, byte_id=97):
    byte_ids = list(range(256))
    byte_ids[0] = byte_id
    bpe = m.BPE(byte_ids, [(97, 98, 0, 256)], None)
    assert 0 <= byte_id < 2**32 - 1, f"byte id {byte_id} was accepted"
    assert bpe.encode_chunk(b"ab") == [256]


def cpu_bpe_merge(m, left=97, right=98, priority=0, merged=256):
    bpe = m.BPE(list(range(256)), [(left, right, priority, merged)], None)
    assert all(0 <= v < 2**32 - 1 for v in (left, right, priority, merged)), "an out-of-range merge was accepted"
    expect = [merged] if (left, right) == (97, 98) else [97, 98]
    assert bpe.encode_chunk(b"ab") == expect


def cpu_bpe_whole(m, token_id=300):
    bpe = m.BPE(list(range(256)), [], {b"ab": token_id})
    assert 0 <= token_id < 2**32 - 1, f"whole-token id {token_id} was accepted"
    assert bpe.encode_chunk(b"ab") == [token_id]


def cpu_bpe_long_chunk(m, long_chunk=128):
    bpe = m.BPE(list(range(256)), [(97, 98, 0, 256), (256, 99, 1, 257)], None)
    bpe.long_chunk = long_chunk
    assert 0 <= long_chunk < 2**64, f"long_chunk = {long_chunk} was accepted"
    assert bpe.encode_chunk(b"abcab") == [257, 256]


# ----------------------------------------------------------------------------- _cuda_emu cases

def emu_embedding_forward(m, pos0=0):
    B, T, C, V, P = 2, 3, 4, 5, 7
    r = np.random.default_rng(4)
    ids = r.integers(0, V, (B, T))
    wte, wpe = r.standard_normal((V, C)).astype(np.float32), r.standard_normal((P, C)).astype(np.float32)
    x = m.embedding_forward(ids, wte, wpe, pos0)
    assert fits(pos0, T, P), f"pos0 = {pos0} was accepted for T = {T}, P = {P}"
    ref = (wte[ids] + wpe[pos0:pos0 + T]).reshape(B * T, C)
    np.testing.assert_allclose(x, ref, rtol=1e-6)


def _qkv(B, T, H, D, seed=5):
    return np.random.default_rng(seed).standard_normal((B * T, 3 * H * D)).astype(np.float32)


def _split_reference(qkv, B, T, H, D):
    return qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)   # (3, B, H, T, D)


def emu_split_heads(m, batch=2, heads=2):
    rows, cols = 6, 12                             # qkv (B*T, 3*H*D): any batch | 6 and heads | 4 is valid
    qkv = _qkv(1, rows, 1, cols // 3)
    q, k, v = m.split_heads(qkv, batch, heads)
    assert batch >= 1 and heads >= 1 and rows % batch == 0 and (cols // 3) % heads == 0, \
        f"batch = {batch}, heads = {heads} accepted for qkv {qkv.shape}"
    ref = _split_reference(qkv, batch, rows // batch, heads, cols // 3 // heads)
    for got, want in zip((q, k, v), ref):
        np.testing.assert_array_equal(got, want)


def emu_split_heads_to_cache(m, batch=2, pos0=1):
    B, T, H, D, Tmax = 2, 2, 1, 2, 5
    qkv = _qkv(B, T, H, D)
    kc, vc = Guarded((B, H, Tmax, D)), Guarded((B, H, Tmax, D))
    try:
        q = m.split_heads_to_cache(qkv, batch, kc.a, vc.a, pos0)
    finally:
        kc.check("k_cache")
        vc.check("v_cache")
    assert batch == B and fits(pos0, T, Tmax), f"batch = {batch}, pos0 = {pos0} accepted (T = {T}, Tmax = {Tmax})"
    rq, rk, rv = _split_reference(qkv, B, T, H, D)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(kc.a[:, :, pos0:pos0 + T], rk)
    np.testing.assert_array_equal(vc.a[:, :, pos0:pos0 + T], rv)


def emu_attention_forward_cached(m, length=3):
    B, H, Tq, Tmax, D = 1, 1, 1, 4, 4
    r = np.random.default_rng(6)
    q = r.standard_normal((B, H, Tq, D)).astype(np.float32)
    kc, vc = (r.standard_normal((B, H, Tmax, D)).astype(np.float32) for _ in range(2))
    out, lse = m.attention_forward_cached(q, kc, vc, length)
    assert 1 <= length <= Tmax, f"length = {length} was accepted"
    s = q[0, 0].astype(np.float64) @ kc[0, 0, :length].T.astype(np.float64) / np.sqrt(D)   # (Tq, length)
    np.testing.assert_allclose(out[0, 0], softmax_reference(s) @ vc[0, 0, :length], rtol=1e-4, atol=1e-5)


def emu_selftest_tree_sum(m, arg1=64):
    x = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
    got = m._selftest_tree_sum(x, arg1)
    assert 8 <= arg1 <= 1024, f"threads = {arg1} was accepted"
    if arg1 & (arg1 - 1) == 0:                     # the self-test's tree sums a power-of-two block only
        np.testing.assert_allclose(got, x.sum(axis=1), rtol=1e-5, atol=1e-5)


def emu_selftest_warp_ops(m, arg1=1):
    x = np.arange(-5, 27, dtype=np.int32)
    got = m._selftest_warp_ops(x, arg1)
    assert got.shape == (8, 32)
    if 0 <= arg1 < 32:                             # the xor shuffle is defined for any lane mask < 32
        np.testing.assert_array_equal(got[0], x[np.arange(32) ^ arg1])


# ----------------------------------------------------------------------------- the table

@dataclass
class Case:
    module: str
    fn: str                          # the function, "Class.attribute" for a class member
    run: Callable                    # run(module, **ints): call, then check the result
    near: dict = field(default_factory=dict)          # param -> the limit-minus-size values
    allowed: tuple = REFUSALS        # exceptions that count as a refusal
    expensive: Callable | None = None                 # valid but too big to run here

    def int_params(self):
        """The integers run() takes: named as in the binding's signature (arg1 when positional)."""
        return tuple(p for p in inspect.signature(self.run).parameters if p != "m")


P_EMB, T_EMB = 7, 3
NEAR_POS = [P_EMB - T_EMB, P_EMB - T_EMB + 1, P_EMB, -T_EMB, 2**63 - T_EMB, 2**63 - T_EMB + 1,
            2**63 - 1 - T_EMB, 2**31 - T_EMB, 2**31 - T_EMB + 1, 2**32 - T_EMB]
CASES = [
    Case("_cpu", "embedding_backward", cpu_embedding_backward, {"pos0": NEAR_POS}),
    Case("_cpu", "cross_entropy_forward", cpu_cross_entropy_forward, {"ignore_index": [2, 3, -100]}),
    Case("_cpu", "cross_entropy_backward", cpu_cross_entropy_backward, {"ignore_index": [2, 3, -100]}),
    Case("_cpu", "adamw_step", cpu_adamw_step, {"step": [10**6, 10**9]}),
    Case("_cpu", "set_num_threads", cpu_set_num_threads, {"n": [1024, 1025]}),
    Case("_cpu", "measure_fma_peak", cpu_measure_fma_peak, {"threads": [1024, 1025]}, expensive=fma_peak_expensive),
    Case("_cpu", "measure_copy_bandwidth", cpu_measure_copy_bandwidth,
         {"nbytes": [2**36, 2**36 + 1, 63, 64], "threads": [1024, 1025]}, expensive=copy_bandwidth_expensive),
    Case("_cpu", "BPE.__init__:byte_ids", cpu_bpe_byte_id, {"byte_id": [2**32 - 2, 2**32 - 1]}),
    Case("_cpu", "BPE.__init__:merges", cpu_bpe_merge, {"merged": [2**32 - 2, 2**32 - 1]}),
    Case("_cpu", "BPE.__init__:whole", cpu_bpe_whole, {"token_id": [2**32 - 2, 2**32 - 1]}),
    Case("_cpu", "BPE.long_chunk", cpu_bpe_long_chunk, {"long_chunk": [2**64 - 1, 3, 4, 5]}),
    Case("_cuda_emu", "embedding_forward", emu_embedding_forward, {"pos0": NEAR_POS}),
    Case("_cuda_emu", "split_heads", emu_split_heads,
         # (2**64 + 2) // 3: 3 * heads wraps to 2 in 64 bits, which divides the 12 columns
         {"heads": [(2**64 + 2) // 3, (2**64 + 1) // 3, 2**62, 3, 4], "batch": [3, 6, 7, 2**62]}),
    Case("_cuda_emu", "split_heads_to_cache", emu_split_heads_to_cache,
         {"pos0": [3, 4, 5, -2, 2**63 - 2, 2**63 - 1, 2**31 - 2, 2**32 - 2], "batch": [4, 2**62]}),
    Case("_cuda_emu", "attention_forward_cached", emu_attention_forward_cached, {"length": [3, 4, 5]}),
    Case("_cuda_emu", "_selftest_tree_sum", emu_selftest_tree_sum, {"arg1": [7, 8, 1024, 1025]},
         allowed=REFUSALS + (RuntimeError,)),       # the emulator refuses a bad launch with RuntimeError
    Case("_cuda_emu", "_selftest_warp_ops", emu_selftest_warp_ops, {"arg1": [31, 32, 33]},
         allowed=REFUSALS + (RuntimeError,)),
]
# Signature names of the BPE members' integers (they sit inside sequences and dicts).
COVERED_EXTRA = {"BPE.__init__:byte_ids", "BPE.__init__:merges", "BPE.__init__:whole", "BPE.long_chunk"}
INT_TYPES = ("int", "typing.SupportsInt", "SupportsInt", "typing.SupportsIndex", "SupportsIndex")


def case_params(case):
    """(fn, param) pairs a case covers, with the signature's names."""
    if ":" in case.fn or case.fn.startswith("BPE."):
        return {(case.fn, "")}
    return {(case.fn, p) for p in case.int_params()}


def signature_int_params(mod):
    """(function, integer parameter) of every public callable of ``mod`` (pybind11 signatures),
    plus every class (whose members need a hand-written case)."""
    found = set()
    for name in dir(mod):
        if name.startswith("__"):
            continue
        obj = getattr(mod, name)
        if isinstance(obj, type):
            found.add((f"class {name}", ""))
            continue
        if not callable(obj):
            continue
        for line in (obj.__doc__ or "").splitlines():
            if re.match(rf"^(\d+\. )?{re.escape(name)}\(", line):    # each overload's signature line
                for param, typ in re.findall(r"(\w+): ([\w.]+)", line):
                    if typ in INT_TYPES:
                        found.add((name, param))
    return found


# ----------------------------------------------------------------------------- the child

def _call(case, mod, kw):
    """'ok' / 'refused: ...' / 'skipped (...)'; AssertionError for a wrong result."""
    if case.expensive is not None and case.expensive(**kw):
        return "skipped (valid but too large to run here)"
    try:
        case.run(mod, **kw)
    except case.allowed as exc:
        return f"refused: {type(exc).__name__}"
    return "ok"


def _emit(obj):
    print(json.dumps(obj), flush=True)


def child_grid(module: str):
    mod = importlib.import_module(f"numformer.{module}")
    wrong = 0
    for case in (c for c in CASES if c.module == module):
        for param in case.int_params():
            for v in dict.fromkeys(EXTREMES + tuple(case.near.get(param, ()))):
                desc = f"{module}.{case.fn}({param}={v})"
                _emit({"start": desc})
                try:
                    outcome = _call(case, mod, {param: v})
                except AssertionError as exc:
                    wrong += 1
                    outcome = f"WRONG: {exc}"
                _emit({"case": desc, "outcome": outcome})
    _emit({"done": True, "wrong": wrong})


def child_hypothesis(module: str, examples: int):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    mod = importlib.import_module(f"numformer.{module}")
    for case in (c for c in CASES if c.module == module):
        values = {p: st.one_of(st.sampled_from(EXTREMES + tuple(case.near.get(p, ()))),
                               st.integers(-2**65, 2**65), st.integers(-70, 70))
                  for p in case.int_params()}

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(st.fixed_dictionaries(values))
        def fuzz(kw):
            _emit({"start": f"{module}.{case.fn}({kw})"})
            _call(case, mod, kw)

        fuzz()
    _emit({"done": True, "wrong": 0})


# ----------------------------------------------------------------------------- the tests


MODULES = ("_cpu", "_cuda_emu")


def _module(name):
    try:
        return importlib.import_module(f"numformer.{name}")
    except ImportError as exc:
        pytest.skip(f"numformer.{name} is not built: {exc}")


def run_child(*args, timeout=300):
    """Run this file as a child; fail naming the call it crashed in, if it did."""
    env = dict(os.environ, NUMFORMER_NUM_THREADS="2", NUMFORMER_EMU_SCHEDULE="threads")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    started = [ln["start"] for ln in lines if "start" in ln]
    done = [ln for ln in lines if "done" in ln]
    if proc.returncode != 0 or not done:
        last = started[-1] if started else "(before the first call)"
        pytest.fail(f"the child stopped (exit status {proc.returncode}; < 0: killed by a signal) in {last}\n"
                    f"stderr tail:\n{proc.stderr[-3000:]}")
    return lines


@pytest.mark.parametrize("module", MODULES)
def test_every_integer_argument_is_fuzzed(module):
    mod = _module(module)
    covered = set().union(*(case_params(c) for c in CASES if c.module == module))
    found = signature_int_params(mod)
    classes = {f for f in found if f[0].startswith("class ")}
    uncovered = found - classes - covered
    assert not uncovered, f"integer arguments of numformer.{module} with no fuzz case: {sorted(uncovered)}"
    for cls, _ in classes:                # a class's integers (in sequences, attributes) need their own case
        short = cls.split()[1]
        assert any(c.startswith(short + ".") for c in COVERED_EXTRA), \
            f"numformer.{module}.{short} has no fuzz case: add its integer members to CASES"
    stale = {fn for fn, p in covered if p and (fn, p) not in found}
    assert not stale, f"cases for arguments that no longer exist: {sorted(stale)}"


def test_the_signature_reader_finds_integer_arguments():
    """The coverage test is only as good as this reader: a new binding with an integer
    argument (pybind11 writes int, typing.SupportsInt or SupportsIndex) must show up."""
    import types

    def fn():
        pass
    fn.__doc__ = "new_op(x: object, pos0: typing.SupportsInt, n: int = 0, flag: bool = False) -> None\n\nDoc."
    fake = types.SimpleNamespace(new_op=fn, Klass=type("Klass", (), {}), constant=3)
    assert signature_int_params(fake) == {("new_op", "pos0"), ("new_op", "n"), ("class Klass", "")}


@pytest.mark.parametrize("module", MODULES)
def test_extreme_integers_grid(module):
    """Every integer argument, one at a time, at every extreme value."""
    _module(module)
    lines = run_child("grid", module)
    wrong = [f"{ln['case']}: {ln['outcome']}" for ln in lines if ln.get("outcome", "").startswith("WRONG")]
    assert not wrong, "\n".join(wrong)
    outcomes = [ln["outcome"] for ln in lines if "outcome" in ln]
    assert any(o == "ok" for o in outcomes) and any(o.startswith("refused") for o in outcomes)


@pytest.mark.parametrize("module", MODULES)
def test_extreme_integers_hypothesis(module):
    """All integer arguments of a function at once, drawn by hypothesis (extremes and any int)."""
    _module(module)
    from hypothesis import settings
    examples = int(os.environ.get("NUMFORMER_FUZZ_EXAMPLES", max(5, settings.default.max_examples // 10)))
    run_child("hypothesis", module, str(examples))


def test_cuda_shapes_and_counts_are_checked_before_the_device():
    """numformer._cuda (built where nvcc is): a DeviceArray's byte count is checked before
    cudaMalloc (a wrapped count would allocate a small block for a huge shape), and the
    benchmark counts are bounded; all before asking for a device, so this runs without one."""
    cuda = _module("_cuda")
    for shape in ([2**62, 4], [2**31, 2**31, 2**31], [-1], [2**63 - 1, 2]):
        with pytest.raises(ValueError, match="DeviceArray|negative"):
            cuda.empty(shape)
    for iters in (0, -1, 2**24 + 1, 2**31 - 1):
        with pytest.raises(ValueError, match="iters"):
            cuda.measure_fma_peak(iters)
    for repeat in (0, 10001, 2**31 - 1):
        with pytest.raises(ValueError, match="repeat"):
            cuda.measure_copy_bandwidth(1 << 20, repeat)


# The reproducers, each in a child of its own.
REPRO_SMALL = """
import numpy as np
from numformer import _cpu
C, P, pad = 2, 8, 16
buf = np.full(pad + P * C + pad, -7.0, np.float32)
dwpe = buf[pad:pad + P * C].reshape(P, C)          # contiguous, with canaries on both sides
dwpe[...] = 0.0
try:
    _cpu.embedding_backward(np.ones((1, 2, C), np.float32), np.zeros((1, 2), np.int64),
                            np.zeros((3, C), np.float32), dwpe, 2**63 - 1)
    print("accepted")
except ValueError as exc:
    print("refused:", exc)
assert (buf[:pad] == -7).all() and (buf[-pad:] == -7).all(), ("canaries overwritten", buf[:pad], buf[-pad:])
assert (dwpe == 0).all()
print("intact")
"""

REPRO_LARGE = """
import numpy as np
from numformer import _cpu
T, C = 2**22, 4
try:
    _cpu.embedding_backward(np.ones((1, T, C), np.float32), np.zeros((1, T), np.int64),
                            np.zeros((3, C), np.float32), np.zeros((8, C), np.float32), 2**63 - T + 1)
    print("accepted")
except ValueError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("code", [REPRO_SMALL, REPRO_LARGE], ids=["pos0=2**63-1,T=2", "T=2**22,pos0=2**63-T+1"])
def test_embedding_backward_huge_pos0_is_refused(code):
    _module("_cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the child died (exit status {proc.returncode}): {proc.stderr[-2000:]}"
    assert "refused: embedding_backward: pos0" in proc.stdout, proc.stdout


if __name__ == "__main__":                        # the child: python test_binding_fuzz.py grid|hypothesis MODULE [N]
    if sys.argv[1] == "grid":
        child_grid(sys.argv[2])
    else:
        child_hypothesis(sys.argv[2], int(sys.argv[3]))
