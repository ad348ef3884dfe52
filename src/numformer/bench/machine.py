"""What the machine can do: FMA peak (GFLOP/s) and copy bandwidth (GB/s).

Measured at the start of every run, because on shared machines the numbers
move: every row's "fraction of peak" is relative to *this* run's ceilings.

* **FMA peak**: ``numformer._cpu.measure_fma_peak(seconds, threads)`` (a tight
  loop of independent vector FMAs, GFLOP/s) when the extension has it.
  Without it, NumPy cannot express an FMA-bound loop, so we report OpenBLAS
  ``sgemm`` at 2048³ as the *practical* peak and say so in ``fma_method``.
* **Copy bandwidth**: ``numformer._cpu.measure_copy_bandwidth(nbytes, threads)``
  when present, else ``np.copyto`` between two large arrays, split across
  ``threads`` Python threads (NumPy releases the GIL while copying). Bytes
  counted: read + written, i.e. 2 × the array size per copy.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from numformer.bench.threads import cpu_module, limit_threads, numpy_threads_settable


def _as_number(value, *keys) -> float:
    """Accept a plain number or a dict from the extension (keys tried in order)."""
    if isinstance(value, dict):
        for k in keys:
            if k in value:
                return float(value[k])
        raise ValueError(f"no {keys} in {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- NumPy sgemm


_SGEMM_SCRIPT = """
import json, sys, time
import numpy as np
n, m, k, runs = (int(v) for v in sys.argv[1:5])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, k), dtype=np.float32)
b = rng.standard_normal((k, m), dtype=np.float32)
c = np.empty((n, m), np.float32)
np.matmul(a, b, out=c)
samples = []
for _ in range(runs):
    t0 = time.perf_counter(); np.matmul(a, b, out=c); samples.append(time.perf_counter() - t0)
print(json.dumps(samples))
"""


def numpy_sgemm_subprocess(M: int, K: int, N: int, runs: int, threads: int) -> list[float]:
    """Seconds per ``np.matmul`` of (M, K)·(K, N), measured in a fresh interpreter
    whose BLAS was started with ``threads`` threads (``OPENBLAS_NUM_THREADS``)."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run([sys.executable, "-c", _SGEMM_SCRIPT, str(M), str(N), str(K), str(runs)],
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def numpy_sgemm_gflops(n: int, threads: int, runs: int = 3) -> float:
    """Best GFLOP/s of NumPy's ``n³`` sgemm with ``threads`` BLAS threads."""
    flops = 2.0 * n ** 3
    if numpy_threads_settable() or threads == _blas_default_threads():
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), np.float32)
        with limit_threads(threads, use_torch=False):
            np.matmul(a, b, out=c)
            best = float("inf")
            for _ in range(runs):
                t0 = time.perf_counter()
                np.matmul(a, b, out=c)
                best = min(best, time.perf_counter() - t0)
        return flops / best / 1e9
    return flops / min(numpy_sgemm_subprocess(n, n, n, runs, threads)) / 1e9


def _blas_default_threads() -> int:
    env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- bandwidth


def numpy_copy_bandwidth(nbytes: int, threads: int, runs: int = 5) -> float:
    """GB/s (read + written) of ``np.copyto`` over ``nbytes``, split across threads."""
    n = max(threads, nbytes // 4)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = [(dst[lo:hi], src[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def copy(pair):
        np.copyto(pair[0], pair[1])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, chunks))                       # warm-up: page faults
        for _ in range(runs):
            t0 = time.perf_counter()
            list(pool.map(copy, chunks))
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n * 4 / best / 1e9


# ----------------------------------------------------------------------------- the machine


def describe() -> dict:
    """CPU, core count, library versions: what a reader needs to interpret the numbers."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info.setdefault("cpu", platform.processor() or "unknown")
    cpu = cpu_module()
    if cpu is not None:
        info["numformer_cpu"] = cpu.build_info() if hasattr(cpu, "build_info") else "present"
        if hasattr(cpu, "isa"):
            info["isa"] = cpu.isa()
        if hasattr(cpu, "output_cache_info"):
            cache = cpu.output_cache_info()
            info["output_cache"] = (f"results of >= {cache['min_bytes'] >> 20} MiB reuse freed blocks, "
                                    f"up to {cache['limit_bytes'] >> 20} MiB idle (NUMFORMER_OUTPUT_CACHE_MB)")
    else:
        info["numformer_cpu"] = None
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')}, "
                        f"{d.get('num_threads')} threads)" for d in threadpool_info()
                        if d.get("user_api") == "blas"]
    except Exception:
        pass
    for dist in ("torch", "transformers", "matplotlib", "threadpoolctl"):
        info[dist] = _installed_version(dist)      # without importing them (slow, optional)
    return info


def _installed_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def measure_peaks(threads: int, *, fma_seconds: float = 0.3, copy_bytes: int = 256 << 20,
                  sgemm_n: int = 2048) -> dict:
    """FMA peak and copy bandwidth with 1 thread and with ``threads`` threads."""
    cpu = cpu_module()
    counts = sorted({1, threads})
    peaks: dict = {"threads": threads}
    if cpu is not None and hasattr(cpu, "measure_fma_peak"):
        peaks["fma_method"] = "numformer._cpu.measure_fma_peak (tight loop of vector FMAs)"
        fma = {t: _as_number(cpu.measure_fma_peak(fma_seconds, t), "gflops", "gflop_s") for t in counts}
    else:
        peaks["fma_method"] = (f"practical peak = OpenBLAS sgemm {sgemm_n}³ via NumPy "
                               "(numformer._cpu.measure_fma_peak unavailable)")
        fma = {t: numpy_sgemm_gflops(sgemm_n, t) for t in counts}
    if cpu is not None and hasattr(cpu, "measure_copy_bandwidth"):
        peaks["bandwidth_method"] = "numformer._cpu.measure_copy_bandwidth (bytes read + written)"
        bw = {t: _as_number(cpu.measure_copy_bandwidth(copy_bytes, t), "gb_s", "gbytes") for t in counts}
    else:
        peaks["bandwidth_method"] = "np.copyto, split across Python threads (bytes read + written)"
        bw = {t: numpy_copy_bandwidth(copy_bytes, t) for t in counts}
    peaks["fma_gflops"] = {str(t): fma[t] for t in counts}
    peaks["copy_gbs"] = {str(t): bw[t] for t in counts}
    return peaks


def peak_for(peaks: dict, kind: str, threads: int) -> float | None:
    """The measured ceiling of ``kind`` ("fma" or "bandwidth") at ``threads`` threads."""
    table = peaks.get("fma_gflops" if kind == "fma" else "copy_gbs", {})
    if str(threads) in table:
        return table[str(threads)]
    if kind == "fma" and "1" in table:              # FMA scales with cores; bandwidth does not
        return table["1"] * threads
    return None
