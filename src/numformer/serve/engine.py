"""The engine: one worker thread that runs the model, fed by a request queue.

The event loop never computes. A route handler puts a :class:`Job` on the
queue and awaits events; the worker thread takes the job together with every
other job waiting at that moment (up to ``max_batch_rows`` sequences), groups
them by sampling settings, and runs each group as one batch:

    queue: [job A (2 rows, T=0.8)] [job B (1 row, T=0.8)] [job C (1 row, T=0)]
    worker: batch {A, B} (same settings) -> then batch {C}

While a batch of completions runs, jobs that arrive with the same settings
join it between tokens (continuous batching), up to ``max_batch_rows`` live
sequences; a job with other settings is set aside (deferred) and starts the
next batch, and from then on nothing more joins the running one, so it
cannot be starved.

Results go back through each job's ``sink`` (a thread-safe callable; the app
passes one that hands events to the event loop): :class:`Delta` text as it is
produced, :class:`Finish` per choice, :class:`Done` when the job is complete,
:class:`Failed` if the model raised. A job whose client went away is
cancelled and its rows are dropped at the next token.

Where batched generation plugs in: :func:`generate_rows` is the only
function that touches the model for completions.
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

    The round-robin :func:`generate_rows` could mix any settings; the key is
    what a batched sampler (one temperature/top-p/top-k per batch) needs.
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
    is left. Between steps it calls ``admit()``: the rows it returns join the
    batch, numbered after the rows so far (continuous batching).

    PLUG-IN POINT FOR BATCHED GENERATION. Until :mod:`numformer.generate`
    has a batched API, this loops over the single-sequence
    :func:`numformer.generate.stream`, advancing the rows in turn by one token
    each (round robin), so every row of a batch makes progress together and
    streamed clients see tokens at the same pace. A batched version runs one
    forward step for all live rows (left padding or per-row positions, a KV
    cache sized to the longest prompt + max_tokens) and calls ``on_token``
    for each live row per step. It must keep one random generator per row
    (seeded with ``row.seed``) so that a seeded request gives the same text
    whatever it is batched with. One that cannot add rows mid-flight simply
    never calls ``admit``: waiting requests then form the next batch.
    """
    from numformer.generate import stream

    live: dict = {}

    def start(new_rows: list[Row]) -> None:
        for r in new_rows:
            live[start.count] = stream(model, r.prompt_ids, r.max_tokens, temperature=r.temperature, top_k=r.top_k,
                                       top_p=None if r.top_p >= 1.0 else r.top_p, seed=r.seed, eot_id=eot_id)
            start.count += 1
    start.count = 0

    start(rows)
    try:
        while live:
            for i in list(live):
                token = next(live[i], None)
                if token is None or not on_token(i, int(token)):
                    live.pop(i).close()
            if admit is not None and live:
                start(admit())
    finally:
        for it in live.values():
            it.close()


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
