"""The OpenAI request bodies the server accepts, checked field by field.

``parse_json`` turns the raw body into a dict; ``parse_completion`` and
``parse_embedding`` turn that dict into a typed request or raise
:class:`~numformer.serve.errors.APIError` naming the field. Checks here need
no model; those that need the tokenizer or the context length (prompt length,
``max_tokens`` against the context) live in :mod:`numformer.serve.models`.

Fields of OpenAI's API that numformer does not implement are accepted only
with their neutral value (``echo: false``, ``logprobs: null``,
``presence_penalty: 0``...), so a client that sends the defaults works and one
that asks for more gets a clear 400 instead of a silent no-op. Fields that
are not in the API at all are refused, as OpenAI does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from numformer.serve.errors import describe_char, invalid

# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (they keep one client from starving the others)."""

    max_body_bytes: int = 1 << 20        # 1 MiB: refused before the body is read in full
    max_n: int = 16                      # completions per prompt
    max_prompts: int = 32                # prompts in one completion request
    max_rows: int = 64                   # prompts × n
    max_inputs: int = 256                # texts in one embeddings request
    max_stop: int = 4                    # stop strings (OpenAI's limit)
    max_stop_chars: int = 256            # characters per stop string (each token scans for them)
    max_temperature: float = 2.0         # OpenAI's range is [0, 2]
    body_timeout: float = 30.0           # seconds to receive the whole body once the headers are in (408)
    header_timeout: float = 10.0         # seconds to receive a request's headers (the connection is closed)


DEFAULT_MAX_TOKENS = 16                  # OpenAI's default for /v1/completions


# ----------------------------------------------------------------------------- requests


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions`` body. ``prompts`` holds text or token-id lists."""

    model: str
    prompts: list                         # list[str | list[int]]
    max_tokens: int | None = None         # None: DEFAULT_MAX_TOKENS, shortened to fit the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None              # extension (not in OpenAI's API), as in vLLM
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False           # stream_options.include_usage


@dataclass
class EmbeddingRequest:
    """A checked ``POST /v1/embeddings`` body."""

    model: str
    inputs: list[str]
    encoding_format: str = "float"        # "float" or "base64" (little-endian float32)
    dimensions: int | None = None


# ----------------------------------------------------------------------------- JSON


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; 400 for anything else (bad UTF-8, bad JSON, NaN, a list...)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the request body is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                      f"{exc.start}: {exc.reason})") from None
    if not text.strip():
        raise invalid("the request body is empty; send a JSON object")
    try:
        body = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _show(value: Any) -> str:
    """``value`` as JSON, cut to 40 characters (a 4,000-digit number stays readable)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, param: str, where: str) -> str:
    """Refuse a lone surrogate in ``text`` (a JSON escape like ``"\\ud800"`` with no partner).

    It is not a Unicode character: it has no UTF-8 form, so no tokenizer can
    encode it faithfully (byte-level BPE would silently turn it into U+FFFD).
    ``where`` names the text in the message ("the prompt", "input 2"...).
    """
    m = _SURROGATE.search(text)
    if m is not None:
        raise invalid(f"{where} has a lone surrogate {describe_char(m.group())} at position {m.start()}, "
                      "which is not a valid Unicode character (pair it or remove it)", param=param,
                      code="invalid_unicode")
    return text


