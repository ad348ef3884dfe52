"""Tests for numformer.tokenizers: round trips, training, persistence, bad files."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numformer.tokenizers import (
    EOT_TOKEN,
    ByteBPETokenizer,
    CharTokenizer,
    load_tokenizer,
)
from numformer.tokenizers.bpe import GPT2_LIKE_PATTERN, merge_pair

SMALL_CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024; don't panic!\n"
    "  Indented line with    spaces\tand tabs.\n"
    "Ünïcödé: naïve café, 東京, Привет мир, emoji 🙂🙂 and numbers 3.14159 + 42 = 45.14159\n"
    "def f(x_1, y_2):\n    return x_1 ** 2 + y_2  # comment\n"
) * 20


@pytest.fixture(scope="module")
def bpe() -> ByteBPETokenizer:
    return ByteBPETokenizer.train(SMALL_CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def pydoc_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics.values())


def naive_bpe_train(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair from scratch at every step."""
    chunks = Counter(re.findall(GPT2_LIKE_PATTERN, text))
    words = {c: list(c.encode("utf-8")) for c in chunks}
    merges = []
    while len(merges) < vocab_size - 257:
        counts: Counter = Counter()
        for c, ids in words.items():
            for pair in zip(ids, ids[1:]):
                counts[pair] += chunks[c]
        if not counts:
            break
        # most frequent; ties -> smallest pair
        pair = min(counts, key=lambda p: (-counts[p], p))
        new_id = 256 + len(merges)
        merges.append(pair)
        words = {c: merge_pair(ids, pair, new_id) for c, ids in words.items()}
    return merges


# --------------------------------------------------------------- pre-tokenizer
@given(st.text())
def test_pretokenizer_covers_every_character(s):
    assert "".join(re.findall(GPT2_LIKE_PATTERN, s)) == s


def test_pretokenizer_chunks_like_gpt2():
    chunks = re.findall(GPT2_LIKE_PATTERN, "Hello world, it's 42 foo_bar   x\n\n")
    assert chunks == ["Hello", " world", ",", " it", "'s", " 42", " foo", "_", "bar",
                      "  ", " x", "\n\n"]


# ------------------------------------------------------------------ BPE basics
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, s):
    ids = bpe.encode(s)
    assert all(0 <= i < bpe.eot_id for i in ids)  # never the special id
    assert bpe.decode(ids) == s


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_bpe_round_trips_any_bytes(bpe, b):
    assert bpe.decode_bytes(bpe.encode_bytes(b)) == b


def test_bpe_round_trip_invalid_utf8_samples(bpe):
    for b in [b"\xff\xfe", b"caf\xc3", b"\xc3\xa9\x80abc the", b"\xed\xa0\x80", bytes(range(256))]:
        assert bpe.decode_bytes(bpe.encode_bytes(b)) == b


def test_bpe_decode_replaces_partial_utf8(bpe):
    ids = bpe.encode_bytes("é".encode()[:1])
    assert bpe.decode(ids) == "\ufffd"


def test_bpe_vocab_layout(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 400
    assert bpe.eot_id == 399 == 256 + len(bpe.merges)
    assert bpe.token_bytes(65) == b"A"
    a, b = bpe.merges[0]
    assert bpe.token_bytes(256) == bpe.token_bytes(a) + bpe.token_bytes(b)
    assert bpe.decode([bpe.eot_id]) == EOT_TOKEN


def test_bpe_decode_rejects_out_of_range(bpe):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([-1])


def test_bpe_decode_accepts_numpy(bpe):
    ids = bpe.encode("the quick brown fox")
    assert bpe.decode(np.array(ids, dtype=np.int64)) == "the quick brown fox"
    assert bpe.decode(np.array(ids, dtype=np.int32)) == "the quick brown fox"


# ------------------------------------------------------------------------- EOT
@pytest.mark.parametrize("make", ["bpe", "char"])
def test_eot_handling_both_ways(make, bpe):
    text = "one doc." + EOT_TOKEN + "two docs." + EOT_TOKEN
    tok = bpe if make == "bpe" else CharTokenizer.train(text + "<|endoftext>")
    special = tok.encode(text, allowed_special=True)
    assert special.count(tok.eot_id) == 2
    assert special[-1] == tok.eot_id
    assert tok.decode(special) == text
    plain = tok.encode(text)  # the literal is just text here
    assert tok.eot_id not in plain
    assert tok.decode(plain) == text
    assert len(plain) > len(special)


def test_eot_not_learned_by_training():
    text = ("hello world" + EOT_TOKEN) * 50
    tok = ByteBPETokenizer.train(text, 300)
    assert all(b"<|" not in tok.token_bytes(i) for i in range(256, tok.eot_id))
    ctok = CharTokenizer.train(text)
    assert "<" not in ctok.chars and "|" not in ctok.chars


# -------------------------------------------------------------------- training
def test_training_is_deterministic():
    a = ByteBPETokenizer.train(SMALL_CORPUS, 350)
    b = ByteBPETokenizer.train(SMALL_CORPUS, 350)
    assert a.merges == b.merges
    assert a.to_dict() == b.to_dict()


def test_training_matches_naive_reference():
    assert ByteBPETokenizer.train(SMALL_CORPUS, 420).merges == naive_bpe_train(SMALL_CORPUS, 420)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="ab c\n.é", max_size=60), st.integers(257, 300))
