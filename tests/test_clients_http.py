"""EndpointPool, HttpSettings and sessions over real HTTP (tiny aiohttp servers on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from qalign.clients import (
    ClientError,
    EndpointPool,
    HttpSettings,
    ProtocolError,
    ServerRequestError,
    ServerUnavailableError,
    close_sessions,
    error_message,
    get_session,
    normalize_urls,
)

FAST = HttpSettings(
    connect_timeout=1.0,
    read_timeout=2.0,
    max_retries=4,
    backoff_initial=0.01,
    backoff_max=0.05,
    cooldown=0.5,
    health_poll_interval=0.02,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(autouse=True)
async def _sessions() -> AsyncIterator[None]:
    yield
    await close_sessions()


@contextlib.asynccontextmanager
async def serve(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """Serve `{"METHOD /path": handler}` on 127.0.0.1 (free port); yield the base URL."""
    app = web.Application()
    for key, handler in routes.items():
        method, path = key.split(" ", 1)
        app.router.add_route(method, path, _coroutine(handler))
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def _coroutine(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    return wrapped


def dead_url() -> str:
    """A URL nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def ident(x: Any) -> Any:
    return x


class Script:
    """A handler answering from a list of (status, body, headers) then a default."""

    def __init__(
        self,
        steps: list[tuple[int, Any, dict[str, str]]] | None = None,
        default: tuple[int, Any, dict[str, str]] = (200, {"ok": True}, {}),
        delay_first: float = 0.0,
    ) -> None:
        self.steps = list(steps or [])
        self.default = default
        self.calls = 0
        self.delay_first = delay_first
        self.headers: list[dict[str, str]] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.headers.append(dict(request.headers))
        if self.calls == 1 and self.delay_first:
            await asyncio.sleep(self.delay_first)
        status, body, headers = self.steps.pop(0) if self.steps else self.default
        if isinstance(body, (dict, list)):
            return web.json_response(body, status=status, headers=headers)
        return web.Response(text=str(body), status=status, headers=headers)


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------


async def test_503_then_success_is_retried_and_counted() -> None:
    h = Script([(503, {"error": {"message": "busy"}}, {}), (503, "busy", {})])
    async with serve({"GET /x": h}) as url:
        pool = EndpointPool(url, FAST)
        reply = await pool.request("GET", "/x", parse=ident)
        assert reply.value == {"ok": True}
        assert reply.url == url and reply.status == 200 and reply.latency_s > 0
        assert h.calls == 3
        assert pool.attempts == 3 and pool.retries == 2 and pool.failovers == 0
        assert pool.successes == 1 and pool.failures == 0
        await pool.close()


async def test_read_timeout_then_retry_succeeds() -> None:
    h = Script(delay_first=4.0)  # far above the bound below, so a loaded machine still fits
    settings = HttpSettings(
        connect_timeout=1.0, read_timeout=0.2, max_retries=3, backoff_initial=0.01
    )
    async with serve({"GET /slow": h}) as url:
        pool = EndpointPool(url, settings)
        t0 = time.monotonic()
        reply = await pool.request("GET", "/slow", parse=ident)
        assert reply.value == {"ok": True}
        assert pool.attempts == 2 and pool.retries == 1
        assert time.monotonic() - t0 < 3.0  # the first attempt was cut by sock_read


async def test_400_nested_error_not_retried_and_message_kept() -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 2048 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    h = Script(default=(400, body, {}))
    async with serve({"POST /v1/completions": h}) as url:
        pool = EndpointPool(url, FAST)
        with pytest.raises(ServerRequestError) as info:
            await pool.request("POST", "/v1/completions", {"prompt": [1]}, parse=ident)
        assert "maximum context length is 2048" in str(info.value)
        assert info.value.status == 400
        assert h.calls == 1 and pool.attempts == 1 and pool.retries == 0