def _kind(value: Any) -> str:
    """JSON's name for the type of ``value``, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ----------------------------------------------------------------------------- field readers


class _Fields:
    """Reads typed fields out of a body dict and remembers which were read."""

    def __init__(self, body: dict):
        self.body = body
        self.seen: set[str] = set()

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.body.get(name)

    def string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        v = self.get(name)
        if v is None:
            if required:
                raise invalid(f"'{name}' is required", param=name)
            return default
        if not isinstance(v, str):
            raise invalid(f"'{name}' must be a string, got {_kind(v)}", param=name)
        return v

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise invalid(f"'{name}' must be an integer, got {_kind(v)} {_show(v)}", param=name)
        v = int(v)
        if lo is not None and v < lo:
            raise invalid(f"'{name}' must be >= {lo}, got {_show(v)}", param=name)
        if hi is not None and v > hi:
            raise invalid(f"'{name}' must be <= {hi}, got {_show(v)}", param=name)
        return v

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise invalid(f"'{name}' must be a number, got {_kind(v)}", param=name)
        # compare before float(): an int beyond float's range (10**400) would overflow there
        if (v <= lo if lo_open else v < lo) or v > hi:
            left = "(" if lo_open else "["
            raise invalid(f"'{name}' must be in {left}{lo:g}, {hi:g}], got {_show(v)}", param=name)
        return float(v)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(f"'{name}' must be a boolean, got {_kind(v)}", param=name)
        return v

    def neutral(self, name: str, allowed: tuple, what: str) -> None:
        """An OpenAI field numformer does not implement: only its neutral value(s) pass."""
        v = self.get(name)
        if v is None or any(type(v) is type(a) and v == a for a in allowed):
            return
        raise invalid(f"'{name}' is not supported by this server ({what}); leave it out", param=name,
                      code="unsupported_parameter")

    def finish(self, known_ignored: tuple = ()) -> None:
        """Refuse fields that are not part of the API (OpenAI does the same)."""
        unknown = [k for k in self.body if k not in self.seen and k not in known_ignored]
        if unknown:
            raise invalid(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                          code="unknown_parameter")


# ----------------------------------------------------------------------------- completions


def _prompts(value: Any, limits: Limits) -> list:
    """OpenAI's four prompt forms -> a list of prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [check_text(value, "prompt", "the prompt")]
    if not isinstance(value, list) or not value:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                      f"token-id lists (non-empty), got {_kind(value) if value != [] else 'an empty array'}",
                      param="prompt")
    if all(_is_token(t) for t in value):
        return [list(value)]
    if all(isinstance(p, str) for p in value):
        prompts = [check_text(p, "prompt", f"prompt {i}") for i, p in enumerate(value)]
    elif all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
        prompts = [list(p) for p in value]
    else:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                      "non-empty token-id lists; this one mixes types", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise invalid(f"'prompt' holds {len(prompts)} prompts; at most {limits.max_prompts} per request",
                      param="prompt")
    return prompts


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _stop(value: Any, limits: Limits) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or a list of strings, got {_kind(value)}", param="stop")
    if len(stops) > limits.max_stop:
        raise invalid(f"'stop' holds {len(stops)} strings; at most {limits.max_stop}", param="stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' strings must not be empty", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise invalid(f"'stop' strings may have at most {limits.max_stop_chars} characters", param="stop")
    for i, s in enumerate(stops):
        check_text(s, "stop", f"stop string {i}")
    return stops


def parse_completion(body: dict, limits: Limits = Limits()) -> CompletionRequest:
    """A ``/v1/completions`` body -> :class:`CompletionRequest` (400 on the first bad field)."""
    f = _Fields(body)
    model = f.string("model", required=True)
    if "prompt" not in body:
        raise invalid("'prompt' is required", param="prompt")
    prompts = _prompts(f.get("prompt"), limits)
    max_tokens = f.integer("max_tokens", None, lo=1)
    temperature = f.number("temperature", 1.0, 0.0, limits.max_temperature)
    top_p = f.number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = f.integer("top_k", None, lo=1)
    n = f.integer("n", 1, lo=1, hi=limits.max_n)
    best_of = f.integer("best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise invalid("'best_of' is not supported by this server unless it equals 'n'", param="best_of",
                      code="unsupported_parameter")
    if len(prompts) * n > limits.max_rows:
        raise invalid(f"{len(prompts)} prompts × n={n} asks for {len(prompts) * n} completions; at most "
                      f"{limits.max_rows} per request", param="n")
    stop = _stop(f.get("stop"), limits)
    seed = f.integer("seed", None, lo=-(2 ** 63), hi=2 ** 63 - 1)
    stream = f.boolean("stream", False)
    include_usage = False
    opts = f.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid(f"'stream_options' must be an object, got {_kind(opts)}", param="stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        bad = [k for k in opts if k != "include_usage"]
        if bad:
            raise invalid(f"unrecognized stream option: {bad[0]}", param="stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("'stream_options.include_usage' must be a boolean", param="stream_options")
    f.neutral("echo", (False,), "the prompt is not echoed")
    f.neutral("logprobs", (0,), "no log probabilities")
    f.neutral("presence_penalty", (0, 0.0), "no penalties")
    f.neutral("frequency_penalty", (0, 0.0), "no penalties")
    f.neutral("logit_bias", ({},), "no logit bias")
    f.neutral("suffix", ("",), "no insertion")
    f.string("user")                       # an end-user id for abuse tracking: accepted, unused
    f.finish()
    return CompletionRequest(model=model, prompts=prompts, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, n=n, stop=stop, seed=seed, stream=stream,
                             include_usage=include_usage)


# ----------------------------------------------------------------------------- embeddings


def parse_embedding(body: dict, limits: Limits = Limits()) -> EmbeddingRequest:
    """A ``/v1/embeddings`` body -> :class:`EmbeddingRequest` (400 on the first bad field)."""
    f = _Fields(body)
    model = f.string("model", required=True)
    if "input" not in body:
        raise invalid("'input' is required", param="input")
    value = f.get("input")
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        inputs = list(value)
    elif isinstance(value, list) and value and all(_is_token(t) or isinstance(t, list) for t in value):
        raise invalid("'input' as token ids is not supported by this server; send text", param="input",
                      code="unsupported_parameter")
    else:
        raise invalid(f"'input' must be a string or a non-empty list of strings, got "
                      f"{_kind(value) if value != [] else 'an empty array'}", param="input")
    if len(inputs) > limits.max_inputs:
        raise invalid(f"'input' holds {len(inputs)} texts; at most {limits.max_inputs} per request", param="input")
    for i, text in enumerate(inputs):
        check_text(text, "input", "the input" if isinstance(value, str) else f"input {i}")
    fmt = f.string("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dimensions = f.integer("dimensions", None, lo=1)
    f.string("user")
    f.finish()
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=fmt, dimensions=dimensions)
