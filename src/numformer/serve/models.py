"""The model a server serves: loading it, and the checks that need its tokenizer and context.

:func:`load_served_model` accepts the folders the rest of numformer reads:

- a numformer checkpoint (``numformer train`` output) -> text completion (GPT-2)
- a Hugging Face GPT-2 folder -> text completion
- a Hugging Face BERT / sentence-transformers folder -> embeddings

:func:`plan_completion` and :func:`check_embedding_inputs` tokenize a checked
request and hold it against the context length: a prompt that does not fit,
or ``max_tokens`` that would run past the context, is a 400 here, before any
model work is queued.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from numformer.serve.errors import APIError, describe_char, invalid
from numformer.serve.protocol import DEFAULT_MAX_TOKENS, CompletionRequest, EmbeddingRequest

COMPLETION = "completion"
EMBEDDING = "embedding"


@dataclass
class ServedModel:
    """A loaded model with what the server needs to know about it.

    ``kind`` is :data:`COMPLETION` (a GPT-2: ``model``, ``tokenizer``) or
    :data:`EMBEDDING` (a :class:`~numformer.sentence.SentenceEncoder` in
    ``encoder``). ``context_length`` is the most tokens one sequence may hold.
    """

    name: str
    kind: str
    context_length: int
    model: object = None
    tokenizer: object = None
    encoder: object = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def eot_id(self) -> int | None:
        return getattr(self.tokenizer, "eot_id", None) if self.kind == COMPLETION else None

    @property
    def embedding_dim(self) -> int | None:
        return self.encoder.model.cfg.hidden_size if self.kind == EMBEDDING else None


def load_served_model(path: str | os.PathLike, name: str | None = None) -> ServedModel:
    """Load ``path`` (see the module docstring); ``name`` defaults to the folder's name.

    Raises :class:`~numformer.checkpoint.CheckpointError` (a ``ValueError``)
    for a folder that cannot be served.
    """
    from numformer import checkpoint, pretrained

    path = os.fspath(path)
    folder = checkpoint.resolve(path)
    name = name or os.path.basename(os.path.normpath(os.path.abspath(path)))
    if os.path.exists(os.path.join(folder, checkpoint.TOKENIZER_FILE)):
        model, tok = checkpoint.load_model(folder), checkpoint.load_tokenizer(folder)
        return ServedModel(name, COMPLETION, model.cfg.n_positions, model=model, tokenizer=tok)
    model_type = pretrained.read_config(folder).get("model_type")
    if model_type == "bert":
        from numformer.sentence import load_sentence_encoder

        try:
            enc = load_sentence_encoder(folder)
        except FileNotFoundError as exc:
            raise checkpoint.CheckpointError(f"{folder}: cannot load the tokenizer ({exc})") from None
        return ServedModel(name, EMBEDDING, enc.max_seq_length, encoder=enc, tokenizer=enc.tokenizer)
    model = pretrained.from_pretrained(folder)
    from numformer.models.gpt2 import GPT2

    if not isinstance(model, GPT2):
        raise checkpoint.CheckpointError(f"{folder}: a {type(model).__name__} cannot be served "
                                         "(GPT-2 for completions, BERT for embeddings)")
    try:
        tok = pretrained.load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{folder}: cannot load the tokenizer ({exc})") from None
    return ServedModel(name, COMPLETION, model.cfg.n_positions, model=model, tokenizer=tok)


# ----------------------------------------------------------------------------- completions


@dataclass
class Row:
    """One sequence to generate: one choice of one prompt."""

    index: int                     # the choice's index in the response (prompt i, sample j -> i·n + j)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    seed: int | None
    stop: list[str]


# what a tokenizer raises for text it cannot encode (CharTokenizer: ValueError naming the character)
_ENCODE_ERRORS = (ValueError, KeyError, IndexError)


def encode_text(tokenizer, text: str, param: str, where: str) -> list[int]:
    """``tokenizer.encode(text)``; text it cannot encode is a 400 naming the character and its position.

    A character-level model knows only the characters of its training text:
    an emoji, a tab or a NUL it never saw cannot be encoded. The tokenizer's
    own error would otherwise escape as a 500. ``where`` names the text in
    the message ("the prompt", "prompt 2", "input 0").
    """
    try:
        return tokenizer.encode(text)
    except _ENCODE_ERRORS as exc:
        raise unencodable(tokenizer, text, param, where, exc) from None


def unencodable(tokenizer, text: str, param: str, where: str, exc: Exception) -> APIError:
    """The 400 for ``text`` that ``tokenizer`` failed on: find the first character it cannot encode alone."""
    for c in dict.fromkeys(text):              # distinct characters, in order of first appearance
        try:
            tokenizer.encode(c)
        except _ENCODE_ERRORS:
            return invalid(f"{where} has a character this model's tokenizer cannot encode: {describe_char(c)} "
                           f"at position {text.index(c)}; remove or replace it", param=param,
                           code="unencodable_character")
    return invalid(f"{where} cannot be encoded by this model's tokenizer ({type(exc).__name__}: {exc})",
                   param=param, code="unencodable_character")


def encode_prompt(served: ServedModel, prompt, where: str = "the prompt") -> list[int]:
    """A prompt (text or token ids) -> token ids, checked against the vocabulary.

    An empty text prompt starts a new document: it becomes the end-of-text
    token, as ``numformer sample`` does (a GPT-2 needs at least one token).
    """
    tok = served.tokenizer
    if isinstance(prompt, str):
        ids = encode_text(tok, prompt, "prompt", where)
        if not ids:
            if served.eot_id is None:
                raise invalid("the prompt is empty and this tokenizer has no end-of-text token to start "
                              "from; give some text", param="prompt")
            ids = [served.eot_id]
        return ids
    vocab = served.model.cfg.vocab_size
    k = next((k for k, t in enumerate(prompt) if not 0 <= t < vocab), None)
    if k is not None:
        shown = str(prompt[k]) if len(str(prompt[k])) <= 40 else str(prompt[k])[:37] + "..."
        raise invalid(f"token id {shown} at position {k} of {where} is outside the vocabulary [0, {vocab})",
                      param="prompt")
    return list(prompt)


def plan_completion(served: ServedModel, req: CompletionRequest) -> tuple[list[Row], int]:
    """Tokenize the prompts and fit them to the context -> (rows, prompt token count).

    Rows come prompt-major: prompt i's n choices are rows i·n … i·n + n − 1.
    Choice j of a seeded request uses seed + j, so ``n=1`` with seed s gives
    the same text as the first choice of ``n=2`` with seed s.
    """
    ctx = served.context_length
    rows, prompt_tokens = [], 0
    for i, prompt in enumerate(req.prompts):
        where = f"prompt {i}" if len(req.prompts) > 1 else "the prompt"
        ids = encode_prompt(served, prompt, where)
        prompt_tokens += len(ids)
        if len(ids) >= ctx:
            raise invalid(f"this model's maximum context length is {ctx} tokens; {where} has {len(ids)} "
                          f"tokens and leaves no room for a completion", param="prompt",
                          code="context_length_exceeded")
        if req.max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, ctx - len(ids))
        elif len(ids) + req.max_tokens > ctx:
            raise invalid(f"this model's maximum context length is {ctx} tokens; you requested "
                          f"{len(ids) + req.max_tokens} ({len(ids)} in {where}, {req.max_tokens} for the "
                          f"completion). Reduce the prompt or max_tokens", param="max_tokens",
                          code="context_length_exceeded")
        else:
            max_tokens = req.max_tokens
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % 2 ** 64    # NumPy seeds are >= 0
            rows.append(Row(i * req.n + j, ids, max_tokens, req.temperature, req.top_p, req.top_k, seed,
                            req.stop))
    return rows, prompt_tokens


# ----------------------------------------------------------------------------- embeddings


def check_embedding_inputs(served: ServedModel, req: EmbeddingRequest) -> int:
    """Token counts of the inputs, each within the encoder's maximum length -> total tokens."""
    if req.dimensions is not None and req.dimensions != served.embedding_dim:
        raise invalid(f"'dimensions' {req.dimensions} is not supported: this model's embeddings have "
                      f"{served.embedding_dim} dimensions (leave 'dimensions' out)", param="dimensions")
    tok, limit, total = served.tokenizer, served.context_length, 0
    for i, text in enumerate(req.inputs):
        n = len(encode_text(tok, text, "input", f"input {i}" if len(req.inputs) > 1 else "the input"))
        if n > limit:
            raise invalid(f"this model's maximum input length is {limit} tokens; input {i} has {n}",
                          param="input", code="context_length_exceeded")
        total += n
    return total
