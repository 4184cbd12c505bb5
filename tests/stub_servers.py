"""Tiny aiohttp servers for tests: a proxy in front of a toy server that can demand a bearer
token, corrupt one endpoint's answers or hold requests at a gate, served on 127.0.0.1 from a
background thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import web

Mutation = Callable[[Any], Any]


class Gate:
    """Lets the first `allow` requests to `paths` through, then holds the rest until `open()`.

    A test uses it to stop a run at a known point: the run cannot finish while the gate is
    shut, so an interrupt sent after the first results were observed always lands mid-run.
    """

    def __init__(self, allow: int, paths: tuple[str, ...] = ("/v1/completions",)) -> None:
        self.allow = allow
        self.paths = paths
        self.passed = 0
        self.held = 0
        self._open = threading.Event()  # set from the test's thread, read on the server's loop

    def open(self) -> None:
        self._open.set()

    async def wait(self, path: str) -> None:
        if path not in self.paths or self._open.is_set():
            return
        if self.passed < self.allow:
            self.passed += 1  # one event loop thread: no lock needed
            return
        self.held += 1
        while not self._open.is_set():
            await asyncio.sleep(0.05)


@contextmanager
def serve_in_background(app: web.Application) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) from its own event loop thread; yield its URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"] = runner
        box["port"] = runner.addresses[0][1]

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    if not started.wait(60):  # seconds on a quiet machine; a loaded one can be far slower
        raise RuntimeError("the stub server did not start within 60 s")
    try:
        yield f"http://127.0.0.1:{box['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def proxy_app(
    upstream: str,
    *,
    mutate: dict[str, Mutation] | None = None,
    require_key: str | None = None,
    seen_auth: list[str] | None = None,
    gate: Gate | None = None,
) -> web.Application:
    """Forward every request to `upstream`.

    `mutate[path]` rewrites that path's JSON answer; `require_key` answers 401 unless the request
    carries `Authorization: Bearer <require_key>`; `seen_auth` collects the headers received;
    `gate` holds requests as described in `Gate`.
    """
    session: dict[str, aiohttp.ClientSession] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if seen_auth is not None:
            seen_auth.append(auth)
        if require_key is not None and auth != f"Bearer {require_key}":
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        if gate is not None:
            await gate.wait(request.path)
        if "s" not in session:
            session["s"] = aiohttp.ClientSession()
        body = await request.read()
        async with session["s"].request(
            request.method,
            upstream + request.path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as resp:
            raw = await resp.read()
            status = resp.status
        rewrite = (mutate or {}).get(request.path)
        if rewrite is not None and status == 200:
            raw = json.dumps(rewrite(json.loads(raw))).encode()
        return web.Response(body=raw, status=status, content_type="application/json")

    async def close(_app: web.Application) -> None:
        if "s" in session:
            await session["s"].close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(close)
    return app
