"""Where a numformer training step spends its time: a light timing hook.

:class:`OpProfiler` temporarily replaces the ops' ``forward``/``backward``
functions (and the backend's kernels) with timed wrappers, runs one step, and
puts everything back. The model code is not touched: it calls
``layernorm.forward(...)``, ``backend.matmul(...)`` and so on through their
modules, so the replaced attributes are what it runs.

Time goes to the **outermost** timed call: a matmul inside attention counts
as attention (and is also listed as "inside" it), a matmul inside
``linear.forward`` counts as matmul. What no hook sees — residual adds,
head split/merge, concatenations, Python — is "other".
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import defaultdict

# op module -> category; forward and backward of each are wrapped
OP_MODULES = {
    "linear": "matmul",
    "attention": "attention",
    "softmax": "softmax",
    "layernorm": "layernorm",
    "gelu": "gelu",
    "cross_entropy": "cross-entropy",
    "embedding": "embedding",
    "dropout": "dropout",
    "residual": "other",
}

# substrings of backend function names -> category (first match wins), so that
# kernels added later (fused LayerNorm, AdamW, ...) are counted where they belong
BACKEND_PATTERNS = (
    ("attention", "attention"), ("softmax", "softmax"), ("matmul", "matmul"), ("gemm", "matmul"),
    ("layernorm", "layernorm"), ("layer_norm", "layernorm"), ("gelu", "gelu"),
    ("cross_entropy", "cross-entropy"), ("embedding", "embedding"), ("adam", "optimizer"),
    ("sgd", "optimizer"),
)

ORDER = ("matmul", "attention", "softmax", "layernorm", "gelu", "cross-entropy", "embedding",
         "dropout", "optimizer", "other")


class OpProfiler:
    """``with OpProfiler() as prof: step()`` then ``prof.breakdown(total)``."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.inside: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._patches: list[tuple[object, str, object]] = []

    # ----------------------------------------------------------- wrapping
    def wrap(self, fn, category: str):
        prof = self

        def timed(*args, **kwargs):
            depth = len(prof._stack)
            prof._stack.append(category)
            t0 = prof.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = prof.clock() - t0
                prof._stack.pop()
                if depth == 0:
                    prof.totals[category] += dt
                    prof.calls[category] += 1
                elif category not in prof._stack:
                    # the outermost call of its kind below another category
                    # (e.g. a matmul under attention → backend.attention_forward)
                    prof.inside[prof._stack[0]][category] += dt
        timed.__wrapped__ = fn
        return timed

    def patch(self, owner, attr: str, category: str) -> None:
        original = getattr(owner, attr)
        self._patches.append((owner, attr, original))
        setattr(owner, attr, self.wrap(original, category))

    @contextlib.contextmanager
    def section(self, category: str):
        """Time a block of code as ``category`` (e.g. the optimizer step)."""
        depth = len(self._stack)
        self._stack.append(category)
        t0 = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - t0
            self._stack.pop()
            if depth == 0:
                self.totals[category] += dt
                self.calls[category] += 1

    def __enter__(self):
        from numformer import backend

        for mod_name, category in OP_MODULES.items():
            try:
                mod = importlib.import_module(f"numformer.ops.{mod_name}")
            except ImportError:
                continue
            for fn in ("forward", "backward"):
                if callable(getattr(mod, fn, None)):
                    self.patch(mod, fn, category)
        for attr in dir(backend):
            if attr.startswith("_") or attr in ("use", "current", "cpu_available"):
                continue
            value = getattr(backend, attr)
            if not callable(value) or getattr(value, "__module__", None) != backend.__name__:
                continue
            for pattern, category in BACKEND_PATTERNS:
                if pattern in attr.lower():
                    self.patch(backend, attr, category)
                    break
        return self

    def __exit__(self, *exc):
        while self._patches:
            owner, attr, original = self._patches.pop()
            setattr(owner, attr, original)
        return False

    # ----------------------------------------------------------- result
    def breakdown(self, total: float, what: str = "") -> dict:
        """``{"total_s", "what", "parts": [{"name", "seconds", "fraction", "calls", "inside"}]}``;
        "other" is the total minus everything timed."""
        totals = dict(self.totals)
        totals["other"] = totals.get("other", 0.0) + max(0.0, total - sum(totals.values()))
        names = [n for n in ORDER if n in totals] + sorted(n for n in totals if n not in ORDER)
        parts = []
        for n in names:
            parts.append({"name": n, "seconds": totals[n], "fraction": totals[n] / total if total else 0.0,
                          "calls": self.calls.get(n, 0),
                          "inside": dict(sorted(self.inside.get(n, {}).items(), key=lambda kv: -kv[1]))})
        return {"total_s": total, "what": what, "parts": parts}
