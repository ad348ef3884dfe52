"""The benchmark suite: timing logic (fake clock), row schema, writers, and a tiny run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from numformer.bench import report
from numformer.bench.profile import OpProfiler
from numformer.bench.runner import select
from numformer.bench.timing import Stats, measure, summarize, wait_until_idle


class FakeClock:
    """A clock that only moves when an implementation "runs" for its cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    def impl(self, name: str, costs):
        """A callable that advances the clock by the next cost (cycling)."""
        costs = list(costs)
        state = {"i": 0}

        def run():
            self.calls.append(name)
            self.now += costs[state["i"] % len(costs)]
            state["i"] += 1
        return run


# ----------------------------------------------------------------------------- timing


def test_measure_interleaves_and_reports_median_and_min():
    clock = FakeClock()
    # warm-up call first (cost 1.0 / 2.0), then the timed rounds: A's samples 1,5,1,1,3 -> median 1
    a = clock.impl("A", [1.0, 1.0, 5.0, 1.0, 1.0, 3.0])
    b = clock.impl("B", [2.0])
    stats = measure({"A": a, "B": b}, min_runs=5, max_runs=5, warmup=1, min_sample=0.0,
                    budget=0.0, clock=clock, sleep=clock.sleep)
    assert clock.calls[:2] == ["A", "B"]                          # warm-up, one call each
    timed = clock.calls[2:]
    assert timed == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]   # interleaved, alternating order
    assert stats["A"].runs == stats["B"].runs == 5
    assert stats["A"].median == 1.0 and stats["A"].min == 1.0
    assert stats["A"].samples == [1.0, 5.0, 1.0, 1.0, 3.0]
    assert stats["B"].median == 2.0


def test_measure_repeats_fast_calls_inside_a_sample():
    clock = FakeClock()
    ms = 1 / 1024                                                  # exact in binary: no rounding
    fast = clock.impl("fast", [ms])
    stats = measure({"fast": fast}, min_runs=5, max_runs=5, warmup=1, min_sample=10 * ms, budget=0.0,
                    clock=clock, sleep=clock.sleep)
    assert stats["fast"].inner == 10                               # 10 calls per sample ≥ min_sample
    assert stats["fast"].median == pytest.approx(ms)
    # warm-up: repeated while the calls after the first add up to < 2 × min_sample (20 calls
    # at most), then 5 samples of 10 calls
    assert len(clock.calls) == 20 + 5 * 10


def test_measure_warmup_estimate_uses_the_fastest_call():
    clock = FakeClock()
    # first call is slow (page faults); the estimate must not be fooled by it
    ms = 1 / 1024
    f = clock.impl("f", [0.125] + [ms] * 100)
    stats = measure({"f": f}, min_runs=5, max_runs=5, warmup=1, min_sample=10 * ms, budget=0.0,
                    clock=clock, sleep=clock.sleep)
    assert stats["f"].inner == 10


def test_measure_budget_adds_rounds_up_to_max():
    clock = FakeClock()
    impls = {"A": clock.impl("A", [0.125]), "B": clock.impl("B", [0.125])}
    stats = measure(impls, min_runs=5, max_runs=25, warmup=1, min_sample=0.0, budget=2.5,
                    clock=clock, sleep=clock.sleep)
    assert stats["A"].runs == 10                                   # 2.5 s / (0.125 + 0.125) s per round
    clock2 = FakeClock()
    impls = {"A": clock2.impl("A", [0.001])}
    assert measure(impls, min_runs=5, max_runs=7, warmup=1, min_sample=0.0, budget=100.0,
                   clock=clock2, sleep=clock2.sleep)["A"].runs == 7


def test_measure_without_warmup_runs_exactly_min_runs_and_sleeps_between():
    clock = FakeClock()
    impls = {"A": clock.impl("A", [3.0]), "B": clock.impl("B", [4.0])}
    stats = measure(impls, min_runs=2, max_runs=2, warmup=0, gap=0.01, clock=clock, sleep=clock.sleep)
    assert clock.calls == ["A", "B", "B", "A"]
    assert clock.sleeps == [0.01] * 4
    assert stats["A"].median == 3.0 and stats["B"].median == 4.0


def test_measure_settles_before_every_sample_instead_of_a_fixed_gap():
    clock = FakeClock()
    settled: list[int] = []
    impls = {"A": clock.impl("A", [1.0]), "B": clock.impl("B", [2.0])}
    measure(impls, min_runs=3, max_runs=3, warmup=0, gap=0.5, settle=lambda: settled.append(len(clock.calls)),
            clock=clock, sleep=clock.sleep)
    assert settled == [0, 1, 2, 3, 4, 5]          # once before each of the 6 samples
    assert clock.sleeps == []                     # settle replaces the gap


