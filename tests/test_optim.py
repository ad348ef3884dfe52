"""Tests for numformer.optim: AdamW, SGD, the cosine schedule, clipping.

The references below are the textbook formulas written out in float64, one
line per equation, independent of the in-place implementation."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest

from numformer import optim
from numformer.optim import SGD, AdamW, clip_grad_norm, cosine_schedule

# float32 state accumulates rounding of ~1 ulp per op; a few steps stay
# well inside this. float64 differs from the reference only by op order.
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


def _problem(dtype, n=50, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    mask = (rng.random(n) < 0.5).astype(dtype)
    return p0, grads, mask


def ref_adamw(p, grads, lrs, b1, b2, eps, wd, mask):
    """Decoupled AdamW (Loshchilov & Hutter), float64, straight from the paper."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        p = p - lr * wd * mask * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def ref_sgd(p, grads, lr, mu, nesterov, wd, mask):
    """SGD with coupled L2 and (Nesterov) momentum, float64."""
    p = p.astype(np.float64)
    b = np.zeros_like(p)
    for g in grads:
        d = g.astype(np.float64) + wd * mask * p
        b = mu * b + d
        u = d + mu * b if nesterov else (b if mu else d)
        p = p - lr * u
    return p


# --------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_mask", [True, False])
def test_adamw_matches_reference(dtype, use_mask):
    p0, grads, mask = _problem(dtype)
    lrs = [1e-2, 3e-2, 2e-2, 1e-2, 5e-3, 1e-3]  # a schedule, passed per step
    p = p0.copy()
    opt = AdamW(p, lr=123.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay_mask=mask if use_mask else None)
    for g, lr in zip(grads, lrs):
        g_before = g.copy()
        opt.step(g, lr=lr)
        assert np.array_equal(g, g_before)  # grads are not modified
    assert p.dtype == dtype and opt.m.dtype == dtype and opt.v.dtype == dtype
    ref = ref_adamw(p0, grads, lrs, 0.9, 0.95, 1e-8, 0.1, mask if use_mask else np.ones_like(p0))
    np.testing.assert_allclose(p, ref, **TOL[dtype])
    assert opt.t == len(grads)


def test_adamw_default_lr_is_used_without_override():
    p0, grads, mask = _problem(np.float64, steps=3)
    p = p0.copy()
    opt = AdamW(p, lr=0.05, weight_decay=0.2, decay_mask=mask)
    for g in grads:
        opt.step(g)
    np.testing.assert_allclose(p, ref_adamw(p0, grads, [0.05] * 3, 0.9, 0.95, 1e-8, 0.2, mask), rtol=1e-12)


def test_adamw_first_step_is_lr_times_sign():
    """Bias correction: after step 1, m_hat = g and v_hat = g^2 exactly, so
    the update is lr * g / (|g| + eps) ~ lr * sign(g) whatever |g| is."""
    g = np.array([1e-3, -5.0, 200.0, -1e-6])
    p = np.zeros(4)
    AdamW(p, lr=0.1, weight_decay=0.0, eps=1e-12).step(g)
    np.testing.assert_allclose(p, -0.1 * g / (np.abs(g) + 1e-12), rtol=1e-12)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-5)


def test_adamw_decay_mask_is_decoupled():
    """With zero gradient, Adam's step is 0: only decay moves the params,
    by exactly the factor (1 - lr*wd), and only where the mask is 1."""
    p = np.array([1.0, 2.0, -3.0, 4.0], np.float32)
    mask = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    opt = AdamW(p, lr=0.5, weight_decay=0.1, decay_mask=mask)
    opt.step(np.zeros(4, np.float32))
    np.testing.assert_array_equal(p, np.array([0.95, 2.0, -2.85, 4.0], np.float32))


