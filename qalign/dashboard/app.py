"""The aiohttp application: HTML pages, their JSON data, static assets and a health check.

Database reads block, so every handler runs its queries on a thread of the default executor
and the event loop stays free to answer other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import Engine

from qalign.dashboard import pages, views
from qalign.dashboard.analysis import AnalysisCache
from qalign.dashboard.queries import NotFoundError
from qalign.storage.engine import make_sessionmaker
from qalign.storage.repo import Sessions

SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
CACHE: web.AppKey[AnalysisCache] = web.AppKey("cache", AnalysisCache)
STATIC = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS, default=str)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip


def _int(request: web.Request, name: str) -> int:
    try:
        return int(request.match_info[name])
    except ValueError:
        raise web.HTTPNotFound(text=f"{name} must be a number") from None


async def _data(
    request: web.Request, build: Callable[..., dict[str, Any]], *args: Any
) -> web.Response:
    fn = functools.partial(build, request.app[SESSIONS], *args)
    try:
        doc = await asyncio.get_running_loop().run_in_executor(None, fn)
    except NotFoundError as exc:
        return _json({"error": str(exc)}, status=404)
    return _json(doc)


def _html(title: str, api: str) -> web.Response:
    return web.Response(text=views.page(title, api), content_type="text/html")


async def sweeps_html(request: web.Request) -> web.Response:
    return _html("Sweeps", "/api/sweeps")


async def sweeps_json(request: web.Request) -> web.Response:
    return await _data(request, pages.sweeps_page)


async def sweep_html(request: web.Request) -> web.Response:
    sid = _int(request, "id")
    return _html(f"Sweep {sid}", f"/api/sweep/{sid}")


async def sweep_json(request: web.Request) -> web.Response:
    return await _data(request, _with_cache(request, pages.sweep_page), _int(request, "id"))


async def run_html(request: web.Request) -> web.Response:
    rid = _int(request, "id")
    return _html(f"Run {rid}", f"/api/run/{rid}")


async def run_json(request: web.Request) -> web.Response:
    raw = request.query.get("prompt")
    try:
        prompt = None if raw in (None, "") else int(raw)
    except ValueError:
        return _json({"error": f"prompt must be a prompt index, got {raw!r}"}, status=400)
    return await _data(request, _with_cache(request, pages.run_page), _int(request, "id"), prompt)


async def chain_html(request: web.Request) -> web.Response:
    cid = _int(request, "id")
    return _html(f"Chain {cid}", f"/api/chain/{cid}")


async def chain_json(request: web.Request) -> web.Response:
    return await _data(request, pages.chain_page, _int(request, "id"))


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    text = resources.files("qalign.dashboard").joinpath("static", name).read_text("utf-8")
    return web.Response(text=text, content_type=STATIC[name])


async def health(request: web.Request) -> web.Response:
    """A trivial endpoint (no database): the baseline of the page-load benchmark."""
    return _json({"ok": True})


def _with_cache(request: web.Request, build: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
    cache = request.app[CACHE]
    return lambda sessions, *args: build(sessions, cache, *args)


async def _close(app: web.Application) -> None:
    app[CACHE].close()


def make_app(engine: Engine) -> web.Application:
    """The dashboard on `engine` (a read-only one: `qalign.dashboard.db.readonly_engine`)."""
    app = web.Application()
    sessions = make_sessionmaker(engine)
    app[SESSIONS] = sessions
    app[CACHE] = AnalysisCache(sessions)
    app.on_cleanup.append(_close)
    app.add_routes(
        [
            web.get("/", sweeps_html),
            web.get("/api/sweeps", sweeps_json),
            web.get("/sweep/{id}", sweep_html),
            web.get("/api/sweep/{id}", sweep_json),
            web.get("/run/{id}", run_html),
            web.get("/api/run/{id}", run_json),
            web.get("/chain/{id}", chain_html),
            web.get("/api/chain/{id}", chain_json),
            web.get("/static/{name}", static),
            web.get("/healthz", health),
        ]
    )
    return app


@contextlib.contextmanager
def serve_in_thread(engine: Engine, host: str = "127.0.0.1", port: int = 0) -> Iterator[Served]:
    """Serve the dashboard on a background thread (tests, benchmarks); stopped on exit."""
    loop = asyncio.new_event_loop()
    app = make_app(engine)
    runner = web.AppRunner(app)
    ready = threading.Event()
    served: list[Served] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        served.append(Served(f"http://{host}:{sock.getsockname()[1]}", app))
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, name="qalign-dashboard", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the dashboard server did not start within 30 s")
    try:
        yield served[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@dataclass(frozen=True)
class Served:
    """A running dashboard: its base URL and its application (for its analysis cache)."""

    url: str
    app: web.Application

    @property
    def cache(self) -> AnalysisCache:
        return self.app[CACHE]
