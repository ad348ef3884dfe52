"""A run folder after a kill: every loader finds the newest complete checkpoint.

Replacing ``checkpoint/`` takes two renames (old aside, new in place) and a
delete. The kills are real (SIGKILL in a subprocess, at the exact call), so
no ``except``/``finally`` clean-up runs, as after a power cut or an OOM kill.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numformer import checkpoint, fileio
from numformer.cli import main
from numformer.train import TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
SETTINGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=12, eval_interval=4,
                eval_batches=1, warmup_steps=2, lr=3e-3, min_lr=3e-4, dropout=0.1, num_samples=0,
                progress=False)

# Trains with max_steps 12, eval (and save) every 4 steps, and SIGKILLs itself at
# the chosen call during the save at step 8.
KILL_SCRIPT = textwrap.dedent("""
    import os, shutil, signal, sys
    from numformer import fileio
    from numformer.train import TrainConfig, train
    where, settings = sys.argv[1], eval(sys.argv[2])
    real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

    def rename(src, dst):
        renames.append((src, dst))
        # save 1 (step 4): tmp -> checkpoint; save 2 (step 8): checkpoint -> aside, tmp -> checkpoint
        if where == "second-rename" and len(renames) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)

    def rmtree(path, *args, **kwargs):
        if where == "delete" and ".old." in os.path.basename(path):
            files = sorted(os.listdir(path))
            os.unlink(os.path.join(path, files[len(files) // 2]))   # part of the old copy is gone
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    fileio.os.rename, fileio.shutil.rmtree = rename, rmtree
    train(TrainConfig(**settings), log=lambda *a: None)
""")


def quiet(*args, **kwargs):
    pass


def settings_for(folder):
    return dict(SETTINGS, data=str(folder / "corpus.txt"), out=str(folder / "run"))


def killed_run(folder, where):
    """A run folder whose training was SIGKILLed during the step-8 save, at ``where``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, where, repr(settings_for(folder))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr                 # it really died at that call
    return folder / "run"


@pytest.fixture(scope="module")
def swap_killed(tmp_path_factory):
    """Killed between the two renames: no checkpoint/, the step-4 copy aside, the step-8 copy in .tmp."""
    return killed_run(tmp_path_factory.mktemp("swap"), "second-rename")


@pytest.fixture
def run(swap_killed, tmp_path):
    """A fresh copy of the killed run folder (tests may repair it)."""
    shutil.copytree(swap_killed.parent, tmp_path / "k")
    return tmp_path / "k" / "run"


def copies(run_dir):
    return sorted(n for n in os.listdir(run_dir) if n.startswith(".checkpoint"))


def step_of(folder):
    return json.load(open(os.path.join(folder, checkpoint.STATE_FILE)))["step"]


def test_the_kill_leaves_two_complete_copies_and_no_checkpoint(run):
    assert not (run / "checkpoint").exists()
    names = copies(run)
    assert len(names) == 2 and any(".old." in n for n in names) and any(n.endswith(".tmp") for n in names)
    for name in names:
        assert fileio.is_complete(run / name, checkpoint.MANIFEST_FILE)
    newest = fileio.complete_copies(run / "checkpoint", checkpoint.MANIFEST_FILE)[0]
    assert newest.endswith(".tmp") and step_of(newest) == 8


def test_loaders_use_the_newest_complete_copy_and_say_so(run, capsys):
    for path in (run, run / "checkpoint"):                # the run folder, or its (missing) checkpoint/
        folder = checkpoint.resolve(str(path))
        assert step_of(folder) == 8 and folder.endswith(".tmp")
    capsys.readouterr()
    checkpoint._REPORTED.clear()
    model = checkpoint.load_model(str(run))
    assert model.cfg.n_layer == 1 and checkpoint.load_tokenizer(str(run)).vocab_size > 0
    err = capsys.readouterr().err
    assert "warning" in err and os.path.basename(folder) in err and err.count("warning") == 1
    assert not (run / "checkpoint").exists()              # a reader does not move folders


def test_sample_quantize_finetune_and_serve_load_a_swap_killed_run(run, tmp_path, capsys):
    checkpoint._REPORTED.clear()
    assert main(["sample", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "3",
                 "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the") and ".checkpoint." in captured.err
    assert main(["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "int8")]) == 0
    assert (tmp_path / "int8" / "model.safetensors").exists()
    from numformer.finetune import load_backbone

    model, tok = load_backbone(str(run))
    assert model.cfg.n_layer == 1 and tok.vocab_size > 0
    pytest.importorskip("starlette")
    from numformer.serve import load_served_model

    served = load_served_model(str(run))
    assert served.kind == "completion" and served.name == "run"


def test_resume_recovers_the_checkpoint_and_matches_the_uninterrupted_run(run, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    shutil.copy(run.parent / "corpus.txt", tmp_path / "s" / "corpus.txt")
    straight = train(TrainConfig(**settings_for(tmp_path / "s")), log=quiet)
    resumed = train(TrainConfig(**settings_for(run.parent)), resume=True)
    out = capsys.readouterr().out
    assert "recovered" in out and ".tmp" in out and "resuming from step 8" in out
    np.testing.assert_array_equal(resumed.model.flat, straight.model.flat)
    assert resumed.losses == straight.losses and resumed.val_losses == straight.val_losses
    assert step_of(run / "checkpoint") == 12
    assert copies(run) == []                              # the next save removed the stale copies


def test_cli_resume_of_a_swap_killed_run(run, capsys):
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "recovered" in captured.err and "resuming from step 8" in captured.out
    assert step_of(run / "checkpoint") == 12 and copies(run) == []


def test_an_incomplete_new_copy_is_skipped_for_the_complete_old_one(run, capsys):
    new = next(n for n in copies(run) if n.endswith(".tmp"))
    os.unlink(run / new / checkpoint.MANIFEST_FILE)        # killed before the manifest: still being written
    folder = checkpoint.resolve(str(run))
    assert ".old." in folder and step_of(folder) == 4
    weights = run / new / checkpoint.MODEL_FILE           # a manifest whose file is short is no better
    json.dump({"files": {checkpoint.MODEL_FILE: os.path.getsize(weights) + 1}, "created_ns": 2 ** 62},
              open(run / new / checkpoint.MANIFEST_FILE, "w"))
    assert ".old." in checkpoint.resolve(str(run))


def test_no_complete_copy_says_there_is_no_checkpoint(run, capsys):
    for name in copies(run):
        os.unlink(run / name / checkpoint.MANIFEST_FILE)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and "optimizer" not in err


def test_a_kill_while_deleting_the_old_copy_is_cleaned_by_the_next_save(tmp_path):
    run_dir = killed_run(tmp_path, "delete")
    assert step_of(run_dir / "checkpoint") == 8            # the new checkpoint is in place
    (stale,) = copies(run_dir)
    assert ".old." in stale and not fileio.is_complete(run_dir / stale, checkpoint.MANIFEST_FILE)
    assert checkpoint.resolve(str(run_dir)) == str(run_dir / "checkpoint")
    resumed = train(TrainConfig(**settings_for(tmp_path)), resume=True, log=quiet)
    assert resumed.end_step == 12 and copies(run_dir) == []


def test_atomic_directory_removes_only_older_leftovers(tmp_path):
    final = tmp_path / "ckpt"
    with fileio.atomic_directory(final, manifest="m.json") as d:
        fileio.atomic_write_text(os.path.join(d, "a.txt"), "1")
    (tmp_path / ".ckpt.old.zzz").mkdir()                  # leftovers of a kill
    (tmp_path / ".ckpt.yyy.tmp").mkdir()
    (tmp_path / ".ckpt.notes").mkdir()                    # not ours: kept
    with fileio.atomic_directory(final, manifest="m.json") as d:
        fileio.atomic_write_text(os.path.join(d, "a.txt"), "2")
    assert sorted(os.listdir(tmp_path)) == [".ckpt.notes", "ckpt"]
    assert json.load(open(final / "m.json"))["files"] == {"a.txt": 1}
    assert fileio.is_complete(final, "m.json")


def test_library_resume_of_a_folder_without_any_checkpoint_says_so(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.load_training_state(str(tmp_path / "run"))