def test_adamw_step_makes_no_large_temporaries():
    """The update runs every step on the whole model: it must work in place
    (one preallocated scratch buffer), not allocate arrays of size P."""
    n = 1_000_000  # 4 MB per float32 buffer
    p = np.zeros(n, np.float32)
    g = np.ones(n, np.float32)
    opt = AdamW(p, decay_mask=np.ones(n, np.float32))
    opt.step(g)  # warm up
    tracemalloc.start()
    try:
        opt.step(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < p.nbytes // 4, f"step allocated {peak} bytes at peak"


# --------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "mu, nesterov, wd, use_mask",
    [
        (0.0, False, 0.0, False),
        (0.9, False, 0.0, False),
        (0.9, True, 0.0, False),
        (0.8, False, 0.05, True),
        (0.9, True, 0.05, False),
        (0.0, False, 0.1, True),
    ],
)
def test_sgd_matches_reference(dtype, mu, nesterov, wd, use_mask):
    p0, grads, mask = _problem(dtype)
    p = p0.copy()
    opt = SGD(p, lr=0.05, momentum=mu, nesterov=nesterov, weight_decay=wd, decay_mask=mask if use_mask else None)
    for g in grads:
        g_before = g.copy()
        opt.step(g)
        assert np.array_equal(g, g_before)
    ref = ref_sgd(p0, grads, 0.05, mu, nesterov, wd, mask if use_mask else np.ones_like(p0))
    np.testing.assert_allclose(p, ref, **TOL[dtype])
    assert (opt.buf is None) == (mu == 0)


def test_sgd_rejects_nesterov_without_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(np.zeros(3), nesterov=True)


# --------------------------------------------------------------------------
# state dicts: a resumed optimizer continues bit for bit
# --------------------------------------------------------------------------


def _make(kind, p, **kw):
    if kind == "adamw":
        return AdamW(p, lr=1e-2, weight_decay=0.1, **kw)
    return SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01, **kw)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_is_exact(kind, dtype):
    p0, grads, mask = _problem(dtype, steps=8)
    # uninterrupted run
    p_a = p0.copy()
    opt_a = _make(kind, p_a, decay_mask=mask)
    for g in grads:
        opt_a.step(g)
    # interrupted after 3 steps, resumed in a fresh optimizer
    p_b = p0.copy()
    opt_b = _make(kind, p_b, decay_mask=mask)
    for g in grads[:3]:
        opt_b.step(g)
    state = opt_b.state_dict()
    saved_params = p_b.copy()
    opt_b.step(grads[3])  # state_dict holds copies: later steps don't leak in

    p_c = saved_params.copy()
    opt_c = _make(kind, p_c, decay_mask=mask)
    opt_c.load_state_dict(state)
    for g in grads[3:]:
        opt_c.step(g)
    assert np.array_equal(p_c, p_a)
    assert opt_c.state_dict()["step"] == len(grads)


def test_state_dict_survives_safetensors_and_json(tmp_path):
    """The checkpoint format: arrays in safetensors, scalars in JSON."""
    from numformer.safetensors import load_file, save_file

    p0, grads, mask = _problem(np.float32, steps=5)
    p = p0.copy()
    opt = AdamW(p, decay_mask=mask)
    for g in grads[:2]:
        opt.step(g)
    state = opt.state_dict()
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    save_file(arrays, tmp_path / "optim.safetensors")
    (tmp_path / "optim.json").write_text(json.dumps(scalars))

    q = p.copy()
    opt2 = AdamW(q, decay_mask=mask)
    loaded_scalars = json.loads((tmp_path / "optim.json").read_text())
    opt2.load_state_dict({**load_file(tmp_path / "optim.safetensors"), **loaded_scalars})
    for g in grads[2:]:
        opt.step(g)
        opt2.step(g)
    assert np.array_equal(p, q)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.pop("m"), "missing 'm'"),
        (lambda s: s.pop("step"), "missing 'step'"),
        (lambda s: s.update(v=np.zeros(7, np.float32)), r"'v' has shape \(7,\)"),
        (lambda s: s.update(m=np.zeros(10, np.float64)), "'m' has dtype float64"),
        (lambda s: s.update(step=-1), "'step' must be >= 0"),
        (lambda s: s.update(step=1.5), "'step' must be an integer"),
        (lambda s: s.update(lr="fast"), "'lr' must be a number"),
        (lambda s: s.update(eps=np.zeros(2)), "'eps' must be a scalar"),
        (lambda s: s.update(beta2=1.0), "betas"),
        (lambda s: s.update(weight_decay=float("nan")), "must be finite"),
    ],
)
def test_adamw_load_state_dict_validates(change, match):
    p = np.ones(10, np.float32)
    opt = AdamW(p)
    opt.step(np.ones(10, np.float32))
    before = opt.state_dict()
    state = opt.state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()  # a failed load changed nothing
    assert after["step"] == before["step"]
    assert np.array_equal(after["m"], before["m"]) and np.array_equal(after["v"], before["v"])


