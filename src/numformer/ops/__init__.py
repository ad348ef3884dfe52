"""The math: one module per operation, each a pair of pure functions.

``forward(...) -> (out, cache)`` and ``backward(dout, cache) -> grads``.
The backward's docstring derives it; see docs/math.md for the long form.
"""
