"""The ``cuda`` backend choice and numformer._cuda on a machine without a GPU.

Without a device, asking for ``cuda`` must fail with a clear message and
``numformer._cuda`` (when built) must import and raise "no CUDA device".
The routing in numformer.backend for ``cuda`` is exercised by standing the
CPU emulator (numformer._cuda_emu, same kernel source) in for the device
module: tests with ``emu`` in the name.
"""

from __future__ import annotations

import numpy as np
import pytest

from numformer import backend


@pytest.fixture
def reset_cuda_probe(monkeypatch):
    """Let a test set what backend._load_cuda finds, and restore it after."""
    monkeypatch.setattr(backend, "_cuda_probed", False)
    monkeypatch.setattr(backend, "_cuda_module", None)
    monkeypatch.setattr(backend, "_cuda_error", None)
    yield monkeypatch


def _has_gpu() -> bool:
    try:
        from numformer import _cuda
    except ImportError:
        return False
    return _cuda.device_count() > 0


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the no-device behaviour cannot be observed")
def test_cuda_backend_without_device_is_a_clear_error(reset_cuda_probe):
    assert not backend.cuda_available()
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but numformer._cuda"):
        with backend.use("cuda"):
            pass
    reset_cuda_probe.setenv("NUMFORMER_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="(no CUDA device|is not built)"):
        backend.current()


def test_default_backend_is_never_cuda(reset_cuda_probe):
    reset_cuda_probe.delenv("NUMFORMER_BACKEND", raising=False)
    assert backend.current() in ("cpu", "numpy")
    with pytest.raises(ValueError, match="numpy, cpu, cuda"):
        backend.use("gpu").__enter__()


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present")
def test_cuda_module_imports_and_raises_without_device():
    _cuda = pytest.importorskip("numformer._cuda", reason="numformer._cuda is not built (no nvcc)")
    assert _cuda.device_count() == 0
    assert "architectures" in _cuda.build_info()
    x = np.zeros((2, 3), np.float32)
    for call in (lambda: _cuda.to_device(x), lambda: _cuda.empty((2, 2)), lambda: _cuda.synchronize(),
                 lambda: _cuda.softmax_forward(x), lambda: _cuda.matmul(x, x.T)):
        with pytest.raises(RuntimeError, match="no CUDA device"):
            call()


class _EmulatorAsDevice:
    """numformer._cuda's interface over the emulator: 'device arrays' are NumPy copies."""

    def __init__(self, emu):
        self._emu = emu

    def __getattr__(self, name):
        return getattr(self._emu, name)

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def to_device(a):
        return np.array(a, copy=True, order="C")


@pytest.fixture
def emulated_cuda(reset_cuda_probe):
    emu = pytest.importorskip("numformer._cuda_emu", reason="numformer._cuda_emu is not built")
    reset_cuda_probe.setattr(backend, "_cuda_probed", True)
    reset_cuda_probe.setattr(backend, "_cuda_module", _EmulatorAsDevice(emu))
    with backend.use("cuda"):
        yield


def test_emu_backend_cuda_routes_matmul_softmax_attention(emulated_cuda):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 9, 5)).astype(np.float32)
    b = rng.standard_normal((2, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(backend.matmul(a, b, trans_b=True), a @ b.transpose(0, 2, 1), atol=1e-5)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(backend.matmul(a[0], w.T.T), a[0] @ w, atol=1e-5)        # transposed view
    out = np.ones((9, 3), np.float32)
    r = backend.matmul(a[0], w, out=out, accumulate=True, bias=np.ones(3, np.float32))
    assert r is out
    np.testing.assert_allclose(out, a[0] @ w + 2, atol=1e-5)

    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    mask = np.where(rng.random((4, 6)) < 0.3, -np.inf, 0).astype(np.float32)
    with backend.use("numpy"):
        want = backend.softmax(x, 0.5, mask, True)
    y = backend.softmax(x, 0.5, mask, True)
    np.testing.assert_allclose(y, want, atol=1e-6)
    with backend.use("numpy"):
        want_dx = backend.softmax_backward(x, y, 0.5)
    np.testing.assert_allclose(backend.softmax_backward(x, y, 0.5), want_dx, atol=1e-6)

    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    km = np.array([[True, True, False, True, True, True, False]])
    o, cache = backend.attention_forward(q, k, v, True, km)
    assert cache[0] == "cuda"
    grads = backend.attention_backward(np.ones_like(o), cache)
    with backend.use("numpy"):
        o_ref, c_ref = backend.attention_forward(q, k, v, True, km)
        grads_ref = backend.attention_backward(np.ones_like(o), c_ref)
    np.testing.assert_allclose(o, o_ref, atol=1e-5)
    for g, gr in zip(grads, grads_ref):
        np.testing.assert_allclose(g, gr, atol=1e-5)

    # float64 has no CUDA kernel: it runs on the CPU kernels (or NumPy), not an error
    a64 = a[0].astype(np.float64)
    np.testing.assert_allclose(backend.matmul(a64, a64.T), a64 @ a64.T)


def test_emu_backend_cuda_gpt2_loss_and_grads_match_numpy(reset_cuda_probe):
    """A whole GPT-2 step with every matmul/softmax/attention on the (emulated) CUDA kernels."""
    emu = pytest.importorskip("numformer._cuda_emu", reason="numformer._cuda_emu is not built")
    from numformer.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT2.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 40, (2, 9)), rng.integers(0, 40, (2, 9))
    with backend.use("numpy"):
        loss_n, grads_n = model.loss_and_grads(ids, targets)
    reset_cuda_probe.setattr(backend, "_cuda_probed", True)
    reset_cuda_probe.setattr(backend, "_cuda_module", _EmulatorAsDevice(emu))
    with backend.use("cuda"):
        loss_c, grads_c = model.loss_and_grads(ids, targets)
    assert abs(loss_n - loss_c) <= 1e-5 * abs(loss_n)
    np.testing.assert_allclose(grads_c, grads_n, rtol=1e-3, atol=1e-5 * np.abs(grads_n).max())


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the benchmark would run")
def test_cuda_benchmark_skips_cleanly_without_a_device(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("cuda_kernels_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 0
    assert "skipped" in capsys.readouterr().out


class _EmuDeviceArray(np.ndarray):
    """An emulator 'device array': a NumPy array with DeviceArray's .numpy()."""

    def numpy(self):
        return np.array(self)


class _EmulatorAsFullDevice(_EmulatorAsDevice):
    """Enough of numformer._cuda's interface, over the emulator, to run the benchmark script."""

    def __getattr__(self, name):
        fn = getattr(self._emu, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(o.view(_EmuDeviceArray) for o in out)
            return out.view(_EmuDeviceArray)
        return wrapped

    @staticmethod
    def to_device(a):
        return np.array(a, copy=True, order="C").view(_EmuDeviceArray)

    @staticmethod
    def empty(shape):
        return np.empty(shape, np.float32).view(_EmuDeviceArray)

    device_name = staticmethod(lambda: "CPU emulator")
    build_info = staticmethod(lambda: "emulated")
    measure_copy_bandwidth = staticmethod(lambda nbytes: 1.0)
    measure_fma_peak = staticmethod(lambda iters: 1.0)
    set_synchronous = staticmethod(lambda on: True)
    synchronize = staticmethod(lambda: None)


def test_emu_cuda_benchmark_script_runs_end_to_end(monkeypatch, capsys, tmp_path):
    """benchmarks/cuda_kernels.py --smoke with the emulator as the device: every
    code path of the script runs (the numbers mean nothing here)."""
    import importlib.util
    import json
    from pathlib import Path

    emu = pytest.importorskip("numformer._cuda_emu", reason="numformer._cuda_emu is not built")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("cuda_kernels_bench_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "_load", lambda: (_EmulatorAsFullDevice(emu), ""))
    monkeypatch.setattr(mod, "_torch", lambda: None)
    out = tmp_path / "rows.json"
    assert mod.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"copy", "fma_peak", "gemm", "softmax", "attention", "gpt2"}
    assert "GEMM float32" in capsys.readouterr().out
