"""Shared HTTP machinery for every backend: settings, sessions, replica choice, retries.

* `HttpSettings` — timeouts, retry/backoff policy, connection limits, API key.
* One `aiohttp.ClientSession` per event loop (and connector configuration) per process, created
  lazily and shared by every client; `close_sessions()` closes them (clients release theirs on
  `close()`, and the last one out closes the session).
* `EndpointPool` — several base URLs of one logical server. Requests pick a healthy replica
  (rendezvous hashing on an `affinity` key, else the least busy one), mark failing replicas down
  for a cool-down, fail over, and retry transient failures with exponential backoff + full jitter
  (tenacity). Counters (`attempts`, `retries`, `failovers`, ...) are exposed for benchmarks.

Generation and scoring requests have no side effects, so re-sending one (with the same seed) is
always safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import json
import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from qalign.clients.errors import (
    ClientError,
    ProtocolError,
    RetryableStatusError,
    ServerRequestError,
    ServerUnavailableError,
)
from qalign.clients.redact import redact_known, register_secret

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth sending again (rate limiting, gateway trouble, overload, engine errors).
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses after which the replica is cooled down (not 429: that replica is alive, just busy).
_MARK_DOWN_STATUSES = frozenset({500, 502, 503, 504})

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,  # refused, reset, ServerDisconnectedError, ClientOSError, ...
    aiohttp.ClientPayloadError,  # body cut short
    TimeoutError,  # asyncio.TimeoutError is TimeoutError on 3.11
)
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (RetryableStatusError, *_TRANSPORT_ERRORS)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSettings:
    """Transport policy shared by every request of a client.

    `max_retries` counts attempts (1 = no retry). `total_timeout=None` derives a total per
    request from the connect and read timeouts (and, for generation, from `max_tokens` via
    `per_token_timeout`: a non-streaming response sends nothing until the whole completion is
    done, so the read timeout has to cover the generation time).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # aiohttp sock_read
    total_timeout: float | None = None
    max_retries: int = 8  # attempts
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # cap on a server's Retry-After
    connection_limit: int = 512  # limit and limit_per_host
    keepalive_timeout: float = 4.0  # below uvicorn's 5 s keep-alive: avoids reuse races
    # Sent as `Authorization: Bearer <key>`; kept out of repr() so logging a settings object
    # cannot leak it, and masked in every client error and log line (a server may echo it).
    api_key: str | None = field(default=None, repr=False)
    cooldown: float = 5.0  # a failing replica is skipped for this long
    malformed_retries: int = 2  # extra attempts after a malformed 2xx body
    per_token_timeout: float = 0.25  # extra read time allowed per requested new token
    health_poll_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 1:
            raise ValueError("max_retries counts attempts and must be >= 1")
        if self.connection_limit < 1:
            raise ValueError("connection_limit must be >= 1")
        register_secret(self.api_key)

    def timeout(self, max_tokens: int | None = None) -> aiohttp.ClientTimeout:
        """The aiohttp timeout of one attempt; `max_tokens` widens it for generation."""
        return _timeout(self, max_tokens)

    def probe_timeout(self) -> aiohttp.ClientTimeout:
        """A short timeout for health checks and metadata reads."""
        read = min(self.read_timeout, 30.0)
        return aiohttp.ClientTimeout(
            total=self.connect_timeout + read, sock_connect=self.connect_timeout, sock_read=read
        )

    def headers(self, json_body: bool = False) -> dict[str, str]:
        """A request's headers (shared: callers must not change the dict)."""
        return _headers(self.api_key, json_body)


# Built once per settings (a request's timeout and headers are the same every time, and making
# them anew was a measurable part of a step's client CPU).
@functools.lru_cache(maxsize=256)
def _timeout(settings: HttpSettings, max_tokens: int | None) -> aiohttp.ClientTimeout:
    read = settings.read_timeout
    if max_tokens is not None and max_tokens > 0:
        read = settings.read_timeout + settings.per_token_timeout * max_tokens
    total = settings.total_timeout
    if total is None:
        total = settings.connect_timeout + read
    return aiohttp.ClientTimeout(total=total, sock_connect=settings.connect_timeout, sock_read=read)


