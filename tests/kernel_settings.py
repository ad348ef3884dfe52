"""Context managers that run numformer._cpu kernels with one setting, then restore it."""

import contextlib


@contextlib.contextmanager
def using_isa(name: str):
    """Run the kernels with one instruction-set variant ("generic", "avx2", "avx512")."""
    from numformer import _cpu

    previous = _cpu.set_isa(name)
    try:
        yield
    finally:
        _cpu.set_isa(previous)


@contextlib.contextmanager
def using_threads(n: int):
    """Run the kernels on ``n`` threads."""
    from numformer import _cpu

    previous = _cpu.num_threads()
    _cpu.set_num_threads(n)
    try:
        yield
    finally:
        _cpu.set_num_threads(previous)
