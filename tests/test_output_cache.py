"""The cache of large kernel results (csrc/bindings/output_cache.h).

Results of 32 MiB or more reuse freed blocks instead of fresh pages. What
must hold: a reused block never leaks stale values into a result, a block is
never handed out while any array or view still refers to it, the idle bytes
stay under the limit, and NUMFORMER_OUTPUT_CACHE_MB=0 turns it off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_cpu = pytest.importorskip("numformer._cpu", reason="numformer._cpu (the C++ extension) is not built")

MIN_BYTES = _cpu.output_cache_info()["min_bytes"]
LARGE = MIN_BYTES // 4 + 1  # float32 elements: just over the threshold


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def empty_cache():
    _cpu.clear_output_cache()
    yield
    _cpu.clear_output_cache()


def test_threshold_is_glibcs_largest_mmap_threshold():
    assert MIN_BYTES == 32 << 20


def test_reused_block_gives_the_same_result_as_a_fresh_one():
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((2, LARGE), dtype=np.float32)
    first = _cpu.gelu_tanh_forward(x1)
    address = _address(first)
    expect_first = first.copy()
    del first
    before = _cpu.output_cache_info()
    assert before["idle_blocks"] == 1
    second = _cpu.gelu_tanh_forward(x2)
    after = _cpu.output_cache_info()
    assert _address(second) == address and after["hits"] == before["hits"] + 1
    np.testing.assert_array_equal(second, _cpu.gelu_tanh_forward(x2.copy()))
    assert not np.array_equal(second, expect_first)


def test_small_results_do_not_use_the_cache():
    info = _cpu.output_cache_info()
    y = _cpu.softmax_forward(np.zeros((4, 1000), np.float32))
    del y
    assert _cpu.output_cache_info() == info


def test_a_live_view_keeps_its_block_out_of_the_cache():
    x = np.ones((2, LARGE // 2 + 1), np.float32)
    y = _cpu.softmax_forward(x)
    view = y[1, ::3]
    del y
    assert _cpu.output_cache_info()["idle_blocks"] == 0
    other = _cpu.softmax_forward(x)
    assert _address(other) != _address(view)
    np.testing.assert_allclose(view, 1.0 / x.shape[1], rtol=1e-6)
    del view
    assert _cpu.output_cache_info()["idle_blocks"] == 1


def test_a_much_larger_block_does_not_serve_a_small_result():
    big = _cpu.gelu_tanh_forward(np.zeros(4 * LARGE, np.float32))
    del big
    hits = _cpu.output_cache_info()["hits"]
    small = _cpu.gelu_tanh_forward(np.zeros(LARGE, np.float32))
    info = _cpu.output_cache_info()
    assert info["idle_blocks"] == 1 and info["hits"] == hits
    del small


def test_matmul_softmax_and_attention_results_come_from_the_cache():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((LARGE // 64 + 1, 8), dtype=np.float32)
    b = rng.standard_normal((8, 64), dtype=np.float32)
    hits = _cpu.output_cache_info()["hits"]
    for _ in range(2):
        c = _cpu.matmul(a, b)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
        del c
    y = rng.random((LARGE // 128 + 1, 128), dtype=np.float32)
    for _ in range(2):
        dx = _cpu.softmax_backward(y, y)
        dot = np.sum(y.astype(np.float64) ** 2, axis=-1, keepdims=True)
        np.testing.assert_allclose(dx, y * (y - dot), rtol=1e-4, atol=1e-5)
        del dx
    assert _cpu.output_cache_info()["hits"] >= hits + 2


def test_clear_frees_idle_blocks():
    y = _cpu.gelu_tanh_forward(np.zeros(LARGE, np.float32))
    del y
    assert _cpu.output_cache_info()["idle_bytes"] >= MIN_BYTES
    _cpu.clear_output_cache()
    info = _cpu.output_cache_info()
    assert info["idle_blocks"] == 0 and info["idle_bytes"] == 0


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_limit_evicts_the_oldest_idle_block():
    r = _child(f"""
        import numpy as np, numformer._cpu as c
        a = c.gelu_tanh_forward(np.zeros({LARGE}, np.float32))
        b = c.gelu_tanh_forward(np.zeros({LARGE}, np.float32))
        del a, b
        info = c.output_cache_info()
        print(info["idle_blocks"], info["idle_bytes"] <= info["limit_bytes"], info["limit_bytes"])
        """, NUMFORMER_OUTPUT_CACHE_MB="40")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", str(40 << 20)]


def test_zero_turns_the_cache_off_and_bad_values_warn():
    code = f"""
        import numpy as np, numformer._cpu as c
        y = c.gelu_tanh_forward(np.zeros({LARGE}, np.float32))
        del y
        info = c.output_cache_info()
        print(info["hits"] + info["misses"], info["idle_blocks"])
        """
    r = _child(code, NUMFORMER_OUTPUT_CACHE_MB="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"]
    r = _child(code, NUMFORMER_OUTPUT_CACHE_MB="lots")
    assert r.returncode == 0, r.stderr
    assert "ignoring NUMFORMER_OUTPUT_CACHE_MB='lots'" in r.stderr
    assert r.stdout.split() == ["1", "1"]