def test_measure_rewarms_cheap_calls_after_settling():
    clock = FakeClock()
    impls = {"cheap": clock.impl("cheap", [0.1]), "slow": clock.impl("slow", [1.0])}
    stats = measure(impls, min_runs=2, max_runs=2, warmup=1, min_sample=0.0, budget=0.0,
                    settle=lambda: None, rewarm_below=0.5, clock=clock, sleep=clock.sleep)
    timed = clock.calls[3:]                       # after the warm-up: cheap twice, slow once
    assert timed == ["cheap", "cheap", "slow", "slow", "cheap", "cheap"]   # cheap: untimed + timed
    assert stats["cheap"].median == pytest.approx(0.1) and stats["slow"].median == pytest.approx(1.0)


class CpuBurner:
    """Wall and CPU clocks for wait_until_idle: other threads spin for ``spin_s`` more seconds."""

    def __init__(self, spin_s: float, threads: int = 1):
        self.wall = 0.0
        self.cpu = 0.0
        self.spin_s, self.threads = spin_s, threads

    def sleep(self, s: float) -> None:
        busy = min(s, max(0.0, self.spin_s - self.wall))
        self.cpu += busy * self.threads
        self.wall += s


def test_wait_until_idle_waits_for_spinning_threads_to_stop():
    m = CpuBurner(spin_s=0.1, threads=2)
    waited = wait_until_idle(slice_s=0.005, clock=lambda: m.wall, cpu_clock=lambda: m.cpu, sleep=m.sleep)
    assert 0.1 <= waited <= 0.1 + 2 * 0.005       # the first slice with no CPU burnt ends it


def test_wait_until_idle_returns_at_once_when_idle_and_gives_up_at_max_wait():
    idle = CpuBurner(spin_s=0.0)
    assert wait_until_idle(slice_s=0.005, clock=lambda: idle.wall, cpu_clock=lambda: idle.cpu,
                           sleep=idle.sleep) == pytest.approx(0.005)
    forever = CpuBurner(spin_s=1e9)
    waited = wait_until_idle(slice_s=0.005, max_wait=0.05, clock=lambda: forever.wall,
                             cpu_clock=lambda: forever.cpu, sleep=forever.sleep)
    assert 0.05 <= waited < 0.06


def test_measure_validates_and_handles_empty():
    assert measure({}) == {}
    with pytest.raises(ValueError):
        measure({"a": lambda: None}, min_runs=0)
    with pytest.raises(ValueError):
        summarize([])


# ----------------------------------------------------------------------------- rows and writers


def _row() -> report.Row:
    row = report.Row("gemm", "qkv", [4096, 768, 2304], "A·B", "float32", 2, "GFLOP/s",
                     2.0 * 4096 * 768 * 2304)
    return row.finish({"ours": Stats(0.05, 0.04, 5), "numpy": Stats(0.1, 0.09, 5), "torch": Stats(0.2, 0.2, 5)},
                      peak=400.0, peak_kind="fma")


def test_row_schema_rates_and_speedups():
    row = _row()
    d = row.to_dict()
    for key in ("op", "shape", "form", "dtype", "threads", "seconds", "min_seconds", "runs", "rate", "unit",
                "speedup", "speedup_vs_numpy", "speedup_vs_torch", "peak", "peak_fraction", "ours_s",
                "numpy_s", "torch_s", "name", "work", "notes", "extra"):
        assert key in d, key
    assert d["ours_s"] == 0.05 and d["numpy_s"] == 0.1 and d["torch_s"] == 0.2
    assert d["speedup_vs_numpy"] == pytest.approx(2.0)              # ours twice as fast as NumPy
    assert d["speedup_vs_torch"] == pytest.approx(4.0)
    flops = 2.0 * 4096 * 768 * 2304
    assert d["rate"]["ours"] == pytest.approx(flops / 0.05 / 1e9)  # GFLOP/s
    assert d["peak_fraction"] == pytest.approx(flops / 0.05 / 1e9 / 400.0)
    assert d["min_seconds"]["numpy"] == 0.09
    assert d["extra"]["spread"]["ours"] == pytest.approx(1.25) and "noisy" not in d["notes"]
    noisy = report.Row("softmax", "", [8, 4], "fwd", "float32", 1, "GB/s", 256.0)
    noisy.finish({"ours": Stats(3.0, 1.0, 5)})
    assert "noisy: median/min up to 3.0×" in noisy.notes
    assert "gemm qkv A·B 4096×768×2304" == row.name
    json.dumps(d)                                                  # serializable as is


