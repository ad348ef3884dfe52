"""Tokenizer hardening (issue 15): ids are never truncated, files are written
0644-style, and hostile tokenizer files fail with the loader's own error."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numformer
from numformer import fileio
from numformer.tokenizers import ByteBPETokenizer, CharTokenizer, load_tokenizer, load_wordpiece

HERE = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module", params=["char", "bpe", "gpt2", "wordpiece"])
def tok(request):
    if request.param == "char":
        return CharTokenizer.train("hello world, the quick brown fox")
    if request.param == "bpe":
        return ByteBPETokenizer.train("hello world, the quick brown fox " * 5, vocab_size=270)
    if request.param == "gpt2":
        return numformer.load_tokenizer(os.path.join(HERE, "tiny-gpt2"))
    return load_wordpiece(os.path.join(HERE, "wordpiece", "tokenizer.json"))


def _decoders(tok):
    """Every entry point that turns ids into text or bytes."""
    out = [tok.decode]
    if hasattr(tok, "decode_bytes"):
        out.append(tok.decode_bytes)
    return out


# ----------------------------------------------------------------------------- defect 7: non-integer ids


@pytest.mark.parametrize("bad, pos", [
    ([1.5], 0), ([1.0], 0), ([0, 2.7], 1), ([True], 0), ([1, False], 1), (["1"], 0), ([None], 0),
    ([1, np.float32(1)], 1), ([np.float64(3.0)], 0), ([np.bool_(True)], 0), ([[1]], 0),
])
def test_decode_refuses_non_integer_ids(tok, bad, pos):
    for decode in _decoders(tok):
        with pytest.raises(TypeError, match=rf"token id .* at position {pos} is not an integer"):
            decode(bad)


def test_decode_refuses_float_and_bool_arrays(tok):
    for decode in _decoders(tok):
        with pytest.raises(TypeError, match=r"at position 0 is not an integer"):
            decode(np.array([1.0, 2.0]))
        with pytest.raises(TypeError, match=r"at position 0 is not an integer"):
            decode(np.array([True]))
        with pytest.raises(TypeError, match=r"one-dimensional"):
            decode(np.array([[1, 2]]))
        with pytest.raises(TypeError, match=r"sequence of integers"):
            decode("12")


def test_decode_accepts_python_and_numpy_integers(tok):
    ids = [1, 2, 3]
    want = tok.decode(ids)
    assert tok.decode(np.array(ids, dtype=np.int64)) == want
    assert tok.decode(np.array(ids, dtype=np.uint16)) == want
    assert tok.decode([np.int32(1), np.int64(2), 3]) == want
    assert tok.decode(iter(ids)) == want                      # a one-shot iterator is read once
    assert tok.decode(np.int64(1)) == tok.decode([1])         # a NumPy scalar: one id
    assert tok.decode([]) == ""


def test_decode_names_out_of_range_ids_and_position(tok):
    for decode in _decoders(tok):
        with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} at position 2 is outside"):
            decode([0, 1, tok.vocab_size])
        with pytest.raises(ValueError, match=r"token id -1 at position 0 is outside"):
            decode(np.array([-1, 0]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 5), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2)),
                min_size=1, max_size=6))
def test_decode_never_truncates_random_ids(ids):
    tok = CharTokenizer.train("abcdefgh")
    first_bad = next((i for i, x in enumerate(ids) if type(x) is not int), None)
    if first_bad is None:
        assert tok.decode(ids) == "".join("abcdefgh"[i] for i in ids)
    else:
        with pytest.raises(TypeError, match=rf"position {first_bad}\b"):
            tok.decode(ids)


# ----------------------------------------------------------------------------- defect 11: file modes


def test_tokenizer_file_gets_the_umask_mode_not_0600(tmp_path, tok):
    if tok.kind == "gpt2":
        pytest.skip("the GPT-2 tokenizer is written with save_pretrained (covered below)")
    path = tmp_path / "tok.json"
    tok.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~fileio._UMASK
    assert load_tokenizer(path).to_dict() == tok.to_dict()
    assert os.listdir(tmp_path) == ["tok.json"]               # no temporary left behind


def test_tokenizer_save_respects_a_restrictive_umask(tmp_path):
    """The mode comes from the umask read at import, as for every other file."""
    tok = CharTokenizer.train("abc")
    tok.save(tmp_path / "a.json")
    safetensors_like = tmp_path / "b.bin"
    fileio.atomic_write_bytes(safetensors_like, b"x")
    assert (stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
            == stat.S_IMODE(safetensors_like.stat().st_mode))


def test_every_file_of_a_checkpoint_and_pretrained_folder_has_the_same_mode(tmp_path):
    from numformer import checkpoint
    from numformer.models.gpt2 import GPT2, GPT2Config

    model = GPT2.init(GPT2Config(vocab_size=9, n_positions=8, n_embd=8, n_layer=1, n_head=2), seed=0)
    checkpoint.save(str(tmp_path / "ck"), model, CharTokenizer.train("abcdefgh"),
                    trainer_state={"step": 1})
    gpt2_tok = numformer.load_tokenizer(os.path.join(HERE, "tiny-gpt2"))
    pre = numformer.from_pretrained(os.path.join(HERE, "tiny-gpt2"))
    numformer.save_pretrained(pre, tmp_path / "hf", tokenizer=gpt2_tok)
    want = 0o666 & ~fileio._UMASK
    for folder in ("ck", "hf"):
        for name in os.listdir(tmp_path / folder):
            assert stat.S_IMODE((tmp_path / folder / name).stat().st_mode) == want, (folder, name)
