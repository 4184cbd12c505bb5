"""One background event loop per process, so synchronous callers can drive async clients.

Synchronous entry points (the seed-style API, Celery tasks) submit coroutines to this loop; all
HTTP traffic of the process then shares one loop and one aiohttp session per server.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide loop, started on first use in a daemon thread."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=_run, name="qalign-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread = loop, thread
        return _loop


def submit(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Schedule `coro` on the background loop and return a concurrent future."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the background loop and wait for its result."""
    loop = background_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("run_sync() was called from the qalign loop thread; await instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _shutdown() -> None:
    loop = _loop
    if loop is not None and loop.is_running():
        try:
            from qalign.clients.http import close_sessions

            asyncio.run_coroutine_threadsafe(close_sessions(), loop).result(5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)


atexit.register(_shutdown)
