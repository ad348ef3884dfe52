"""Timing several implementations of one operation, fairly, on a noisy machine.

The rules, in order of importance:

1. **Interleave.** The implementations take turns — round 1 runs A, B, C,
   round 2 runs C, B, A, round 3 A, B, C again — so a neighbour's burst of
   work or a change of clock speed hits all of them alike, and none always
   runs right after the same other one.
2. **Warm up** each implementation before timing it (page faults, lazy
   initialization, thread pools, caches); the fastest warm-up call estimates
   the cost of a call.
3. **Median** of at least ``min_runs`` timed rounds is the figure we report;
   the minimum is recorded too (the best the machine could do).
4. **Adaptive repetition.** A fast call is repeated ``inner`` times inside one
   sample, so that each sample lasts at least ``min_sample`` seconds and the
   clock's resolution and call overhead do not matter; the number of rounds
   grows (up to ``max_runs``) while the whole measurement fits ``budget``.
5. **Settle** before every sample: wait until the process is idle, so that
   the worker threads of the *previous* implementation's thread pool have
   stopped spinning before the next one starts (:func:`wait_until_idle`).
   OpenBLAS workers busy-wait about 2^28 cycles (≈ 0.1 s here) after each
   call and our OpenMP workers a few milliseconds; with a fixed 10 ms gap the
   spinning OpenBLAS threads took one of the two cores from whatever ran
   next, which cost our GEMM 15-45% on the short GPT-2 shapes in the tables
   before this rule (measured: 4096×768×768 at 141 vs 183 GFLOP/s). After
   settling, a call shorter than ``rewarm_below`` seconds is preceded by one
   untimed call of the same implementation, so that it is timed with its own
   pool awake, as in a loop of such calls (the first call after an idle
   pause measured 2-5 % slower, for every library).

Clock and sleep are parameters so that the tests can drive this with a fake
clock.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass
class Stats:
    """Timings of one implementation: seconds per call."""

    median: float
    min: float
    runs: int                       # timed samples
    inner: int = 1                  # calls per sample
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "runs": self.runs, "inner": self.inner}


def summarize(samples: list[float], inner: int = 1) -> Stats:
    """Median and minimum of per-call samples."""
    if not samples:
        raise ValueError("no samples to summarize")
    return Stats(statistics.median(samples), min(samples), len(samples), inner, list(samples))


def wait_until_idle(*, slice_s: float = 0.005, busy: float = 0.1, max_wait: float = 0.5,
                    clock: Callable[[], float] = time.perf_counter,
                    cpu_clock: Callable[[], float] = time.process_time,
                    sleep: Callable[[float], None] = time.sleep) -> float:
    """Sleep until this process uses (almost) no CPU; returns the seconds waited.

    While we sleep, any CPU time the process still burns is other threads
    spinning: a thread pool's workers waiting for the next parallel region.
    Returns once a ``slice_s`` sleep saw less than ``busy`` cores' worth of
    CPU time, or after ``max_wait`` seconds (a pool that never sleeps).
    """
    start = clock()
    while True:
        t0, c0 = clock(), cpu_clock()
        sleep(slice_s)
        elapsed = clock() - t0
        if cpu_clock() - c0 < busy * max(elapsed, slice_s) or clock() - start >= max_wait:
            return clock() - start


def measure(impls: Mapping[str, Callable[[], object]], *, min_runs: int = 5, max_runs: int = 25,
            warmup: int = 1, min_sample: float = 0.01, budget: float = 2.0, gap: float = 0.0,
            settle: Callable[[], object] | None = None, rewarm_below: float = 0.0,
            clock: Callable[[], float] = time.perf_counter,
            sleep: Callable[[float], None] = time.sleep) -> dict[str, Stats]:
    """Time every callable in ``impls``; returns ``{name: Stats}`` (seconds per call).

    ``budget`` is the wall time (seconds) we are willing to spend on the timed
    rounds of all implementations together; it only ever *adds* rounds
    beyond ``min_runs``. With ``warmup=0`` nothing is estimated: every sample
    is one call and exactly ``min_runs`` rounds run (for slow end-to-end cases
    that warm up on their own). Before an implementation's first warm-up call
    and before every sample, ``settle()`` runs when given (e.g.
    :func:`wait_until_idle`) — then, before a sample of an implementation
    whose call was estimated under ``rewarm_below`` seconds, one untimed
    call — else ``sleep(gap)`` when ``gap`` > 0.
    """
    def pause(name: str | None = None) -> None:
        if settle is not None:
            settle()
            if name is not None and estimate.get(name, float("inf")) < rewarm_below:
                impls[name]()                  # untimed: wake this implementation's pool
        elif gap:
            sleep(gap)

    names = list(impls)
    if not names:
        return {}
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    estimate = {}
    for name in names:
        # warm-up: at least ``warmup`` calls; for a cheap call (the first took < 0.2 s:
        # maybe only page faults made it slow) at least 2, and more (up to 20) while
        # those after the first add up to less than 2·min_sample. The fastest call
        # estimates the cost of one call.
        calls, spent, first, best = 0, 0.0, 0.0, float("inf")

        def more() -> bool:
            if calls < warmup:
                return True
            if calls >= 20 or first >= 0.2:
                return False
            return calls < 2 or spent - first < 2 * min_sample

        while warmup and more():
            if calls == 0:
                pause()
            t0 = clock()
            impls[name]()
            dt = clock() - t0
            first = dt if calls == 0 else first
            calls, spent, best = calls + 1, spent + dt, min(best, dt)
        estimate[name] = best
    if warmup:
        inner = {n: max(1, math.ceil(min_sample / max(estimate[n], 1e-9))) for n in names}
        round_cost = sum(estimate[n] * inner[n] for n in names)
        runs = int(budget / max(round_cost, 1e-12) + 1e-9)
        runs = max(min_runs, min(max_runs, runs))
    else:
        inner = {n: 1 for n in names}
        runs = min_runs
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn, k = impls[name], inner[name]
            pause(name)
            t0 = clock()
            for _ in range(k):
                fn()
            samples[name].append((clock() - t0) / k)
    return {n: summarize(samples[n], inner[n]) for n in names}
