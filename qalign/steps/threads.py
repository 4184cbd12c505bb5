"""Starting every thread of a thread pool up front, instead of one per first busy moment."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Executor

# How long to wait for all threads to exist; past it the executor starts the rest lazily, as
# it would have anyway (never a reason to fail a start).
START_TIMEOUT_S = 30.0


def start_threads(executor: Executor, n: int, timeout: float = START_TIMEOUT_S) -> None:
    """Make `executor` start `n` threads now (it must have at most `n`)."""
    # `n` jobs that each wait until all are running occupy `n` distinct threads, so the
    # executor has to start every one of them.
    barrier = threading.Barrier(n)

    def hold() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout)

    for job in [executor.submit(hold) for _ in range(n)]:
        job.result()
