"""Hugging Face GPT-2 folders: loading, parity with transformers (committed fixture), export, bad input.

The fixture tests/fixtures/tiny-gpt2/ was made by tests/fixtures/make_gpt2_fixture.py
with transformers (random init, 2 layers, 64 wide, vocab 500); these tests need no torch.
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

import numformer
from numformer import pretrained, safetensors
from numformer.generate import generate
from numformer.models.gpt2 import GPT2, GPT2Config, param_shapes
from numformer.params import ParamLayout
from numformer.pretrained import PretrainedError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")
EXPECTED = np.load(os.path.join(FIXTURE, "expected.npz"))

# float32 on both sides, different summation orders: differences are a few ulps of
# the largest intermediate, so tolerances scale with the reference's magnitude.
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)


def hf_targets(ids):
    """transformers' labels=ids loss predicts ids[:, 1:] from positions :-1."""
    return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)


@pytest.fixture(scope="module")
def model():
    return numformer.from_pretrained(FIXTURE)


def copy_fixture(tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(FIXTURE, dst)
    return dst


def rewrite_weights(folder, fn):
    """Load model.safetensors, apply fn(dict) -> dict, write it back."""
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors.load_file(path)
    safetensors.save_file(fn(dict(tensors)), path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- parity (fixture)


def test_logits_and_loss_match_transformers(model):
    ids = EXPECTED["ids"]
    logits, loss, _ = model.forward(ids, hf_targets(ids))
    np.testing.assert_allclose(logits, EXPECTED["logits"], **LOGIT_TOL)
    assert abs(loss - float(EXPECTED["loss"])) < 1e-5


def test_gradients_match_pytorch_autograd(model):
    ids = EXPECTED["ids"]
    _, _, cache = model.forward(ids, hf_targets(ids))
    grads = model.layout.views(model.backward(cache))
    names = [k for k in EXPECTED.files if k.startswith("grad/")]
    assert len(names) >= 6
    for key in names:
        ref = EXPECTED[key]
        ours = grads[key[len("grad/transformer."):]]
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=key)


def test_greedy_generation_is_identical(model):
    new = generate(model, EXPECTED["ids"][0, :5].tolist(), len(EXPECTED["greedy"]), temperature=0)
    assert new == EXPECTED["greedy"].tolist()
    assert len(set(new)) > 3      # the fixture was made so that greedy decoding is not degenerate


def test_tokenizer_matches_hf_tokenizers_on_committed_texts():
    tok = numformer.load_tokenizer(FIXTURE)
    with open(os.path.join(FIXTURE, "texts.json"), encoding="utf-8") as f:
        texts = json.load(f)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert ids == EXPECTED[f"text{i}"].tolist(), text
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- layouts


def test_any_gpt2_size_config():
    """The four released GPT-2 sizes (config only: counting parameters allocates nothing)."""
    sizes = {(12, 768, 12): 124_439_808, (24, 1024, 16): 354_823_168,
             (36, 1280, 20): 774_030_080, (48, 1600, 25): 1_557_611_200}
    for (n_layer, n_embd, n_head), count in sizes.items():
        cfg = pretrained.gpt2_config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                              "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                                              "n_positions": 1024, "vocab_size": 50257, "n_inner": None})
        assert ParamLayout(param_shapes(cfg)).size == count


def test_names_without_prefix_and_mask_buffers(tmp_path, model):
    folder = copy_fixture(tmp_path)

    def strip(t):
        out = {k[len("transformer."):]: v for k, v in t.items()}
        out["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))   # old transformers buffers
        out["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
        out["lm_head.weight"] = t["transformer.wte.weight"]                    # tied: equal, accepted
        return out
    rewrite_weights(folder, strip)
    assert np.array_equal(numformer.from_pretrained(folder).flat, model.flat)


def test_float16_and_bfloat16_weights_are_converted(tmp_path, model):
    folder = copy_fixture(tmp_path)
    rewrite_weights(folder, lambda t: {k: v.astype(np.float16) for k, v in t.items()})
    m16 = numformer.from_pretrained(folder)
    assert np.array_equal(m16.flat, model.flat.astype(np.float16).astype(np.float32))
    # BF16 has no NumPy dtype: write the header by hand around u16 data
    path = os.path.join(folder, "model.safetensors")
    tensors = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in
               safetensors.load_file(os.path.join(FIXTURE, "model.safetensors")).items()}
    safetensors.save_file(tensors, path)
    header, _ = safetensors.read_header(path)
    raw = json.dumps({k: {**e, "dtype": "BF16"} for k, e in header.items()}).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "rb") as f:
        old = f.read()
    data = old[8 + int.from_bytes(old[:8], "little"):]
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    mbf = numformer.from_pretrained(folder)
    expect = (model.flat.view(np.uint32) >> 16 << 16).view(np.float32)
    assert np.array_equal(mbf.flat, expect)


def test_sharded_checkpoint(tmp_path, model):
    folder = copy_fixture(tmp_path)
    tensors = safetensors.load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        safetensors.save_file({n: tensors[n] for n in part}, os.path.join(folder, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    assert np.array_equal(numformer.from_pretrained(folder).flat, model.flat)


def test_float32_weights_are_read_straight_into_the_flat_buffer(monkeypatch):
    """No intermediate per-tensor arrays for float32 files (memory: one copy of the weights)."""
    def boom(*a, **k):
        raise AssertionError("a float32 tensor went through an intermediate array")
    monkeypatch.setattr(safetensors, "load_file", boom)
    monkeypatch.setattr(pretrained, "_read_tensor", boom)
    numformer.from_pretrained(FIXTURE)


# ----------------------------------------------------------------------------- export


def test_round_trip_is_exact(tmp_path, model):
    out = tmp_path / "export"
    tok = numformer.load_tokenizer(FIXTURE)
    numformer.save_pretrained(model, out, tokenizer=tok)
    again = numformer.from_pretrained(out)
    assert np.array_equal(again.flat, model.flat)
    assert again.cfg == model.cfg
    # same names and bytes per tensor as the file transformers wrote
    ours = safetensors.load_file(os.path.join(out, "model.safetensors"))
    theirs = safetensors.load_file(os.path.join(FIXTURE, "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    tok2 = numformer.load_tokenizer(out)
    assert tok2.encode("round trip ünïcode") == tok.encode("round trip ünïcode")
    # a second export replaces the first atomically
    numformer.save_pretrained(again, out)
    assert np.array_equal(numformer.from_pretrained(out).flat, model.flat)


def test_export_of_a_fresh_model_with_n_inner_and_exact_gelu(tmp_path):
    cfg = GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                     activation_function="gelu")
    m = GPT2.init(cfg, seed=3)
    numformer.save_pretrained(m, tmp_path / "fresh")
    back = numformer.from_pretrained(tmp_path / "fresh")
    assert back.cfg.n_inner == 48 and back.cfg.activation_function == "gelu"
    ids = np.arange(10)[None] % 300
    np.testing.assert_array_equal(back.forward(ids)[0], m.forward(ids)[0])


# ----------------------------------------------------------------------------- bad input


def test_missing_tensor_names_file_and_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(PretrainedError, match=r"model\.safetensors.*missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        numformer.from_pretrained(folder)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_weights(folder, lambda t: {**t, "transformer.h.0.attn.c_proj.weight": np.zeros((64, 65), np.float32)})
    with pytest.raises(PretrainedError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_proj\.weight' "
                                              r"has shape \(64, 65\).*needs \(64, 64\)"):
        numformer.from_pretrained(folder)


def test_config_and_weights_disagree(tmp_path):
    folder = copy_fixture(tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["n_layer"] = 3
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(PretrainedError, match=r"missing tensor 'h\.2\.ln_1\.weight'"):
        numformer.from_pretrained(folder)
    cfg["n_layer"], cfg["vocab_size"] = 2, 512
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(PretrainedError, match=r"'transformer\.wte\.weight' has shape \(500, 64\).*needs \(512, 64\)"):
        numformer.from_pretrained(folder)


def test_unexpected_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_weights(folder, lambda t: {**t, "score.weight": np.zeros((2, 64), np.float32)})
    with pytest.raises(PretrainedError, match=r"unexpected tensor 'score\.weight'"):
        numformer.from_pretrained(folder)


def test_untied_lm_head_is_reported(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_weights(folder, lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1e-3})
    with pytest.raises(PretrainedError, match=r"'lm_head\.weight' differs from wte\.weight"):
        numformer.from_pretrained(folder)


@pytest.mark.parametrize("change, pattern", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, r"config\.json: unknown architecture"),
    ({"architectures": ["GPT2ForSequenceClassification"]}, r"unknown architecture 'GPT2ForSequenceClassification'"),
    ({"scale_attn_weights": False}, r"scale_attn_weights=False is not supported"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=False is not supported"),
    ({"activation_function": "relu"}, r"activation_function 'relu' is not supported"),
    ({"n_head": 5}, r"config\.json: bad GPT-2 config .*divisible"),
])
def test_unsupported_configs(tmp_path, change, pattern):
    folder = copy_fixture(tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(PretrainedError, match=pattern):
        numformer.from_pretrained(folder)


class _Trap:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_is_refused_never_unpickled(tmp_path):
    folder = copy_fixture(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    marker = tmp_path / "unpickled"
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_Trap(str(marker)), f)
    with pytest.raises(PretrainedError, match=r"pytorch_model\.bin.*pickle.*model\.safetensors"):
        numformer.from_pretrained(folder)
    assert not marker.exists()


def test_corrupt_safetensors_and_missing_folder(tmp_path):
    folder = copy_fixture(tmp_path)
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.write((10 ** 12).to_bytes(8, "little"))
    with pytest.raises(PretrainedError, match=r"model\.safetensors: header length"):
        numformer.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="does not exist"):
        numformer.from_pretrained(tmp_path / "nope")
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(PretrainedError, match="no config.json"):
        numformer.from_pretrained(folder)


# ----------------------------------------------------------------------------- CLI


def test_cli_tokenize_and_sample_from_hf_folder(capsys):
    from numformer.cli import main

    assert main(["tokenize", "--tokenizer", FIXTURE, "Hello world!"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert ids == numformer.load_tokenizer(FIXTURE).encode("Hello world!")
    assert main(["tokenize", "--tokenizer", FIXTURE, "--allow-special", "<|endoftext|>"]) == 0
    assert capsys.readouterr().out.split() == ["499"]
    assert main(["sample", "--checkpoint", FIXTURE, "--prompt", "def", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from numformer.cli import main

    folder = copy_fixture(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"not even a pickle")
    assert main(["sample", "--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numformer: error:") and "pytorch_model.bin" in err and "safetensors" in err
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("!!!! 0\n")
    assert main(["tokenize", "--tokenizer", str(bad), "x"]) == 2
    assert "line 1" in capsys.readouterr().err


def test_tied_check_reads_lm_head_in_blocks(tmp_path, monkeypatch, model):
    """The tie check compares block by block (small blocks here) and finds a difference in the last row."""
    folder = copy_fixture(tmp_path)

    def last_row_differs(t):
        head = t["transformer.wte.weight"].copy()
        head[-1, -1] += 1.0
        return {**t, "lm_head.weight": head}
    rewrite_weights(folder, last_row_differs)
    monkeypatch.setattr(pretrained, "_TIE_BLOCK_BYTES", 64 * 4 * 100)          # 100 rows per block
    monkeypatch.setattr(pretrained, "_read_tensor", _counting(pretrained._read_tensor, calls := []))
    with pytest.raises(PretrainedError, match=r"lm_head\.weight' differs from wte\.weight \(max \|diff\| 1\)"):
        numformer.from_pretrained(folder)
    assert calls == [[100, 64]] * 5


def _counting(fn, calls):
    def wrapper(*a, **k):
        calls.append(a[3]["shape"])
        return fn(*a, **k)
    return wrapper