def test_training_matches_naive_reference_random(text, vocab_size):
    assert ByteBPETokenizer.train(text, vocab_size).merges == naive_bpe_train(text, vocab_size)


def test_frequent_words_become_single_tokens():
    tok = ByteBPETokenizer.train("hello world " * 100, 300)
    assert len(tok.encode("hello")) == 1
    assert len(tok.encode(" world")) == 1
    assert tok.encode("hello world") == tok.encode("hello") + tok.encode(" world")


def test_hand_checked_merge_order():
    # One chunk "aaabdaaabac" (a=97 b=98 c=99 d=100). Pair counts: aa=4, ab=2, rest 1.
    #   merge 0: (a,a)     -> 256: [256 a b d 256 a b a c]; (256,a)=2 and (a,b)=2 tie
    #   merge 1: (a,b)     -> 257 (smaller pair wins the tie): [256 257 d 256 257 a c]
    #   merge 2: (256,257) -> 258: [258 d 258 a c]
    tok = ByteBPETokenizer.train("aaabdaaabac", 260)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.eot_id == 259
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    # encoding applies merges by rank: aaab -> [256 a b] -> [256 257] -> [258]
    assert tok.encode("aaab") == [258]
    assert tok.encode("aaaa") == [256, 256]
    assert tok.token_bytes(258) == b"aaab"


def test_training_stops_when_pairs_run_out():
    tok = ByteBPETokenizer.train("ab", 1000)
    assert tok.merges == [(97, 98)]
    assert tok.vocab_size == 258


@pytest.mark.parametrize("bad", [256, 0, -5, 300.0, True, "512"])
def test_vocab_size_too_small_or_wrong_type(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        ByteBPETokenizer.train("hello", bad)


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    a = ByteBPETokenizer.train(SMALL_CORPUS, 300, progress=True)
    assert a.merges == ByteBPETokenizer.train(SMALL_CORPUS, 300).merges


# ------------------------------------------------------------------------ char
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(sorted(set(SMALL_CORPUS)))))
def test_char_round_trip(s):
    tok = CharTokenizer.train(SMALL_CORPUS)
    ids = tok.encode(s)
    assert len(ids) == len(s)
    assert tok.decode(ids) == s


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trips_its_own_training_text(s):
    tok = CharTokenizer.train(s + "x")
    t = s.replace(EOT_TOKEN, "")
    assert tok.decode(tok.encode(t)) == t


def test_char_vocab_layout():
    tok = CharTokenizer.train("hello")
    assert tok.kind == "char"
    assert tok.chars == ["e", "h", "l", "o"]
    assert tok.vocab_size == 5 and tok.eot_id == 4
    assert tok.encode("hole") == [1, 3, 2, 0]
    assert tok.decode_bytes(tok.encode("hole")) == b"hole"


def test_char_unknown_character_names_char_and_position():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match=r"'z' at position 3"):
        tok.encode("abcz")
    with pytest.raises(ValueError, match=r"'\\n' at position 1"):
        tok.encode("a\nb")
    # positions count the special token's characters too
    with pytest.raises(ValueError, match=r"'z' at position 14"):
        tok.encode("a" + EOT_TOKEN + "z", allowed_special=True)


def test_char_decode_rejects_unknown_ids():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError):
        tok.decode([4])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_char_empty_training_text():
    with pytest.raises(ValueError):
        CharTokenizer.train("")


