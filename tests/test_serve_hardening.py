"""The server under hostile input: no request body, header or pace of sending gives a 5xx or holds a connection.

- A prompt character the model's tokenizer cannot encode (an emoji, a tab,
  a NUL for a character-level model; a lone surrogate for any) is a 400
  naming the character and its position, before any stream starts.
- An unexpected failure is a 500 that leaves the keep-alive connection usable
  (it used to be re-raised after the response, and uvicorn then closed the
  connection under the client's next request).
- Every other field, type, size and encoding mistake found by the audit is a 4xx.
- A body or headers that never finish arriving do not hold a connection:
  408 and close after ``body_timeout``, close after ``header_timeout``.

Real servers on loopback ports; the random-body test runs the app in process.
"""

import http.client
import json
import os
import shutil
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from numformer import checkpoint, cli  # noqa: E402
from numformer.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from numformer.serve import BackgroundServer, Limits, create_app, load_served_model  # noqa: E402
from numformer.serve import app as app_mod  # noqa: E402
from numformer.tokenizers import CharTokenizer  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_GPT2 = os.path.join(HERE, "tiny-gpt2")
CORPUS = "hello world, a small corpus"           # the character model knows only these characters
CHAR = "chars"                                   # its model name
GPT = "tiny-gpt2"
BERT = "tiny-bert"


@pytest.fixture(scope="module")
def char_served(tmp_path_factory):
    tok = CharTokenizer.train(CORPUS)
    model = GPT2.init(GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    folder = tmp_path_factory.mktemp("char") / CHAR
    checkpoint.save(str(folder), model, tok)
    return load_served_model(str(folder))


@pytest.fixture(scope="module")
def gpt_served():
    return load_served_model(TINY_GPT2)


@pytest.fixture(scope="module")
def bert_served(tmp_path_factory):
    """The tiny random BERT fixture plus a 99-word vocab.txt (as in test_serve.py)."""
    folder = tmp_path_factory.mktemp("bert") / BERT
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(HERE, "tiny-bert", name), folder / name)
    words = open(os.path.join(HERE, "wordpiece", "vocab.txt"), encoding="utf-8").read().split("\n")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[106:200]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return load_served_model(str(folder))


@pytest.fixture(scope="module")
def servers(char_served, gpt_served, bert_served):
    """One real server per model kind, by model name."""
    srvs = {CHAR: BackgroundServer(char_served), GPT: BackgroundServer(gpt_served),
            BERT: BackgroundServer(bert_served)}
    for s in srvs.values():
        s.start()
    yield srvs
    for s in srvs.values():
        s.stop()


