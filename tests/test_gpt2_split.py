"""The hand-written GPT-2 pre-tokenizer (no ``regex``) against the pattern itself."""

import os
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

import numformer
from numformer.tokenizers import gpt2 as g
from numformer.tokenizers import gpt2_split
from numformer.tokenizers.gpt2 import GPT2_PATTERN, GPT2Tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")

# Explicit splits (the specification, checked by hand; also compared with `regex` below).
CASES = [
    ("Hello world", ["Hello", " world"]),
    ("trailing spaces   ", ["trailing", " spaces", "   "]),
    ("two  spaces", ["two", " ", " spaces"]),                 # \s+(?!\S) leaves one space for the word
    ("line\n\nbreak\n", ["line", "\n", "\n", "break", "\n"]),   # the last \n before a word stands alone
    ("a \n b", ["a", " \n", " b"]),
    ("tab\tword", ["tab", "\t", "word"]),                      # only U+0020 glues to a word
    ("I'm you'll they've it's we'd she're don't", ["I", "'m", " you", "'ll", " they", "'ve", " it", "'s",
                                                   " we", "'d", " she", "'re", " don", "'t"]),
    ("'S 'LL ''s 'x", ["'", "S", " '", "LL", " ''", "s", " '", "x"]),   # case-sensitive; ' alone is "other"
    ("abc123 456def", ["abc", "123", " 456", "def"]),
    ("٣٤ ½ Ⅻ x²", ["٣٤", " ½", " Ⅻ", " x", "²"]),             # Nd, No, Nl
    ("日本語のテキスト Привет мир", ["日本語のテキスト", " Привет", " мир"]),
    ("é vs e\u0301", ["é", " vs", " e", "\u0301"]),             # a combining mark is not a letter
    ("!!  ?? ...", ["!!", " ", " ??", " ..."]),
    ("\u00a0nbsp\u3000ideo", ["\u00a0", "nbsp", "\u3000", "ideo"]),
    ("x\x1cy", ["x", "\x1c", "y"]),                            # str.isspace() but not White_Space
    ("emoji 😀😀 ok", ["emoji", " 😀😀", " ok"]),
    (" ", [" "]), ("", []), ("  \n", ["  \n"]), ("'", ["'"]),
]


@pytest.fixture(scope="module")
def unicodedata_table():
    return gpt2_split.class_table_from_unicodedata()


@pytest.mark.parametrize("text, expected", CASES)
def test_committed_cases(unicodedata_table, text, expected):
    assert gpt2_split.split(text, unicodedata_table) == expected
    assert gpt2_split.split(text) == expected                 # the table this process uses


@pytest.fixture(scope="module")
def regex():
    return pytest.importorskip("regex")


@pytest.fixture(scope="module")
def pattern(regex):
    return regex.compile(GPT2_PATTERN)


@pytest.fixture(scope="module")
def regex_table(regex):
    return gpt2_split.class_table_from_regex(regex)


@pytest.mark.parametrize("text, expected", CASES)
def test_committed_cases_are_what_the_pattern_does(pattern, text, expected):
    assert pattern.findall(text) == expected


def assigned_here(ch: str) -> bool:
    """Assigned in this Python's Unicode database (``regex`` may know newer characters)."""
    return unicodedata.category(ch) != "Cn"


def test_unicodedata_table_matches_regex_on_every_assigned_code_point(unicodedata_table, regex_table):
    differ = [cp for cp in range(0x110000) if unicodedata_table[cp] != regex_table[cp]
              and assigned_here(chr(cp))]
    assert differ == [], [hex(cp) for cp in differ[:20]]


TRICKY = " \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2028\u3000'sdmtlvreSL aZé1١½Ⅻ_-!.\u0301\U0001F600日"

assigned_text = st.text(st.characters(blacklist_categories=("Cs", "Cn")).filter(assigned_here), max_size=120)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)
tricky_text = st.text(st.sampled_from(TRICKY), max_size=60)


@given(text=assigned_text | tricky_text)
def test_scanner_with_unicodedata_classes_equals_regex(pattern, unicodedata_table, text):
    assert gpt2_split.split(text, unicodedata_table) == pattern.findall(text)


@given(text=any_text | tricky_text)
def test_scanner_with_regex_classes_equals_regex_on_any_text(pattern, regex_table, text):
    """With the table asked of `regex`, even characters Python does not know yet split alike."""
    assert gpt2_split.split(text, regex_table) == pattern.findall(text)


@given(text=any_text)
def test_chunks_cover_the_text(text):
    chunks = gpt2_split.split(text)
    assert "".join(chunks) == text and all(chunks)


def test_tokenizer_without_regex_encodes_the_same(monkeypatch):
    normal = numformer.load_tokenizer(FIXTURE)
    texts = [t for t, _ in CASES] + ["<|endoftext|>x<|endoftext|>", "numbers 12345 and 'quotes'\n\n"]
    expected = [(normal.encode(t), normal.encode(t, allowed_special=True)) for t in texts]
    monkeypatch.setattr(g, "_regex", None)
    for use_extension in (False, True):
        tok = GPT2Tokenizer(normal.ranks, normal.merges, normal.special_tokens, use_extension=use_extension)
        assert tok._regex is None
        assert [(tok.encode(t), tok.encode(t, allowed_special=True)) for t in texts] == expected


def test_a_custom_pattern_without_regex_says_what_is_missing(monkeypatch):
    normal = numformer.load_tokenizer(FIXTURE)
    monkeypatch.setattr(g, "_regex", None)
    with pytest.raises(ImportError, match="regex"):
        GPT2Tokenizer(normal.ranks, normal.merges, normal.special_tokens, pattern=r"\p{L}+|.")