def test_row_without_ours_has_no_speedups():
    row = report.Row("softmax", "", [8, 4], "fwd", "float32", 1, "GB/s", 256.0)
    row.finish({"numpy": Stats(1e-6, 1e-6, 5)}, peak=10.0, peak_kind="bandwidth")
    assert row.speedup == {} and row.peak_fraction is None
    assert "| — |" in report.markdown_table([row])


def test_markdown_and_json_writers(tmp_path):
    rows = [_row()]
    meta = {"machine": {"cpu": "Test CPU", "cpus": 2, "numpy": np.__version__, "numformer_cpu": "x"},
            "peaks": {"fma_gflops": {"1": 100.0, "2": 200.0}, "copy_gbs": {"1": 20.0, "2": 30.0},
                      "fma_method": "m", "bandwidth_method": "b"}, "notes": ["hello"]}
    breakdown = {"total_s": 2.0, "what": "x", "parts": [{"name": "matmul", "seconds": 1.5, "calls": 3,
                                                         "inside": {}},
                                                        {"name": "other", "seconds": 0.5, "calls": 0,
                                                         "inside": {"softmax": 0.1}}]}
    text = report.markdown_document(rows, meta, breakdown)
    assert "| gemm (qkv) | 4096×768×2304 | A·B | 2 | 50 ms | 100 ms | 200 ms | 2.00× | 4.00× |" in text
    assert "| FMA peak, GFLOP/s | 100 | 200 | m |" in text
    assert "| matmul | 1.50 s | 75.0% | 3 |" in text and "- hello" in text
    path = report.write_json(str(tmp_path / "sub" / "rows.json"), rows, meta, breakdown)
    doc = json.loads(open(path, encoding="utf-8").read())
    assert doc["schema"] == report.SCHEMA_VERSION and doc["rows"][0]["op"] == "gemm"
    assert doc["breakdown"]["parts"][0]["name"] == "matmul"
    png = report.write_chart(str(tmp_path / "c.png"), rows)
    assert png is None or os.path.getsize(png) > 0


def test_formatting_helpers():
    assert report.format_seconds(2.5) == "2.50 s"
    assert report.format_seconds(0.0123) == "12.3 ms"
    assert report.format_seconds(0.25) == "250 ms"
    assert report.format_seconds(3e-6) == "3 µs"
    assert report.format_seconds(None) == "—"
    assert report.format_rate(1234.5, "tokens/s") == "1,234 tokens/s" or \
        report.format_rate(1234.5, "tokens/s") == "1,235 tokens/s"
    assert report.format_ratio(1.5) == "1.50×" and report.format_fraction(0.5) == "50%"


# ----------------------------------------------------------------------------- cases, profiler


def test_select_filters_by_substring():
    from numformer.bench.cases import Sizes, kernel_cases

    cases = kernel_cases(Sizes.tiny(), use_torch=False)
    names = [c.name for c in select(cases, ["softmax"])]
    assert names and all("softmax" in n for n in names)
    both = select(cases, ["SOFTMAX,lm head"])
    assert any("LM head" in c.name for c in both) and any("softmax" in c.name for c in both)
    assert select(cases, []) == cases and select(cases, ["nothing-like-this"]) == []


def test_attention_flop_count():
    from numformer.bench.cases import attention_flops

    # B=4, H=12, T=1024, D=64: forward ≈ 6.4 GFLOP, fwd+bwd (7 matmuls) ≈ 22.5 GFLOP
    assert attention_flops(4, 12, 1024, 64, 2) == pytest.approx(6.45e9, rel=1e-2)
    assert attention_flops(4, 12, 1024, 64, 7) == pytest.approx(22.6e9, rel=1e-2)
    assert attention_flops(1, 1, 1, 1, 1) == 2.0                     # one pair, one multiply-add


