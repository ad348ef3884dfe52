"""Fine-tuning GPT-2 from its last token: gradients, padding, training, save/load, CLI, transformers."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from labelled_data import KEYS, make_dataset  # tests/labelled_data.py

from numformer import backend, checkpoint, cli, safetensors
from numformer.finetune import (FinetuneConfig, GPT2Classifier, _pad, classify, finetune, gpt2_pad_token_id,
                                last_token_index, load_backbone, load_classifier, save_classifier)
from numformer.gradcheck import numeric_grad, relative_error
from numformer.models.gpt2 import GPT2, GPT2Config

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(HERE, "tiny-gpt2")          # HF GPT2LMHeadModel: 2 layers, 64 wide, vocab 500, context 32



@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY)


def write_csv(path, texts, labels):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))


# ----------------------------------------------------------------------------- GPT-2's hidden states


def test_hidden_states_are_what_the_lm_head_reads():
    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    model = GPT2.init(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, 13, (2, 6))
    logits, _, _ = model.forward(ids)
    hidden, _ = model.hidden(ids)
    # logits = ln_f(x)·wteᵀ, the same product bit for bit (through the same
    # backend: NumPy's BLAS may group the sums differently, e.g. OpenBLAS's
    # Haswell kernel against ours on AVX2)
    head = backend.matmul(hidden.reshape(-1, cfg.n_embd), model.params["wte.weight"], trans_b=True)
    np.testing.assert_array_equal(head.reshape(logits.shape), logits)
    np.testing.assert_allclose(hidden @ model.params["wte.weight"].T, logits, rtol=1e-5, atol=1e-7)


def test_backward_from_dhidden_matches_finite_differences():
    """L = Σ hidden ⊙ R for a fixed random R, every parameter, float64; and with targets,
    the LM loss's gradient and dhidden's simply add."""
    rng = np.random.default_rng(1)
    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    model = GPT2.init(cfg, seed=1, dtype=np.float64)
    model.flat += rng.normal(0, 0.1, model.flat.shape)             # off the symmetric init
    ids, targets = rng.integers(0, 13, (2, 7)), rng.integers(0, 13, (2, 7))
    R = rng.standard_normal((2, 7, 8))
    with backend.use("numpy"):
        _, cache = model.hidden(ids)
        analytic = model.backward(cache, dhidden=R)
        numeric = numeric_grad(lambda: float(np.sum(model.hidden(ids)[0] * R)), model.flat,
                               np.arange(model.flat.size))
        assert relative_error(analytic, numeric) < 1e-6
        _, _, lm_cache = model.forward(ids, targets)
        both = model.backward(lm_cache, dhidden=R)
        _, _, lm_cache = model.forward(ids, targets)
        np.testing.assert_allclose(both, model.backward(lm_cache) + analytic, atol=1e-12)
    with pytest.raises(ValueError, match="dhidden"):
        model.backward(cache)                                        # no targets and no dhidden
    with pytest.raises(ValueError, match="shape"):
        model.backward(cache, dhidden=R[:, :3])


# ----------------------------------------------------------------------------- the classifier


def batch(tok, texts, pad):
    return _pad([tok.encode(t) for t in texts], pad)


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_classifier_gradients_match_finite_differences(tiny, frozen):
    """float64: d(cross-entropy)/d(parameters) through score, the last-token gather and both
    blocks (full), or of the head alone on features computed once (frozen)."""
    body, tok = tiny
    model = GPT2Classifier.from_body(body.astype(np.float64), ["a", "b", "c"], 499, seed=1, std=0.5)
    ids, mask = batch(tok, ["the she of and his", "you were not at it on", "her"], 499)
    y = np.array([0, 2, 1])
    rng = np.random.default_rng(0)
    with backend.use("numpy"):
        if frozen:
            f, _ = model.features(ids, mask)                       # once, as finetune(freeze=True) does
            _, _, head_c = model.head_forward(f, y)
            grads = model.layout.zeros(np.float64)
            model.head_backward(head_c, grads)
            assert not grads[:model.n_body].any()                  # nothing flows into the body
            b, e = model.layout.offsets["score.weight"]
            idx = np.arange(b, e)
            numeric = numeric_grad(lambda: model.head_forward(f, y)[1], model.flat, idx)
        else:
            _, _, cache = model.forward(ids, mask, None, y)
            grads = model.backward(cache)
            names = ["score.weight", "ln_f.weight", "ln_f.bias", "h.1.mlp.c_proj.weight", "h.1.attn.c_attn.bias",
                     "h.0.attn.c_attn.weight", "h.0.ln_1.weight", "wte.weight", "wpe.weight"]
            idx = []
            for name in names:
                b, e = model.layout.offsets[name]
                idx.extend(rng.choice(np.arange(b, e), size=min(20, e - b), replace=False))
            idx = np.array(idx)
            numeric = numeric_grad(lambda: model.forward(ids, mask, None, y)[1], model.flat, idx)
    assert np.abs(numeric).max() > 1e-4                            # the check is not vacuous
    assert relative_error(grads[idx], numeric) < 1e-6


def test_padding_does_not_change_the_logits(tiny):
    """Each text alone vs. in a right-padded batch (with extra padding columns), with the
    mask and with Hugging Face's pad-id rule: the causal mask keeps padding invisible."""
    body, tok = tiny
    model = GPT2Classifier.from_body(body, ["a", "b"], 499, seed=0)
    texts = ["she was here", "you", "the of and in to was is as for on with that it", ""]
    rows = model.encode_texts(tok, texts, 32)
    assert rows[-1] == [499]                                       # an empty text is one end-of-text token
    alone = [model.forward(*_pad([r], 499))[0][0] for r in rows]
    ids, mask = _pad(rows, 499)
    ids = np.concatenate([ids, np.full((4, 5), 499)], axis=1)      # 5 more padding columns
    mask = np.concatenate([mask, np.zeros((4, 5), mask.dtype)], axis=1)
    with_mask = model.forward(ids, mask)[0]
    hf_rule = model.forward(ids)[0]                                # no mask: last id that is not the pad id
    np.testing.assert_allclose(with_mask, np.array(alone), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(with_mask, hf_rule)
    # and what the padding holds does not matter either
    junk = ids.copy()
    junk[mask == 0] = 7
    np.testing.assert_array_equal(model.forward(junk, mask)[0], with_mask)


def test_last_token_index_rules():
    ids = np.array([[5, 6, 9, 9], [5, 9, 6, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(last_token_index(ids, 9), [1, 2, 0])      # HF: rightmost non-pad, else 0
    np.testing.assert_array_equal(last_token_index(ids, 9, np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])),
                                  [1, 2, 0])
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_index(ids, 9, np.zeros((3, 4), int))


def test_pad_id_is_end_of_text(tiny):
    body, tok = tiny
    assert gpt2_pad_token_id(body, tok) == 499 == tok.eot_id       # config eos_token_id
    bare = GPT2(body.cfg, body.flat)                               # no config.json: the tokenizer's EOT
    assert gpt2_pad_token_id(bare, tok) == 499
    with pytest.raises(ValueError, match="no padding id"):
        gpt2_pad_token_id(bare, None)


# ----------------------------------------------------------------------------- training


def test_full_finetuning_learns_the_task_and_saves(tiny, tmp_path):
    body, tok = tiny
    # The random tiny GPT-2 (initializer_range 0.2) must learn to attend from the last token to
    # the pronoun; with 240 examples it half memorizes (0.83-1.0 by seed), with 480 it reaches
    # 1.0 validation accuracy for seeds 0, 1, 2 alike.
    texts, labels = make_dataset(480, seed=0)
    vt, vl = make_dataset(60, seed=1)
    logs = []
    result = finetune(body, tok, texts, labels, vt, vl,
                      FinetuneConfig(epochs=6, batch_size=16, lr=5e-3, patience=3, seed=0), log=logs.append)
    model = result.model
    assert isinstance(model, GPT2Classifier) and model.pooling == "last"
    assert result.report["accuracy"] >= 0.9, logs
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not np.array_equal(model.flat[:model.n_body], body.flat)   # GPT-2 itself was trained
    save_classifier(model, tmp_path / "clf", tokenizer_from=TINY)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] == 499
    assert config["id2label"] == {"0": "he", "1": "she", "2": "you"} and config["numformer"]["max_length"] == 32
    names = safetensors.read_header(str(tmp_path / "clf" / "model.safetensors"))[0]
    assert "score.weight" in names and "transformer.h.1.mlp.c_fc.weight" in names and "score.bias" not in names
    loaded, tok2 = load_classifier(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.flat, model.flat)
    pred, probs = classify(loaded, tok2, vt)
    assert np.mean([p == t for p, t in zip(pred, vl)]) == pytest.approx(result.report["accuracy"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_frozen_gpt2_trains_only_the_head(tiny):
    body, tok = tiny
    texts, labels = make_dataset(120, seed=2)
    result = finetune(body, tok, texts, labels, cfg=FinetuneConfig(epochs=3, freeze=True, seed=0), log=lambda s: 0)
    np.testing.assert_array_equal(result.model.flat[:result.model.n_body], body.flat)
    assert sum(result.report["per_class"][k]["support"] for k in KEYS) == 24     # 20 % held out


def test_truncation_keeps_the_first_tokens(tiny):
    body, tok = tiny
    model = GPT2Classifier.from_body(body, ["a", "b"], 499)
    text = " ".join(["the of and in to"] * 20)
    assert model.encode_texts(tok, [text], 10) == [tok.encode(text)[:10]]


def test_pooling_must_fit_the_model(tiny):
    body, tok = tiny
    texts, labels = make_dataset(12, seed=0)
    with pytest.raises(ValueError, match="last token"):
        finetune(body, tok, texts, labels, cfg=FinetuneConfig(pooling="mean"), log=lambda s: 0)


# ----------------------------------------------------------------------------- command line


def test_cli_finetune_then_classify_with_a_gpt2_folder(tmp_path, capsys):
    texts, labels = make_dataset(300, seed=4)
    write_csv(tmp_path / "train.csv", texts, labels)
    out = tmp_path / "clf"
    assert cli.main(["finetune", "--model", TINY, "--train", str(tmp_path / "train.csv"), "--out", str(out),
                     "--epochs", "4", "--lr", "5e-3"]) == 0
    printed = capsys.readouterr().out
    assert "GPT-2" in printed and "pooling last" in printed and "confusion matrix" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] >= 0.6 and report["settings"]["pooling"] == "last"   # chance: 1/3
    assert (out / "vocab.json").exists() and (out / "merges.txt").exists()
    model, tok = load_classifier(out)
    expected, probs = classify(model, tok, texts[:4])
    assert cli.main(["classify", "--model", str(out)] + texts[:4]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == expected
    assert [r["probabilities"][r["label"]] for r in rows] == pytest.approx(probs.max(axis=1), abs=1e-6)


def test_cli_finetune_from_a_numformer_checkpoint(tmp_path, capsys):
    """A `numformer train`-style run folder (checkpoint/ with numformer's own BPE) works too."""
    from numformer.tokenizers import ByteBPETokenizer

    texts, labels = make_dataset(60, seed=5)
    tok = ByteBPETokenizer.train(" ".join(texts), 300)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    (tmp_path / "run").mkdir()
    checkpoint.save(str(tmp_path / "run" / "checkpoint"), GPT2.init(cfg, seed=0), tok)
    write_csv(tmp_path / "train.csv", texts, labels)
    out = tmp_path / "clf"
    assert cli.main(["finetune", "--model", str(tmp_path / "run"), "--train", str(tmp_path / "train.csv"),
                     "--out", str(out), "--epochs", "2", "--freeze"]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == tok.eot_id                    # no eos in the config: the tokenizer's EOT
    model, tok2 = load_classifier(out)
    expected, _ = classify(model, tok2, texts[:3])
    assert cli.main(["classify", "--model", str(out)] + texts[:3]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == expected


# ----------------------------------------------------------------------------- bad input


def test_a_labels_file_with_one_class_is_refused(tmp_path, capsys):
    write_csv(tmp_path / "one.csv", ["a b", "c d", "e f"], ["x", "x", "x"])
    assert cli.main(["finetune", "--model", TINY, "--train", str(tmp_path / "one.csv"),
                     "--out", str(tmp_path / "clf")]) == 2
    err = capsys.readouterr().err
    assert "one.csv" in err and "at least two classes" in err
    assert not (tmp_path / "clf").exists()


def test_a_folder_without_score_weight_is_refused(tiny, tmp_path):
    body, tok = tiny
    save_classifier(GPT2Classifier.from_body(body, ["a", "b"], 499), tmp_path / "clf", tokenizer_from=TINY)
    path = str(tmp_path / "clf" / "model.safetensors")
    tensors = safetensors.load_file(path)
    del tensors["score.weight"]
    safetensors.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'score\.weight'"):
        load_classifier(tmp_path / "clf")


def test_a_plain_gpt2_folder_is_not_a_classifier(tmp_path, capsys):
    assert cli.main(["classify", "--model", TINY, "hello"]) == 2
    assert "no id2label" in capsys.readouterr().err


def test_a_classifier_config_without_pad_token_id_is_refused(tiny, tmp_path):
    body, tok = tiny
    save_classifier(GPT2Classifier.from_body(body, ["a", "b"], 499), tmp_path / "clf", tokenizer_from=TINY)
    cfg_path = tmp_path / "clf" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["pad_token_id"] = None
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pad_token_id"):
        load_classifier(tmp_path / "clf")


# ----------------------------------------------------------------------------- transformers


def test_saved_folder_matches_transformers_gpt2_for_sequence_classification(tiny, tmp_path):
    """Our folder loads in transformers and gives the same logits on a right-padded batch;
    and a folder transformers writes loads back in numformer with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    body, tok = tiny
    model = GPT2Classifier.from_body(body, ["neg", "pos", "mixed"], 499, seed=0, std=0.5)
    save_classifier(model, tmp_path / "clf", tokenizer_from=TINY)
    ref = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "clf")).eval()
    assert ref.config.pad_token_id == 499 and ref.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    texts = ["Hello world! It's 2024", "def f(x): return x", "", "ünïcödé 日本語 and more words here to pad"]
    ids, mask = _pad(model.encode_texts(tok, texts, 32), 499)
    ours = model.forward(ids, mask)[0]
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
    ref.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TINY, name), tmp_path / "hf" / name)
    back, _ = load_classifier(tmp_path / "hf")
    assert back.labels == ["neg", "pos", "mixed"] and back.pad_token_id == 499
    np.testing.assert_allclose(back.forward(ids)[0], theirs, rtol=0, atol=2e-5)
