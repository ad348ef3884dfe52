"""Fine-tuning: gradients through head + pooling + encoder, metrics, data files, training, CLI."""

import csv
import json
import os

import numpy as np
import pytest
from labelled_data import KEYS, make_dataset  # tests/labelled_data.py

import numformer
from numformer import backend, cli
from numformer.finetune import (BertClassifier, FinetuneConfig, classification_report, classify, finetune,
                                load_classifier, read_labelled, save_classifier)
from numformer.gradcheck import numeric_grad, relative_error
from numformer.tokenizers.wordpiece import WordPieceTokenizer

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(HERE, "tiny-bert")


def tiny_vocab():
    words = open(os.path.join(HERE, "wordpiece", "vocab.txt"), encoding="utf-8").read().split("\n")
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[106:200]



@pytest.fixture(scope="module")
def tiny():
    return numformer.load_bert(TINY), WordPieceTokenizer(tiny_vocab(), max_length=24)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_classifier_gradients_match_finite_differences(tiny, pooling):
    """float64: d(cross-entropy)/d(every kind of parameter), through head, pooling and both layers."""
    encoder, tok = tiny
    model = BertClassifier.from_encoder(encoder.astype(np.float64), ["a", "b", "c"], pooling, seed=1)
    model.params["classifier.weight"][...] *= 30                # a head that matters
    ids = np.array([tok.encode("the she of and his") + [0], tok.encode("you were not at it on")])
    mask = np.array([[1] * 7 + [0], [1] * 8])
    y = np.array([0, 2])
    with backend.use("numpy"):
        _, _, cache = model.forward(ids, mask, None, y)
        analytic = model.backward(cache)
        rng = np.random.default_rng(0)
        names = ["classifier.weight", "classifier.bias", "encoder.layer.1.output.dense.weight",
                 "encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight",
                 "embeddings.LayerNorm.bias"] + (["pooler.dense.weight"] if pooling == "pooler" else [])
        idx = []
        for name in names:
            b, e = model.layout.offsets[name]
            idx.extend(rng.choice(np.arange(b, e), size=min(15, e - b), replace=False))
        idx = np.array(idx)
        numeric = numeric_grad(lambda: model.forward(ids, mask, None, y)[1], model.flat, idx)
    assert np.abs(numeric).max() > 1e-6                          # the check is not vacuous
    assert relative_error(analytic[idx], numeric) < 1e-6


def test_classification_report_by_hand():
    r = classification_report([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)   # 0/0 -> 0
    assert r["macro_f1"] == pytest.approx(0.4)


def test_classification_report_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    r = classification_report(y, p, list("abcd"))
    prec, rec, f1, sup = metrics.precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    np.testing.assert_allclose([r["per_class"][k]["f1"] for k in "abcd"], f1)
    np.testing.assert_allclose([r["per_class"][k]["precision"] for k in "abcd"], prec)
    np.testing.assert_array_equal(r["confusion_matrix"], metrics.confusion_matrix(y, p, labels=range(4)))


def test_read_labelled_csv_and_jsonl(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,text,label\n1,"hello, world",pos\n2,bad,neg\n', encoding="utf-8")
    assert read_labelled(c) == (["hello, world", "bad"], ["pos", "neg"])
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "x"}\n', encoding="utf-8")
    assert read_labelled(j) == (["a", "b"], ["1", "x"])


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "sentence,label\nx,1\n", "header must name"),
    ("d.csv", "text,label\nx,1,extra\n", r"d\.csv:2: 3 fields"),
    ("d.jsonl", '{"text": "a"}\n', r"d\.jsonl:1: expected an object"),
    ("d.jsonl", "{oops\n", r"d\.jsonl:1: not valid JSON"),
    ("d.csv", "text,label\n", "no labelled examples"),
])
def test_read_labelled_errors_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_labelled(path)


def test_full_finetuning_learns_the_task_and_saves(tiny, tmp_path):
    encoder, tok = tiny
    texts, labels = make_dataset(240, seed=0)
    vt, vl = make_dataset(60, seed=1)
    logs = []
    result = finetune(encoder, tok, texts, labels, vt, vl,
                      FinetuneConfig(epochs=8, batch_size=16, lr=1e-3, seed=0), log=logs.append)
    assert result.report["accuracy"] >= 0.9, logs
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not np.array_equal(result.model.flat[:result.model.n_encoder], encoder.flat)   # encoder trained
    save_classifier(result.model, tmp_path / "clf", tokenizer=tok)
    model, tok2 = load_classifier(tmp_path / "clf")
    np.testing.assert_array_equal(model.flat, result.model.flat)
    pred, probs = classify(model, tok2, vt)
    assert np.mean([p == t for p, t in zip(pred, vl)]) == pytest.approx(result.report["accuracy"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_frozen_encoder_trains_only_the_head(tiny):
    encoder, tok = tiny
    texts, labels = make_dataset(120, seed=2)
    result = finetune(encoder, tok, texts, labels, cfg=FinetuneConfig(epochs=3, freeze=True, seed=0), log=lambda s: 0)
    np.testing.assert_array_equal(result.model.flat[:result.model.n_encoder], encoder.flat)
    assert result.report["accuracy"] > 0.4                    # above chance (1/3) with a random encoder
    assert sum(result.report["per_class"][k]["support"] for k in KEYS) == 24     # 20 % held out


def test_early_stopping_keeps_the_best_weights(tiny):
    encoder, tok = tiny
    texts, labels = make_dataset(90, seed=3)
    logs = []
    result = finetune(encoder, tok, texts, labels,
                      cfg=FinetuneConfig(epochs=40, batch_size=8, lr=3e-3, patience=1, seed=0), log=logs.append)
    assert result.stopped_early and len(result.history) < 40, logs
    best = min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == best
    assert any("early stop" in line for line in logs)


def test_cli_finetune_then_classify(tmp_path, capsys):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    texts, labels = make_dataset(150, seed=4)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    out = tmp_path / "clf"
    assert cli.main(["finetune", "--model", str(folder), "--train", str(tmp_path / "train.csv"), "--out", str(out),
                     "--epochs", "6", "--lr", "1e-3", "--max-length", "24"]) == 0
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "precision" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] >= 0.8 and len(report["confusion_matrix"]) == 3
    assert cli.main(["classify", "--model", str(out), "the she was at it", "you are not"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["she", "you"]
    assert cli.main(["classify", "--model", str(out)]) == 2


def test_saved_pooler_classifier_loads_in_transformers(tiny, tmp_path):
    """With pooling='pooler' the folder is a real BertForSequenceClassification."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    encoder, tok = tiny
    model = BertClassifier.from_encoder(encoder, ["x", "y"], "pooler", seed=0)
    save_classifier(model, tmp_path / "clf", tokenizer=tok)
    ref = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "clf")).eval()
    ids = np.array([tok.encode("the she was here") + [0], tok.encode("you are not at it")])
    mask = (np.arange(ids.shape[1])[None] < np.array([[6], [7]])).astype(np.int64)
    ours, _, _ = model.forward(ids, mask)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert ref.config.id2label == {0: "x", 1: "y"}
