"""The GPT-2 tokenizer: file formats, tiktoken / Hugging Face parity, C++ vs Python merge loop, bad files."""

import base64
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numformer
from numformer.tokenizers import gpt2 as g
from numformer.tokenizers.gpt2 import GPT2_PATTERN, GPT2Tokenizer, bpe_heap, bpe_scan

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_tok():
    return numformer.load_tokenizer(FIXTURE)                 # vocab.json + merges.txt


@pytest.fixture(scope="module")
def rank_tok(hf_tok):
    """The fixture's vocabulary as a tiktoken rank table (tiktoken's merge rule)."""
    return GPT2Tokenizer(hf_tok.ranks, None, hf_tok.special_tokens)


def write_rank_file(path, ranks):
    with open(path, "w") as f:
        for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {r}\n")


# The real GPT-2 rank file, from the openai-whisper sdist on PyPI (skipped when offline).
CACHE = os.environ.get("NUMFORMER_TEST_CACHE", os.path.join(tempfile.gettempdir(), "numformer-test-cache"))


@pytest.fixture(scope="session")
def gpt2_rank_file():
    target = os.path.join(CACHE, "gpt2.tiktoken")
    if not os.path.exists(target):
        os.makedirs(CACHE, exist_ok=True)
        dl = tempfile.mkdtemp(dir=CACHE)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "openai-whisper", "--no-deps",
                            "--no-binary", ":all:", "-d", dl, "-q"], check=True, timeout=180,
                           capture_output=True)
            sdist = next(os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".tar.gz"))
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
                data = tar.extractfile(member).read()
        except Exception as exc:  # offline, no pip, layout changed
            pytest.skip(f"could not fetch gpt2.tiktoken from the openai-whisper sdist: {exc}")
        tmp = target + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def real_gpt2(gpt2_rank_file):
    return numformer.load_tokenizer(gpt2_rank_file)


# ----------------------------------------------------------------------------- basics


def test_real_gpt2_known_ids(real_gpt2):
    """Ids every GPT-2 user knows (checked against tiktoken's "gpt2")."""
    tok = real_gpt2
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode(EOT, allowed_special=True) == [50256]
    assert tok.encode(EOT) == [27, 91, 437, 1659, 5239, 91, 29]          # plain text by default
    assert tok.encode("a" + EOT + "b", allowed_special={EOT}) == [64, 50256, 65]
    text = "Hello, ünïcode 日本語 🙂\n\n  spaced  \t tabs"
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_round_trip(hf_tok):
    text = f"one{EOT}two {EOT}"
    plain = hf_tok.encode(text)
    assert hf_tok.eot_id not in plain and hf_tok.decode(plain) == text
    special = hf_tok.encode(text, allowed_special=True)
    assert special.count(hf_tok.eot_id) == 2 and hf_tok.decode(special) == text
    with pytest.raises(ValueError, match="unknown special token"):
        hf_tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hf_tok.decode([hf_tok.vocab_size])


def test_all_formats_agree(tmp_path, hf_tok, rank_tok):
    write_rank_file(tmp_path / "tiny.tiktoken", hf_tok.ranks)
    from_file = numformer.load_tokenizer(tmp_path / "tiny.tiktoken")
    text = "The quick brown fox; def f(x): return x**2 — ünïcode"
    assert from_file.encode(text) == rank_tok.encode(text)
    assert from_file.eot_id == max(hf_tok.ranks.values()) + 1
    # a rank table exports as vocab.json + merges.txt and reads back with the same ids
    rank_tok.save_pretrained(str(tmp_path))
    back = numformer.load_tokenizer(tmp_path)
    assert back.merges is not None and back.encode(text) == rank_tok.encode(text)
    # numformer's own JSON form
    rank_tok.save(tmp_path / "tok.json")
    assert numformer.load_tokenizer(tmp_path / "tok.json").encode(text) == rank_tok.encode(text)


