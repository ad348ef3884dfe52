"""``numformer quantize`` reports *measured* errors (issue 15, defect 14).

The figure it used to print, max over columns of ``max |w − q·s| / max|w|``,
sits at the rounding bound 1/254 for any column of more than a few elements,
so it said nothing about the checkpoint at hand. The summary now measures
the written int8 copy against the float weights (relative RMS per tensor and
over all) and the logits of both models on a fixed probe input.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from numformer import checkpoint
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.quantize import QUANT_MODULES, probe_logits_error, quantize_checkpoint, quantize_model
from numformer.tokenizers.char import CharTokenizer

CFG = GPT2Config(vocab_size=27, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def _save(tmp_path, model, name="float"):
    path = str(tmp_path / name)
    checkpoint.save(path, model, CharTokenizer.train("abcdefghijklmnopqrstuvwxyz"))
    return path


def _exact_model(seed=0):
    """A model whose int8 weights reconstruct exactly: every column (head: row)
    holds 127·s in one place and integer multiples of s elsewhere."""
    model = GPT2.init(CFG, seed=seed)
    rng = np.random.default_rng(seed)
    names = [f"h.{i}.{m}.weight" for i in range(CFG.n_layer) for m in QUANT_MODULES]
    for n in names:
        w = model.params[n]
        s = rng.uniform(0.5, 2.0, size=w.shape[1]).astype(np.float32) / 1024  # powers of two apart: exact
        s = np.exp2(np.round(np.log2(s))).astype(np.float32)
        q = rng.integers(-127, 128, size=w.shape)
        q[0] = 127
        w[...] = (q * s).astype(np.float32)
    wte = model.params["wte.weight"]
    s = np.full(wte.shape[0], 2.0 ** -9, dtype=np.float32)
    q = rng.integers(-127, 128, size=wte.shape)
    q[:, 0] = -127
    wte[...] = (q * s[:, None]).astype(np.float32)
    return model


def _independent_rel_rms(float_model, out):
    qm = checkpoint.load_model(out).dequantize()
    num = den = 0.0
    for n in (f"h.{i}.{m}.weight" for i in range(CFG.n_layer) for m in QUANT_MODULES):
        a, b = float_model.params[n].astype(np.float64), qm.params[n].astype(np.float64)
        num += np.sum((a - b) ** 2)
        den += np.sum(a ** 2)
    return np.sqrt(num / den)


def test_summary_measures_the_weights_written(tmp_path):
    model = GPT2.init(CFG, seed=1)
    out = str(tmp_path / "q")
    info = quantize_checkpoint(_save(tmp_path, model), out)
    we = info["weight_error"]
    assert we["rel_rms"] == pytest.approx(_independent_rel_rms(model, out), rel=1e-6)
    assert 0 < we["rel_rms"] <= we["worst_rel_rms"]
    assert we["worst_name"] in model.params
    assert info["head_error"]["rel_rms"] > 0
    lg = info["logits_error"]
    assert lg["tokens"] == CFG.n_positions and 0.0 <= lg["top1_agree"] <= 1.0
    assert 0 < lg["max_abs"] and 0 < lg["rel_rms"] < 0.05


def test_exactly_representable_weights_measure_zero_not_the_bound(tmp_path):
    """The old figure reported ≈ 1/254 whatever the weights; a measured one is 0 here."""
    model = _exact_model()
    out = str(tmp_path / "q")
    info = quantize_checkpoint(_save(tmp_path, model), out)
    assert info["weight_error"]["rel_rms"] == 0.0 and info["weight_error"]["max_abs"] == 0.0
    assert info["head_error"]["rel_rms"] == 0.0
    assert info["logits_error"]["top1_agree"] == 1.0
    assert info["logits_error"]["rel_rms"] < 1e-5          # float32 summation order only


def test_float_head_has_no_head_error(tmp_path):
    info = quantize_checkpoint(_save(tmp_path, GPT2.init(CFG, seed=2)), str(tmp_path / "q"), int8_head=False)
    assert info["head_error"] is None and info["weight_error"]["rel_rms"] > 0


def test_probe_logits_error_compares_the_two_models():
    model = GPT2.init(CFG, seed=3)
    q = quantize_model(model)
    ids = np.arange(8)[None] % CFG.vocab_size
    r = probe_logits_error(model, q, ids)
    ref, got = model.forward(ids)[0], q.forward(ids)[0]
    assert r["max_abs"] == pytest.approx(float(np.max(np.abs(got - ref))), rel=1e-6)
    assert r["tokens"] == 8
    assert probe_logits_error(model, model, ids)["max_abs"] == 0.0


def test_cli_prints_the_measured_figures(tmp_path, capsys):
    from numformer.cli import main

    model = GPT2.init(CFG, seed=4)
    src, out = _save(tmp_path, model), str(tmp_path / "q")
    assert main(["quantize", "--checkpoint", src, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "measured weight error" in text and "logits on a 16-token probe" in text
    assert "max per-channel error" not in text                  # the bound is not reported as an error
    shown = float(re.search(r"\|\|w - q\*s\|\| / \|\|w\|\|: ([0-9.e+-]+)", text).group(1))
    assert shown == pytest.approx(_independent_rel_rms(model, out), rel=1e-2)
