"""``numformer bench``: numformer's kernels and models next to NumPy and PyTorch, in one run.

* :mod:`~numformer.bench.timing` — interleaved, warmed-up, median-of-runs timing,
* :mod:`~numformer.bench.machine` — the machine's FMA peak and copy bandwidth,
* :mod:`~numformer.bench.cases` — GEMM, softmax and attention cases,
* :mod:`~numformer.bench.model_cases` — GPT-2 training step and generation,
* :mod:`~numformer.bench.profile` — per-op breakdown of a training step,
* :mod:`~numformer.bench.report` — rows, JSON, Markdown and the PNG chart,
* :mod:`~numformer.bench.runner` — the command line.

PyTorch, transformers, matplotlib and threadpoolctl are optional
(``pip install "numformer[bench]"``): without them their columns are left
out and the run says why.
"""

from numformer.bench.report import Row
from numformer.bench.timing import Stats, measure

__all__ = ["Row", "Stats", "measure"]