def _assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def _post(conn: http.client.HTTPConnection, path: str, body) -> tuple[int, dict, bytes]:
    """One request on ``conn`` (kept alive); ``body`` is a dict (JSON) or raw bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


# ----------------------------------------------------------------------------- unencodable characters

# (raw JSON of the prompt, the character as the message shows it, its position)
UNENCODABLE = [
    ('"hello \\ud83d\\ude00"', "'\U0001F600' (U+1F600)", 6),     # an emoji (a surrogate pair in JSON)
    ('"hel\\tlo"', "'\\t' (U+0009)", 3),
    ('"he\\u0000llo"', "'\\x00' (U+0000)", 2),
    ('"hello \\ud800"', "'\\ud800' (U+D800)", 6),                  # a lone surrogate
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt, shown, pos", UNENCODABLE)
def test_unencodable_character_is_a_400_and_the_connection_stays_usable(servers, prompt, shown, pos, stream):
    srv = servers[CHAR]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        raw = b'{"model": "chars", "max_tokens": 2, "stream": %s, "prompt": %s}' % (
            json.dumps(stream).encode(), prompt.encode())
        status, headers, body = _post(conn, "/v1/completions", raw)
        assert status == 400, body
        assert headers["content-type"].startswith("application/json")      # refused before any stream
        err = json.loads(body)["error"]
        assert err["param"] == "prompt" and shown in err["message"] and f"position {pos}" in err["message"]
        sock = conn.sock
        status, headers, body = _post(conn, "/v1/completions",
                                      {"model": CHAR, "prompt": "hello", "max_tokens": 2, "stream": stream})
        assert status == 200, body
        assert conn.sock is sock                 # the same connection: the server did not close it
    finally:
        conn.close()


def test_unencodable_character_in_a_prompt_list_names_the_prompt(servers):
    with httpx.Client(base_url=f"http://{servers[CHAR].host}:{servers[CHAR].port}", timeout=30) as c:
        msg = _assert_error(c.post("/v1/completions", json={"model": CHAR, "prompt": ["hello", "wor\U0001F600"]}),
                            400, "prompt", "unencodable_character")
        assert msg.startswith("prompt 1 has") and "U+1F600" in msg and "position 3" in msg
        assert c.post("/v1/completions", json={"model": CHAR, "prompt": ["hello", "world"],
                                                "max_tokens": 1}).status_code == 200


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(servers, monkeypatch):
    srv = servers[CHAR]

    def broken(*args):
        raise RuntimeError("a bug")
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        with monkeypatch.context() as m:
            m.setattr(app_mod, "plan_completion", broken)
            status, headers, body = _post(conn, "/v1/completions", {"model": CHAR, "prompt": "hello"})
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        assert "RuntimeError" in json.loads(body)["error"]["message"]
        sock = conn.sock
        status, _, body = _post(conn, "/v1/completions", {"model": CHAR, "prompt": "hello", "max_tokens": 2})
        assert status == 200, body
        assert conn.sock is sock
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the audit: every path is a 4xx

BIG = 10 ** 400                                  # beyond float's range
AUDIT = [
    # model, route, body (dict or raw bytes), status, param
    (GPT, "completions", {"prompt": "h", "temperature": BIG}, 400, "temperature"),       # was OverflowError
    (GPT, "completions", {"prompt": "h", "top_p": BIG}, 400, "top_p"),
    (GPT, "completions", {"prompt": "h", "top_p": -BIG}, 400, "top_p"),
    (GPT, "completions", {"prompt": "h", "max_tokens": BIG}, 400, "max_tokens"),
    (GPT, "completions", {"prompt": "h", "seed": BIG}, 400, "seed"),
    (GPT, "completions", {"prompt": "h", "n": BIG}, 400, "n"),
    (GPT, "completions", {"prompt": "h", "seed": 1.5}, 400, "seed"),
    (GPT, "completions", {"prompt": "h", "max_tokens": True}, 400, "max_tokens"),
    (GPT, "completions", {"prompt": "h", "logprobs": 5}, 400, "logprobs"),
    (GPT, "completions", {"prompt": [1, -1]}, 400, "prompt"),
    (GPT, "completions", {"prompt": [1, BIG]}, 400, "prompt"),
    (GPT, "completions", {"prompt": [1, 2.0]}, 400, "prompt"),
    (GPT, "completions", {"prompt": [1, True]}, 400, "prompt"),
    (GPT, "completions", {"prompt": [[1], []]}, 400, "prompt"),
    (GPT, "completions", {"prompt": []}, 400, "prompt"),
    (GPT, "completions", {"prompt": "h", "stop": [5]}, 400, "stop"),
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": "\\ud800"}', 400, "prompt"),  # was U+FFFD silently
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": ["ok", "a\\udfffb"]}', 400, "prompt"),
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": "x", "stop": "\\ud800"}', 400, "stop"),
    (GPT, "completions", b'{"model": "\\ud800", "prompt": "x"}', 404, "model"),          # was UnicodeEncodeError
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": "x", "\\udc00": 1}', 400, None),
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": "\xff"}', 400, None),         # invalid UTF-8
    (GPT, "completions", b'"just a string"', 400, None),
    (GPT, "completions", b"null", 400, None),
    (GPT, "completions", b'{"model": "tiny-gpt2", "prompt": "x", "max_tokens": 1e999}', 400, None),
    (GPT, "completions", b"[" * 100_000, 400, None),
    (CHAR, "completions", {"prompt": ""}, 200, None),                                   # empty: end-of-text
    (CHAR, "completions", {"prompt": "hello " * 10}, 400, "prompt"),                    # longer than the context
    (CHAR, "completions", {"prompt": "h", "stop": "\U0001F600"}, 200, None),            # a stop never seen: fine
    (BERT, "embeddings", b'{"model": "tiny-bert", "input": "a\\ud800"}', 400, "input"),
    (BERT, "embeddings", b'{"model": "tiny-bert", "input": ["ok", "\\udfff"]}', 400, "input"),
    (BERT, "embeddings", {"input": "hi \U0001F600 \t \x00"}, 200, None),                # WordPiece: [UNK]
    (BERT, "embeddings", {"input": "hi", "dimensions": BIG}, 400, "dimensions"),
    (BERT, "embeddings", {"input": [1, 2]}, 400, "input"),
    (BERT, "embeddings", b'{"model": "\\ud800", "input": "x"}', 404, "model"),
    (BERT, "completions", {"prompt": "x"}, 400, "model"),
]


@pytest.mark.parametrize("name, route, body, status, param", AUDIT)
def test_audit_every_request_path_is_a_4xx(servers, name, route, body, status, param):
    srv = servers[name]
    if isinstance(body, dict):
        body = json.dumps({"model": name, "max_tokens": 1, **body} if route == "completions"
                          else {"model": name, **body}).encode()
    r = httpx.post(f"http://{srv.host}:{srv.port}/v1/{route}", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        _assert_error(r, status, param)
        r.content.decode("utf-8")                # the error body is valid UTF-8 whatever came in


def test_lone_surrogates_and_utf8_errors_are_named(servers):
    base = f"http://{servers[GPT].host}:{servers[GPT].port}"
    r = httpx.post(base + "/v1/completions", content=b'{"model": "tiny-gpt2", "prompt": "abc\\udbff"}')
    assert "'\\udbff' (U+DBFF) at position 3" in _assert_error(r, 400, "prompt", "invalid_unicode")
    raw = b'{"model": "tiny-gpt2", "prompt": "\xc3("}'
    r = httpx.post(base + "/v1/completions", content=raw)
    assert f"byte 0xc3 at offset {raw.index(0xc3)}" in _assert_error(r, 400)
    r = httpx.post(base + "/v1/completions", content=b'{"model": "\\ud800x", "prompt": "x"}')
    assert "'\ud800x'" in _assert_error(r, 404, "model")     # echoed (as a JSON escape: the body stays UTF-8)


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("application/vnd.api+json", 200),
    (None, 200), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("application/json; charset=latin-1", 415), ("multipart/form-data; boundary=x", 415),
])
def test_content_type(servers, content_type, status):
    srv = servers[GPT]
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(f"http://{srv.host}:{srv.port}/v1/completions", headers=headers, timeout=30,
                   content=json.dumps({"model": GPT, "prompt": "hi", "max_tokens": 1}).encode())
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert "application/json" in _assert_error(r, status, code="unsupported_media_type")


# ----------------------------------------------------------------------------- random bodies


FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "stream_options", "logprobs", "echo", "best_of", "user", "input", "encoding_format", "dimensions",
          "suffix", "logit_bias", "presence_penalty"]
_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=12) | st.sampled_from(
    ["", "hello", "\ud800", "\U0001F600", "\t", "\x00", "<|endoftext|>", GPT, CHAR, BERT])
_scalar = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.sampled_from([0, 1, 2, 5, -1, BIG, -BIG, 2 ** 63, 2 ** 64]) | st.floats(allow_nan=False) | _text)
_value = st.recursive(_scalar, lambda v: st.lists(v, max_size=4) | st.dictionaries(_text, v, max_size=3),
                      max_leaves=8)
_mutation = st.tuples(st.sampled_from(FIELDS) | _text, st.none() | _value)   # (field, None: delete it)


@pytest.fixture(scope="module")
def in_process(char_served, gpt_served, bert_served):
    """The app for each model, in process (fast: no sockets)."""
    clients = {}
    for served in (char_served, gpt_served, bert_served):
        c = TestClient(create_app(served), raise_server_exceptions=True)
        c.__enter__()
        clients[served.name] = c
    yield clients
    for c in clients.values():
        c.__exit__(None, None, None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([GPT, CHAR, BERT]), text=_text, mutations=st.lists(_mutation, max_size=2),
       raw=st.none() | st.binary(max_size=40), wrong_route=st.booleans())
def test_random_bodies_never_give_a_5xx(in_process, which, text, mutations, raw, wrong_route):
    """A valid request for the model, with random text, then up to two fields set to random JSON or removed."""
    embedding = (which == BERT) != wrong_route
    body = {"model": which, "input": text} if embedding else {"model": which, "prompt": text, "max_tokens": 2}
    for name, value in mutations:
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 4)             # keep valid requests short
    content = json.dumps(body).encode() if raw is None else raw     # ASCII: lone surrogates as \\ud800 escapes
    r = in_process[which].post("/v1/embeddings" if embedding else "/v1/completions", content=content,
                               headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- slow clients


def _until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection -> (bytes, seconds); fails after ``limit``."""
    sock.settimeout(limit)
    t0, got = time.monotonic(), b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got, time.monotonic() - t0
            got += chunk
    except socket.timeout:
        pytest.fail(f"the server still holds the connection after {limit} s (received {got[:80]!r})")
    except ConnectionResetError:
        return got, time.monotonic() - t0


