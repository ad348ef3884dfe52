"""Load test for `numformer serve`: C concurrent clients × R requests each, latency percentiles.

    python benchmarks/serve_load.py                                  # tiny GPT-2 fixture, 32 × 3, max_tokens 4
    python benchmarks/serve_load.py --stream                         # streamed: also time to first token
    python benchmarks/serve_load.py --checkpoint runs/x --max-tokens 32 --clients 8 --requests 4
    python benchmarks/serve_load.py --threads 1                      # the server's kernels on one thread
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server already running

Without --url the server is started as a separate process on a free
loopback port (``python -m numformer.cli serve``), so the clients do not
share its interpreter. Each client is an asyncio task with its own HTTP
connection sending its requests one after another. Prints a table and writes
DIR/serve_load.json + DIR/serve_load.md (--out). Needs the serve extra and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tests", "fixtures", "tiny-gpt2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    """`numformer serve` in a child process; returns once /health answers."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("NUMFORMER_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "numformer.cli", "serve", "--checkpoint", checkpoint,
                             "--port", str(port), "--max-batch", str(max_batch), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """Send one completion; -> status, latency, time to first token (streamed), completion tokens."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await client.post("/v1/completions", json=body)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return {"status": r.status_code, "latency": time.perf_counter() - t0, "ttft": None, "tokens": tokens}
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    return {"status": r.status_code, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def run_clients(url: str, model: str, args) -> tuple[list[dict], float]:
    async def client_task(k: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for j in range(args.requests):
                body = {"model": model, "prompt": f"Request {j} of client {k}:", "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": k * args.requests + j}
                if args.stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                try:
                    out.append(await one_request(client, body))
                except httpx.HTTPError as exc:
                    out.append({"status": f"error: {type(exc).__name__}", "latency": None, "ttft": None,
                                "tokens": 0})
        return out

    t0 = time.perf_counter()
    results = await asyncio.gather(*(client_task(k) for k in range(args.clients)))
    return [r for rs in results for r in rs], time.perf_counter() - t0


def percentiles(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    p = np.percentile(np.array(xs) * 1000.0, [50, 90, 99])
    return {"p50_ms": round(float(p[0]), 1), "p90_ms": round(float(p[1]), 1), "p99_ms": round(float(p[2]), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=TINY, help="model folder to serve (default: the tiny GPT-2 fixture)")
    ap.add_argument("--url", help="an already running server (then --checkpoint is not used)")
    ap.add_argument("--model", help="model id (default: asked from /v1/models)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--stream", action="store_true", help="streamed requests (reports time to first token)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (when started here)")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernel and BLAS threads of the server started here (default: the environment's)")
    ap.add_argument("--out", default="bench-results", help="folder for serve_load.json / .md")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        proc = start_server(args.checkpoint, port, args.max_batch, args.threads)
        url = f"http://127.0.0.1:{port}"
    try:
        model = args.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        results, wall = asyncio.run(run_clients(url, model, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    statuses: dict = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ok = [r for r in results if r["status"] == 200]
    report = {
        "model": model, "checkpoint": None if args.url else os.path.relpath(args.checkpoint),
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "stream": args.stream, "max_batch": args.max_batch, "server_threads": args.threads, "statuses": statuses,
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "latency": percentiles(r["latency"] for r in ok),
        "time_to_first_token": percentiles(r["ttft"] for r in ok) if args.stream else None,
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
        "completion_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve_load.json"), "w") as f:
        json.dump(report, f, indent=2)
    lat, ttft = report["latency"], report["time_to_first_token"] or {}
    rows = [("requests", f"{args.clients} clients × {args.requests}, max_tokens {args.max_tokens}"
             f"{', streamed' if args.stream else ''}"),
            ("server threads", str(args.threads or os.environ.get("NUMFORMER_NUM_THREADS", "default"))),
            ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))),
            ("latency p50 / p90 / p99", f"{lat.get('p50_ms')} / {lat.get('p90_ms')} / {lat.get('p99_ms')} ms")]
    if args.stream:
        rows.append(("time to first token p50 / p90 / p99",
                     f"{ttft.get('p50_ms')} / {ttft.get('p90_ms')} / {ttft.get('p99_ms')} ms"))
    rows += [("throughput", f"{report['requests_per_s']} requests/s, {report['completion_tokens_per_s']} "
                            f"completion tokens/s (wall {report['wall_s']} s)"),
             ("machine", report["machine"])]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    with open(os.path.join(args.out, "serve_load.md"), "w") as f:
        f.write(f"# serve load test: {model}\n\n{table}")
    print(table)
    return 0 if report["server_errors_5xx"] == 0 and len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