def test_profiler_counts_outermost_and_restores_functions():
    from numformer import backend
    from numformer.models.gpt2 import GPT2, GPT2Config
    from numformer.ops import attention, layernorm

    original = (attention.forward, layernorm.backward, backend.matmul)
    model = GPT2.init(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 9))
    # The NumPy backend's attention runs QKᵀ and PV through backend.matmul,
    # so a matmul is nested inside it (the flash kernel has none).
    with backend.use("numpy"), OpProfiler() as prof:
        _, _, cache = model.forward(ids[:, :-1], ids[:, 1:], train=True)
        model.backward(cache)
        with prof.section("optimizer"):
            pass
    assert (attention.forward, layernorm.backward, backend.matmul) == original
    result = prof.breakdown(total=sum(prof.totals.values()) + 0.5)
    parts = {p["name"]: p for p in result["parts"]}
    for name in ("matmul", "attention", "layernorm", "gelu", "cross-entropy", "embedding", "optimizer"):
        assert name in parts, name
    assert parts["attention"]["calls"] == 2                      # forward + backward, once each
    assert "matmul" in parts["attention"]["inside"]              # its QKᵀ/PV counted inside it
    assert parts["other"]["seconds"] >= 0.5
    assert sum(p["seconds"] for p in result["parts"]) == pytest.approx(result["total_s"])


def test_numpy_sgemm_subprocess_returns_samples():
    from numformer.bench.machine import numpy_sgemm_subprocess

    samples = numpy_sgemm_subprocess(16, 8, 4, runs=3, threads=1)
    assert len(samples) == 3 and all(s > 0 for s in samples)


# ----------------------------------------------------------------------------- the command


def test_bench_command_tiny_smoke(tmp_path, capsys):
    from numformer.cli import main

    out = tmp_path / "out"
    rows_path = tmp_path / "rows.json"
    rc = main(["bench", "--tiny", "--quick", "--filter", "softmax", "--no-torch", "--out", str(out),
               "--json", str(rows_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "| op | shape | form |" in captured.out                 # the table on stdout
    assert "softmax" in captured.err                              # progress on stderr
    doc = json.loads(rows_path.read_text(encoding="utf-8"))
    assert doc["rows"] and all(r["op"] == "softmax" for r in doc["rows"])
    assert {r["form"] for r in doc["rows"]} == {"fwd", "bwd"}
    for r in doc["rows"]:
        assert r["numpy_s"] > 0 and r["unit"] == "GB/s" and r["runs"]["numpy"] >= 5
    assert doc["meta"]["peaks"]["fma_gflops"] and doc["meta"]["machine"]["numpy"]
    assert (out / "bench.md").read_text(encoding="utf-8").startswith("# numformer bench")
    assert (out / "bench.json").exists()


def test_bench_command_model_rows_tiny(tmp_path, capsys):
    from numformer.cli import main

    rc = main(["bench", "--tiny", "--filter", "gpt2", "--no-torch", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    ops = [r["op"] for r in doc["rows"]]
    assert ops == ["gpt2_train_step", "gpt2_generate", "gpt2_generate", "gpt2_generate_int8"]
    train = doc["rows"][0]
    assert train["unit"] == "tokens/s" and train["extra"]["roofline_tokens_per_s"] > 0
    for gen, (batch, new) in zip(doc["rows"][1:], [(1, 4), (2, 3), (1, 4)]):   # Sizes.tiny: batch 1 and 2
        assert gen["shape"] == [batch, 4, new] and gen["work"] == batch * new
        assert "time_to_first_token_s" in gen["extra"]
    if train["ours_s"] is not None:
        assert doc["breakdown"]["parts"]


def test_bench_command_list_and_bad_filter(capsys):
    from numformer.cli import main

    assert main(["bench", "--tiny", "--list", "--no-torch", "--filter", "attention"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed and all("attention" in line for line in listed)
    assert main(["bench", "--tiny", "--no-torch", "--filter", "no-such-op"]) == 2
    assert "no benchmark matches" in capsys.readouterr().err


def test_measure_peaks_uses_the_extension_when_it_can(monkeypatch):
    from numformer.bench import machine

    class FakeCpu:
        def measure_fma_peak(self, seconds, threads):
            return 100.0 * threads

        def measure_copy_bandwidth(self, nbytes, threads):
            return 20.0 + threads

    monkeypatch.setattr(machine, "cpu_module", lambda: FakeCpu())
    peaks = machine.measure_peaks(2)
    assert peaks["fma_gflops"] == {"1": 100.0, "2": 200.0}
    assert peaks["copy_gbs"] == {"1": 21.0, "2": 22.0}
    assert "measure_fma_peak" in peaks["fma_method"]
    assert machine.peak_for(peaks, "fma", 2) == 200.0 and machine.peak_for(peaks, "bandwidth", 1) == 21.0


def test_chart_is_skipped_without_matplotlib(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import fails
    assert report.write_chart(str(tmp_path / "c.png"), [_row()]) is None