@pytest.fixture(scope="module")
def impatient(gpt_served):
    """A real server with short timeouts."""
    with BackgroundServer(gpt_served, limits=Limits(body_timeout=0.5, header_timeout=0.5)) as srv:
        yield srv


def test_a_body_that_never_finishes_gets_a_408_and_the_connection_is_closed(impatient):
    with socket.create_connection((impatient.host, impatient.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"model": "tiny-gpt2", "prompt": "')
        got, took = _until_closed(s, 10)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert b"connection: close" in got.lower() and b'"code": "request_timeout"' in got
    assert b"received 34 bytes of the 1000 declared" in got
    assert took < 5


def test_a_trickled_body_is_cut_at_the_timeout_too(impatient):
    with socket.create_connection((impatient.host, impatient.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        s.settimeout(0.1)
        got = b""
        for _ in range(40):                      # a byte every 0.1 s: each read is quick, the whole is not
            try:
                s.sendall(b" ")
                got += s.recv(65536)
                break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        rest, _ = _until_closed(s, 10)
    assert (got + rest).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - t0 < 5


def test_a_silent_connection_is_closed(impatient):
    with socket.create_connection((impatient.host, impatient.port)) as s:
        got, took = _until_closed(s, 10)
    assert got == b"" and took < 5


def test_headers_trickled_byte_by_byte_do_not_hold_the_connection(impatient):
    """A slowloris: one header byte every 0.1 s, each well within any idle timeout."""
    with socket.create_connection((impatient.host, impatient.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        s.settimeout(0.1)
        for c in b"X-Slow: 1234567890\r\n" * 3:
            try:
                s.sendall(bytes([c]))
                if s.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        _until_closed(s, 10)
    assert time.monotonic() - t0 < 5


def test_keep_alive_still_works_with_the_timeouts(impatient):
    conn = http.client.HTTPConnection(impatient.host, impatient.port, timeout=30)
    try:
        socks = []
        for _ in range(3):
            status, _, body = _post(conn, "/v1/completions", {"model": GPT, "prompt": "hi", "max_tokens": 1})
            assert status == 200, body
            socks.append(conn.sock)
            time.sleep(0.2)                      # idle, but within both timeouts
        assert socks[0] is socks[1] is socks[2]
    finally:
        conn.close()


def test_cli_has_the_timeouts():
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert (args.body_timeout, args.header_timeout) == (Limits().body_timeout, Limits().header_timeout)
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "x", "--body-timeout", "5",
                                          "--header-timeout", "2.5"])
    assert (args.body_timeout, args.header_timeout) == (5.0, 2.5)
    for bad in ("0", "-1", "nan", "inf"):
        assert cli.main(["serve", "--checkpoint", TINY_GPT2, "--body-timeout", bad]) == 2
    assert cli.main(["serve", "--checkpoint", TINY_GPT2, "--header-timeout", "0"]) == 2