# ----------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, bpe):
    char = CharTokenizer.train(SMALL_CORPUS)
    sample = SMALL_CORPUS[:500] + EOT_TOKEN + "the end"
    for tok in (bpe, char):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        json.loads(path.read_text())  # plain JSON
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok)
        assert loaded.to_dict() == tok.to_dict()
        assert loaded.encode(sample, allowed_special=True) == tok.encode(sample, allowed_special=True)
        assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
        assert load_tokenizer(tok.to_dict()).to_dict() == tok.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json", "char.json"]  # no temp left


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "tok.json"
    ByteBPETokenizer.train("aaabdaaabac", 258).save(path)
    ByteBPETokenizer.train("aaabdaaabac", 260).save(path)
    assert load_tokenizer(path).vocab_size == 260
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def _good_bpe() -> dict:
    return ByteBPETokenizer.train("aaabdaaabac", 260).to_dict()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "line 1: not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        ("[1, 2]", "expected a JSON object"),
        ({"merges": []}, "missing the 'kind' field"),
        ({**_good_bpe(), "kind": "sentencepiece"}, "unknown kind 'sentencepiece'"),
        ({**_good_bpe(), "merges": [[97, 97], [300, 97]]}, r"merges\[1\].*does not exist yet"),
        ({**_good_bpe(), "merges": [[97, 97], [256, 256], [258, 97]]}, r"merges\[2\]"),
        ({**_good_bpe(), "merges": [[97, 97], [97, 97], [97, 98]]}, "repeats"),
        ({**_good_bpe(), "merges": [[97, "a"]]}, "not a pair of integer ids"),
        ({**_good_bpe(), "merges": [[97, 98, 99]]}, "not a pair of integer ids"),
        ({k: v for k, v in _good_bpe().items() if k != "merges"}, "'merges'"),
        ({k: v for k, v in _good_bpe().items() if k != "pattern"}, "'pattern'"),
        ({**_good_bpe(), "pattern": "(unclosed"}, "not a valid regular expression"),
        ({k: v for k, v in _good_bpe().items() if k != "special_tokens"}, "special_tokens"),
        ({**_good_bpe(), "special_tokens": {EOT_TOKEN: 5}}, "special_tokens"),
        ({**_good_bpe(), "version": 99}, "unsupported version"),
        ({"kind": "char", "version": 1, "special_tokens": {EOT_TOKEN: 0}}, "'chars'"),
        ({"kind": "char", "version": 1, "chars": ["a", "bc"],
          "special_tokens": {EOT_TOKEN: 2}}, "not a single character"),
        ({"kind": "char", "version": 1, "chars": ["a", "a"],
          "special_tokens": {EOT_TOKEN: 2}}, "duplicates"),
        ({"kind": "char", "version": 1, "chars": ["a", "b"]}, "special_tokens"),
    ],
)
def test_malformed_files_raise_value_error_naming_file(tmp_path, content, problem):
    path = tmp_path / "my_tokenizer.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as info:
        load_tokenizer(path)
    assert "my_tokenizer.json" in str(info.value)
    assert re.search(problem, str(info.value)), str(info.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")


# -------------------------------------------------------------- real corpus
@pytest.mark.parametrize("vocab_size, min_ratio", [(512, 2.0), (2048, 3.0)])
def test_pydoc_topics_compression_and_speed(pydoc_text, vocab_size, min_ratio):
    t0 = time.perf_counter()
    tok = ByteBPETokenizer.train(pydoc_text, vocab_size)
    t1 = time.perf_counter()
    ids = tok.encode(pydoc_text)
    t2 = time.perf_counter()
    n_bytes = len(pydoc_text.encode("utf-8"))
    ratio = n_bytes / len(ids)
    print(f"\npydoc topics ({n_bytes / 1e3:.0f} kB), vocab {vocab_size}: train {t1 - t0:.2f} s, "
          f"encode {t2 - t1:.2f} s ({n_bytes / 1e6 / (t2 - t1):.1f} MB/s), "
          f"{ratio:.2f} bytes/token")
    assert tok.vocab_size == vocab_size
    assert ratio > min_ratio
    assert tok.decode(ids) == pydoc_text
    assert t1 - t0 < 20 and t2 - t1 < 10  # generous: seconds, not minutes