async def test_flat_error_envelope_parsed() -> None:
    body = {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    h = Script(default=(404, body, {}))
    async with serve({"POST /v1/completions": h}) as url:
        pool = EndpointPool(url, FAST)
        with pytest.raises(ServerRequestError, match="The model `nope` does not exist"):
            await pool.request("POST", "/v1/completions", {}, parse=ident)
        assert h.calls == 1


@pytest.mark.parametrize("status", [404, 422, 501])
async def test_client_errors_are_not_retried(status: int) -> None:
    h = Script(default=(status, {"error": {"message": f"nope {status}"}}, {}))
    async with serve({"POST /classify": h}) as url:
        pool = EndpointPool(url, FAST)
        with pytest.raises(ServerRequestError, match=f"nope {status}"):
            await pool.request("POST", "/classify", {}, parse=ident)
        assert h.calls == 1


def test_error_message_shapes() -> None:
    assert error_message(b'{"error": {"message": "m1", "type": "T"}}') == "m1 (T)"
    assert error_message(b'{"object": "error", "message": "m2", "type": "X"}') == "m2 (X)"
    llama = b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}'
    assert error_message(llama) == "Loading model (unavailable_error)"
    assert error_message(b'{"error": "plain string"}') == "plain string"
    assert "field required" in error_message(b'{"detail": [{"msg": "field required"}]}')
    assert error_message(b"Internal Server Error") == "Internal Server Error"
    assert error_message(b"") == "(empty body)"


