"""The engine: one worker thread that runs the model, fed by a request queue.

The event loop never computes. A route handler puts a :class:`Job` on the
queue and awaits events; the worker thread takes the job together with every
other job waiting at that moment (up to ``max_batch_rows`` sequences), groups
them by sampling settings, and runs each group as one batch:

    queue: [job A (2 rows, T=0.8)] [job B (1 row, T=0.8)] [job C (1 row, T=0)]
    worker: batch {A, B} (same settings) -> then batch {C}

A batch of completions runs as one batched generation (one forward pass
per step for all its rows; see :func:`generate_rows`). Its set of rows is
fixed: jobs that arrive while it runs wait in the queue and form the next
batch. (The engine still offers an ``admit`` callback through which a
generator able to add rows between tokens would take compatible waiting
jobs — same settings, room left, and no job of other settings waiting
before them, so none can be starved — but :func:`generate_rows` does not
call it; see its docstring for why.)

Results go back through each job's ``sink`` (a thread-safe callable; the app
passes one that hands events to the event loop): :class:`Delta` text as it is
produced, :class:`Finish` per choice, :class:`Done` when the job is complete,
:class:`Failed` if the model raised. A job whose client went away is
cancelled and its rows are dropped at the next token.

:func:`generate_rows` is the only function that touches the model for
completions.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from numformer.serve.errors import APIError, server_error
from numformer.serve.models import COMPLETION, EMBEDDING, Row, ServedModel
from numformer.serve.text import TextStream

log = logging.getLogger("numformer.serve")


# ----------------------------------------------------------------------------- events


@dataclass
class Delta:
    """New text of choice ``index``."""

    index: int
    text: str


@dataclass
class Finish:
    """Choice ``index`` ended: ``reason`` is "stop" (end-of-text or a stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int


@dataclass
class Embeddings:
    """The vectors of an embeddings job, (N, dim) float32, in input order."""

    vectors: np.ndarray


@dataclass
class Done:
    """The job is complete; no more events follow."""


@dataclass
class Failed:
    """The job failed on our side; no more events follow."""

    error: APIError


# ----------------------------------------------------------------------------- jobs


class Job:
    """One request's work: completion ``rows`` or embedding ``texts``, and where results go."""

    def __init__(self, kind: str, sink: Callable[[object], None], rows: list[Row] | None = None,
                 texts: list[str] | None = None):
        self.kind = kind
        self.sink = sink
        self.rows = rows or []
        self.texts = texts or []
        self._cancelled = threading.Event()
        self._open_rows = len(self.rows)
        self.finished = False              # Done or Failed was sent

    @property
    def size(self) -> int:
        """Sequences this job adds to a batch."""
        return len(self.rows) if self.kind == COMPLETION else len(self.texts)

    def cancel(self) -> None:
        """The client went away: stop working on this job (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event) -> None:
        """Send ``event`` to the client; a sink that fails (the loop is gone) cancels the job."""
        if self.cancelled or self.finished:
            return
        if isinstance(event, (Done, Failed)):
            self.finished = True
        try:
            self.sink(event)
        except Exception:                     # e.g. the event loop closed during shutdown
            self.cancel()


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys may share a batch.

    A batch stream samples with one temperature/top-p/top-k for all rows,
    so those are the key (seeds and ``max_tokens`` are per row).
    """
    if job.kind == EMBEDDING:
        return (EMBEDDING,)
    r = job.rows[0]
    return (COMPLETION, r.temperature, r.top_p, r.top_k)


# ----------------------------------------------------------------------------- the model call


def generate_rows(model, rows: list[Row], eot_id: int | None, on_token: Callable[[int, int], bool],
                  admit: Callable[[], list[Row]] | None = None) -> None:
    """Generate every row of a batch; ``on_token(i, token)`` returns False to end row i.

    The caller ends each row (end-of-text, stop string, ``max_tokens``, a
    cancelled client) by returning False; this function returns when no row
    is left. Rows are numbered by their position in ``rows``.

    Each group of :func:`context_groups` runs as one
    :func:`numformer.generate.batch_stream`: one forward pass per step for
    all its rows (left padding, per-row positions, a KV cache sized to the
    longest prompt + the largest ``max_tokens``), and ``on_token`` is called
    for every running row per step, in row order. Row b samples from
    ``np.random.default_rng(row.seed)``, the generator
    :func:`numformer.generate.stream` uses for that prompt alone, so a
    seeded request gives the same text whatever it is batched with (up to
    float32 rounding of the padded batch, which can only flip a sample at a
    near-tie of the cumulative probabilities).

    ``admit`` is accepted and **not called**: a batch stream has a fixed set
    of rows, so requests that arrive while it runs wait and form the next
    batch. The alternative — a second batch stream for the admitted rows,
    interleaved step by step with the first — would start those requests
    sooner but costs one more forward pass per step for every admission
    group, giving back part of what batching wins. The load test in
    docs/serving.md (32 streaming clients) found this simpler choice good
    enough: against the round-robin loop that admitted rows between tokens,
    throughput doubled and time to first token kept its p90 (its p50 rose
    from about 90 to 140 ms). The callback stays in the
    signature so a generator that can add rows mid-flight plugs in without
    changing the engine.

    Groups are run one after another (usually there is one; see
    :func:`context_groups`).
    """
    del admit                                  # see the docstring: a batch stream cannot add rows
    from numformer.generate import batch_stream

    settings = {(r.temperature, r.top_p, r.top_k) for r in rows}
    if len(settings) > 1:
        raise ValueError(f"the rows of one batch must share temperature, top_p and top_k; got {sorted(settings, key=repr)}")
    n_ctx = model.cfg.n_positions
    for group in context_groups(rows, n_ctx):
        first = rows[group[0]]
        bs = batch_stream(model, [rows[i].prompt_ids for i in group], [rows[i].max_tokens for i in group],
                          temperature=first.temperature, top_k=first.top_k,
                          top_p=None if first.top_p >= 1.0 else first.top_p,
                          seed=[rows[i].seed for i in group], eot_id=eot_id)
        for event in bs:
            if not on_token(group[event.row], int(event.token)):
                bs.finish(event.row)


def context_groups(rows: list[Row], n_ctx: int) -> list[list[int]]:
    """Split row indices into groups that each fit one batch stream's KV cache.

    A batch stream left-pads its prompts, so it needs the *longest* prompt +
    the *largest* ``max_tokens`` to fit ``n_ctx``, while the protocol layer
    only checks each row on its own (prompt + max_tokens ≤ n_ctx). A
    long-prompt row with few new tokens and a short-prompt row with many can
    each fit and still not fit together. Rows are placed first-fit, in
    order, into the first group they fit (one group in the common case);
    every row fits a group of its own, so this always succeeds.

    The rows of one batch share their sampling settings (see
    :func:`batch_key`); ``rows`` must all fit ``n_ctx`` individually.
    """
    groups: list[list[int]] = []
    shape: list[tuple[int, int]] = []           # per group: (longest prompt, largest max_tokens)
    for i, r in enumerate(rows):
        p, m = len(r.prompt_ids), r.max_tokens
        if p + m > n_ctx:
            raise ValueError(f"row {i}: a prompt of {p} tokens + max_tokens {m} exceeds the context of "
                             f"{n_ctx} positions (the request checks should have refused it)")
        for g, (gp, gm) in enumerate(shape):
            if max(gp, p) + max(gm, m) <= n_ctx:
                groups[g].append(i)
                shape[g] = (max(gp, p), max(gm, m))
                break
        else:
            groups.append([i])
            shape.append((p, m))
    return groups


# ----------------------------------------------------------------------------- the engine


class _RowState:
    """Progress of one row inside a batch."""

    def __init__(self, job: Job, row: Row, tokenizer):
        self.job = job
        self.row = row
        self.text = TextStream(tokenizer, row.stop)
        self.tokens = 0
        self.done = False


class Engine:
    """The worker thread and its queue (see the module docstring).

    ``max_batch_rows`` bounds the live sequences of a batch (a single job
    with more rows still runs, alone); ``max_queue`` bounds waiting jobs,
    beyond which :meth:`submit` answers 429.
    """

    def __init__(self, served: ServedModel, max_batch_rows: int = 32, max_queue: int = 256):
        self.served = served
        self.max_batch_rows = max_batch_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._deferred: list[Job] = []     # taken off the queue, waiting for a batch of their settings
        self.batches_run = 0               # counters, for tests and logs
        self.jobs_admitted = 0             # jobs that joined a running batch
        self.largest_batch = 0

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="numformer-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the batch in progress, fail the jobs still queued, and end the thread."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for job in self._drain():
            job.emit(Failed(APIError("the server is shutting down", status=503, type="server_error")))

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (approximate)."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; 503 when the engine is not running, 429 when the queue is full."""
        if not self.running or self._stopping.is_set():
            raise APIError("the model engine is not running", status=503, type="server_error")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError("the server is busy (too many queued requests); retry shortly", status=429,
                           type="rate_limit_error", code="server_busy") from None

    # -- the worker

    def _drain(self) -> list[Job]:
        jobs, self._deferred = self._deferred, []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _poll(self) -> Job | None:
        """A waiting job, without blocking: deferred ones first. None when there is none.

        (The queue's None is stop()'s wake-up call; ``_stopping`` is already set
        when it arrives, and the worker loop checks that.)
        """
        if self._deferred:
            return self._deferred.pop(0)
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _take_batch(self, first: Job) -> list[Job]:
        """``first`` plus the jobs waiting now, up to ``max_batch_rows`` sequences (in arrival order).

        A job that does not fit waits at the head of the line for the next batch.
        """
        jobs, size = [first], first.size
        while size < self.max_batch_rows:
            job = self._poll()
            if job is None:
                break
            if size + job.size > self.max_batch_rows:
                self._deferred.insert(0, job)
                break
            jobs.append(job)
            size += job.size
        return jobs

    def _admit(self, key: tuple, live_rows: int) -> list[Job]:
        """Jobs that join the running batch now: same settings, room left, and no older job waiting.

        A job of other settings ends the admission and waits (deferred) for
        the next batch; while one waits, nothing more joins, so a stream of
        compatible requests cannot starve it.
        """
        jobs: list[Job] = []
        if self._deferred:
            return jobs
        while live_rows < self.max_batch_rows:
            job = self._poll()
            if job is None:
                break
            if job.cancelled:
                continue
            if batch_key(job) != key or live_rows + job.size > self.max_batch_rows:
                self._deferred.append(job)
                break
            jobs.append(job)
            live_rows += job.size
        return jobs

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._deferred.pop(0) if self._deferred else self._queue.get()
            if first is None:
                continue                                    # stop()'s wake-up
            jobs = [j for j in self._take_batch(first) if not j.cancelled]
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:                                # dicts keep first-seen order
                groups.setdefault(batch_key(job), []).append(job)
            if not groups:
                continue
            first_group, *later = groups.values()
            self._deferred[:0] = [j for g in later for j in g]   # the other settings go next, in order
            self._run_group(first_group)

    def _run_group(self, jobs: list[Job]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, sum(j.size for j in jobs))
        try:
            if jobs[0].kind == EMBEDDING:
                self._embed(jobs)
            else:
                self._complete(jobs)
        except Exception as exc:                             # a bug or a model failure: tell, keep serving
            log.exception("batch of %d job(s) failed", len(jobs))
            for job in jobs:
                job.emit(Failed(server_error(f"the model failed on this request ({type(exc).__name__}: {exc})")))

    def _complete(self, jobs: list[Job]) -> None:
        """Generate for ``jobs``; jobs admitted while it runs are appended to ``jobs``."""
        served = self.served
        eot = served.eot_id
        states = [_RowState(job, row, served.tokenizer) for job in jobs for row in job.rows]

        def on_token(i: int, token: int) -> bool:
            s = states[i]
            if s.job.cancelled:
                s.done = True
                return False
            s.tokens += 1
            if eot is not None and token == eot:
                self._finish(s, "stop")
                return False
            delta = s.text.feed(token)
            if delta:
                s.job.emit(Delta(s.row.index, delta))
            if s.text.stopped:
                self._finish(s, "stop")
                return False
            if s.tokens >= s.row.max_tokens:
                self._finish(s, "length")
                return False
            return True

        key = batch_key(jobs[0])

        def admit() -> list[Row]:
            live = sum(1 for s in states if not s.done)
            new: list[Row] = []
            for job in self._admit(key, live):
                jobs.append(job)                 # so that _run_group's error handling reaches it too
                self.jobs_admitted += 1
                for row in job.rows:
                    states.append(_RowState(job, row, served.tokenizer))
                    new.append(row)
            self.largest_batch = max(self.largest_batch, live + len(new))
            return new

        generate_rows(served.model, [s.row for s in states], eot, on_token, admit)
        for s in states:                                     # rows the generator ended on its own
            if not s.done:
                self._finish(s, "length" if s.tokens >= s.row.max_tokens else "stop")

    def _finish(self, s: _RowState, reason: str) -> None:
        rest = s.text.finish()
        if rest:
            s.job.emit(Delta(s.row.index, rest))
        s.done = True
        s.job.emit(Finish(s.row.index, reason, s.tokens))
        s.job._open_rows -= 1
        if s.job._open_rows == 0:
            s.job.emit(Done())

    def _embed(self, jobs: list[Job]) -> None:
        from numformer.sentence import embed

        texts = [t for job in jobs for t in job.texts]
        vectors = embed(self.served.encoder, None, texts).astype(np.float32, copy=False)
        start = 0
        for job in jobs:
            job.emit(Embeddings(vectors[start:start + len(job.texts)]))
            job.emit(Done())
            start += len(job.texts)