def test_lone_surrogates_become_replacement_characters(rank_tok):
    """As tiktoken: invalid Unicode is repaired to U+FFFD before encoding."""
    assert rank_tok.encode("a\ud800b") == rank_tok.encode("a\ufffdb")
    assert rank_tok.encode("\ud83d\ude00") == rank_tok.encode("\U0001F600")   # a surrogate pair is joined


def test_long_pieces_are_not_quadratic(rank_tok):
    import time
    text = "a" * 200_000 + " " + "7" * 100_000
    t = time.perf_counter()
    ids = rank_tok.encode(text)
    assert rank_tok.decode(ids) == text
    assert time.perf_counter() - t < 20


# ----------------------------------------------------------------------------- engines agree


def _pair_table(tok):
    return tok._byte_ids, tok._pairs


@settings(max_examples=300)
@given(data=st.binary(min_size=1, max_size=300))
def test_scan_and_heap_merge_loops_agree(hf_tok, rank_tok, data):
    for tok in (hf_tok, rank_tok):
        byte_ids, pairs = _pair_table(tok)
        assert bpe_scan(data, byte_ids, pairs) == bpe_heap(data, byte_ids, pairs)


@pytest.mark.skipif(not GPT2Tokenizer({bytes([b]): b for b in range(256)}).uses_extension,
                    reason="numformer._cpu.BPE is not built")
@given(data=st.binary(min_size=1, max_size=300), long_chunk=st.sampled_from([1, 8, 128]))
def test_cpp_merge_loop_matches_python(hf_tok, rank_tok, data, long_chunk):
    for tok in (hf_tok, rank_tok):
        byte_ids, pairs = _pair_table(tok)
        tok._core.long_chunk = long_chunk
        try:
            got = tok._core.encode_chunk(data)
        finally:
            tok._core.long_chunk = 128
        whole = tok.ranks.get(data) if tok._whole else None
        assert got == ([whole] if whole is not None else bpe_scan(data, byte_ids, pairs))


@given(text=st.text(max_size=200))
def test_cpp_and_python_tokenizers_agree(hf_tok, text):
    py = GPT2Tokenizer(hf_tok.ranks, hf_tok.merges, hf_tok.special_tokens, use_extension=False)
    assert hf_tok.encode(text) == py.encode(text)
    assert hf_tok.decode(hf_tok.encode(text)) == text


TRICKY = " \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2028\u3000'sdmtlvre aZé1١½_-!\u0301\U0001F600日"


@given(text=st.text(st.sampled_from(TRICKY), max_size=60))
def test_cpp_pretokenizer_matches_the_regex(hf_tok, text):
    """Whitespace runs, contractions, the optional leading space, Unicode letters/numbers/marks."""
    py = GPT2Tokenizer(hf_tok.ranks, hf_tok.merges, hf_tok.special_tokens, use_extension=False)
    assert hf_tok.encode(text) == py.encode(text)


# ----------------------------------------------------------------------------- tiktoken


tiktoken_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300) | st.from_regex(
    r"(?:'(?:s|t|re|ve|m|ll|d)| ?[a-zA-Z]{1,8}| ?[0-9]{1,5}| ?[!-/:-@]{1,3}|[ \t\n\r]{1,4}|<\|endoftext\|>){0,40}",
    fullmatch=True) | st.text(st.sampled_from(TRICKY), max_size=60)


def _tiktoken_encoding(tok, name):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=tok.ranks,
                             special_tokens=tok.special_tokens)


@given(text=tiktoken_text)
def test_encodes_exactly_as_tiktoken_small_vocab(rank_tok, text):
    enc = _tiktoken_encoding(rank_tok, "tiny")
    assert rank_tok.encode(text) == enc.encode(text, disallowed_special=())
    assert rank_tok.encode(text, allowed_special=True) == enc.encode(text, allowed_special="all")


@given(text=tiktoken_text)
def test_encodes_exactly_as_tiktoken_real_gpt2(real_gpt2, text):
    enc = _tiktoken_encoding(real_gpt2, "gpt2-whisper")
    assert real_gpt2.encode(text) == enc.encode(text, disallowed_special=())
    assert real_gpt2.encode(text, allowed_special=True) == enc.encode(text, allowed_special="all")