@functools.lru_cache(maxsize=64)
def _headers(api_key: str | None, json_body: bool) -> dict[str, str]:
    out = {"Content-Type": "application/json"} if json_body else {}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


# --------------------------------------------------------------------------------------------
# Errors specific to the transport (all ClientError subclasses)
# --------------------------------------------------------------------------------------------


class TransientStatusError(RetryableStatusError):
    """A retryable HTTP status, with the server's Retry-After (seconds) when it sent one."""

    def __init__(
        self, url: str, status: int, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(url, status, message)
        self.retry_after = retry_after


class ContextLengthError(ClientError, ValueError):
    """prompt length + max_tokens exceeds the server's context window (checked client-side)."""


class TemplateUnavailableError(ClientError, NotImplementedError):
    """The backend cannot apply the chat template; pass prompt ids or a template URL."""


# --------------------------------------------------------------------------------------------
# Sessions: one per (event loop, connector configuration) per process
# --------------------------------------------------------------------------------------------


@dataclass
class _SessionEntry:
    session: aiohttp.ClientSession
    users: weakref.WeakSet[EndpointPool] = field(default_factory=weakref.WeakSet)


_ConnectorKey = tuple[int, float]
_sessions: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[_ConnectorKey, _SessionEntry]
] = weakref.WeakKeyDictionary()


def _connector_key(settings: HttpSettings) -> _ConnectorKey:
    return (settings.connection_limit, settings.keepalive_timeout)


def _session_entry(settings: HttpSettings) -> _SessionEntry:
    loop = asyncio.get_running_loop()
    per_loop = _sessions.setdefault(loop, {})
    key = _connector_key(settings)
    entry = per_loop.get(key)
    if entry is None or entry.session.closed:
        connector = aiohttp.TCPConnector(
            limit=settings.connection_limit,
            limit_per_host=settings.connection_limit,
            keepalive_timeout=settings.keepalive_timeout,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=settings.timeout(),
            json_serialize=_dumps,
            raise_for_status=False,
        )
        entry = _SessionEntry(session)
        per_loop[key] = entry
    return entry


def get_session(settings: HttpSettings | None = None) -> aiohttp.ClientSession:
    """The shared session of the running event loop (created on first use)."""
    return _session_entry(settings or HttpSettings()).session


async def close_sessions() -> None:
    """Close every shared session of the running loop; forget those of closed loops."""
    loop = asyncio.get_running_loop()
    for other in list(_sessions.keys()):
        if other is not loop and other.is_closed():
            _sessions.pop(other, None)
    per_loop = _sessions.pop(loop, {})
    for entry in per_loop.values():
        if not entry.session.closed:
            await entry.session.close()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------------------------
# URLs and error bodies
# --------------------------------------------------------------------------------------------


def normalize_urls(urls: str | Iterable[str]) -> list[str]:
    """Base URLs from a string (comma/space separated) or an iterable; no trailing slashes."""
    items: list[str] = []
    raw = [urls] if isinstance(urls, str) else list(urls)
    for chunk in raw:
        if not isinstance(chunk, str):
            raise TypeError(f"a URL must be a string, not {type(chunk).__name__}")
        items.extend(part for part in chunk.replace(",", " ").split() if part)
    out: list[str] = []
    for item in items:
        url = item.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        if url not in out:
            out.append(url)
    if not out:
        raise ValueError("at least one server URL is required")
    return out


