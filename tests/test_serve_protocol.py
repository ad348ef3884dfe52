"""The server's parts that need no HTTP stack: request checks, stop strings, planning, the engine's batching."""

import json
import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numformer import pretrained
from numformer.serve import engine as engine_mod
from numformer.serve.engine import Delta, Done, Engine, Failed, Finish, Job
from numformer.serve.errors import APIError
from numformer.serve.models import COMPLETION, Row, load_served_model, plan_completion
from numformer.serve.protocol import Limits, parse_completion, parse_embedding, parse_json
from numformer.serve.text import TextStream, _partial_stop_suffix

TINY_GPT2 = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-gpt2")


@pytest.fixture(scope="module")
def served():
    return load_served_model(TINY_GPT2)


# ----------------------------------------------------------------------------- request bodies


def test_parse_completion_defaults_and_prompt_forms():
    r = parse_completion({"model": "m", "prompt": "hi"})
    assert (r.prompts, r.max_tokens, r.temperature, r.top_p, r.n, r.stop, r.seed, r.stream) == \
        (["hi"], None, 1.0, 1.0, 1, [], None, False)
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    assert parse_completion({"model": "m", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    r = parse_completion({"model": "m", "prompt": "x", "stop": "\n", "stream": True,
                          "stream_options": {"include_usage": True}, "echo": False, "logprobs": None,
                          "presence_penalty": 0, "user": "u", "max_tokens": 5.0})
    assert r.stop == ["\n"] and r.include_usage and r.max_tokens == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": ["a", 1]}, "prompt"),
    ({"model": "m", "prompt": [[1], []]}, "prompt"),
    ({"model": "m", "prompt": [True]}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "top_p": 1.01}, "top_p"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "n": 17}, "n"),
    ({"model": "m", "prompt": ["a"] * 8, "n": 16}, "n"),
    ({"model": "m", "prompt": "x", "stop": 5}, "stop"),
    ({"model": "m", "prompt": "x", "stop": ["a", ""]}, "stop"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "stop": "x" * 257}, "stop"),
    ({"model": "m", "prompt": "x", "seed": "1"}, "seed"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "m", "prompt": "x", "user": 7}, "user"),
    ({"model": "m", "prompt": "x", "colour": "blue"}, "colour"),
])
def test_parse_completion_refuses_bad_fields_naming_them(body, param):
    with pytest.raises(APIError) as info:
        parse_completion(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_parse_embedding():
    assert parse_embedding({"model": "m", "input": "a"}).inputs == ["a"]
    r = parse_embedding({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert r.inputs == ["a", "b"] and r.encoding_format == "base64"
    for body, param in [({"model": "m"}, "input"), ({"model": "m", "input": []}, "input"),
                        ({"model": "m", "input": [1, 2]}, "input"), ({"model": "m", "input": 3}, "input"),
                        ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format"),
                        ({"model": "m", "input": ["a"] * 300}, "input")]:
        with pytest.raises(APIError) as info:
            parse_embedding(body)
        assert info.value.param == param


@pytest.mark.parametrize("raw", [b"", b"   ", b"{bad", b"[1, 2]", b'"text"', b"\xff\xfe{}",
                                 b'{"a": NaN}', b'{"a": Infinity}', b"[" * 100000])
def test_parse_json_refuses_what_is_not_a_json_object(raw):
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400


# ----------------------------------------------------------------------------- text and stop strings


def test_text_stream_holds_back_a_possible_stop_and_cuts_before_it(served):
    tok = served.tokenizer
    ids = tok.encode("one two three four")
    ts = TextStream(tok, stop=["three"])
    sent = ""
    for t in ids:
        sent += ts.feed(t)
        if ts.stopped:
            break
    sent += ts.finish()
    assert sent == "one two " and ts.stopped and ts.text == sent


def test_text_stream_joins_split_utf8(served):
    tok = served.tokenizer
    ids = tok.encode("é€😀 ok")
    ts = TextStream(tok)
    pieces = [ts.feed(t) for t in ids] + [ts.finish()]
    assert "".join(pieces) == "é€😀 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_survives_ids_the_tokenizer_cannot_decode(served):
    ts = TextStream(served.tokenizer)
    assert ts.feed(10 ** 6) == "\ufffd"                 # a padded vocabulary's unused id


def test_partial_stop_suffix():
    assert _partial_stop_suffix("abc", ["cd"]) == 1
    assert _partial_stop_suffix("abc", ["bcd", "x"]) == 2
    assert _partial_stop_suffix("abc", ["abc"]) == 0      # a whole match is found by find, not held
    assert _partial_stop_suffix("abc", []) == 0


@given(ids=st.lists(st.integers(0, 498), max_size=40),
       stops=st.lists(st.text(alphabet="ab \n\u00e9", min_size=1, max_size=3), max_size=3))
def test_text_stream_equals_decoding_everything_then_cutting(ids, stops):
    tok = _tiny_tokenizer()
    ts = TextStream(tok, stops)
    out = ""
    for t in ids:
        out += ts.feed(t)
        if ts.stopped:
            break
    out += ts.finish()
    full = tok.decode(ids)
    cuts = [full.find(s) for s in stops if full.find(s) >= 0]
    assert out == (full[:min(cuts)] if cuts else full)
    assert ts.stopped == bool(cuts)


_TOK = []


def _tiny_tokenizer():
    if not _TOK:
        _TOK.append(pretrained.load_tokenizer(TINY_GPT2))
    return _TOK[0]


# ----------------------------------------------------------------------------- planning against the context


def test_plan_completion_rows_seeds_and_context(served):
    req = parse_completion({"model": "tiny-gpt2", "prompt": ["ab", "cd"], "n": 2, "seed": 7, "max_tokens": 3})
    rows, prompt_tokens = plan_completion(served, req)
    assert [r.index for r in rows] == [0, 1, 2, 3] and [r.seed for r in rows] == [7, 8, 7, 8]
    assert prompt_tokens == len(served.tokenizer.encode("ab")) + len(served.tokenizer.encode("cd"))
    # the default max_tokens shrinks to fit the context; an explicit one past it is refused
    rows, _ = plan_completion(served, parse_completion({"model": "m", "prompt": list(range(30))}))
    assert rows[0].max_tokens == 2
    for body, param in [({"prompt": list(range(30)), "max_tokens": 3}, "max_tokens"),
                        ({"prompt": list(range(32))}, "prompt"), ({"prompt": list(range(40))}, "prompt"),
                        ({"prompt": [1, 500]}, "prompt"), ({"prompt": [-1]}, "prompt")]:
        with pytest.raises(APIError) as info:
            plan_completion(served, parse_completion({"model": "m", **body}))
        assert info.value.status == 400 and info.value.param == param
    rows, n = plan_completion(served, parse_completion({"model": "m", "prompt": ""}))
    assert rows[0].prompt_ids == [served.eot_id] and n == 1       # an empty prompt starts a document


# ----------------------------------------------------------------------------- the engine


class _Script:
    """A stand-in for generate_rows: row i produces tokens[i]; the first batch can be held."""

    def __init__(self, tokens, hold_first=False, admits=True):
        self.tokens = tokens
        self.admits = admits                 # False: like a batched generator that cannot add rows
        self.batches = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, model, rows, eot_id, on_token, admit=None):
        rows = list(rows)
        self.batches.append([r.prompt_ids[0] for r in rows])
        self.entered.set()
        self.release.wait(10)
        live = {i: 0 for i in range(len(rows))}        # row -> next step
        while live:
            for i in sorted(live):
                script = self.tokens[rows[i].prompt_ids[0]]
                if live[i] >= len(script) or not on_token(i, script[live[i]]):
                    del live[i]
                else:
                    live[i] += 1
            if self.admits and admit is not None and live:
                new = admit()
                self.batches[-1].extend("+%d" % r.prompt_ids[0] for r in new)
                live.update({len(rows) + k: 0 for k in range(len(new))})
                rows.extend(new)


def _collect():
    events, done = [], threading.Event()

    def sink(ev):
        events.append(ev)
        if isinstance(ev, (Done, Failed)):
            done.set()
    return events, done, sink


def _job(served, body, sink):
    rows, _ = plan_completion(served, parse_completion({"model": "m", **body}))
    return Job(COMPLETION, sink, rows=rows)


def test_engine_finish_reasons_and_stop_strings(served, monkeypatch):
    tok, eot = served.tokenizer, served.eot_id
    text = tok.encode("hello world again")
    # prompt id 0 -> ends with end-of-text; 1 -> runs to max_tokens; 2 -> hits the stop string
    script = _Script({0: text[:2] + [eot, 5], 1: text * 3, 2: text})
    monkeypatch.setattr(engine_mod, "generate_rows", script)
    eng = Engine(served)
    eng.start()
    try:
        results = []
        for prompt, extra in [([0], {}), ([1], {}), ([2], {"stop": [" again"], "max_tokens": 20})]:
            events, done, sink = _collect()
            eng.submit(_job(served, {"prompt": prompt, "max_tokens": 4, **extra}, sink))
            assert done.wait(10)
            text_out = "".join(e.text for e in events if isinstance(e, Delta))
            fin = [e for e in events if isinstance(e, Finish)]
            results.append((text_out, fin[0].reason, fin[0].completion_tokens))
    finally:
        eng.stop()
    assert results[0] == (tok.decode(text[:2]), "stop", 3)          # the end-of-text token counts, shows no text
    assert results[1] == (tok.decode((text * 3)[:4]), "length", 4)
    assert results[2] == ("hello world", "stop", len(text))


def test_engine_batches_waiting_jobs_by_settings(served, monkeypatch):
    script = _Script({k: [10, 11] for k in range(5)}, hold_first=True, admits=False)
    monkeypatch.setattr(engine_mod, "generate_rows", script)
    eng = Engine(served, max_batch_rows=8)
    eng.start()
    try:
        dones = []
        for k, extra in enumerate([{}, {"n": 2}, {}, {"temperature": 0}, {}]):
            events, done, sink = _collect()
            eng.submit(_job(served, {"prompt": [k], "max_tokens": 2, **extra}, sink))
            dones.append(done)
            if k == 0:
                assert script.entered.wait(10)       # the first job is running: the rest queue up
        script.release.set()
        assert all(d.wait(10) for d in dones)
    finally:
        eng.stop()
    # job 0 alone; then jobs 1 (2 rows), 2 and 4 share temperature 1 -> one batch; job 3 (T=0) after it
    assert [len(b) for b in script.batches] == [1, 4, 1]
    assert eng.largest_batch == 4


def test_engine_batches_never_exceed_max_batch_rows(served, monkeypatch):
    script = _Script({k: [10] for k in range(4)}, hold_first=True, admits=False)
    monkeypatch.setattr(engine_mod, "generate_rows", script)
    eng = Engine(served, max_batch_rows=3)
    eng.start()
    try:
        dones = []
        for k, n in enumerate([1, 2, 2, 1]):
            events, done, sink = _collect()
            eng.submit(_job(served, {"prompt": [k], "max_tokens": 1, "n": n}, sink))
            dones.append(done)
            if k == 0:
                assert script.entered.wait(10)
        script.release.set()
        assert all(d.wait(10) for d in dones)
    finally:
        eng.stop()
    # job 2 does not fit beside job 1 (2 + 2 > 3): it leads the next batch, which job 3 joins
    assert script.batches == [[0], [1, 1], [2, 2, 3]]


def test_engine_admits_compatible_jobs_into_a_running_batch(served, monkeypatch):
    """Jobs arriving while a batch runs join it between tokens if their settings match;
    the first one that does not match waits for the next batch, and nothing joins after it."""
    script = _Script({k: [10, 11, 12] for k in range(5)}, hold_first=True)
    monkeypatch.setattr(engine_mod, "generate_rows", script)
    eng = Engine(served, max_batch_rows=8)
    eng.start()
    try:
        dones = []
        for k, extra in enumerate([{}, {}, {"temperature": 0}, {}, {"temperature": 0}]):
            events, done, sink = _collect()
            eng.submit(_job(served, {"prompt": [k], "max_tokens": 3, **extra}, sink))
            dones.append(done)
            if k == 0:
                assert script.entered.wait(10)
        script.release.set()
        assert all(d.wait(10) for d in dones)
    finally:
        eng.stop()
    # batch 1: job 0, job 1 joins; job 2 (T=0) is deferred, so job 3 does not join.
    # batch 2: job 2 with job 4 (both T=0); batch 3: job 3.
    assert script.batches == [[0, "+1"], [2, 4], [3]]
    assert eng.jobs_admitted == 1


def test_engine_survives_a_failing_model(served, monkeypatch):
    calls = []

    def broken(model, rows, eot_id, on_token, admit=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        on_token(0, 10)
        on_token(0, 11)

    monkeypatch.setattr(engine_mod, "generate_rows", broken)
    eng = Engine(served)
    eng.start()
    try:
        events, done, sink = _collect()
        eng.submit(_job(served, {"prompt": [1], "max_tokens": 2}, sink))
        assert done.wait(10)
        assert isinstance(events[-1], Failed) and events[-1].error.status == 500
        events, done, sink = _collect()
        eng.submit(_job(served, {"prompt": [1], "max_tokens": 2}, sink))
        assert done.wait(10)
    finally:
        eng.stop()


def test_engine_refuses_when_full_or_stopped(served, monkeypatch):
    eng = Engine(served, max_queue=1)
    with pytest.raises(APIError) as info:
        eng.submit(Job(COMPLETION, lambda e: None, rows=[]))
    assert info.value.status == 503                     # not started
    script = _Script({0: [10]}, hold_first=True)
    monkeypatch.setattr(engine_mod, "generate_rows", script)
    eng.start()
    try:
        eng.submit(_job(served, {"prompt": [0], "max_tokens": 1}, lambda e: None))
        assert script.entered.wait(10)                  # running; the queue is empty again
        eng.submit(_job(served, {"prompt": [0], "max_tokens": 1}, lambda e: None))   # fills the queue
        with pytest.raises(APIError) as info:
            eng.submit(_job(served, {"prompt": [0], "max_tokens": 1}, lambda e: None))
        assert info.value.status == 429 and info.value.code == "server_busy"
    finally:
        script.release.set()
        eng.stop()
    with pytest.raises(APIError) as info:
        eng.submit(_job(served, {"prompt": [0], "max_tokens": 1}, lambda e: None))
    assert info.value.status == 503                     # stopped


def test_real_generate_rows_matches_generate(served):
    """One batch stream gives each row what generate() gives it alone; admit is never called."""
    from numformer.generate import generate

    req = parse_completion({"model": "m", "prompt": ["ab", "xyz q", "late"], "n": 2, "seed": 3, "max_tokens": 6,
                            "temperature": 0.9})
    rows, _ = plan_completion(served, req)
    got = {i: [] for i in range(len(rows))}
    order = []

    def on_token(i, t):
        got[i].append(t)
        order.append(i)
        return len(got[i]) < rows[i].max_tokens

    def admit():
        raise AssertionError("a batch stream cannot add rows; generate_rows must not ask for any")

    engine_mod.generate_rows(served.model, rows, None, on_token, admit)
    for i, r in enumerate(rows):
        assert got[i] == generate(served.model, r.prompt_ids, 6, temperature=0.9, seed=r.seed)
    assert order == list(range(len(rows))) * 6          # every row advances by one token per step


def test_context_groups_split_rows_that_do_not_fit_together():
    """Left padding needs longest prompt + largest max_tokens <= context, so two rows that each fit
    (a long prompt with few tokens, a short prompt with many) can need separate batch streams."""
    def row(prompt_len, max_tokens):
        return Row(0, [1] * prompt_len, max_tokens, 1.0, 1.0, None, None, [])

    rows = [row(28, 4), row(2, 29), row(3, 20), row(20, 3), row(1, 1)]
    groups = engine_mod.context_groups(rows, 32)
    assert groups == [[0, 3, 4], [1, 2]]                 # first fit, in order: (28, 4) and (3, 29)
    for g in groups:
        assert max(len(rows[i].prompt_ids) for i in g) + max(rows[i].max_tokens for i in g) <= 32
    assert engine_mod.context_groups(rows[1:3], 32) == [[0, 1]]     # rows that fit together stay together
    with pytest.raises(ValueError, match="exceeds the context"):
        engine_mod.context_groups([row(30, 3)], 32)


def test_generate_rows_runs_a_batch_that_needs_two_streams(served):
    """A long-prompt row with few tokens beside a short-prompt row with many: each is valid alone
    (the protocol layer accepts both), together they overflow one cache; both still get their tokens."""
    from numformer.generate import generate

    ctx = served.context_length
    body = {"model": "m", "prompt": [[5] * (ctx - 3), [7, 8]], "max_tokens": 3, "temperature": 0.7, "seed": 9}
    long_row = plan_completion(served, parse_completion(body))[0][0]
    short_row = plan_completion(served, parse_completion({**body, "prompt": [7, 8], "max_tokens": ctx - 2}))[0][0]
    rows = [long_row, short_row]
    assert engine_mod.context_groups(rows, ctx) == [[0], [1]]
    got = {0: [], 1: []}

    def on_token(i, t):
        got[i].append(t)
        return True                                       # run each row to its max_tokens

    engine_mod.generate_rows(served.model, rows, None, on_token)
    for i, r in enumerate(rows):
        assert got[i] == generate(served.model, r.prompt_ids, r.max_tokens, temperature=0.7, seed=r.seed)


def test_generate_rows_refuses_mixed_sampling_settings(served):
    """One batch stream samples with one temperature/top_p/top_k; the engine groups by batch_key,
    so mixed settings reaching generate_rows are a bug, reported as such."""
    rows = [Row(0, [1, 2], 2, 1.0, 1.0, None, 1, []), Row(1, [1, 2], 2, 0.0, 1.0, 5, 2, [])]
    with pytest.raises(ValueError, match="must share temperature"):
        engine_mod.generate_rows(served.model, rows, None, lambda i, t: True)
