"""WordPiece, BERT's tokenizer, compatible with Hugging Face ``tokenizers``.

Encoding a text runs four stages, each as the ``tokenizers`` library does them:

1. **Added tokens.** Literal special tokens (``[CLS]``, ``[MASK]``, ...) in the
   raw text are cut out first and map straight to their ids.
2. **Normalization** (``BertNormalizer``), in this order:
   clean-up (control/format/private-use characters and U+FFFD removed, every
   whitespace character becomes a space) → a space on both sides of each CJK
   ideograph → accent stripping (NFD, then drop non-spacing marks; on by
   default when lower-casing) → lower-casing, character by character.
3. **Pre-tokenization** (``BertPreTokenizer``): split on whitespace and
   isolate each punctuation character (Unicode P* plus the ASCII symbols
   ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~``).
4. **WordPiece** per word: greedy longest-match-first against the vocabulary;
   pieces after the first carry the ``##`` prefix. A word with no complete
   segmentation, or longer than ``max_input_chars_per_word``, becomes ``[UNK]``.

Then ``[CLS] … [SEP]`` (``[CLS] A [SEP] B [SEP]`` for pairs, token types 0/1)
and truncation to a maximum length that counts those special tokens.

Character classes come from :mod:`numformer.tokenizers._bert_unicode`, probed
from ``tokenizers`` itself (its Rust code uses Unicode 8.0 categories, not the
interpreter's), so the ids are the same on every Python version.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from numformer import jsonfile
from numformer.configcheck import Bool, ConfigFieldError, Int, check_keys

from . import _bert_unicode as _U
from .base import Tokenizer, as_id_list, fail

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Rust's char::is_whitespace (the Unicode White_Space property). Not Python's
# \s, which also matches U+001C..U+001F.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# CJK ideograph blocks, as BERT defines "Chinese characters".
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _cls(ranges) -> str:
    """Regex character-class body for inclusive code point ranges."""
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


_CONTROL_RE = re.compile(f"[{_cls(_U.CONTROL)}]+")
_WHITESPACE_RE = re.compile(f"[{_WHITESPACE}]")
_CJK_RE = re.compile(f"[{_cls(_CJK)}]")
_MARKS_RE = re.compile(f"[{_cls(_U.NONSPACING_MARKS)}]+")
_NFD_EXEMPT_RE = re.compile(f"([{_cls(_U.NFD_EXEMPT)}])") if _U.NFD_EXEMPT else None
_LOWER_OVERRIDE_RE = re.compile("[" + "".join(f"\\U{c:08x}" for c in _U.LOWER_OVERRIDES) + "]")
_PUNCT = _cls(_U.PUNCTUATION)
_WORD_RE = re.compile(f"[{_PUNCT}]|[^{_PUNCT}{_WHITESPACE}]+")


@dataclass
class AddedToken:
    """A literal token matched in the text before anything else (HF ``added_tokens``)."""

    content: str
    id: int
    special: bool = True
    normalized: bool = False        # matched in the normalized text (else in the raw text)
    lstrip: bool = False            # also swallow whitespace on the left
    rstrip: bool = False            # ... and on the right
    single_word: bool = False       # only when not inside a word


@dataclass
class BatchEncoding:
    """Padded batch: three (B, T) int64 arrays, padding on the right."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer. See the module docstring for the pipeline.

    ``max_length`` is the model's maximum sequence length (special tokens
    included), used by :meth:`batch` and as the default for :meth:`encode`
    with ``truncation=True``.
    """

    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str], *, unk_token: str = "[UNK]", prefix: str = "##",
                 max_input_chars_per_word: int = 100, clean_text: bool = True,
                 handle_chinese_chars: bool = True, strip_accents: bool | None = None,
                 lowercase: bool = True, cls_token: str | None = "[CLS]", sep_token: str | None = "[SEP]",
                 pad_token: str = "[PAD]", added_tokens: Iterable[AddedToken] | None = None,
                 max_length: int | None = None, source: str = "<vocab>"):
        self.tokens = list(vocab)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        if len(self.vocab) != len(self.tokens):
            dup = next(t for i, t in enumerate(self.tokens) if self.vocab[t] != i)
            raise fail(source, f"token {dup!r} appears twice in the vocabulary")
        try:        # typed settings: "false" or 1 is not a bool, True is not a length
            max_input_chars_per_word = Int(min=1)(None, "max_input_chars_per_word", max_input_chars_per_word)
            max_length = Int(min=3, optional=True)(None, "max_length", max_length)
            clean_text, handle_chinese_chars, lowercase = (
                Bool()(None, name, v) for name, v in (("clean_text", clean_text),
                                                      ("handle_chinese_chars", handle_chinese_chars),
                                                      ("lowercase", lowercase)))
            strip_accents = Bool(optional=True)(None, "strip_accents", strip_accents)
            for name, tok in (("prefix", prefix), ("unk_token", unk_token), ("pad_token", pad_token),
                              ("cls_token", cls_token), ("sep_token", sep_token)):
                if not (isinstance(tok, str) or (tok is None and name in ("cls_token", "sep_token"))):
                    raise ConfigFieldError(None, name, tok, "a string")
        except ConfigFieldError as e:
            raise fail(source, str(e)) from None
        for name, tok in (("unk_token", unk_token), ("pad_token", pad_token), ("cls_token", cls_token),
                          ("sep_token", sep_token)):
            if tok is not None and tok not in self.vocab:
                raise fail(source, f"{name} {tok!r} is not in the vocabulary")
        self.unk_token, self.prefix = unk_token, prefix
        self.unk_id = self.vocab[unk_token]
        self.max_input_chars_per_word = max_input_chars_per_word
        self.clean_text, self.handle_chinese_chars = clean_text, handle_chinese_chars
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.cls_token, self.sep_token, self.pad_token = cls_token, sep_token, pad_token
        self.cls_id = None if cls_token is None else self.vocab[cls_token]
        self.sep_id = None if sep_token is None else self.vocab[sep_token]
        self.pad_id = self.vocab[pad_token]
        self.max_length = max_length
        if added_tokens is None:
            added_tokens = [AddedToken(t, self.vocab[t]) for t in SPECIAL_TOKENS if t in self.vocab]
        self.added_tokens = list(added_tokens)
        for a in self.added_tokens:
            if not a.content:
                raise fail(source, "an added token has empty content")
            if not 0 <= a.id < len(self.tokens) and a.id != len(self.tokens):
                raise fail(source, f"added token {a.content!r} has id {a.id} outside the vocabulary")
        self._special_ids = {a.id for a in self.added_tokens if a.special}
        self._longest = max((len(t) for t in self.tokens), default=1)
        self._cache: dict[str, list[int]] = {}
        self._raw_split = self._splitter([a for a in self.added_tokens if not a.normalized], normalize=False)
        self._norm_split = self._splitter([a for a in self.added_tokens if a.normalized], normalize=True)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eot_id(self) -> int:
        """The separator, which ends every encoded sequence."""
        return self.sep_id if self.sep_id is not None else self.pad_id

    @property
    def num_special_tokens(self) -> int:
        return (self.cls_id is not None) + (self.sep_id is not None)

    # -------------------------------------------------------- normalization
    def normalize(self, text: str) -> str:
        """``BertNormalizer``: clean-up, CJK spacing, accent stripping, lower-casing."""
        if self.clean_text:
            text = _CONTROL_RE.sub("", text)
            text = _WHITESPACE_RE.sub(" ", text)
        if self.handle_chinese_chars:
            text = _CJK_RE.sub(r" \g<0> ", text)
        if self.lowercase if self.strip_accents is None else self.strip_accents:
            if text.isascii():
                pass                                            # nothing to decompose
            elif _NFD_EXEMPT_RE is not None and _NFD_EXEMPT_RE.search(text):
                parts = _NFD_EXEMPT_RE.split(text)              # exempt characters sit at odd indices
                text = "".join(p if i % 2 else unicodedata.normalize("NFD", p) for i, p in enumerate(parts))
            else:
                text = unicodedata.normalize("NFD", text)
            if not text.isascii():
                text = _MARKS_RE.sub("", text)
        if self.lowercase:
            if not text.isascii():
                # per character, as Rust does: no final-sigma rule (Python maps a word-final Σ to ς)
                text = text.replace("\u03a3", "\u03c3")
                if _LOWER_OVERRIDE_RE.search(text):
                    text = text.translate(_U.LOWER_OVERRIDES)
            text = text.lower()
        return text

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """``BertPreTokenizer``: words split on whitespace, punctuation isolated."""
        return _WORD_RE.findall(text)

    # ---------------------------------------------------------- added tokens
    def _splitter(self, added: list[AddedToken], normalize: bool):
        """A function text -> list of (str piece, None) / (None, token id), or None if no tokens."""
        if not added:
            return None
        by_content = {}
        for a in added:
            content = self.normalize(a.content) if normalize else a.content
            by_content.setdefault(content, a)
        alternatives = sorted(by_content, key=len, reverse=True)      # longest match first
        pattern = re.compile("|".join(re.escape(c) for c in alternatives))
        ws = re.compile(f"[{_WHITESPACE}]*")

        def split(text: str):
            out, pos = [], 0
            for m in pattern.finditer(text):
                a = by_content[m.group()]
                start, end = m.start(), m.end()
                if a.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                      or (end < len(text) and _is_word_char(text[end]))):
                    continue
                if start < pos:
                    continue
                if a.lstrip:
                    while start > pos and _WHITESPACE_RE.match(text[start - 1]):
                        start -= 1
                if a.rstrip:
                    end = ws.match(text, end).end()
                if start > pos:
                    out.append((text[pos:start], None))
                out.append((None, a.id))
                pos = end
            if pos < len(text):
                out.append((text[pos:], None))
            return out

        return split

    # ------------------------------------------------------------- wordpiece
    def _word_ids(self, word: str) -> list[int]:
        """Greedy longest-match-first segmentation of one word (cached)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        n = len(word)
        if n > self.max_input_chars_per_word:
            ids = [self.unk_id]
        else:
            ids, start = [], 0
            vocab, prefix = self.vocab, self.prefix
            while start < n:
                end = min(n, start + self._longest)
                found = None
                while start < end:                       # shrink from the right until a piece is known
                    piece = word[start:end] if start == 0 else prefix + word[start:end]
                    found = vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:                        # no piece fits: the whole word is unknown
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        """Normalize, split on normalized added tokens, pre-tokenize, WordPiece."""
        text = self.normalize(text)
        pieces = [(text, None)] if self._norm_split is None else self._norm_split(text)
        out: list[int] = []
        for piece, tid in pieces:
            if piece is None:
                out.append(tid)
                continue
            for word in _WORD_RE.findall(piece):
                out.extend(self._word_ids(word))
        return out

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without [CLS]/[SEP] and without truncation."""
        if self._raw_split is None:
            return self._plain_ids(text)
        out: list[int] = []
        for piece, tid in self._raw_split(text):
            if piece is None:
                out.append(tid)
            else:
                out.extend(self._plain_ids(piece))
        return out

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of ``text`` as strings (no special tokens added)."""
        return [self.tokens[i] for i in self.tokenize_ids(text)]

    # -------------------------------------------------------------- encoding
    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
               max_length: int | None = None, truncation: bool = False) -> list[int]:
        """Token ids of ``text`` (and ``pair``), with ``[CLS] … [SEP]`` unless told not to.

        Truncation happens when ``max_length`` is given, or with ``truncation=True``
        to the tokenizer's ``max_length``; the length counts the special tokens.
        """
        return self.encode_with_types(text, pair, add_special_tokens=add_special_tokens,
                                      max_length=max_length, truncation=truncation)[0]

    def encode_with_types(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
                          max_length: int | None = None, truncation: bool = False):
        """(ids, token_type_ids) of one text or a pair; see :meth:`encode`."""
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise TypeError("encode expects str input")
        if max_length is None and truncation:
            max_length = self.max_length
        a = self.tokenize_ids(text)
        b = None if pair is None else self.tokenize_ids(pair)
        n_special = 0
        if add_special_tokens:
            n_special = self.num_special_tokens + (0 if b is None else (self.sep_id is not None))
        if max_length is not None:
            budget = max_length - n_special
            if budget < 0:
                raise ValueError(f"max_length {max_length} leaves no room for the {n_special} special tokens")
            a, b = _truncate(a, b, budget)
        cls = [self.cls_id] if add_special_tokens and self.cls_id is not None else []
        sep = [self.sep_id] if add_special_tokens and self.sep_id is not None else []
        ids = cls + a + sep
        types = [0] * len(ids)
        if b is not None:
            ids += b + sep
            types += [1] * (len(b) + len(sep))
        return ids, types

    def batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
              max_length: int | None = None, add_special_tokens: bool = True) -> BatchEncoding:
        """Encode many texts, truncated to ``max_length`` (default: the tokenizer's) and
        right-padded with ``[PAD]`` to the longest; attention_mask is 1 on real tokens."""
        if isinstance(texts, str):
            raise TypeError("batch expects a list of texts, not one string")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        max_length = self.max_length if max_length is None else max_length
        rows = [self.encode_with_types(t, None if pairs is None else pairs[i], max_length=max_length,
                                       add_special_tokens=add_special_tokens) for i, t in enumerate(texts)]
        T = max((len(r[0]) for r in rows), default=0)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        types = np.zeros((len(rows), T), dtype=np.int64)
        for i, (r, tt) in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
            types[i, :len(r)] = tt
        return BatchEncoding(ids, mask, types)

    def __call__(self, texts, **kwargs) -> BatchEncoding:
        return self.batch([texts] if isinstance(texts, str) else texts, **kwargs)

    # -------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, cleanup: bool = True) -> str:
        """Join word pieces back into text, as HF's ``WordPiece`` decoder.

        ``##`` continuations attach to the previous piece, other pieces get a
        space. ``cleanup`` is applied *per piece*, as in ``tokenizers``: a lone
        " ." " ?" " !" " ," loses its space (so ``don ' t`` stays as it is).
        Lower-casing and accent stripping cannot be undone.
        """
        ids = as_id_list(ids, self.vocab_size)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        parts = []
        for n, i in enumerate(ids):
            tok = self.tokens[i]
            if n and tok.startswith(self.prefix):
                tok = tok[len(self.prefix):]
            elif n:
                tok = " " + tok
            if cleanup:
                tok = _cleanup(tok)
            parts.append(tok)
        return "".join(parts)

    # ---------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "version": FORMAT_VERSION, "vocab": self.tokens,
            "unk_token": self.unk_token, "prefix": self.prefix,
            "max_input_chars_per_word": self.max_input_chars_per_word,
            "clean_text": self.clean_text, "handle_chinese_chars": self.handle_chinese_chars,
            "strip_accents": self.strip_accents, "lowercase": self.lowercase,
            "cls_token": self.cls_token, "sep_token": self.sep_token, "pad_token": self.pad_token,
            "max_length": self.max_length,
            "added_tokens": [vars(a) for a in self.added_tokens],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "WordPieceTokenizer":
        if d.get("version") != FORMAT_VERSION:
            raise fail(source, f"unsupported version {d.get('version')!r} (expected {FORMAT_VERSION})")
        vocab = d.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise fail(source, "'vocab' must be a list of strings")
        try:
            added = [AddedToken(**a) for a in d.get("added_tokens", [])]
        except TypeError as e:
            raise fail(source, f"bad added token ({e})") from None
        keys = ("unk_token", "prefix", "max_input_chars_per_word", "clean_text", "handle_chinese_chars",
                "strip_accents", "lowercase", "cls_token", "sep_token", "pad_token", "max_length")
        return cls(vocab, added_tokens=added, source=source, **{k: d[k] for k in keys if k in d})

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, max_length: int | None = None) -> "WordPieceTokenizer":
        """Read a Hugging Face ``tokenizer.json`` whose model is WordPiece."""
        source = os.fspath(path)
        d = _read_json(source)
        if not isinstance(d, dict):
            raise fail(source, f"expected a JSON object, got {type(d).__name__}")
        model = d.get("model")
        if not isinstance(model, dict):
            raise fail(source, "missing the 'model' object")
        if model.get("type") != "WordPiece":
            raise fail(source, f"model type {model.get('type')!r} is not WordPiece")
        raw_vocab = model.get("vocab")
        if not isinstance(raw_vocab, dict) or not raw_vocab:
            raise fail(source, "model.vocab must be a non-empty object of token -> id")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw_vocab.values()):
            raise fail(source, "model.vocab ids must be integers")
        ids = sorted(raw_vocab.values())
        if ids != list(range(len(ids))):
            raise fail(source, "model.vocab ids must be 0..N-1, each once")
        tokens = [""] * len(ids)
        for t, i in raw_vocab.items():
            tokens[i] = t
        opts: dict[str, Any] = dict(
            unk_token=model.get("unk_token", "[UNK]"),
            prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=model.get("max_input_chars_per_word", 100))
        norm = d.get("normalizer")
        if norm is None:
            opts.update(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)
        elif isinstance(norm, dict) and norm.get("type") == "BertNormalizer":
            opts.update(clean_text=norm.get("clean_text", True),     # types checked by __init__
                        handle_chinese_chars=norm.get("handle_chinese_chars", True),
                        strip_accents=norm.get("strip_accents"), lowercase=norm.get("lowercase", True))
        else:
            kind = norm.get("type") if isinstance(norm, dict) else norm
            raise fail(source, f"normalizer {kind!r} is not supported (only BertNormalizer)")
        pre = d.get("pre_tokenizer")
        if not (isinstance(pre, dict) and pre.get("type") == "BertPreTokenizer"):
            kind = pre.get("type") if isinstance(pre, dict) else pre
            raise fail(source, f"pre_tokenizer {kind!r} is not supported (only BertPreTokenizer)")
        opts.update(_read_post_processor(d.get("post_processor"), tokens, source))
        added = []
        for a in d.get("added_tokens") or []:
            if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int) \
                    or isinstance(a.get("id"), bool):
                raise fail(source, f"malformed added token {a!r:.80}")
            flags = ("special", "normalized", "lstrip", "rstrip", "single_word")
            try:
                values = [Bool()(None, f"added token {a['content']!r}: {k}", a.get(k, False)) for k in flags]
            except ConfigFieldError as e:
                raise fail(source, str(e)) from None
            added.append(AddedToken(a["content"], a["id"], *values))
            if a["id"] >= len(tokens) or tokens[a["id"]] != a["content"]:
                raise fail(source, f"added token {a['content']!r} (id {a['id']}) is not that vocabulary entry")
        if max_length is None and isinstance(d.get("truncation"), dict):
            max_length = d["truncation"].get("max_length")
        for tok in ("[PAD]", "<pad>"):
            if tok in raw_vocab:
                opts.setdefault("pad_token", tok)
                break
        else:
            opts.setdefault("pad_token", opts["unk_token"])
        if isinstance(d.get("padding"), dict) and isinstance(d["padding"].get("pad_token"), str) \
                and d["padding"]["pad_token"] in raw_vocab:
            opts["pad_token"] = d["padding"]["pad_token"]
        return cls(tokens, added_tokens=added, max_length=max_length, source=source, **opts)

    @classmethod
    def from_vocab_txt(cls, path: str | os.PathLike, *, lowercase: bool = True, strip_accents: bool | None = None,
                       handle_chinese_chars: bool = True, max_length: int | None = None) -> "WordPieceTokenizer":
        """Read a ``vocab.txt`` (one token per line, id = line number) with BERT's defaults."""
        source = os.fspath(path)
        with open(source, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(source, f"not valid UTF-8 ({e})") from None
        tokens = text.split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        tokens = [t[:-1] if t.endswith("\r") else t for t in tokens]
        if not tokens:
            raise fail(source, "the vocabulary is empty")
        seen = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise fail(source, f"line {i + 1}: token {t!r} already on line {seen[t] + 1}")
            seen[t] = i
        for special in ("[UNK]",):
            if special not in seen:
                raise fail(source, f"the vocabulary has no {special} token")
        return cls(tokens, lowercase=lowercase, strip_accents=strip_accents,
                   handle_chinese_chars=handle_chinese_chars, max_length=max_length, source=source,
                   cls_token="[CLS]" if "[CLS]" in seen else None, sep_token="[SEP]" if "[SEP]" in seen else None,
                   pad_token="[PAD]" if "[PAD]" in seen else "[UNK]")


def _cleanup(piece: str) -> str:
    """HF's ``cleanup`` replacements, applied to one decoded piece."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        piece = piece.replace(a, b)
    return piece


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _truncate(a: list[int], b: list[int] | None, budget: int):
    """Cut to ``budget`` tokens in total: from the end of ``a`` alone, or for pairs
    longest-first (``tokenizers``' LongestFirst: the shorter one stays whole if it
    fits in half the budget, else both get half)."""
    if b is None:
        return a[:budget], None
    if len(a) + len(b) <= budget:
        return a, b
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if len(short) <= budget // 2:
        n_short, n_long = len(short), budget - len(short)
    else:
        n_long = (budget + 1) // 2
        n_short = budget - n_long
    if len(a) <= len(b):
        return a[:n_short], b[:n_long]
    return a[:n_long], b[:n_short]


def _read_json(path: str):
    return jsonfile.load(path, error=fail)     # any bad JSON: "bad tokenizer file PATH: ..."


def _read_post_processor(post, tokens: list[str], source: str) -> dict[str, Any]:
    """[CLS]/[SEP] from a ``TemplateProcessing`` or ``BertProcessing`` post-processor."""
    if post is None:
        return dict(cls_token=None, sep_token=None)
    if not isinstance(post, dict):
        raise fail(source, f"post_processor must be an object, got {type(post).__name__}")
    kind = post.get("type")
    if kind == "BertProcessing":
        try:
            (cls_tok, cls_id), (sep_tok, sep_id) = post["cls"], post["sep"]
        except (KeyError, TypeError, ValueError):
            raise fail(source, "BertProcessing needs 'cls' and 'sep' as [token, id]") from None
    elif kind == "TemplateProcessing":
        single = post.get("single")
        ok = (isinstance(single, list) and len(single) == 3 and "SpecialToken" in single[0]
              and "Sequence" in single[1] and "SpecialToken" in single[2])
        if not ok:
            raise fail(source, "only the template '[CLS] $A [SEP]' is supported")
        cls_tok, sep_tok = single[0]["SpecialToken"]["id"], single[2]["SpecialToken"]["id"]
        specials = post.get("special_tokens", {})
        try:
            cls_id, sep_id = specials[cls_tok]["ids"][0], specials[sep_tok]["ids"][0]
        except (KeyError, TypeError, IndexError):
            raise fail(source, "TemplateProcessing special_tokens lack the ids of its tokens") from None
    else:
        raise fail(source, f"post_processor {kind!r} is not supported")
    for tok, i in ((cls_tok, cls_id), (sep_tok, sep_id)):
        if not (isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] == tok):
            raise fail(source, f"post_processor token {tok!r} does not have id {i!r} in the vocabulary")
    return dict(cls_token=cls_tok, sep_token=sep_tok)


def load_wordpiece(path: str | os.PathLike, max_length: int | None = None) -> WordPieceTokenizer:
    """A WordPiece tokenizer from a Hugging Face model folder, a ``tokenizer.json`` or a ``vocab.txt``.

    In a folder, ``tokenizer.json`` is preferred; with only ``vocab.txt``,
    ``tokenizer_config.json`` supplies ``do_lower_case`` / ``strip_accents`` /
    ``tokenize_chinese_chars``. The maximum length is, in order: the argument,
    ``sentence_bert_config.json``'s ``max_seq_length``, ``tokenizer_config.json``'s
    ``model_max_length``, the ``truncation`` in ``tokenizer.json``.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg: dict[str, Any] = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise fail(cfg_path, "expected a JSON object")
            try:
                check_keys(cfg, {"do_lower_case": Bool(), "tokenize_chinese_chars": Bool(),
                                 "strip_accents": Bool(optional=True)})
            except ConfigFieldError as e:
                raise fail(cfg_path, str(e)) from None
        if max_length is None:
            st_path = os.path.join(folder, "sentence_bert_config.json")
            if os.path.isfile(st_path):
                st = _read_json(st_path)
                if not isinstance(st, dict):
                    raise fail(st_path, f"expected a JSON object, got {type(st).__name__}")
                try:
                    max_length = Int(min=3, optional=True)(None, "max_seq_length", st.get("max_seq_length"))
                except ConfigFieldError as e:
                    raise fail(st_path, str(e)) from None
        if max_length is None:
            mml = cfg.get("model_max_length")
            if isinstance(mml, int) and 3 <= mml <= 1_000_000:
                max_length = mml
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            path = os.path.join(folder, "tokenizer.json")
        elif os.path.isfile(os.path.join(folder, "vocab.txt")):
            path = os.path.join(folder, "vocab.txt")
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
    if path.endswith(".txt"):
        return WordPieceTokenizer.from_vocab_txt(   # types checked by __init__ (no bool("false"))
            path, lowercase=cfg.get("do_lower_case", True), strip_accents=cfg.get("strip_accents"),
            handle_chinese_chars=cfg.get("tokenize_chinese_chars", True), max_length=max_length)
    return WordPieceTokenizer.from_tokenizer_json(path, max_length=max_length)