def error_message(body: bytes | str, limit: int = 2000) -> str:
    """The server's own message from an error body (vLLM nested/flat, llama.cpp, SGLang, text).

    API keys in it (a server may echo the request's Authorization header) are masked before it
    is cut to `limit`: a cut through a key could leave a part that no longer looks like it.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return redact_known(text)[:limit] or "(empty body)"
    msg = _message_from(data)
    return redact_known(msg if msg is not None else text)[:limit] or "(empty body)"


def _message_from(data: Any) -> str | None:
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict):  # vLLM >= 0.10.1, llama.cpp, SGLang native
        msg = err.get("message")
        if isinstance(msg, str):
            kind = err.get("type")
            return f"{msg} ({kind})" if isinstance(kind, str) and kind else msg
        return json.dumps(err)
    if isinstance(err, str):
        return err
    msg = data.get("message")
    if isinstance(msg, str):  # vLLM < 0.10.1 / SGLang OpenAI: {"object": "error", "message", ...}
        kind = data.get("type")
        return f"{msg} ({kind})" if isinstance(kind, str) and kind else msg
    detail = data.get("detail")  # FastAPI validation errors
    if detail is not None:
        return detail if isinstance(detail, str) else json.dumps(detail)
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --------------------------------------------------------------------------------------------
# Endpoint pool
# --------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One replica's base URL and health bookkeeping."""

    url: str
    down_until: float = 0.0
    last_failure: float = -math.inf
    consecutive_failures: int = 0
    in_flight: int = 0
    requests: int = 0
    failures: int = 0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


@dataclass(frozen=True)
class Reply(Generic[T]):
    """A parsed 2xx answer and where/how fast it came."""

    value: T
    url: str
    latency_s: float
    status: int


class _Attempts:
    """Per-request retry bookkeeping."""

    def __init__(self, pinned: bool = False) -> None:
        self.pinned = pinned
        self.protocol_errors = 0
        self.last: Endpoint | None = None
        self.failover_now = False
        self.tried: list[str] = []