def test_load_state_dict_accepts_0d_array_scalars():
    p = np.ones(4)
    opt = AdamW(p)
    state = {k: (np.asarray(v) if not isinstance(v, np.ndarray) else v) for k, v in opt.state_dict().items()}
    state["step"] = np.array([5], np.int64)
    opt.load_state_dict(state)
    assert opt.t == 5 and isinstance(opt.t, int)


def test_sgd_load_state_dict_validates():
    opt = SGD(np.zeros(3), momentum=0.9)
    with pytest.raises(ValueError, match="missing 'momentum_buffer'"):
        opt.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "momentum_buffer"})
    with pytest.raises(ValueError, match="momentum=0.0"):
        opt.load_state_dict(SGD(np.zeros(3)).state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(SGD(np.zeros(4), momentum=0.9).state_dict())


@pytest.mark.parametrize("cls", [AdamW, SGD])
def test_input_validation(cls):
    with pytest.raises(TypeError):
        cls(np.zeros(3, np.int32))
    with pytest.raises(TypeError):
        cls([0.0, 1.0])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        cls(ro)
    with pytest.raises(ValueError, match="decay_mask has shape"):
        cls(np.zeros(3), decay_mask=np.ones(4))
    opt = cls(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"grads has shape \(4,\)"):
        opt.step(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="grads has dtype float64"):
        opt.step(np.zeros(3, np.float64))


# --------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------


def test_cosine_schedule_values():
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert cosine_schedule(0, **kw) == pytest.approx(1e-4)    # max_lr * 1/10: warmup start, not 0
    assert cosine_schedule(4, **kw) == pytest.approx(5e-4)
    assert cosine_schedule(9, **kw) == pytest.approx(1e-3)    # warmup end
    assert cosine_schedule(10, **kw) == pytest.approx(1e-3)   # decay start
    assert cosine_schedule(60, **kw) == pytest.approx(5.5e-4)  # midpoint: (max+min)/2
    assert cosine_schedule(110, **kw) == pytest.approx(1e-4)  # end
    assert cosine_schedule(10_000, **kw) == 1e-4              # after the end
    lrs = [cosine_schedule(s, **kw) for s in range(120)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))   # warmup rises
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))     # then never rises
    assert min(lrs) == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)