def test_real_gpt2_on_python_docs(real_gpt2):
    from pydoc_data.topics import topics
    enc = _tiktoken_encoding(real_gpt2, "gpt2-whisper")
    text = "\n".join(topics.values())
    assert real_gpt2.encode(text) == enc.encode_ordinary(text)


# ----------------------------------------------------------------------------- Hugging Face tokenizers


@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_merges_rule_matches_hf_tokenizers(hf_tok, text):
    tokenizers = pytest.importorskip("tokenizers")
    ref = _hf_reference(tokenizers)
    assert hf_tok.encode(text) == ref.encode(text, add_special_tokens=False).ids


_HF = {}


def _hf_reference(tokenizers):
    if "tok" not in _HF:
        bpe = tokenizers.models.BPE.from_file(os.path.join(FIXTURE, "vocab.json"), os.path.join(FIXTURE, "merges.txt"))
        t = tokenizers.Tokenizer(bpe)
        t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        _HF["tok"] = t
    return _HF["tok"]


def test_the_two_merge_rules_differ_where_they_should():
    """merges (b,c), (a,b), (ab,c): the pair rule stops at [a, bc]; tiktoken's rank rule
    merges a+bc because 'abc' is a token."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"abc": 258})
    pair_rule = GPT2Tokenizer(ranks, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    rank_rule = GPT2Tokenizer(ranks, None)
    assert pair_rule.encode("abc") == [ord("a"), 256]
    assert rank_rule.encode("abc") == [258]


# ----------------------------------------------------------------------------- bad files


def bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_bad_rank_files(tmp_path):
    ok = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
    cases = {
        b"!!!! 256\n": r"line 257: '!!!!' is not valid base64",
        b"YWI= x\n": r"line 257: rank 'x' is not a non-negative integer",
        b"YWI= 255\n": r"line 257: rank 255 already used on line 256",
        b"AA== 300\n": r"line 257: token b'\\x00' already appeared on line 1",
        b"YWI=\n": r"line 257: expected 'base64-token rank'",
        b"YWI= 256 extra\n": r"line 257: expected",
        "YWI=\u00e9 256\n".encode(): r"line 257: not ASCII",
    }
    for i, (tail, msg) in enumerate(cases.items()):
        p = bad(tmp_path, f"r{i}.tiktoken", ok + tail)
        with pytest.raises(ValueError, match=f"{p}.*{msg}"):
            numformer.load_tokenizer(p)
    p = bad(tmp_path, "short.tiktoken", ok.replace(b"AA== 0\n", b""))
    with pytest.raises(ValueError, match=r"no token for byte\(s\) 0x00"):
        numformer.load_tokenizer(p)
    with pytest.raises(ValueError, match="no ranks"):
        numformer.load_tokenizer(bad(tmp_path, "empty.tiktoken", b"\n\n"))


def _vocab_folder(tmp_path, vocab: bytes, merges: bytes, name="v"):
    d = tmp_path / name
    d.mkdir()
    (d / "vocab.json").write_bytes(vocab)
    (d / "merges.txt").write_bytes(merges)
    return d


def test_bad_vocab_and_merges(tmp_path):
    vocab_path = os.path.join(FIXTURE, "vocab.json")
    merges_path = os.path.join(FIXTURE, "merges.txt")
    vocab, merges = open(vocab_path, "rb").read(), open(merges_path, "rb").read()
    cases = [
        (vocab, merges + b"zzzq \xc4\xa0\n", r"merges\.txt.*line \d+: token 'zzzq' is not in the vocabulary"),
        (vocab, merges + b"onlyone\n", r"merges\.txt.*line \d+: expected two tokens"),
        (vocab, merges + merges.split(b"\n")[1] + b"\n", r"merges\.txt.*line \d+: merge .* repeats line 2"),
        (vocab, merges + b"\xff\xfe\n", r"merges\.txt.*line \d+: not valid UTF-8"),
        (vocab, b"#version: 0.2\n" + "Ġ !".encode() + b"\n", r"merged token 'Ġ!' is not in the vocabulary"),
        (vocab[:-1] + b', "\xe9": 7}', merges, r"vocab\.json.*line 1: not valid UTF-8"),
        (vocab[:-1] + b', "zz": 3}', merges, r"vocab\.json.*tokens .* have the same id 3"),
        (vocab[:-1] + ', "\u2603": 900}'.encode(), merges, r"vocab\.json.*contains '\u2603' \(U\+2603\), which is not in"),
        (vocab[:-1] + b', "xyzzy": 1.5}', merges, r"vocab\.json.*not a non-negative integer"),
        (vocab[:-1] + b', "xyzzy": 1000000000000}', merges, r"vocab\.json.*largest id is 1000000000000 for only"),
        (b'{"a": 0,\n "a": 1}', merges, r"vocab\.json.*line 2: key 'a' appears twice"),
        (b'{"a": 0,\n "b" 1}', merges, r"vocab\.json.*line 2: not valid JSON"),
    ]
    for i, (v, m, msg) in enumerate(cases):
        folder = _vocab_folder(tmp_path, v, m, name=f"case{i}")
        with pytest.raises(ValueError, match=msg):
            numformer.load_tokenizer(folder)


def test_tokenizer_json(tmp_path, hf_tok):
    tokenizers = pytest.importorskip("tokenizers")
    ref = _hf_reference(tokenizers)
    ref.add_special_tokens([tokenizers.AddedToken(EOT, special=True)])
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = numformer.load_tokenizer(tmp_path / "tokenizer.json")
    text = "json form: ünïcode, <|endoftext|> and 12345"
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, allowed_special=True) == hf_tok.encode(text, allowed_special=True)
    bad_json = tmp_path / "wp" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    # numformer.load_tokenizer would hand a WordPiece file to the WordPiece reader;
    # the GPT-2 reader itself must refuse it by name
    from numformer.tokenizers.gpt2 import load_gpt2_tokenizer

    with pytest.raises(ValueError, match=r"tokenizer\.json.*'WordPiece' is not byte-level BPE"):
        load_gpt2_tokenizer(bad_json)


def test_real_gpt2_rank_file_exports_to_equivalent_hf_files(tmp_path, real_gpt2):
    """Rank file -> vocab.json + merges.txt (derived merges) -> same ids under the pair rule."""
    real_gpt2.save_pretrained(str(tmp_path))
    hf = numformer.load_tokenizer(tmp_path)
    assert hf.merges is not None and len(hf.merges) == 50000
    from pydoc_data.topics import topics
    text = "\n".join(list(topics.values())[:40]) + " ünïcode 日本語 🙂 <|endoftext|>"
    assert hf.encode(text) == real_gpt2.encode(text)
    assert hf.encode(text, allowed_special=True) == real_gpt2.encode(text, allowed_special=True)


# ----------------------------------------------------------------------------- fuzzing the readers

_VOCAB = open(os.path.join(FIXTURE, "vocab.json"), "rb").read()
_MERGES = open(os.path.join(FIXTURE, "merges.txt"), "rb").read()
_RANKS = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))


def _mutate(data: bytes, at: int, cut: int, insert: bytes) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + insert + data[at + cut:]


@given(which=st.sampled_from(["vocab.json", "merges.txt", "rank"]), at=st.integers(0, 10 ** 6),
       cut=st.integers(0, 40), insert=st.binary(max_size=40))
def test_corrupted_files_load_or_raise_value_error(which, at, cut, insert):
    """Random edits of a valid file: either it still loads, or a ValueError names the file."""
    with tempfile.TemporaryDirectory() as d:
        if which == "rank":
            path = os.path.join(d, "r.tiktoken")
            with open(path, "wb") as f:
                f.write(_mutate(_RANKS, at, cut, insert))
        else:
            path = d
            files = {"vocab.json": _VOCAB, "merges.txt": _MERGES}
            files[which] = _mutate(files[which], at, cut, insert)
            for name, data in files.items():
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
        try:
            tok = numformer.load_tokenizer(path)
        except ValueError as e:
            assert d in str(e)
        else:
            assert tok.decode(tok.encode("still works")) == "still works"
