"""Set the thread count of every library in the comparison at once.

* ours: ``numformer._cpu.set_num_threads`` (and ``NUMFORMER_NUM_THREADS`` for
  anything that reads the environment later),
* PyTorch: ``torch.set_num_threads``,
* NumPy's BLAS (OpenBLAS): ``threadpoolctl`` when it is installed. Without
  it the BLAS thread count is fixed when NumPy is imported, so a NumPy row
  with fewer threads than the process default must run in a subprocess
  started with ``OPENBLAS_NUM_THREADS`` (see :func:`numpy_threads_settable`).
"""

from __future__ import annotations

import contextlib
import os
import sys


def cpu_module():
    """``numformer._cpu`` or None."""
    from numformer import backend

    return backend._load_cpu()


def torch_module():
    """``torch`` when it imports (it is an optional extra), else None."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        import torch  # noqa: F401
    except Exception:
        return None
    return sys.modules["torch"]


def numpy_threads_settable() -> bool:
    try:
        import threadpoolctl  # noqa: F401
    except Exception:
        return False
    return True


def default_threads() -> int:
    """The thread count a plain run uses: ``NUMFORMER_NUM_THREADS``, else what
    the extension chose, else the number of CPUs available to this process."""
    env = os.environ.get("NUMFORMER_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpu = cpu_module()
    if cpu is not None and hasattr(cpu, "num_threads"):
        return int(cpu.num_threads())
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def limit_threads(n: int, use_torch: bool = True):
    """Run the block with ``n`` threads in ours, PyTorch and (if possible) NumPy's BLAS.

    Yields True when NumPy's BLAS was limited too, False when it could not be.
    """
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    cpu = cpu_module()
    old_env = os.environ.get("NUMFORMER_NUM_THREADS")
    old_cpu = cpu.num_threads() if cpu is not None and hasattr(cpu, "num_threads") else None
    torch = torch_module() if use_torch else None
    old_torch = torch.get_num_threads() if torch is not None else None
    os.environ["NUMFORMER_NUM_THREADS"] = str(n)
    if cpu is not None and hasattr(cpu, "set_num_threads"):
        cpu.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    with contextlib.ExitStack() as stack:
        limited = False
        if numpy_threads_settable():
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
            limited = True
        try:
            yield limited
        finally:
            if old_env is None:
                os.environ.pop("NUMFORMER_NUM_THREADS", None)
            else:
                os.environ["NUMFORMER_NUM_THREADS"] = old_env
            if old_cpu is not None:
                cpu.set_num_threads(old_cpu)
            if old_torch is not None:
                torch.set_num_threads(old_torch)
