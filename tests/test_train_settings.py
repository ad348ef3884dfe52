"""Resume semantics, settings files and help text of `numformer train` (and the other commands).

Each test pins a defect that a new user hit: flags silently ignored on resume,
a schedule that moved when --max-steps grew, a torn metrics line, settings of
the wrong type, doubled defaults in --help, validation losses only in the bar.
"""

import argparse
import json
import os
import re
import shutil

import numpy as np
import pytest

from numformer import checkpoint
from numformer.cli import build_parser, main
from numformer.train import TrainConfig, learning_rate, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_interval=4, eval_batches=1,
            warmup_steps=2, lr=3e-3, min_lr=3e-4, dropout=0.1, num_samples=0, progress=False)
FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-interval", "4", "--eval-batches", "1", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr",
         "3e-4", "--num-samples", "0", "--no-progress"]


def quiet(*args, **kwargs):
    pass


def config(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "corpus.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    return TrainConfig(**{**TINY, "data": str(data), "out": str(folder / "run"), **overrides})


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
    """A finished 8-step CLI run (checkpoints at 4 and 8)."""
    folder = tmp_path_factory.mktemp("eight")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert main(["train", "--data", str(folder / "corpus.txt"), "--out", str(folder / "run"),
                 "--max-steps", "8", *FLAGS]) == 0
    return folder


@pytest.fixture
def run(eight_steps, tmp_path):
    shutil.copytree(eight_steps, tmp_path / "c")
    return str(tmp_path / "c" / "run")


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("numformer: error: "), err
    return err[-1]


def saved_state(run_dir):
    return json.load(open(os.path.join(run_dir, "checkpoint", checkpoint.STATE_FILE)))


# ----------------------------------------------------------------------------- the schedule on resume


def test_resume_continues_the_original_schedule_bit_exactly(tmp_path):
    """8 steps of max_steps 8, resumed to 12: the schedule's horizon stays 8 (steps 9-12 at min_lr),
    so the run equals an uninterrupted 12-step run with an 8-step schedule, bit for bit."""
    train(config(tmp_path / "a", max_steps=8), log=quiet)
    resumed = train(config(tmp_path / "a", max_steps=12), resume=True, log=quiet)
    straight = train(config(tmp_path / "b", max_steps=12, schedule_steps=8), log=quiet)
    np.testing.assert_array_equal(resumed.model.flat, straight.model.flat)
    assert resumed.losses == straight.losses and resumed.val_losses == straight.val_losses
    rows = [json.loads(l) for l in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert [r["lr"] for r in rows[8:]] == [3e-4] * 4
    assert saved_state(tmp_path / "a" / "run")["train_config"]["schedule_steps"] == 8


def test_interrupted_run_resumed_to_its_max_steps_equals_the_uninterrupted_run(tmp_path):
    straight = train(config(tmp_path / "a", max_steps=12), log=quiet)
    train(config(tmp_path / "b", max_steps=12), log=quiet, stop_after=8)
    resumed = train(config(tmp_path / "b", max_steps=12), resume=True, log=quiet)
    np.testing.assert_array_equal(resumed.model.flat, straight.model.flat)
    assert resumed.losses == straight.losses and resumed.val_losses == straight.val_losses
    rows_a = [json.loads(l) for l in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    rows_b = [json.loads(l) for l in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(rows_a) == strip(rows_b)


def test_extend_schedule_stretches_the_cosine_to_the_new_max_steps(run, capsys):
    assert main(["train", "--resume", run, "--max-steps", "12", "--extend-schedule", "--no-progress"]) == 0
    assert "extending the learning-rate schedule from 8 to 12 steps" in capsys.readouterr().out
    cfg = TrainConfig(**{**saved_state(run)["train_config"]})
    assert cfg.schedule_steps == 12
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["lr"] for r in rows[8:]] == [learning_rate(cfg, s) for s in range(8, 12)]
    assert rows[8]["lr"] > 3e-4


def test_resume_without_extend_says_the_extra_steps_use_min_lr(run, capsys):
    assert main(["train", "--resume", run, "--max-steps", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "steps 9-10 train at --min-lr" in out and "trained 2 steps (steps 9-10)" in out


@pytest.mark.parametrize("max_steps", ["8", "5"])
def test_resume_with_nothing_left_to_train_says_so_and_changes_nothing(run, capsys, max_steps):
    before = open(os.path.join(run, "metrics.jsonl")).read(), saved_state(run)
    assert main(["train", "--resume", run, "--max-steps", max_steps, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"nothing to train: the checkpoint {os.path.join(run, 'checkpoint')} is already at step 8" in out
    assert "trained" not in out
    assert (open(os.path.join(run, "metrics.jsonl")).read(), saved_state(run)) == before


def test_extend_schedule_needs_resume(tmp_path, capsys):
    assert main(["train", "--data", "x.txt", "--extend-schedule"]) == 2
    assert "--extend-schedule only applies with --resume" in error_line(capsys)


# ----------------------------------------------------------------------------- flags a resume cannot honour


@pytest.mark.parametrize("flags, match", [
    (["--n-layer", "2"], "--n-layer 2 but the checkpoint has 1"),
    (["--n-embd", "32"], "--n-embd 32 but the checkpoint has 16"),
    (["--n-head", "4"], "--n-head 4 but the checkpoint has 2"),
    (["--block-size", "32"], "--block-size 32 but the checkpoint has 16"),
    (["--tokenizer", "bpe", "--vocab-size", "300"], "--tokenizer 'bpe' but the checkpoint has 'char'"),
    (["--optimizer", "sgd"], "--optimizer 'sgd' but the checkpoint has 'adamw'"),
    (["--seed", "7"], "--seed 7 but the checkpoint has 1337"),
    (["--schedule-steps", "20"], "--schedule-steps 20 conflicts with the checkpoint's schedule of 8 steps"),
])
def test_resume_refuses_flags_that_conflict_with_the_checkpoint(run, capsys, flags, match):
    before = saved_state(run)
    assert main(["train", "--resume", run, "--max-steps", "12", *flags]) == 2
    assert match in error_line(capsys)
    assert saved_state(run) == before                      # nothing was trained or saved


def test_resume_accepts_flags_equal_to_the_checkpoint_and_honours_dropout(run, capsys):
    assert main(["train", "--resume", run, "--max-steps", "9", "--n-layer", "1", "--n-embd", "16",
                 "--dropout", "0.2", "--no-progress"]) == 0
    assert "1 layer, 2 heads" in capsys.readouterr().out      # singular, and the real shape
    assert json.load(open(os.path.join(run, "checkpoint", "config.json")))["dropout"] == 0.2


def test_resume_config_file_conflict_is_refused(run, tmp_path, capsys):
    conf = tmp_path / "more.json"
    conf.write_text(json.dumps({"n_layer": 3, "max_steps": 12}))
    assert main(["train", "--resume", run, "--config", str(conf)]) == 2
    assert "--n-layer 3 but the checkpoint has 1" in error_line(capsys)


def test_a_wrong_shape_recorded_by_an_older_version_is_corrected_on_resume(run):
    state_file = os.path.join(run, "checkpoint", checkpoint.STATE_FILE)
    state = json.load(open(state_file))
    state["train_config"]["n_layer"] = 2                   # what `--resume --n-layer 2` used to save
    del state["train_config"]["schedule_steps"]            # ... before the horizon was stored
    json.dump(state, open(state_file, "w"))
    assert main(["train", "--resume", run, "--max-steps", "9", "--no-progress"]) == 0
    saved = saved_state(run)["train_config"]
    assert saved["n_layer"] == 1 and saved["schedule_steps"] == 8


@pytest.mark.parametrize("flags, match", [
    (["--block-size", "64"], "--block-size"), (["--data", "corpus.txt"], "--data"),
    (["--tokenizer", "bpe"], "--tokenizer")])
def test_task_refuses_settings_it_would_ignore(tmp_path, capsys, flags, match):
    assert main(["train", "--task", "sort", "--out", str(tmp_path / "r"), *flags]) == 2
    line = error_line(capsys)
    assert "--task sort brings its own" in line and match in line


# ----------------------------------------------------------------------------- metrics.jsonl on resume


def test_a_torn_last_metrics_line_is_dropped_and_reported(run, capsys):
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "loss": 2.1, "l')              # killed mid-write
    assert main(["train", "--resume", run, "--max-steps", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl, line 9: dropped a half-written last line" in out
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 11))


@pytest.mark.parametrize("bad", ['{"step": 3, "loss": }', '[1, 2]', '{"loss": 1.0}'])
def test_a_corrupt_metrics_line_names_the_file_and_line(run, capsys, bad):
    path = os.path.join(run, "metrics.jsonl")
    lines = open(path).read().splitlines()
    lines[2] = bad
    open(path, "w").write("\n".join(lines) + "\n")
    assert main(["train", "--resume", run, "--max-steps", "10"]) == 2
    assert f"{path}, line 3:" in error_line(capsys)


# ----------------------------------------------------------------------------- settings files


@pytest.mark.parametrize("name, content, match", [
    ("c.json", {"n_layer": "two"}, "setting 'n_layer' must be an integer, got 'two' (str)"),
    ("c.json", {"lr": "fast"}, "setting 'lr' must be a number, got 'fast'"),
    ("c.json", {"n_layer": 2.5}, "setting 'n_layer' must be an integer"),
    ("c.json", {"progress": "yes"}, "setting 'progress' must be true or false"),
    ("c.json", {"batch_size": True}, "setting 'batch_size' must be an integer, got True"),
    ("c.json", {"n_layer": -1}, "setting 'n_layer' must be positive, got -1"),
    ("c.json", {"dropout": 1.5}, "setting 'dropout' must be in [0, 1)"),
    ("c.json", {"tokenizer": "words"}, "setting 'tokenizer' must be one of char, bpe"),
    ("c.json", {"n_layers": 2}, "unknown setting 'n_layers'; did you mean n_layer"),
    ("c.json", {"learning_rate": 0.1}, "unknown setting 'learning_rate'"),
    ("c.json", [1, 2], "must hold a table of settings"),
    ("c.toml", 'n_layer = "two"\n', "setting 'n_layer' must be an integer"),
    ("c.toml", "max_step = 3\n", "did you mean max_steps"),
])
def test_bad_settings_files_name_the_setting_and_the_file(tmp_path, capsys, name, content, match):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    line = error_line(capsys)
    assert match in line and str(path) in line


def test_a_flag_overriding_a_bad_file_value_is_fine_and_flag_errors_name_the_flag(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_layer": -1}))
    assert main(["train", "--config", str(path), "--n-layer", "0"]) == 2
    line = error_line(capsys)
    assert "--n-layer must be positive, got 0" in line and str(path) not in line


# ----------------------------------------------------------------------------- help text


def _subparsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def _option_helps(help_text):
    """{option: its help text} from an argparse help page."""
    helps, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            helps[current] = line
        elif current and line.startswith("      "):
            helps[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in helps.items()}


def test_every_help_page_states_each_default_once_and_lists_choices():
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "`" not in top
    pages = dict(_subparsers(parser))
    assert {("train",), ("sample",), ("finetune",), ("serve",), ("tokenizer", "train")} <= set(pages)
    for name, sub in pages.items():
        text = sub.format_help()
        for option, help_line in _option_helps(text).items():
            assert "(default: None)" not in help_line, (name, option, help_line)
            assert help_line.count("(default:") <= 1, (name, option, help_line)
            assert "`" not in help_line, (name, option, help_line)
    train_help = _option_helps(pages[("train",)].format_help())
    assert "(default: 0.002)" in train_help["--lr"]
    for option, choices in [("--tokenizer", "{char,bpe}"), ("--optimizer", "{adamw,sgd}"),
                            ("--dtype", "{float32,float64}"), ("--task", "{sort}")]:
        assert choices in train_help[option], train_help[option]
    for option in ("--n-layer", "--max-steps", "--batch-size", "--seed"):
        assert "(default: " in train_help[option], train_help[option]
    sample_help = _option_helps(pages[("sample",)].format_help())
    assert "(default: 200)" in sample_help["--max-new-tokens"]


# ----------------------------------------------------------------------------- validation losses as lines


def test_validation_losses_are_printed_as_lines_with_the_progress_bar_on(tmp_path, capsys):
    cfg = config(tmp_path, max_steps=8, progress=True)
    train(cfg)
    out = capsys.readouterr().out
    assert re.search(r"^step 4: train loss \d+\.\d+, val loss \d+\.\d+$", out, re.M), out
    assert re.search(r"^step 8: train loss \d+\.\d+, val loss \d+\.\d+$", out, re.M), out


def test_resume_of_a_task_run_refuses_data_it_would_ignore(tmp_path, capsys):
    out = str(tmp_path / "sort")
    assert main(["train", "--task", "sort", "--out", out, "--max-steps", "2", "--n-layer", "1", "--n-embd", "16",
                 "--n-head", "2", "--batch-size", "4", "--eval-interval", "2", "--no-progress"]) == 0
    saved = saved_state(out)["train_config"]
    assert saved["block_size"] == json.load(open(os.path.join(out, "checkpoint", "config.json")))["n_positions"]
    (tmp_path / "c.txt").write_text(TEXT)
    assert main(["train", "--resume", out, "--max-steps", "3", "--data", str(tmp_path / "c.txt")]) == 2
    assert "--task sort brings its own" in error_line(capsys)


def test_tokenize_and_tokenizer_group_help(run, capsys):
    assert main(["tokenize", "--tokenizer", run, "the fox"]) == 0          # a run folder's tokenizer
    ids = capsys.readouterr().out.split()
    assert len(ids) == len("the fox")
    assert main(["tokenizer"]) == 2
    assert "train a tokenizer" in capsys.readouterr().out


def test_vocab_size_without_bpe_is_refused_not_ignored(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    assert main(["train", "--data", str(tmp_path / "c.txt"), "--vocab-size", "300"]) == 2
    assert "--vocab-size applies to --tokenizer bpe only" in error_line(capsys)
    assert main(["tokenizer", "train", "--data", str(tmp_path / "c.txt"), "--kind", "char", "--vocab-size", "300",
                 "--out", str(tmp_path / "t.json")]) == 2
    assert "--vocab-size applies to --kind bpe only" in error_line(capsys)
    assert main(["tokenizer", "train", "--data", str(tmp_path / "c.txt"), "--kind", "char",
                 "--out", str(tmp_path / "t.json")]) == 0
