#!/usr/bin/env python
"""Run the benchmark suite from a checkout: the same as ``numformer bench``.

    python benchmarks/run.py --quick
    python benchmarks/run.py --json benchmarks/results/full.json --out benchmarks/results

Everything lives in the installed package (``numformer.bench``) so that
``numformer bench`` works after ``pip install .``; this file only calls it.
"""

import sys

from numformer.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
