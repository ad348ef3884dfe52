"""The command line: each command works, and each user mistake is one line + exit status 2."""

import json
import os
import subprocess
import sys

import pytest

from numformer.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-steps", "6", "--eval-interval", "3", "--eval-batches", "1", "--num-samples", "1",
        "--sample-tokens", "10", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, this is a tiny corpus. " * 40, encoding="utf-8")
    return str(path)


@pytest.fixture
def trained(tmp_path, corpus):
    out = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", out, *TINY]) == 0
    return out


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("numformer: error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_train_then_sample(tmp_path, corpus, capsys):
    trained = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", trained, *TINY]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "unigram baseline" in out and "sample 1" in out
    assert main(["sample", "--checkpoint", trained, "--prompt", "hello", "--max-new-tokens", "5",
                 "--seed", "1", "--top-k", "3", "--top-p", "0.9"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("hello")
    main(["sample", "--checkpoint", trained, "--prompt", "hello", "--max-new-tokens", "5", "--seed", "1",
          "--top-k", "3", "--top-p", "0.9"])
    assert capsys.readouterr().out == text                     # same seed, same text


def test_resume_continues_to_more_steps(trained, capsys):
    assert main(["train", "--resume", trained, "--max-steps", "9", "--no-progress"]) == 0
    rows = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert "resuming from step 6" in capsys.readouterr().out


def test_config_files_json_and_toml(tmp_path, corpus, capsys):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "max_steps": 2,
                              "eval_interval": 2, "eval_batches": 1, "num_samples": 0, "batch_size": 2}))
    assert main(["train", "--config", str(js), "--data", corpus, "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    toml = tmp_path / "c.toml"
    toml.write_text('n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\nmax_steps = 2\n'
                    'eval_interval = 2\neval_batches = 1\nnum_samples = 0\nbatch_size = 2\n')
    assert main(["train", "--config", str(toml), "--data", corpus, "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layers": 3}))
    assert main(["train", "--config", str(bad), "--data", corpus]) == 2
    assert "unknown setting" in error_line(capsys)


def test_gradcheck_command(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "layernorm" in out and "GPT-2 model" in out and "BERT encoder" in out and "GPT-2 classifier" in out
    assert "16/16 checks pass" in out


def test_tokenizer_train_command(tmp_path, corpus, capsys):
    path = str(tmp_path / "tok.json")
    assert main(["tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", path]) == 0
    from numformer.tokenizers import load_tokenizer

    assert load_tokenizer(path).vocab_size <= 300


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make_args, match", [
    (lambda t, c: ["train", "--data", str(t / "missing.txt")], "does not exist"),
    (lambda t, c: ["train", "--data", _write(t, "empty.txt", b"  \n")], "empty"),
    (lambda t, c: ["train", "--data", _write(t, "latin1.txt", "café".encode("latin-1") * 100)], "UTF-8"),
    (lambda t, c: ["train", "--data", _write(t, "short.txt", b"abc")], "too short"),
    (lambda t, c: ["train", "--data", c, "--n-embd", "30", "--n-head", "4"], "divisible"),
    (lambda t, c: ["train", "--data", c, "--n-layer", "-2"], "n-layer"),
    (lambda t, c: ["train", "--data", c, "--batch-size", "0"], "batch-size"),
    (lambda t, c: ["train", "--resume", str(t / "nowhere")], "does not exist"),
    (lambda t, c: ["sample", "--checkpoint", str(t / "nowhere")], "does not exist"),
    (lambda t, c: ["train", "--config", str(t / "nope.toml")], "does not exist"),
])
def test_user_mistakes_are_one_line_and_status_2(tmp_path, corpus, capsys, make_args, match):
    assert main(make_args(tmp_path, corpus)) == 2
    assert match in error_line(capsys)


@pytest.mark.parametrize("flags, match", [
    (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"), (["--top-k", "0"], "top_k"),
    (["--max-new-tokens", "-3"], "max-new-tokens")])
def test_bad_sampling_flags(trained, capsys, flags, match):
    assert main(["sample", "--checkpoint", trained, *flags]) == 2
    assert match in error_line(capsys)


def test_broken_checkpoints_are_refused(trained, capsys):
    folder = os.path.join(trained, "checkpoint")
    weights = os.path.join(folder, "model.safetensors")
    blob = open(weights, "rb").read()
    open(weights, "wb").write(blob[:100])                           # truncated
    assert main(["sample", "--checkpoint", trained]) == 2
    error_line(capsys)
    os.remove(weights)                                               # missing
    assert main(["sample", "--checkpoint", trained]) == 2
    assert "missing" in error_line(capsys)


def test_unparseable_flag_exits_2():
    result = subprocess.run([sys.executable, "-m", "numformer.cli", "train", "--n-layer", "two"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_sample_stream_prints_the_same_text(trained, capsys):
    args = ["sample", "--checkpoint", trained, "--prompt", "hello", "--max-new-tokens", "6", "--seed", "3"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    # past the context window (16 positions) generation slides the window, as before
    assert main(["sample", "--checkpoint", trained, "--prompt", "hello", "--max-new-tokens", "30",
                 "--seed", "3", "--stream"]) == 0
    assert capsys.readouterr().out.startswith(plain.rstrip("\n"))


def test_sample_several_prompts_as_one_batch(trained, tmp_path, capsys):
    from numformer import checkpoint
    from numformer.generate import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("this is\nworld\n", encoding="utf-8")
    assert main(["sample", "--checkpoint", trained, "--prompt", "hello", "--prompts-file", str(prompts),
                 "--max-new-tokens", "5", "--temperature", "0", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    model, tok = checkpoint.load_model(trained), checkpoint.load_tokenizer(trained)
    for p, text in enumerate(["hello", "this is", "world"]):
        new = generate(model, [tok.eot_id] + tok.encode(text), 5, temperature=0, eot_id=tok.eot_id)
        completion = text + tok.decode([t for t in new if t != tok.eot_id])
        for i in (1, 2):
            assert f"--- prompt {p + 1}, sample {i} ---\n{completion}\n" in out
    assert main(["sample", "--checkpoint", trained, "--prompt", "hello", "--prompt", "world",
                 "--max-new-tokens", "4", "--seed", "0", "--stream"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row in (0, 1):
        mine = [line for line in lines if line["row"] == row]
        assert mine[-1]["finish_reason"] in ("stop", "length")
        assert all("text" in line for line in mine[:-1]) and len(mine) - 1 <= 4


@pytest.mark.parametrize("flags, match", [
    (["--prompts-file", "missing.txt"], "does not exist"), (["--num-samples", "0"], "num-samples")])
def test_bad_batch_sampling_flags(trained, capsys, flags, match):
    assert main(["sample", "--checkpoint", trained, *flags]) == 2
    assert match in error_line(capsys)
