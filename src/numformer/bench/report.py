"""Benchmark rows and the three ways we write them: JSON, Markdown, PNG.

One :class:`Row` per measured case. Implementations are keyed by name:

* ``ours``  — numformer on the ``cpu`` backend (``numformer._cpu``),
* ``numpy`` — the NumPy reference (OpenBLAS for matmul; for model rows,
  numformer on the ``numpy`` backend),
* ``torch`` — PyTorch (for model rows, Hugging Face ``transformers``),

and rows may carry more (e.g. an int8 variant) without changing the schema:
``seconds``/``rate`` are dictionaries, and the speedups are always taken
against ``ours``. A speedup is ``t_other / t_ours``: above 1 means ours is
faster.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1
IMPL_ORDER = ("ours", "numpy", "torch")
IMPL_TITLES = {"ours": "ours", "numpy": "NumPy", "torch": "PyTorch"}
NOISY = 1.5            # a row whose median is this much above its minimum is flagged in the notes
UNIT_SCALE = {"GFLOP/s": 1e9, "GB/s": 1e9, "tokens/s": 1.0}   # rate = work / seconds / scale


@dataclass
class Row:
    """One measured case."""

    op: str                     # "gemm", "softmax", "attention", "gpt2_train_step", "gpt2_generate", ...
    label: str                  # what the shape is in GPT-2 ("qkv", "LM head", ...) or ""
    shape: list                 # the op's sizes, e.g. [M, K, N] for gemm (K = inner dimension)
    form: str                   # "A·B", "A·Bᵀ", "Aᵀ·B", "fwd", "bwd", "fwd+bwd", "step", "greedy"
    dtype: str
    threads: int
    unit: str                   # unit of ``rate``: "GFLOP/s", "GB/s" or "tokens/s"
    work: float                 # FLOPs, bytes or tokens per call (rate = work / seconds)
    seconds: dict = field(default_factory=dict)       # impl -> median seconds per call
    min_seconds: dict = field(default_factory=dict)   # impl -> fastest call
    runs: dict = field(default_factory=dict)          # impl -> timed samples
    rate: dict = field(default_factory=dict)          # impl -> work / median seconds, in ``unit``
    speedup: dict = field(default_factory=dict)       # impl -> t_impl / t_ours (ours faster when > 1)
    peak: float | None = None                         # the ceiling ours is compared with, in ``unit``
    peak_kind: str | None = None                      # "fma", "bandwidth" or "roofline"
    peak_fraction: float | None = None                # rate["ours"] / peak
    notes: str = ""
    extra: dict = field(default_factory=dict)         # row-specific figures (e.g. time to first token)

    @property
    def name(self) -> str:
        """Text that ``--filter`` matches: op, label, form and shape."""
        return " ".join(filter(None, [self.op, self.label, self.form, shape_text(self.shape)]))

    def finish(self, stats: dict, peak: float | None = None, peak_kind: str | None = None) -> "Row":
        """Fill seconds, rates, speedups and the peak fraction from ``{impl: Stats}``."""
        for impl, s in stats.items():
            self.seconds[impl] = s.median
            self.min_seconds[impl] = s.min
            self.runs[impl] = s.runs
            scale = UNIT_SCALE.get(self.unit, 1.0)
            self.rate[impl] = self.work / s.median / scale if s.median > 0 else None
        ours = self.seconds.get("ours")
        for impl, t in self.seconds.items():
            if impl != "ours" and ours:
                self.speedup[impl] = t / ours
        spread = {k: s.median / s.min for k, s in stats.items() if s.min > 0}
        if spread:
            self.extra["spread"] = spread                   # median / min per implementation
            worst = max(spread.values())
            if worst > NOISY:
                flag = f"noisy: median/min up to {worst:.1f}×"
                self.notes = f"{self.notes}; {flag}" if self.notes else flag
        self.peak, self.peak_kind = peak, peak_kind
        if peak and self.rate.get("ours"):
            self.peak_fraction = self.rate["ours"] / peak
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        # the flat fields the issue names, for readers of the JSON
        for impl in IMPL_ORDER:
            d[f"{impl}_s"] = self.seconds.get(impl)
        d["speedup_vs_numpy"] = self.speedup.get("numpy")
        d["speedup_vs_torch"] = self.speedup.get("torch")
        return d


def shape_text(shape) -> str:
    if isinstance(shape, str):
        return shape
    return "×".join(str(s) for s in shape)


# ----------------------------------------------------------------------------- JSON


def to_json_document(rows: list[Row], meta: dict | None = None, breakdown: dict | None = None) -> dict:
    return {"schema": SCHEMA_VERSION, "meta": meta or {}, "rows": [r.to_dict() for r in rows],
            "breakdown": breakdown}


def write_json(path: str, rows: list[Row], meta: dict | None = None, breakdown: dict | None = None) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_json_document(rows, meta, breakdown), f, indent=1, ensure_ascii=False,
                  default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(obj):
    try:
        return float(obj)
    except Exception:
        return str(obj)


# ----------------------------------------------------------------------------- Markdown


def format_seconds(t: float | None) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "—"
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms" if t < 0.1 else f"{t * 1e3:.0f} ms"
    return f"{t * 1e6:.3g} µs"


def format_rate(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    digits = f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    return f"{digits} {unit}"


def format_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def format_fraction(f: float | None) -> str:
    return "—" if f is None else f"{f:.0%}"


def markdown_table(rows: list[Row]) -> str:
    head = ["op", "shape", "form", "thr", "ours", "NumPy", "PyTorch", "vs NumPy", "vs PyTorch",
            "ours rate", "of peak", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * 8 + ["---"]) + "|"]
    for r in rows:
        op = r.op + (f" ({r.label})" if r.label else "")
        cells = [op, shape_text(r.shape), r.form, str(r.threads),
                 format_seconds(r.seconds.get("ours")), format_seconds(r.seconds.get("numpy")),
                 format_seconds(r.seconds.get("torch")),
                 format_ratio(r.speedup.get("numpy")), format_ratio(r.speedup.get("torch")),
                 format_rate(r.rate.get("ours"), r.unit),
                 format_fraction(r.peak_fraction) + (f" {r.peak_kind}" if r.peak_fraction is not None else ""),
                 r.notes.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_machine(meta: dict) -> str:
    m, peaks = meta.get("machine", {}), meta.get("peaks", {})
    lines = [f"- CPU: {m.get('cpu', '?')} ({m.get('cpus', '?')} logical CPUs), "
             f"Python {m.get('python', '?')}, NumPy {m.get('numpy', '?')}, "
             f"PyTorch {m.get('torch') or 'not installed'}, transformers {m.get('transformers') or 'not installed'}"]
    if m.get("numformer_cpu"):
        lines.append(f"- numformer._cpu: {m['numformer_cpu']}")
        if m.get("output_cache"):
            lines.append(f"- output cache: {m['output_cache']}")
    else:
        lines.append("- numformer._cpu: **not available** — 'ours' rows are missing")
    if m.get("blas"):
        lines.append(f"- NumPy BLAS: {'; '.join(m['blas'])}")
    if peaks:
        counts = sorted(peaks.get("fma_gflops", {}), key=int)
        lines.append("")
        lines.append("| ceiling | " + " | ".join(f"{c} thread{'s' if c != '1' else ''}" for c in counts)
                     + " | how |")
        lines.append("|---|" + "--:|" * len(counts) + "---|")
        lines.append("| FMA peak, GFLOP/s | " + " | ".join(f"{peaks['fma_gflops'][c]:.0f}" for c in counts)
                     + f" | {peaks.get('fma_method', '')} |")
        lines.append("| copy bandwidth, GB/s | " + " | ".join(f"{peaks['copy_gbs'][c]:.1f}" for c in counts)
                     + f" | {peaks.get('bandwidth_method', '')} |")
    return "\n".join(lines)


def markdown_breakdown(breakdown: dict | None) -> str:
    if not breakdown:
        return ""
    total = breakdown["total_s"]
    lines = [f"Per-op breakdown of one numformer training step ({breakdown.get('what', '')}; "
             f"{format_seconds(total)} with the timing hooks):", "",
             "| part | time | share | calls | inside it |", "|---|--:|--:|--:|---|"]
    for part in breakdown["parts"]:
        inner = ", ".join(f"{k} {format_seconds(v)}" for k, v in part.get("inside", {}).items())
        share = part["seconds"] / total if total else 0.0
        lines.append(f"| {part['name']} | {format_seconds(part['seconds'])} | {share:.1%} | "
                     f"{part.get('calls', '')} | {inner} |")
    return "\n".join(lines)


def markdown_document(rows: list[Row], meta: dict, breakdown: dict | None = None) -> str:
    parts = ["# numformer bench", "", markdown_machine(meta), "", markdown_table(rows), ""]
    notes = meta.get("notes") or []
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if breakdown:
        parts += [markdown_breakdown(breakdown), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- PNG


def write_chart(path: str, rows: list[Row], title: str | None = None) -> str | None:
    """Horizontal bars of our speedup over NumPy and PyTorch per row (log scale).

    Returns the path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    shown = [r for r in rows if r.speedup]
    if not shown:
        return None
    labels = [f"{r.op}{' ' + r.label if r.label else ''} {shape_text(r.shape)} {r.form} ({r.threads}t)"
              for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(shown) + 1.6))
    ys = range(len(shown))
    h = 0.38
    for k, (impl, color) in enumerate((("numpy", "#4c72b0"), ("torch", "#dd8452"))):
        vals = [r.speedup.get(impl) or 0 for r in shown]
        ax.barh([y + (k - 0.5) * h for y in ys], [v if v > 0 else float("nan") for v in vals], h,
                label=f"ours vs {IMPL_TITLES[impl]}", color=color)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    finite = [v for r in shown for v in r.speedup.values() if v and v > 0]
    lo, hi = min(finite + [1.0]), max(finite + [1.0])
    ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title or "numformer bench: speedup of ours (medians, same run)", fontsize=10)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of numformer._cpu (× faster; > 1 is better)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
