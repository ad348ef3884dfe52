"""numformer._cuda on a real GPU: the kernels vs NumPy (float64) and, when
installed with CUDA, PyTorch (cuBLAS, torch.softmax, SDPA).

Every test is marked ``cuda`` and the whole module is skipped cleanly when
``numformer._cuda`` is not built or sees no device (as on our CI machines,
where tests/test_cuda_emu.py runs the same kernel source on the CPU instead).
"""

from __future__ import annotations

import numpy as np
import pytest

_cuda = pytest.importorskip("numformer._cuda", reason="numformer._cuda is not built (no nvcc at install time)")
if _cuda.device_count() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.cuda

EPS = float(np.finfo(np.float32).eps)


def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def dev(x):
    return _cuda.to_device(np.ascontiguousarray(x))


def test_device_arrays_round_trip_and_describe_themselves():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    d = _cuda.to_device(x)
    assert d.shape == (2, 3, 4) and d.dtype == np.float32 and d.nbytes == 96
    np.testing.assert_array_equal(d.numpy(), x)
    np.testing.assert_array_equal(np.asarray(d), x)
    m = _cuda.to_device(np.array([True, False]))
    assert m.dtype == np.uint8 and list(m.numpy()) == [1, 0]
    assert "DeviceArray(shape=(2, 3, 4)" in repr(d)
    assert _cuda.empty((0, 5)).shape == (0, 5)
    with pytest.raises(TypeError, match="int64"):
        _cuda.to_device(np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="DeviceArray"):
        _cuda.matmul(x[0], x[0].T)


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (127, 129, 7), (128, 128, 8), (257, 300, 513), (1024, 1024, 1024),
                                     (3, 2048, 768)])
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_matches_numpy(M, N, K, ta, tb):
    rng = np.random.default_rng(M * N + K)
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    got = _cuda.matmul(dev(a), dev(b), ta, tb, bias=dev(bias)).numpy()
    a_op = (a.T if ta else a).astype(np.float64)
    b_op = (b.T if tb else b).astype(np.float64)
    want = a_op @ b_op + bias
    bound = (K + 2) * EPS * (abs(a_op) @ abs(b_op) + abs(bias))
    assert (abs(got - want) <= bound).all()


def test_matmul_batched_accumulate_and_results_stay_on_device():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 65, 33)).astype(np.float32)
    b = rng.standard_normal((3, 33, 17)).astype(np.float32)
    c0 = rng.standard_normal((3, 65, 17)).astype(np.float32)
    c = dev(c0)
    r = _cuda.matmul(dev(a), dev(b), out=c, accumulate=True)
    np.testing.assert_allclose(r.numpy(), a @ b + c0, rtol=1e-5, atol=1e-4)
    # chain without host copies: softmax of a product, then its gradient
    y = _cuda.softmax_forward(r, scale=0.1)
    dx = _cuda.softmax_backward(y, y)
    assert isinstance(dx, _cuda.DeviceArray) and dx.shape == (3, 65, 17)


def test_matmul_against_torch_cublas():
    torch = torch_cuda()
    rng = np.random.default_rng(2)
    a = rng.standard_normal((512, 384)).astype(np.float32)
    b = rng.standard_normal((384, 640)).astype(np.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    want = (torch.from_numpy(a).cuda() @ torch.from_numpy(b).cuda()).cpu().numpy()
    np.testing.assert_allclose(_cuda.matmul(dev(a), dev(b)).numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(7, 1), (64, 31), (33, 1024), (4, 50257), (2, 12, 128, 128)])
def test_softmax_forward_backward_match_numpy(shape):
    from numformer.backend import _masked_logits
    from numformer.ops.softmax import softmax_backward_reference, softmax_reference

    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    causal = len(shape) == 4
    mask = np.where(rng.random(shape[-1]) < 0.2, -np.inf, 0).astype(np.float32)
    y = _cuda.softmax_forward(dev(x), scale=0.7, mask=dev(mask), causal=causal).numpy()
    want = softmax_reference(_masked_logits(x.astype(np.float64), 0.7, mask.astype(np.float64), causal))
    n = shape[-1]
    assert (abs(y - want) <= EPS + (24 + n / 16 + 2 * 5 * 5) * EPS * abs(want)).all()
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = _cuda.softmax_backward(dev(dy), dev(y), scale=0.7).numpy()
    np.testing.assert_allclose(dx, 0.7 * softmax_backward_reference(dy.astype(np.float64), y.astype(np.float64)),
                               rtol=1e-4, atol=1e-6)