def test_cosine_schedule_edge_cases():
    assert cosine_schedule(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 1.0
    assert cosine_schedule(5, max_lr=1.0, min_lr=0.2, warmup_steps=5, total_steps=5) == 0.2
    assert cosine_schedule(2, max_lr=1.0, min_lr=1.0, warmup_steps=0, total_steps=4) == 1.0
    with pytest.raises(ValueError):
        cosine_schedule(-1, max_lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=2)
    with pytest.raises(ValueError):
        cosine_schedule(0, max_lr=1.0, min_lr=0.0, warmup_steps=3, total_steps=2)


# --------------------------------------------------------------------------
# clipping
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_leaves_small_gradients_alone(dtype):
    g = np.array([0.3, -0.4], dtype)  # norm 0.5
    before = g.copy()
    norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(0.5, rel=1e-7) and isinstance(norm, float)
    assert np.array_equal(g, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_scales_large_gradients_to_max_norm(dtype):
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(10_000) * 10).astype(dtype)
    expected = float(np.linalg.norm(g.astype(np.float64)))
    direction = g.astype(np.float64) / expected
    norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(expected, rel=1e-12)
    eps = float(np.finfo(dtype).eps)
    assert np.linalg.norm(g.astype(np.float64)) == pytest.approx(1.0, rel=10 * eps)
    np.testing.assert_allclose(g, direction, rtol=4 * eps, atol=0)  # direction kept


def test_clip_norm_is_accumulated_in_float64(monkeypatch):
    """float32 summation of 1e6 squares would drift; ours must not. Also
    exercises the chunked loop."""
    monkeypatch.setattr(optim, "_NORM_CHUNK", 1000)
    g = np.full(1_000_003, 0.1, np.float32)
    exact = math.sqrt(1_000_003 * float(np.float32(0.1)) ** 2)
    assert clip_grad_norm(g, 1e9) == pytest.approx(exact, rel=1e-12)


def test_clip_non_finite_and_overflow():
    g = np.array([1.0, np.nan, 3.0], np.float32)
    assert math.isnan(clip_grad_norm(g, 1.0))
    assert g[0] == 1.0 and g[2] == 3.0  # untouched: the caller skips the step
    g = np.array([1.0, np.inf])
    assert clip_grad_norm(g, 1.0) == math.inf and g[0] == 1.0
    # finite float64 values whose squares overflow still give a finite norm
    g = np.array([3e200, 4e200])
    assert clip_grad_norm(g, 1.0) == pytest.approx(5e200, rel=1e-12)
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-12)
    assert clip_grad_norm(np.zeros(0, np.float32), 1.0) == 0.0
    with pytest.raises(ValueError):
        clip_grad_norm(np.ones(2), 0.0)
    with pytest.raises(TypeError):
        clip_grad_norm(np.ones(2, np.int64), 1.0)


def test_clip_non_contiguous_grads_are_clipped_in_place():
    base = np.zeros((4, 4))
    view = base[:, 0]
    view[:] = [3.0, 4.0, 0.0, 0.0]
    assert clip_grad_norm(view, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(base[:2, 0], [0.6, 0.8])


# --------------------------------------------------------------------------
# they actually optimize
# --------------------------------------------------------------------------


def _quadratic(x, a, c):
    """f(x) = 0.5 * sum a_i (x_i - c_i)^2, an ill-conditioned bowl; grad a (x - c)."""
    return 0.5 * float(np.sum(a * (x - c) ** 2)), (a * (x - c)).astype(x.dtype)


@pytest.mark.parametrize(
    "make, steps",
    [
        (lambda x: AdamW(x, lr=0.05, weight_decay=0.0), 600),
        (lambda x: SGD(x, lr=0.05, momentum=0.9), 400),
        (lambda x: SGD(x, lr=0.05, momentum=0.9, nesterov=True), 400),
    ],
    ids=["adamw", "sgd-momentum", "sgd-nesterov"],
)
def test_minimizes_a_quadratic(make, steps):
    rng = np.random.default_rng(0)
    a = np.linspace(0.5, 10.0, 20).astype(np.float32)
    c = rng.standard_normal(20).astype(np.float32)
    x = np.zeros(20, np.float32)
    opt = make(x)
    f0, _ = _quadratic(x, a, c)
    for s in range(steps):
        _, g = _quadratic(x, a, c)
        lr = cosine_schedule(s, max_lr=opt.lr, min_lr=opt.lr / 10, warmup_steps=10, total_steps=steps)
        opt.step(g, lr=lr)
    f1, _ = _quadratic(x, a, c)
    assert f1 < 1e-6 * f0
    np.testing.assert_allclose(x, c, atol=1e-3)


# --------------------------------------------------------------------------
# optional oracle: PyTorch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    p0, grads, _ = _problem(dtype, n=200, steps=10, seed=3)
    p = p0.copy()
    opt = AdamW(p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for g in grads:
        opt.step(g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), **TOL[dtype])


def test_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    p0, grads, _ = _problem(np.float64, n=100, steps=10, seed=4)
    p = p0.copy()
    opt = SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for g in grads:
        opt.step(g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