async def test_429_honours_retry_after() -> None:
    h = Script([(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"})])
    async with serve({"GET /x": h}) as url:
        pool = EndpointPool(url, FAST)
        t0 = time.monotonic()
        reply = await pool.request("GET", "/x", parse=ident)
        assert reply.value == {"ok": True}
        assert time.monotonic() - t0 >= 0.28
        assert pool.attempts == 2
        assert pool.endpoints[0].healthy(time.monotonic())  # 429 does not cool a replica down


async def test_malformed_200_retried_then_protocol_error() -> None:
    bad = Script(default=(200, "not json", {}))
    async with serve({"GET /x": bad}) as url:
        pool = EndpointPool(url, FAST)
        with pytest.raises(ProtocolError, match="not valid JSON"):
            await pool.request("GET", "/x", parse=ident)
        assert bad.calls == 1 + FAST.malformed_retries

    flaky = Script([(200, "{truncated", {})])
    async with serve({"GET /x": flaky}) as url:
        pool = EndpointPool(url, FAST)
        assert (await pool.request("GET", "/x", parse=ident)).value == {"ok": True}
        assert flaky.calls == 2


async def test_missing_field_is_protocol_error() -> None:
    h = Script(default=(200, {"unexpected": 1}, {}))

    def parse(data: Any) -> int:
        return int(data["tokens"][0])

    async with serve({"GET /x": h}) as url:
        pool = EndpointPool(url, FAST)
        with pytest.raises(ProtocolError, match="unexpected response shape"):
            await pool.request("GET", "/x", parse=parse)


async def test_unavailable_after_last_attempt_names_urls_and_cause() -> None:
    url = dead_url()
    settings = HttpSettings(max_retries=3, backoff_initial=0.01, backoff_max=0.02, cooldown=0.1)
    pool = EndpointPool(url, settings)
    with pytest.raises(ServerUnavailableError) as info:
        await pool.request("GET", "/health", parse=ident)
    text = str(info.value)
    assert url in text and "3 attempt" in text and "Connect" in text
    assert pool.attempts == 3 and pool.failures == 1


async def test_server_disconnect_is_retried() -> None:
    """A raw server that drops the first connection without answering (keep-alive race)."""
    calls = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await reader.readuntil(b"\r\n\r\n")
        if calls == 1:
            writer.close()
            return
        body = b'{"ok": 1}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = EndpointPool(f"http://127.0.0.1:{port}", FAST)
        # POST: aiohttp itself never re-sends a non-idempotent request
        reply = await pool.request("POST", "/x", {"a": 1}, parse=ident)
        assert reply.value == {"ok": 1} and calls == 2 and pool.retries == 1
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------------------------
# replicas: failover, health, affinity
# --------------------------------------------------------------------------------------------


async def test_failover_when_one_url_refuses_connections() -> None:
    live = Script()
    async with serve({"GET /x": live}) as url:
        dead = dead_url()
        pool = EndpointPool([dead, url], FAST)
        for _ in range(10):
            reply = await pool.request("GET", "/x", parse=ident)
            assert reply.url == url
        assert live.calls == 10
        assert pool.failovers >= 1
        assert not pool.endpoint(dead).healthy(time.monotonic())
        assert pool.endpoint(dead).failures >= 1


async def test_failover_on_503_and_recovery_after_cooldown() -> None:
    bad = Script(default=(503, {"error": {"message": "overloaded"}}, {}))
    good = Script()
    async with serve({"GET /x": bad}) as url_a, serve({"GET /x": good}) as url_b:
        settings = HttpSettings(max_retries=4, backoff_initial=0.01, backoff_max=0.02, cooldown=0.3)
        pool = EndpointPool([url_a, url_b], settings)
        key = next(k for k in (f"chain-{i}" for i in range(100)) if pool.choose(k).url == url_a)
        reply = await pool.request("GET", "/x", parse=ident, affinity=key)
        assert reply.url == url_b
        assert bad.calls == 1 and pool.failovers == 1
        # while A cools down, the key goes straight to B
        for _ in range(3):
            assert (await pool.request("GET", "/x", parse=ident, affinity=key)).url == url_b
        assert bad.calls == 1
        # after the cool-down A is tried again and, healthy now, gets its keys back
        bad.default = (200, {"ok": "a"}, {})
        await asyncio.sleep(0.35)
        reply = await pool.request("GET", "/x", parse=ident, affinity=key)
        assert reply.url == url_a and reply.value == {"ok": "a"}


async def test_all_down_still_tries_least_recently_failed() -> None:
    h = Script([(503, "x", {}), (503, "x", {})])
    async with serve({"GET /x": h}) as url:
        settings = HttpSettings(max_retries=4, backoff_initial=0.01, cooldown=60.0)
        pool = EndpointPool(url, settings)
        reply = await pool.request("GET", "/x", parse=ident)
        assert reply.value == {"ok": True} and h.calls == 3


async def test_affinity_sticky_and_spread() -> None:
    a, b = Script(), Script()
    async with serve({"GET /x": a}) as url_a, serve({"GET /x": b}) as url_b:
        pool = EndpointPool([url_a, url_b], FAST)
        first = (await pool.request("GET", "/x", parse=ident, affinity="chain-7")).url
        for _ in range(49):
            assert (await pool.request("GET", "/x", parse=ident, affinity="chain-7")).url == first
        assert {url_a: a.calls, url_b: b.calls}[first] == 50
        a.calls = b.calls = 0
        for i in range(50):
            await pool.request("GET", "/x", parse=ident, affinity=f"chain-{i}")
        assert a.calls >= 10 and b.calls >= 10 and a.calls + b.calls == 50


def test_rendezvous_moves_few_keys() -> None:
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    three = EndpointPool(urls)
    two = EndpointPool(urls[:2])
    keys = [f"k{i}" for i in range(300)]
    moved = 0
    for k in keys:
        before = three.choose(k).url
        after = two.choose(k).url
        if before != "http://c:1":
            assert after == before  # keys of surviving replicas never move
        else:
            moved += 1
    assert 50 < moved < 150  # only c's share (~1/3) moves


def test_least_busy_choice_without_affinity() -> None:
    pool = EndpointPool(["http://a:1", "http://b:1"])
    pool.endpoints[0].in_flight = 3
    assert all(pool.choose().url == "http://b:1" for _ in range(5))
    pool.endpoints[1].in_flight = 3
    assert {pool.choose().url for _ in range(4)} == {"http://a:1", "http://b:1"}


async def test_pinned_endpoint_has_no_failover() -> None:
    good = Script()
    async with serve({"GET /x": good}) as url:
        dead = dead_url()
        settings = HttpSettings(max_retries=2, backoff_initial=0.01)
        pool = EndpointPool([dead, url], settings)
        with pytest.raises(ServerUnavailableError):
            await pool.request("GET", "/x", parse=ident, endpoint=dead)
        assert good.calls == 0


async def test_wait_healthy_waits_out_loading() -> None:
    loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    h = Script([(503, loading, {})] * 3, default=(200, {"status": "ok"}, {}))
    async with serve({"GET /health": h}) as url:
        pool = EndpointPool(url, FAST)
        await pool.wait_healthy("/health", timeout=5)
        assert h.calls == 4


async def test_wait_healthy_timeout_and_partial() -> None:
    never = Script(default=(503, {"error": {"message": "Loading model"}}, {}))
    ok = Script()
    async with serve({"GET /health": never}) as url_a, serve({"GET /health": ok}) as url_b:
        pool = EndpointPool(url_a, FAST)
        with pytest.raises(ServerUnavailableError, match="Loading model"):
            await pool.wait_healthy("/health", timeout=0.2)
        both = EndpointPool([url_a, url_b], FAST)
        await both.wait_healthy("/health", timeout=0.2)  # proceeds with B only
        assert not both.endpoint(url_a).healthy(time.monotonic())
        assert both.choose().url == url_b


# --------------------------------------------------------------------------------------------
# settings, sessions, URLs
# --------------------------------------------------------------------------------------------


async def test_api_key_sent_as_bearer() -> None:
    h = Script()
    async with serve({"GET /x": h}) as url:
        pool = EndpointPool(url, HttpSettings(api_key="sekret"))
        await pool.request("GET", "/x", parse=ident)
        assert h.headers[0]["Authorization"] == "Bearer sekret"
        pool2 = EndpointPool(url, HttpSettings())
        await pool2.request("GET", "/x", parse=ident)
        assert "Authorization" not in h.headers[1]


async def test_one_session_per_loop_and_close() -> None:
    h = Script()
    async with serve({"GET /x": h}) as url:
        p1, p2 = EndpointPool(url, FAST), EndpointPool(url, FAST)
        await p1.request("GET", "/x", parse=ident)
        await p2.request("GET", "/x", parse=ident)
        session = get_session(FAST)
        assert session is get_session(FAST) and not session.closed
        await p1.close()
        assert not session.closed  # p2 still uses it
        await p2.close()
        assert session.closed  # the last user closed it
        with pytest.raises(ClientError, match="closed"):
            await p1.request("GET", "/x", parse=ident)
        s2 = get_session(FAST)
        assert s2 is not session
        await close_sessions()
        assert s2.closed


def test_session_differs_between_loops() -> None:
    async def grab() -> aiohttp.ClientSession:
        s = get_session(FAST)
        await close_sessions()
        return s

    s1 = asyncio.run(grab())
    s2 = asyncio.run(grab())
    assert s1 is not s2


def test_settings_timeouts() -> None:
    s = HttpSettings(connect_timeout=2, read_timeout=10, per_token_timeout=0.5)
    t = s.timeout()
    assert t.sock_connect == 2 and t.sock_read == 10 and t.total == 12
    g = s.timeout(max_tokens=100)
    assert g.sock_read == 60 and g.total == 62
    assert HttpSettings(total_timeout=5).timeout(1000).total == 5
    with pytest.raises(ValueError):
        HttpSettings(max_retries=0)


def test_normalize_urls() -> None:
    assert normalize_urls("http://a:1/") == ["http://a:1"]
    assert normalize_urls("http://a:1/, b:2 http://a:1") == ["http://a:1", "http://b:2"]
    assert normalize_urls(["http://x/v/", "https://y"]) == ["http://x/v", "https://y"]
    with pytest.raises(ValueError):
        normalize_urls([])
    with pytest.raises(ValueError):
        normalize_urls(" , ")
