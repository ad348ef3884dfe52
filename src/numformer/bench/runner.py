"""``numformer bench``: measure the machine, run every case, write the results.

    numformer bench                      # the suite (< 10 min on 2 cores)
    numformer bench --quick              # a ~1-minute subset
    numformer bench --full               # + LM-head backward GEMMs, GPT-2 on the NumPy backend
    numformer bench --filter softmax --filter "LM head" --threads 1 --json out.json

Progress goes to stderr; the Markdown table goes to stdout and, with the
JSON rows and a PNG chart (when matplotlib is installed), to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

from numformer.bench import report
from numformer.bench.cases import Case, Sizes, kernel_cases
from numformer.bench.machine import describe, measure_peaks, numpy_sgemm_gflops, peak_for
from numformer.bench.model_cases import model_cases, transformers_module
from numformer.bench.threads import (cpu_module, default_threads, limit_threads, numpy_threads_settable,
                                     torch_module)
from numformer.bench.timing import measure, summarize, wait_until_idle

EXTRA_HINT = 'pip install "numformer[bench]"  (torch==2.13.0, transformers, matplotlib, threadpoolctl)'


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a ~1-minute subset of the cases")
    size.add_argument("--full", action="store_true",
                      help="also the LM head's backward GEMM forms and the GPT-2 rows on the NumPy "
                           "backend (a few minutes more)")
    p.add_argument("--json", metavar="PATH", help="also save the rows (and machine, breakdown) as JSON here")
    p.add_argument("--out", metavar="DIR", default="bench-results",
                   help="folder for bench.md, bench.json and bench.png (default: %(default)s)")
    p.add_argument("--filter", action="append", default=[], metavar="TEXT",
                   help="run only cases whose name contains TEXT (case-insensitive; repeatable, "
                        "comma-separated alternatives), e.g. softmax, gemm, 'LM head', attention, gpt2")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for ours, NumPy's BLAS and PyTorch (default: NUMFORMER_NUM_THREADS or all cores)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch and transformers out")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op breakdown of the training step")
    p.add_argument("--list", action="store_true", help="list the cases (after --filter) and exit")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)    # tiny sizes, for tests
    p.add_argument("--gap", type=float, default=None, help=argparse.SUPPRESS)  # fixed idle seconds instead of settling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="numformer bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def select(cases: list[Case], filters: list[str]) -> list[Case]:
    """Cases whose name contains any of the filter texts (all cases when there are none)."""
    words = [w.strip().lower() for f in filters for w in f.split(",") if w.strip()]
    if not words:
        return cases
    return [c for c in cases if any(w in c.name.lower() for w in words)]


def build_cases(sizes: Sizes, use_torch: bool) -> list[Case]:
    return kernel_cases(sizes, use_torch) + model_cases(sizes, use_torch)


def run(args) -> int:
    from numformer.cli import UserError

    started = time.perf_counter()
    set_name = "tiny" if args.tiny else "quick" if args.quick else "full" if args.full else "default"
    sizes = getattr(Sizes, set_name)()
    threads = args.threads if args.threads is not None else default_threads()
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    # Between implementations: wait until the previous one's thread pool sleeps
    # (see timing.py, rule 5), or a fixed gap when one is given (tests: 0).
    gap = args.gap if args.gap is not None else (0.0 if args.tiny else None)
    use_torch = not args.no_torch and torch_module() is not None
    cases = select(build_cases(sizes, use_torch), args.filter)
    if not cases:
        raise UserError(f"no benchmark matches --filter {' '.join(args.filter)!r}; see numformer bench --list")
    if args.list:
        for c in cases:
            print(c.name + (f"  [{c.threads} thread]" if c.threads else ""))
        return 0

    notes = _setup_notes(use_torch, args.no_torch)
    for n in notes:
        _log(f"note: {n}")
    rows: list[report.Row] = []
    breakdown = None
    with limit_threads(threads, use_torch=use_torch):
        machine = describe()
        _log(f"numformer bench: {len(cases)} case(s), {threads} thread(s), "
             f"{set_name} set; measuring the machine ...")
        peaks = measure_peaks(threads, fma_seconds=sizes.fma_seconds, copy_bytes=sizes.copy_bytes,
                              sgemm_n=sizes.sgemm_n)
        _log("  FMA peak " + ", ".join(f"{v:.0f} GFLOP/s ({t}t)" for t, v in peaks["fma_gflops"].items())
             + "; copy " + ", ".join(f"{v:.1f} GB/s ({t}t)" for t, v in peaks["copy_gbs"].items()))
        for i, case in enumerate(cases, 1):
            _log(f"[{i}/{len(cases)} {time.perf_counter() - started:5.0f}s] {case.name}"
                 + (f" ({case.threads} thread)" if case.threads else "") + " ...")
            row, bd = run_case(case, sizes, threads, peaks, rows, gap, profile=not args.no_profile,
                               use_torch=use_torch)
            breakdown = bd or breakdown
            rows.append(row)
            _log("      " + _summary(row))
            gc.collect()
    elapsed = time.perf_counter() - started
    meta = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "duration_s": round(elapsed, 1), "set": set_name,
            "threads": threads, "filter": args.filter, "machine": machine, "peaks": peaks,
            "notes": notes + _method_notes(peaks)}
    _write_outputs(args, rows, meta, breakdown)
    _log(f"numformer bench: {len(rows)} row(s) in {elapsed:.0f} s")
    return 0


def _setup_notes(use_torch: bool, no_torch: bool) -> list[str]:
    notes = []
    if cpu_module() is None:
        from numformer import backend

        notes.append(f"numformer._cpu is unavailable ({backend._cpu_error}); only NumPy/PyTorch rows")
    if not use_torch and not no_torch:
        notes.append(f"PyTorch is not installed: no PyTorch column ({EXTRA_HINT})")
    elif use_torch and transformers_module() is None:
        notes.append(f"transformers is not installed: no PyTorch GPT-2 rows ({EXTRA_HINT})")
    if not numpy_threads_settable():
        notes.append("threadpoolctl is not installed: NumPy rows with fewer threads than the process "
                     "default run in a subprocess with OPENBLAS_NUM_THREADS set")
    return notes


def _method_notes(peaks: dict) -> list[str]:
    return [
        "Times are medians of >= 5 interleaved runs after a warm-up (model rows: warm-up + "
        "the stated runs); 'vs NumPy' = t_NumPy / t_ours, above 1 means ours is faster.",
        "Before every timed sample the run waits until the process is idle, so that the previous "
        "implementation's spinning pool threads (OpenBLAS spins ~0.1 s after a call) do not take a "
        "core from the next one; calls under 0.25 s then get one untimed call first (their own "
        "pool awake, as in a loop).",
        "GEMM rows write into a preallocated output (out=) for every implementation: kernel "
        "against kernel. Softmax and attention rows return fresh arrays, as the model calls them "
        "(ours reuse freed blocks of >= 32 MiB: see the output cache above).",
        "Rates: GEMM 2·M·K·N FLOP; softmax bytes read + written (fwd 8 B/element, bwd 12 B/element); "
        "causal attention (matmuls)·B·H·T(T+1)·D FLOP with 2 matmuls for fwd and 7 for fwd+bwd.",
        f"'of peak' compares ours with this run's FMA peak ({peaks.get('fma_method')}), copy bandwidth, "
        "or for the training step the GEMM roofline 6·params·tokens at the best GEMM rate measured here.",
    ]


def _summary(row: report.Row) -> str:
    parts = [f"{report.IMPL_TITLES.get(k, k)} {report.format_seconds(v)}" for k, v in row.seconds.items()]
    ratios = [f"{v:.2f}× vs {report.IMPL_TITLES.get(k, k)}" for k, v in row.speedup.items()]
    rate = report.format_rate(row.rate.get("ours"), row.unit) if row.rate.get("ours") else ""
    text = " | ".join(parts)
    if ratios:
        text += "  (" + ", ".join(ratios) + ")"
    if rate:
        text += f"  ours {rate}"
    if row.notes.startswith("failed"):
        text += f"  [{row.notes}]"
    return text


def gemm_rate(rows: list[report.Row], threads: int) -> float | None:
    """GFLOP/s for the training-step roofline: the median over the GPT-2 GEMM rows
    measured at ``threads`` threads of the faster of ours and NumPy."""
    rates = [max(v for k, v in r.rate.items() if k in ("ours", "numpy") and v)
             for r in rows if r.op == "gemm" and r.threads == threads
             and any(r.rate.get(k) for k in ("ours", "numpy"))]
    return statistics.median(rates) if rates else None


def run_case(case: Case, sizes: Sizes, threads: int, peaks: dict, rows: list, gap: float | None,
             profile: bool = True, use_torch: bool = True):
    """Set up, time and describe one case -> (Row, breakdown or None)."""
    th = case.threads or threads
    row = report.Row(case.op, case.label, list(case.shape), case.form, case.dtype, th, case.unit, case.work,
                     notes=case.notes, extra=dict(case.extra))
    breakdown = None
    notes = [case.notes] if case.notes else []
    try:
        with limit_threads(th, use_torch=use_torch) as numpy_limited:
            impls = case.setup()
            profile_fn = impls.pop("_profile", None)
            first_token = impls.pop("_first_token", None)
            sub = None
            if th != threads and not numpy_limited and "numpy" in impls:
                impls.pop("numpy")
                sub = case.numpy_subprocess
                notes.append("NumPy in a subprocess with OPENBLAS_NUM_THREADS (not interleaved)" if sub
                             else "no NumPy column: install threadpoolctl to limit its threads")
            stats, failed = _measure_guarded(impls, case, sizes, gap)
            notes += failed
            if sub is not None:
                stats["numpy"] = summarize(sub(max(case.min_runs, 5)))
            if first_token:
                ttft, failed = _measure_guarded(first_token, case, sizes, gap, runs=3)
                row.extra["time_to_first_token_s"] = {k: s.median for k, s in ttft.items()}
                if "ours" in ttft:
                    notes.append(f"first token: ours {report.format_seconds(ttft['ours'].median)}"
                                 + (f", PyTorch {report.format_seconds(ttft['torch'].median)}"
                                    if "torch" in ttft else ""))
            if profile_fn is not None and profile:
                breakdown = profile_fn()
            del impls, first_token, profile_fn
    except MemoryError as exc:
        notes.append(f"failed: out of memory ({exc})")
        stats = {}
    peak, kind = None, case.peak_kind
    if kind in ("fma", "bandwidth"):
        peak = peak_for(peaks, kind, th)
    elif kind == "roofline":
        rate = gemm_rate(rows, threads)
        if rate is None:                                       # no GEMM rows in this run: measure one
            rate = numpy_sgemm_gflops(sizes.sgemm_n, threads)
        peak = rate * 1e9 / (6.0 * case.extra["params"])       # tokens/s if every FLOP ran at GEMM speed
        row.extra["gemm_rate_gflops"] = rate
        row.extra["roofline_tokens_per_s"] = peak
        notes.append(f"roofline {peak:,.0f} tokens/s = {rate:.0f} GFLOP/s / (6·{case.extra['params'] / 1e6:.4g}M)")
    row.notes = "; ".join(notes)
    row.finish(stats, peak, kind)
    return row, breakdown


def _measure_guarded(impls: dict, case: Case, sizes: Sizes, gap: float | None, runs: int | None = None):
    """Time all implementations together; if one fails, drop it (with a note) and time the rest."""
    kwargs = dict(min_runs=runs or case.min_runs, max_runs=runs or case.max_runs,
                  warmup=0 if runs else case.warmup, budget=case.budget or sizes.budget,
                  gap=gap or 0.0, settle=wait_until_idle if gap is None else None, rewarm_below=0.25)
    try:
        return measure(impls, **kwargs), []
    except Exception:
        pass
    ok, failed = {}, []
    for name, fn in impls.items():
        try:
            fn()
            ok[name] = fn
        except Exception as exc:
            failed.append(f"failed: {report.IMPL_TITLES.get(name, name)} raised {type(exc).__name__}: {exc}"[:200])
    return (measure(ok, **kwargs) if ok else {}), failed


def _write_outputs(args, rows, meta, breakdown) -> None:
    text = report.markdown_document(rows, meta, breakdown)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, "bench.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(text)
    written = [md, report.write_json(os.path.join(args.out, "bench.json"), rows, meta, breakdown)]
    if args.json:
        written.append(report.write_json(args.json, rows, meta, breakdown))
    png = report.write_chart(os.path.join(args.out, "bench.png"), rows)
    if png:
        written.append(png)
    else:
        _log("note: no chart (matplotlib is not installed: pip install matplotlib, or numformer[bench])")
    _log("wrote " + ", ".join(written))
