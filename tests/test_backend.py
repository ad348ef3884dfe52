"""Backend selection: environment variable, context manager, fallback."""

import subprocess
import sys

import numpy as np
import pytest

from numformer import backend

needs_cpu = pytest.mark.skipif(not backend.cpu_available(), reason="numformer._cpu not built")


def test_context_manager_selects_and_restores(monkeypatch):
    monkeypatch.delenv("NUMFORMER_BACKEND", raising=False)
    before = backend.current()
    with backend.use("numpy"):
        assert backend.current() == "numpy"
    assert backend.current() == before


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("NUMFORMER_BACKEND", "numpy")
    assert backend.current() == "numpy"
    monkeypatch.setenv("NUMFORMER_BACKEND", "tpu")
    for _ in range(2):                       # a bad name is never remembered as parsed
        with pytest.raises(ValueError, match="unknown backend 'tpu'"):
            backend.current()
    monkeypatch.setenv("NUMFORMER_BACKEND", " NumPy ")
    assert backend.current() == "numpy"      # a change of the variable takes effect at once
    monkeypatch.delenv("NUMFORMER_BACKEND")
    assert backend.current() == ("cpu" if backend.cpu_available() else "numpy")


def test_pinned_holds_the_backend_for_a_pass(monkeypatch):
    monkeypatch.setenv("NUMFORMER_BACKEND", "numpy")
    with backend.pinned():
        monkeypatch.delenv("NUMFORMER_BACKEND")
        assert backend.current() == "numpy"          # chosen on entry, held inside
        with backend.use("cpu" if backend.cpu_available() else "numpy"), backend.pinned():
            assert backend.current() == ("cpu" if backend.cpu_available() else "numpy")  # use() wins
        assert backend.current() == "numpy"
    assert backend.current() == ("cpu" if backend.cpu_available() else "numpy")


def test_a_model_pass_reads_the_environment_once(monkeypatch):
    from numformer.models.gpt2 import GPT2, GPT2Config

    model = GPT2.init(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2), seed=0)
    reads = []
    real = backend._env_backend
    monkeypatch.setattr(backend, "_env_backend", lambda: reads.append(1) or real())
    ids = np.array([[1, 2, 3]])
    _, loss, cache = model.forward(ids, targets=ids)
    model.backward(cache)
    assert len(reads) == 2                           # one per pass, not one per op


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with backend.use("gpu"):
            pass


def test_numpy_matmul_forms_and_softmax():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    with backend.use("numpy"):
        np.testing.assert_allclose(backend.matmul(a, b, trans_b=True), a @ b.T)
        np.testing.assert_allclose(backend.matmul(a, a, trans_a=True), a.T @ a)
        y = backend.softmax(a)
        np.testing.assert_allclose(y.sum(-1), 1)


@needs_cpu
def test_default_is_cpu_when_built(monkeypatch):
    monkeypatch.delenv("NUMFORMER_BACKEND", raising=False)
    assert backend.current() == "cpu"


@needs_cpu
def test_transposed_views_reach_the_kernel_without_copies():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    with backend.use("cpu"):
        np.testing.assert_allclose(backend.matmul(x.T.T, w), x @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(backend.matmul(w.T, x.T), w.T @ x.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(backend.matmul(w[::2], w[::2], trans_b=True),
                                   w[::2] @ w[::2].T, rtol=1e-5, atol=1e-5)


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    """Hide numformer._cpu: numformer must still work, warn once, and refuse an explicit 'cpu'."""
    code = """
import sys, warnings
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "numformer._cpu":
            raise ImportError("hidden for the test")
sys.meta_path.insert(0, Hide())
import numpy as np
from numformer import backend
from numformer.models.gpt2 import GPT2, GPT2Config
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = GPT2.init(GPT2Config(vocab_size=7, n_positions=4, n_embd=8, n_layer=1, n_head=2))
    m.forward(np.zeros((1, 4), int)); m.forward(np.zeros((1, 4), int))
print(backend.current(), sum("unavailable" in str(w.message) for w in caught))
try:
    with backend.use("cpu"):
        pass
except RuntimeError as e:
    print("refused")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["numpy", "1", "refused"]
