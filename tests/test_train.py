"""Training loop: learning, exact resume, checkpoints, metrics."""

import json
import os

import numpy as np
import pytest

from numformer import checkpoint
from numformer.train import TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def small_config(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    settings = dict(data=str(data), out=str(tmp_path / "run"), n_layer=2, n_head=2, n_embd=32,
                    block_size=16, batch_size=8, max_steps=12, eval_interval=4, eval_batches=2,
                    warmup_steps=2, lr=3e-3, min_lr=3e-4, dropout=0.1, num_samples=0, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings).validate()


def quiet(*args, **kwargs):
    pass


def test_loss_goes_down_and_beats_unigram(tmp_path):
    result = train(small_config(tmp_path, max_steps=60, eval_interval=30, dropout=0.0), log=quiet)
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    assert result.val_losses[-1][1] < result.baseline


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    """Stop after 8 steps, resume to 12: every loss equals the straight 12-step run (dropout on)."""
    straight = train(small_config(tmp_path / "a"), log=quiet)
    first = train(small_config(tmp_path / "b"), log=quiet, stop_after=8)
    assert [l for _, l in first.losses] == [l for _, l in straight.losses[:8]]
    resumed = train(small_config(tmp_path / "b"), resume=True, log=quiet)
    assert resumed.losses == straight.losses                 # exact, not approximate
    assert resumed.val_losses == straight.val_losses
    np.testing.assert_array_equal(resumed.model.flat, straight.model.flat)
    rows = [json.loads(l) for l in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_resume_ignores_metrics_written_after_the_checkpoint(tmp_path):
    cfg = small_config(tmp_path)
    train(cfg, log=quiet, stop_after=8)
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 9, "loss": 123.0}) + "\n")   # a crash after step 9
    resumed = train(small_config(tmp_path), resume=True, log=quiet)
    assert 123.0 not in [l for _, l in resumed.losses]


def test_sgd_and_grad_accumulation(tmp_path):
    accum = train(small_config(tmp_path / "a", grad_accum=2, batch_size=4, optimizer="sgd", lr=0.1,
                               min_lr=0.01), log=quiet)
    assert all(np.isfinite(l) for _, l in accum.losses)


def test_checkpoint_round_trip_and_contents(tmp_path):
    cfg = small_config(tmp_path, max_steps=4)
    result = train(cfg, log=quiet)
    folder = os.path.join(cfg.out, "checkpoint")
    assert sorted(os.listdir(folder)) == sorted(
        ["config.json", "manifest.json", "model.safetensors", "numformer_tokenizer.json",
         "optimizer.safetensors", "trainer_state.json"])
    loaded = checkpoint.load_model(cfg.out)            # the run folder resolves to its checkpoint
    np.testing.assert_array_equal(loaded.flat, result.model.flat)
    tok = checkpoint.load_tokenizer(cfg.out)
    assert tok.decode(tok.encode("lazy dog")) == "lazy dog"
    assert not [n for n in os.listdir(cfg.out) if "tmp" in n]   # no leftovers


def test_checkpoint_from_another_model_shape_is_refused(tmp_path):
    cfg = small_config(tmp_path, max_steps=4)
    train(cfg, log=quiet)
    conf_path = os.path.join(cfg.out, "checkpoint", "config.json")
    conf = json.load(open(conf_path))
    conf["n_embd"] = 64
    json.dump(conf, open(conf_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="wrong shape"):
        checkpoint.load_model(cfg.out)


def test_truncated_checkpoint_is_refused(tmp_path):
    cfg = small_config(tmp_path, max_steps=4)
    train(cfg, log=quiet)
    weights = os.path.join(cfg.out, "checkpoint", "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_model(cfg.out)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, max_steps=4)
    result = train(cfg, log=quiet)
    before = checkpoint.load_model(cfg.out).flat.copy()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.safetensors, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(os.path.join(cfg.out, "checkpoint"), result.model)
    np.testing.assert_array_equal(checkpoint.load_model(cfg.out).flat, before)


@pytest.mark.parametrize("overrides, match", [
    ({"n_embd": 30, "n_head": 4}, "divisible"), ({"batch_size": 0}, "batch-size"),
    ({"tokenizer": "words"}, "tokenizer"), ({"lr": -1.0}, "lr"), ({"block_size": -2}, "block-size")])
def test_nonsense_settings_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        small_config(tmp_path, **overrides)


def test_synthetic_sort_task_is_learned_exactly(tmp_path):
    """The built-in sort task reaches >= 99 % exact match within a minute on 2 cores."""
    from numformer.tasks import SortTask

    cfg = TrainConfig(task="sort", out=str(tmp_path / "sort"), progress=False, num_samples=0,
                      **SortTask.recommended_settings())
    result = train(cfg, log=quiet)
    acc = SortTask().accuracy(result.model, np.random.default_rng(123), n=1000)
    assert acc >= 0.99, acc


def test_default_corpus_needs_no_download():
    from numformer.train import build_data

    tok, splits, baseline = build_data(TrainConfig(progress=False), log=quiet)
    assert len(splits.train) > 400_000 and len(splits.val) > 40_000
    assert tok.kind == "char" and 60 < tok.vocab_size < 200
    assert 2.5 < baseline < 4.0                              # unigram entropy of English-ish text


def test_bpe_tokenizer_option(tmp_path):
    result = train(small_config(tmp_path, tokenizer="bpe", vocab_size=300, max_steps=4), log=quiet)
    assert result.tokenizer.kind == "bpe" and result.model.cfg.vocab_size == result.tokenizer.vocab_size


@pytest.mark.skipif(not __import__("numformer.backend").backend.cpu_available(),
                    reason="numformer._cpu not built")
def test_training_losses_agree_across_backends(tmp_path):
    """The same run on the NumPy reference and on the compiled core: float32-close losses."""
    from numformer import backend

    with backend.use("numpy"):
        ref = train(small_config(tmp_path / "numpy"), log=quiet)
    with backend.use("cpu"):
        fast = train(small_config(tmp_path / "cpu"), log=quiet)
    np.testing.assert_allclose([l for _, l in fast.losses], [l for _, l in ref.losses], rtol=1e-4)
    np.testing.assert_allclose(fast.model.flat, ref.model.flat, atol=1e-4)
