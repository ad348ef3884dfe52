"""Inference with nothing but NumPy: no compiled extension, no tqdm, no regex, no extras.

A child Python gets a ``sitecustomize`` on its PYTHONPATH that installs an
import blocker: ``numformer._cpu`` and every top-level module outside the
standard library, NumPy and numformer raise ImportError (as if they were
not installed). In that child we load checkpoints (numformer's own folder,
a Hugging Face GPT-2 folder and an int8 folder from ``numformer quantize``),
tokenize, generate and run the CLI, and compare with this process (all
packages present) on the numpy backend — equal tokens — and on the cpu
backend — logits within float32 tolerance.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from numformer import backend, checkpoint
from numformer.cli import _load_for_sampling
from numformer.generate import generate_batch
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.tokenizers import ByteBPETokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")
PROMPTS = ["Hello world", "It's naïve 日本!", " 42  \n"]   # short: the HF fixture has 32 positions

BLOCKER = r'''
import importlib.abc, sys

ALLOWED = set(sys.stdlib_module_names) | {"numpy", "numformer", "sitecustomize"}


class Blocker(importlib.abc.MetaPathFinder):
    """Pretend that only the standard library, NumPy and numformer (without _cpu) exist."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if name == "numformer._cpu" or (top not in ALLOWED and not top.startswith("_")):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the minimal-runtime test)",
                                      name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''

CHILD = r'''
import json, sys
import numpy as np

spec = json.loads(sys.argv[1])
for hidden in ("numformer._cpu", "regex", "tqdm", "hypothesis"):
    try:
        __import__(hidden)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {hidden} through")

from numformer import backend
from numformer.cli import _load_for_sampling
from numformer.generate import generate_batch

assert not backend.cpu_available()
out = {}
for name, folder in spec["folders"].items():
    model, tok = _load_for_sampling(folder)
    ids = [[tok.eot_id] + tok.encode(p) for p in spec["prompts"]]
    greedy = generate_batch(model, ids, spec["new"], temperature=0)
    sampled = generate_batch(model, ids, spec["new"], temperature=1.0, top_k=40, seed=7)
    logits = model.forward(np.array([ids[0]]))[0][0].tolist()
    out[name] = {"ids": ids, "greedy": greedy, "sampled": sampled, "logits": logits,
                 "regex_free": getattr(tok, "_regex", None) is None}
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("regex", "tqdm") or m == "numformer._cpu")
out["leaked"] = bad
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("minimal-site")
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS="ignore::RuntimeWarning")
    env.pop("NUMFORMER_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A numformer checkpoint folder (random weights, a byte-level BPE tokenizer)."""
    tok = ByteBPETokenizer.train("It's a small corpus: hello world, café, 日本語. " * 20, 300)
    model = GPT2.init(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4), seed=1)
    path = str(tmp_path_factory.mktemp("own") / "ckpt")
    checkpoint.save(path, model, tok)
    return path


@pytest.fixture(scope="module")
def int8_checkpoint(own_checkpoint, tmp_path_factory):
    """``numformer quantize`` of it: int8 blocks and an int8 head, packed, run by the NumPy reference."""
    from numformer.quantize import quantize_checkpoint

    path = str(tmp_path_factory.mktemp("int8") / "ckpt")
    quantize_checkpoint(own_checkpoint, path)
    return path


def run_child(env, spec):
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_blocker_hides_what_it_should(blocked_env):
    for name in ("regex", "tqdm", "numformer._cpu", "torch"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], env=blocked_env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and "hidden by the minimal-runtime test" in proc.stderr, name
    assert subprocess.run([sys.executable, "-c", "import numpy, numformer, json"], env=blocked_env,
                          timeout=60).returncode == 0


def test_generation_with_numpy_alone_equals_the_full_install(blocked_env, own_checkpoint, int8_checkpoint):
    spec = {"folders": {"numformer": own_checkpoint, "huggingface": FIXTURE, "int8": int8_checkpoint},
            "prompts": PROMPTS, "new": 8}
    child = run_child(blocked_env, spec)
    assert child["leaked"] == []
    for name, folder in spec["folders"].items():
        got = child[name]
        model, tok = _load_for_sampling(folder)
        ids = [[tok.eot_id] + tok.encode(p) for p in PROMPTS]
        assert got["ids"] == ids                                   # the tokenizer splits alike
        if name == "huggingface":
            assert got["regex_free"]                               # the hand-written scanner did it
        with backend.use("numpy"):                                 # the same arithmetic: the same tokens
            assert got["greedy"] == generate_batch(model, ids, 8, temperature=0)
            assert got["sampled"] == generate_batch(model, ids, 8, temperature=1.0, top_k=40, seed=7)
            np.testing.assert_array_equal(np.array(got["logits"], np.float32),
                                          model.forward(np.array([ids[0]]))[0][0])
        if backend.cpu_available():
            # the compiled kernels sum in another order: float32 rounding, relative to the logits' scale
            with backend.use("cpu"):
                fast = model.forward(np.array([ids[0]]))[0][0]
            scale = np.abs(fast).max()
            np.testing.assert_allclose(np.array(got["logits"]), fast, rtol=1e-4, atol=1e-4 * scale)


def test_cli_sample_with_numpy_alone(blocked_env, own_checkpoint):
    args = ["sample", "--checkpoint", own_checkpoint, "--prompt", PROMPTS[1], "--prompt", PROMPTS[0],
            "--max-new-tokens", "6", "--seed", "3"]
    child = subprocess.run([sys.executable, "-m", "numformer.cli", *args], env=blocked_env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    full = subprocess.run([sys.executable, "-m", "numformer.cli", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, NUMFORMER_BACKEND="numpy"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert child.stdout == full.stdout and "--- prompt 2, sample 1 ---" in child.stdout
