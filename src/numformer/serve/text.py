"""Token ids -> text, one token at a time, cut at stop strings.

A token may end in the middle of a UTF-8 character (byte-level BPE splits
them), and the start of a stop string must not be sent before we know
whether the whole stop string follows. :class:`TextStream` handles both:

    ts = TextStream(tokenizer, stop=["\\n\\n"])
    for t in tokens:
        send(ts.feed(t))          # text that is safe to send now ("" while held back)
        if ts.stopped:            # a stop string appeared: the text ends before it
            break
    send(ts.finish())             # whatever was held back (nothing after a stop)
"""

from __future__ import annotations

import codecs
from typing import Sequence


class TextStream:
    """Incremental detokenizer with stop strings (see the module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._bytes_of = _token_bytes_function(tokenizer)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""           # decoded text held back: it may be the start of a stop string
        self.text = ""               # everything sent so far
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that can be sent now."""
        if self.stopped:
            return ""
        return self._push(self._decoder.decode(self._bytes_of(token_id)))

    def finish(self) -> str:
        """End of generation: return the rest (incomplete UTF-8 becomes U+FFFD)."""
        if self.stopped:
            return ""
        out = self._push(self._decoder.decode(b"", final=True))
        if not self.stopped:
            out += self._pending
            self.text += self._pending
            self._pending = ""
        return out

    def _push(self, new: str) -> str:
        buf = self._pending + new
        cut = min((i for i in (buf.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:                                   # a stop string: the text ends right before it
            self.stopped = True
            self._pending = ""
            self.text += buf[:cut]
            return buf[:cut]
        hold = _partial_stop_suffix(buf, self._stop)
        send, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += send
        return send


def _partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


REPLACEMENT = "\ufffd".encode("utf-8")


def _token_bytes_function(tokenizer):
    """A function id -> bytes for the tokenizer.

    An id the tokenizer cannot decode (a model whose vocabulary is padded past
    the tokenizer's) becomes U+FFFD instead of failing the whole batch.
    """
    decode = tokenizer.decode_bytes if hasattr(tokenizer, "decode_bytes") else \
        (lambda ids: tokenizer.decode(ids).encode("utf-8"))

    def token_bytes(t: int) -> bytes:
        try:
            return decode([t])
        except (ValueError, IndexError, KeyError):
            return REPLACEMENT
    return token_bytes