def test_softmax_special_rows_and_torch():
    x = np.array([[-np.inf] * 40, [0.0] * 39 + [np.nan], [1.0] * 39 + [np.inf]], np.float32)
    y = _cuda.softmax_forward(dev(x)).numpy()
    assert (y[0] == 0).all() and np.isnan(y[1]).all() and np.isnan(y[2]).all()
    torch = torch_cuda()
    z = np.random.default_rng(3).standard_normal((256, 1000)).astype(np.float32)
    want = torch.softmax(torch.from_numpy(z).cuda(), -1).cpu().numpy()
    np.testing.assert_allclose(_cuda.softmax_forward(dev(z)).numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("B, H, Tq, Tk, D", [(1, 2, 1, 1, 32), (2, 3, 65, 65, 64), (1, 2, 100, 257, 128),
                                             (1, 1, 300, 40, 96), (2, 2, 512, 512, 64)])
@pytest.mark.parametrize("mode", ["full", "causal", "padding", "causal+padding"])
def test_attention_matches_reference(B, H, Tq, Tk, D, mode):
    from test_cpu_attention import bounds, check, reference

    rng = np.random.default_rng(B * Tq + Tk + D)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)))
    dout = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    causal = "causal" in mode
    km = rng.random((B, Tk)) < 0.7 if "padding" in mode else None
    out, lse = _cuda.attention_forward(dev(q), dev(k), dev(v), causal=causal, key_mask=km)
    dq, dk, dv = _cuda.attention_backward(dev(dout), dev(q), dev(k), dev(v), out, lse, causal=causal, key_mask=km)
    scale = 1.0 / np.sqrt(D)
    r = reference(q, k, v, dout, causal, km, scale)
    bd = bounds(r, np.float32, scale)
    for name, got in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items():
        check(name, got.numpy(), r[name], bd[name])


def test_attention_against_torch_sdpa():
    torch = torch_cuda()
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 4, 256, 64)).astype(np.float32) for _ in range(3))
    out, _ = _cuda.attention_forward(dev(q), dev(k), dev(v), causal=True)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).cpu().numpy()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)


def test_backend_cuda_gpt2_loss_and_grads_match_numpy():
    from numformer import backend
    from numformer.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=50, n_positions=80, n_embd=64, n_layer=2, n_head=2)
    model = GPT2.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 50, (2, 70)), rng.integers(0, 50, (2, 70))
    with backend.use("numpy"):
        loss_n, grads_n = model.loss_and_grads(ids, targets)
    with backend.use("cuda"):
        loss_c, grads_c = model.loss_and_grads(ids, targets)
    assert abs(loss_n - loss_c) <= 1e-5 * abs(loss_n)
    np.testing.assert_allclose(grads_c, grads_n, rtol=1e-3, atol=1e-5 * np.abs(grads_n).max())


def test_device_gpt2_forward_matches_the_cpu_model():
    """numformer.cuda_model.DeviceGPT2 at GPT-2 124M's size (random weights):
    the weights live on the device as DeviceArrays, and the logits agree with
    the model on NumPy within float32 accumulation error."""
    from numformer import backend
    from numformer.cuda_model import DeviceGPT2
    from numformer.models.gpt2 import GPT2, GPT2Config

    model = GPT2.init(GPT2Config(), seed=0)
    ids = np.random.default_rng(0).integers(0, 50257, (2, 64))
    dm = DeviceGPT2(model)
    assert all(isinstance(w, _cuda.DeviceArray) for w in dm.weights.values())
    got = dm.forward(ids)
    with backend.use("numpy"):
        want = model.forward(ids)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    cache = dm.new_cache(2, 64)                     # the same logits through the device KV cache
    head, tail = dm.forward(ids[:, :60], cache), dm.forward(ids[:, 60:], cache, last_only=True)
    np.testing.assert_allclose(head, got[:, :60], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(tail[:, 0], got[:, -1], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert dm.generate(ids[:, :8], 4, temperature=0).shape == (2, 4)