def _rendezvous_score(key: str, url: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class EndpointPool:
    """Health-aware choice among replicas of one server, with retries and failover."""

    def __init__(
        self, urls: str | Iterable[str], settings: HttpSettings | None = None, name: str = ""
    ) -> None:
        self.settings = settings or HttpSettings()
        self.endpoints = [Endpoint(u) for u in normalize_urls(urls)]
        self.name = name or self.endpoints[0].url
        self.attempts = 0  # HTTP attempts sent
        self.retries = 0  # attempts after the first of a request
        self.failovers = 0  # attempts sent to a different replica than the previous attempt
        self.requests = 0  # logical requests
        self.successes = 0
        self.failures = 0  # logical requests that finally failed
        self._rr = 0
        self._closed = False

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "attempts": self.attempts,
            "retries": self.retries,
            "failovers": self.failovers,
            "successes": self.successes,
            "failures": self.failures,
        }

    def reset_counters(self) -> None:
        self.attempts = self.retries = self.failovers = 0
        self.requests = self.successes = self.failures = 0

    def endpoint(self, url: str) -> Endpoint:
        url = url.rstrip("/")
        for ep in self.endpoints:
            if ep.url == url:
                return ep
        raise KeyError(url)

    def mark_down(self, ep: Endpoint, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        ep.down_until = now + self.settings.cooldown
        ep.last_failure = now
        ep.consecutive_failures += 1
        ep.failures += 1

    def mark_up(self, ep: Endpoint) -> None:
        ep.down_until = 0.0
        ep.consecutive_failures = 0

    def choose(self, affinity: str | None = None) -> Endpoint:
        """A healthy replica: the affinity key's rendezvous winner, else the least busy one.

        When every replica is cooling down, the least recently failed one is tried anyway.
        """
        now = time.monotonic()
        if len(self.endpoints) == 1 and self.endpoints[0].healthy(now):
            return self.endpoints[0]  # the common case, without the bookkeeping below
        healthy = [e for e in self.endpoints if e.healthy(now)]
        if not healthy:
            return min(self.endpoints, key=lambda e: e.last_failure)
        if affinity is not None:
            return max(healthy, key=lambda e: _rendezvous_score(affinity, e.url))
        low = min(e.in_flight for e in healthy)
        candidates = [e for e in healthy if e.in_flight == low]
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    def _other_healthy(self, ep: Endpoint) -> bool:
        now = time.monotonic()
        return any(e is not ep and e.healthy(now) for e in self.endpoints)

    # -- requests ------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        parse: Callable[[Any], T],
        affinity: str | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        endpoint: str | None = None,
        max_attempts: int | None = None,
        as_text: bool = False,
    ) -> Reply[T]:
        """Send a JSON request and parse the 2xx body with `parse` (raise ProtocolError there).

        `endpoint` pins one replica (no failover). Raises ServerRequestError (no retry),
        ServerUnavailableError (after the last attempt) or ProtocolError.
        """
        if self._closed:
            raise ClientError(f"{self.name}: client is closed")
        self.requests += 1
        pinned = self.endpoint(endpoint) if endpoint is not None else None
        state = _Attempts(pinned=pinned is not None)
        attempts = max_attempts or self.settings.max_retries

        async def attempt() -> Reply[T]:
            ep = pinned or self.choose(affinity)
            if state.last is not None:
                self.retries += 1
                if ep is not state.last:
                    self.failovers += 1
            state.last = ep
            state.tried.append(ep.url)
            state.failover_now = False
            reply = await self._attempt(ep, state, method, path, body, parse, timeout, as_text)
            self.successes += 1
            return reply

        try:
            # Almost every request succeeds at once; tenacity's bookkeeping costs about as much
            # CPU as the request itself, so it only takes over after a first retryable failure.
            try:
                return await attempt()
            except BaseException as exc:
                if attempts <= 1 or not self._retryable(exc, state):
                    raise
                await asyncio.sleep(self._delay(exc, state, 1))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(attempts - 1),
                wait=self._wait_for(state),
                retry=retry_if_exception(lambda exc: self._retryable(exc, state)),
                reraise=True,
            )
            async for retry in retrying:
                with retry:
                    return await attempt()
        except ProtocolError:
            self.failures += 1
            raise
        except _RETRYABLE_ERRORS as exc:
            self.failures += 1
            tried = ", ".join(dict.fromkeys(state.tried))
            raise ServerUnavailableError(
                f"{method} {path}: no answer from {tried} after {len(state.tried)} attempt(s);"
                f" last cause: {_describe(exc)}"
            ) from exc
        except BaseException:
            self.failures += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _retryable(self, exc: BaseException, state: _Attempts) -> bool:
        if isinstance(exc, ProtocolError):
            state.protocol_errors += 1
            return state.protocol_errors <= self.settings.malformed_retries
        return isinstance(exc, _RETRYABLE_ERRORS)

    def _delay(self, exc: BaseException | None, state: _Attempts, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt."""
        if isinstance(exc, TransientStatusError) and exc.retry_after is not None:
            return min(exc.retry_after, self.settings.retry_after_max)
        if state.failover_now:
            return 0.0  # another healthy replica is waiting: fail over at once
        # exponential backoff with full jitter
        ceiling = self.settings.backoff_initial * 2 ** (failures - 1)
        return random.uniform(0.0, min(ceiling, self.settings.backoff_max))

    def _wait_for(self, state: _Attempts) -> Callable[[RetryCallState], float]:
        def wait(retry_state: RetryCallState) -> float:
            outcome = retry_state.outcome
            exc = outcome.exception() if outcome is not None else None
            # tenacity counts from the second attempt (the first ran outside it)
            return self._delay(exc, state, retry_state.attempt_number + 1)

        return wait

    async def _attempt(
        self,
        ep: Endpoint,
        state: _Attempts,
        method: str,
        path: str,
        body: Any,
        parse: Callable[[Any], T],
        timeout: aiohttp.ClientTimeout | None,
        as_text: bool,
    ) -> Reply[T]:
        entry = _session_entry(self.settings)
        entry.users.add(self)
        url = ep.url + path
        self.attempts += 1
        ep.requests += 1
        ep.in_flight += 1
        start = time.monotonic()
        try:
            async with entry.session.request(
                method,
                url,
                data=None if body is None else orjson.dumps(body),
                headers=self.settings.headers(json_body=body is not None),
                timeout=timeout or self.settings.timeout(),
            ) as resp:
                raw = await resp.read()
                status = resp.status
                if 200 <= status < 300:
                    value = _decode(url, raw, parse, as_text)
                    self.mark_up(ep)
                    return Reply(value, ep.url, time.monotonic() - start, status)
                message = error_message(raw)
                if status in RETRYABLE_STATUSES:
                    if status in _MARK_DOWN_STATUSES:
                        self.mark_down(ep)
                        state.failover_now = not state.pinned and self._other_healthy(ep)
                    raise TransientStatusError(url, status, message, _retry_after(resp.headers))
                raise ServerRequestError(url, status, message)
        except _TRANSPORT_ERRORS:
            self.mark_down(ep)
            state.failover_now = not state.pinned and self._other_healthy(ep)
            raise
        finally:
            ep.in_flight -= 1

    async def close(self) -> None:
        """Release the shared session; the last client of a loop closes it."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            per_loop = _sessions.get(loop, {})
            for key, entry in list(per_loop.items()):
                entry.users.discard(self)
                if not entry.users and not entry.session.closed:
                    await entry.session.close()
                    per_loop.pop(key, None)

    # -- convenience ---------------------------------------------------------------------

    async def get_json(
        self, path: str, *, endpoint: str | None = None, max_attempts: int | None = None
    ) -> Reply[Any]:
        return await self.request(
            "GET",
            path,
            parse=_identity,
            endpoint=endpoint,
            timeout=self.settings.probe_timeout(),
            max_attempts=max_attempts,
        )

    async def try_get_json(self, path: str, *, endpoint: str | None = None) -> Any | None:
        """GET a metadata path once; None when it is missing, refused or not JSON."""
        try:
            reply = await self.get_json(path, endpoint=endpoint, max_attempts=1)
        except ClientError:
            return None
        return reply.value

    async def wait_healthy(
        self,
        path: str = "/health",
        *,
        timeout: float = 600.0,
        ready: Callable[[int, bytes], bool] | None = None,
    ) -> None:
        """Poll `path` on every replica until it answers 200 (or `ready(status, body)`).

        Connection refused and 503 (model loading) are waited out. If only some replicas are
        ready when `timeout` expires, the others are marked down and startup continues;
        if none is, ServerUnavailableError is raised.
        """
        ok = ready or (lambda status, _body: status == 200)
        deadline = time.monotonic() + timeout
        pending = {ep.url: ep for ep in self.endpoints}
        last: dict[str, str] = {}

        async def probe(ep: Endpoint) -> bool:
            entry = _session_entry(self.settings)
            entry.users.add(self)
            try:
                async with entry.session.get(
                    ep.url + path,
                    headers=self.settings.headers(),
                    timeout=self.settings.probe_timeout(),
                ) as resp:
                    raw = await resp.read()
                    if ok(resp.status, raw):
                        return True
                    last[ep.url] = f"HTTP {resp.status}: {error_message(raw, 300)}"
                    if resp.status in (401, 403, 404):
                        raise ServerRequestError(ep.url + path, resp.status, last[ep.url])
                    return False
            except _TRANSPORT_ERRORS as exc:
                last[ep.url] = _describe(exc)
                return False

        while True:
            results = await asyncio.gather(*(probe(ep) for ep in pending.values()))
            for url, good in zip(list(pending), results, strict=True):
                if good:
                    self.mark_up(pending.pop(url))
            if not pending:
                return
            if time.monotonic() >= deadline:
                break
            delay = min(self.settings.health_poll_interval, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(delay)
        causes = "; ".join(f"{u}: {last.get(u, 'no answer')}" for u in pending)
        if len(pending) == len(self.endpoints):
            raise ServerUnavailableError(
                f"no replica became healthy within {timeout:g} s: {causes}"
            )
        log.warning("%s: some replicas are not healthy, starting without them: %s", path, causes)
        for ep in pending.values():
            self.mark_down(ep)


def _identity(value: Any) -> Any:
    return value


def _decode(url: str, raw: bytes, parse: Callable[[Any], T], as_text: bool) -> T:
    if as_text:
        return parse(raw.decode("utf-8", "replace"))
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # Python's parser also takes NaN/Infinity, which some servers emit for scores
            data = json.loads(raw)
        except ValueError as exc:
            # Masked before the cut (see `error_message`).
            snippet = redact_known(raw.decode("utf-8", "replace"))[:200]
            raise ProtocolError(f"{url}: response is not valid JSON: {snippet!r}") from exc
    try:
        return parse(data)
    except ProtocolError as exc:
        raise ProtocolError(f"{url}: {exc}") from exc
    except ClientError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        text = repr(exc)
        if redact_known(text) == text:
            raise ProtocolError(f"{url}: unexpected response shape ({text})") from exc
        # The cause quotes an API key from the answer: raise the (masked) error outside this
        # handler, so no traceback can show the cause or context.
        shape_error = ProtocolError(f"{url}: unexpected response shape ({text})")
    raise shape_error


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Small shared helpers for the backends
# --------------------------------------------------------------------------------------------


def as_int_list(value: Any, what: str) -> list[int]:
    """A list of non-negative ints or ProtocolError."""
    if not isinstance(value, list):
        raise ProtocolError(f"{what} is not a list: {value!r:.200}")
    out: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ProtocolError(f"{what} contains a non token id: {item!r}")
        out.append(item)
    return out


def check_vocab(ids: Sequence[int], vocab_size: int | None, what: str) -> None:
    """ProtocolError when an id is outside a vocabulary of `vocab_size` tokens (when known)."""
    if vocab_size is None:
        return
    for t in ids:
        if t >= vocab_size:
            raise ProtocolError(
                f"{what} contains token id {t}, outside the vocabulary of {vocab_size} tokens"
            )


def as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} is not a number: {value!r:.200}")
    try:
        return float(value)
    except OverflowError:  # JSON integers are unbounded; a float is not
        # (bits, not digits: str() of a huge int is itself refused past 4300 digits)
        bits = int(value).bit_length()
        raise ProtocolError(f"{what} is an integer of {bits} bits, too large for a float") from None


def first_number(value: Any, what: str) -> float:
    """The first scalar of a (possibly nested) list of numbers."""
    cur = value
    while isinstance(cur, list):
        if not cur:
            raise ProtocolError(f"{what} is empty")
        cur = cur[0]
    return as_float(cur, what)


def require_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not an object: {value!r:.200}")
    return value


def check_ids(prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty")
    return ids


def check_context(
    url_or_name: str, prompt_len: int, max_tokens: int, max_model_len: int | None
) -> None:
    """Raise ContextLengthError when prompt + max_tokens cannot fit the context window."""
    if max_model_len is not None and prompt_len + max_tokens > max_model_len:
        raise ContextLengthError(
            f"{url_or_name}: prompt of {prompt_len} tokens + max_tokens {max_tokens} ="
            f" {prompt_len + max_tokens} exceeds the context window of {max_model_len} tokens"
        )


def logit(p: float, eps: float = 1e-12) -> float:
    """log(p / (1 - p)) with p clamped into [eps, 1 - eps] (NaN stays NaN)."""
    if math.isnan(p):
        return p
    q = min(max(p, eps), 1.0 - eps)
    return math.log(q) - math.log1p(-q)


def truncate_to_budget(
    ids: list[int], logprobs: list[float] | None, max_tokens: int
) -> tuple[list[int], list[float] | None, bool]:
    """Cut an over-long answer to `max_tokens` (its prefix is still an exact sample).

    Returns (ids, logprobs, truncated).
    """
    if len(ids) <= max_tokens:
        return ids, logprobs, False
    return ids[:max_tokens], (logprobs[:max_tokens] if logprobs is not None else None), True
